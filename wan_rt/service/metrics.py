"""Prometheus metrics of a service, every name prefixed `wan_rt_`.

Queue depth and jobs by status are read from the store at scrape time (so they are right for
a queue shared by several services); stage seconds, job seconds and steps per second are
observed here as this service's workers report finished jobs.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wan_rt.service.jobs import JobStore

# Seconds: tiny CPU jobs take ~1 s, real 14B generations tens of minutes.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class ServiceMetrics:
    def __init__(self, store: JobStore, model_id: str, workers_ready: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram("wan_rt_stage_seconds", "Seconds per pipeline stage of finished jobs",
                                       ["stage"], buckets=_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("wan_rt_job_seconds", "Seconds a worker spent on a job, by how it ended",
                                     ["outcome"], buckets=_BUCKETS, registry=self.registry)
        self.steps_per_second = Gauge("wan_rt_steps_per_second", "Denoising steps per second of the last "
                                      "completed job, per worker device", ["device"], registry=self.registry)
        self.worker_restarts = Counter("wan_rt_worker_restarts", "Workers restarted after one of their processes died",
                                       ["device"], registry=self.registry)
        self.registry.register(_StoreCollector(store, model_id, workers_ready))

    def observe_job(self, device: str, report: dict) -> None:
        self.job_seconds.labels(report["outcome"]).observe(report["seconds"])
        if report["outcome"] != "completed":
            return
        for stage, seconds in report["timings"].items():
            self.stage_seconds.labels(stage).observe(seconds)
        if report.get("denoise_s"):
            self.steps_per_second.labels(device).set(report["steps"] / report["denoise_s"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StoreCollector(Collector):
    def __init__(self, store: JobStore, model_id: str, workers_ready: Callable[[], int]):
        self.store, self.model_id, self.workers_ready = store, model_id, workers_ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts()
        depth = GaugeMetricFamily("wan_rt_queue_depth", "Jobs waiting for a worker (all models in the store)")
        depth.add_metric([], counts["queued"])
        yield depth
        jobs = GaugeMetricFamily("wan_rt_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        ready = GaugeMetricFamily("wan_rt_workers_ready", "Workers (processes or worker groups) with a loaded pipeline",
                                  labels=["model"])
        ready.add_metric([self.model_id], self.workers_ready())
        yield ready
