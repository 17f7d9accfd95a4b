"""`wan-rt serve` under load: API latency while a job runs, and jobs per minute on the tiny model.

Reference measured in the same run: the same jobs on a warm pipeline called in a loop in this
process (no server, no store; the mp4 is written the same way; with all cores' threads, and with
one thread as each of two workers gets), so "vs pipeline" (the first row) is what the
queue, the store, the worker processes and HTTP cost or gain. Batches of every variant run
interleaved (the order rotates each round; the median counts), the servers staying up. Latency:
GET /v1/videos/{id} on one keep-alive connection, idle and while a long job runs, p50/p99.

--scale adds serving past one machine, as README "Serving at scale" deploys it: one PostgreSQL
queue and one bucket (a private PostgreSQL server and moto's S3 server, bench/local_services.py),
2 services x 1 CPU worker (each pinned to its own cores, as two machines) vs 1 service x 2 CPU
workers, the same jobs; jobs go to the services in turn, as a load balancer sends them.

    python bench/serve.py --json bench/serve.json                          # 1 and 2 CPU workers
    python bench/serve.py --scale --devices cpu,cpu --json bench/serve_scale.json
    python bench/serve.py --jobs 1 --rounds 1 --requests 5 --devices cpu   # smoke test (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved, median, print_table, write_json  # noqa: E402
from local_services import MOTO_ENV, moto_s3, new_database, private_postgres  # noqa: E402

MODEL = "tiny-t2v-A14B"
JOB = {"num_inference_steps": 4, "num_frames": 5, "size": "32x32"}   # the tiny model's defaults, spelled out
LONG_JOB = {"num_inference_steps": 1000, "num_frames": 5, "size": "32x32"}  # the most steps the server takes; deleted once measured


class Api:
    """One keep-alive HTTP connection to a server."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if body else {}
        try:
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()  # the server closed an idle keep-alive connection: open a new one
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {}

    def wait(self, video_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, video = self.call("GET", f"/v1/videos/{video_id}")
            if video["status"] in ("completed", "failed"):
                return video
            time.sleep(0.02)
        raise TimeoutError(f"{video_id} not finished after {timeout} s")


def serve(devices: str, data_dir: Path, extra: tuple[str, ...] = (),
          cpus: set[int] | None = None) -> tuple[subprocess.Popen, int]:
    """cpus: the cores the service and its workers may use (as if it had a machine of its own)."""
    code = "import sys; from wan_rt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", "--devices", devices,
                             "--data-dir", str(data_dir), "--log-level", "warning", "--model", MODEL, *extra],
                            stdout=subprocess.PIPE, text=True, cwd=data_dir.parent, start_new_session=True,
                            env={**os.environ, **MOTO_ENV},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"wan-rt serve did not start: {line!r}")
    port = int(found[1])
    api = Api(port)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, ready = api.call("GET", "/readyz")
        if status == 200 and all(w["ready"] for w in ready["workers"]):
            return proc, port
        time.sleep(0.2)
    raise RuntimeError("workers not ready after 300 s")


def latencies_ms(api: Api, video_id: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        api.call("GET", f"/v1/videos/{video_id}")
        out.append((time.perf_counter() - start) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


class ServerVariant:
    """`wan-rt serve` processes kept up for the whole run; calling it runs one batch of jobs.
    services > 1: that many services on `shared` (store URL, storage URL, S3 endpoint), each
    pinned to its share of the cores; jobs go to them in turn."""

    def __init__(self, devices: str, work: Path, services: int = 1, shared: tuple[str, str, str] | None = None):
        per_service = len(devices.split(","))
        self.workers = services * per_service
        workers = f"{per_service} CPU worker{'s' if per_service > 1 else ''}"
        if shared is None:
            self.name = f"wan-rt serve, {workers}"
        else:
            self.name = f"{services} service{'s' if services > 1 else ''} x {workers}, one PostgreSQL queue + bucket"
        extra = () if shared is None else ("--store", shared[0], "--storage", shared[1], "--s3-endpoint-url", shared[2])
        cores = os.cpu_count() or 1
        share = cores // services if services > 1 else 0
        self.procs, self.apis = [], []
        for i in range(services):
            cpus = set(range(i * share, (i + 1) * share)) if share else None
            proc, port = serve(devices, work / f"data-{services}x{devices.replace(',', '-')}-{i}", extra, cpus)
            self.procs.append(proc)
            self.apis.append(Api(port))
        self.api = self.apis[0]
        self.batch = 0
        warm = self.submit([{"prompt": f"warm-up {i}", **JOB} for i in range(self.workers)])  # every worker's first job
        self.warm_id = warm[0]

    def submit(self, bodies: list[dict]) -> list[str]:
        """POST each body to the services in turn, then wait for all; -> the video ids."""
        posted = [(api, api.call("POST", "/v1/videos", body)[1]["id"])
                  for api, body in zip(self.apis * len(bodies), bodies)]
        results = [api.wait(video_id) for api, video_id in posted]
        assert all(r["status"] == "completed" for r in results), [r["error"] for r in results]
        return [video_id for _, video_id in posted]

    def __call__(self, jobs: int) -> None:
        self.batch += 1
        self.submit([{"prompt": f"job {self.batch}.{i}", "seed": i, **JOB} for i in range(jobs)])

    def latency(self, requests: int) -> dict:
        """GET p50/p99, idle and while a long job runs on a worker."""
        idle = latencies_ms(self.api, self.warm_id, requests)
        _, long = self.api.call("POST", "/v1/videos", {"prompt": "keeps a worker busy", **LONG_JOB})
        while self.api.call("GET", f"/v1/videos/{long['id']}")[1]["status"] != "in_progress":
            time.sleep(0.05)
        busy = latencies_ms(self.api, long["id"], requests)
        self.api.call("DELETE", f"/v1/videos/{long['id']}")
        return {"get_idle_p50_ms": p(idle, 50), "get_idle_p99_ms": p(idle, 99),
                "get_busy_p50_ms": p(busy, 50), "get_busy_p99_ms": p(busy, 99)}

    def stop(self) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=120)


class PipelineVariant:
    """The reference: a warm pipeline in this process, the same jobs one after another, each
    written as an mp4 the same way, on `threads` torch threads (a lone worker gets all cores)."""

    workers = 1
    _pipe = None

    def __init__(self, work: Path, threads: int):
        import wan_rt

        if PipelineVariant._pipe is None:
            PipelineVariant._pipe = wan_rt.WanPipeline.from_pretrained(MODEL, device="cpu")
            PipelineVariant._pipe.set_progress_bar_config(disable=True)
        self.threads = threads
        self.name = f"warm pipeline in-process, {threads} thread{'s' if threads > 1 else ''}"
        self.out = work / "reference.mp4"
        self(1)

    def __call__(self, jobs: int) -> None:
        import torch

        import wan_rt

        torch.set_num_threads(self.threads)
        pipe = PipelineVariant._pipe
        for seed in range(jobs):
            out = pipe("job", height=32, width=32, num_frames=5, num_inference_steps=4,
                       generator=torch.Generator("cpu").manual_seed(seed))
            wan_rt.export_to_video(out.frames[0], self.out, fps=pipe.spec.fps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per batch (tiny default: 32x32x5, 4 steps)")
    parser.add_argument("--rounds", type=int, default=3, help="batches per variant, interleaved; the median counts")
    parser.add_argument("--requests", type=int, default=300, help="GETs per latency measurement")
    parser.add_argument("--devices", action="append", default=None,
                        help="a server variant's --devices (repeatable; default: cpu and cpu,cpu)")
    parser.add_argument("--scale", action="store_true",
                        help="also 2 services x 1 CPU worker vs 1 service x 2 CPU workers on one PostgreSQL queue and "
                             "one bucket (a private PostgreSQL server and moto's S3 server)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wan_rt_bench_serve_"))
    cores = os.cpu_count() or 1
    references = [PipelineVariant(work, t) for t in sorted({cores, 1}, reverse=True)]
    servers: list[ServerVariant] = []
    shared = contextlib.ExitStack()
    try:
        for devices in args.devices or ["cpu", "cpu,cpu"]:
            servers.append(ServerVariant(devices, work))
        if args.scale:
            postgres = shared.enter_context(private_postgres())
            endpoint = shared.enter_context(moto_s3("wan-rt-bench"))
            for services, devices in ((1, "cpu,cpu"), (2, "cpu")):  # a queue and a prefix each: no job crosses over
                name = f"scale{services}"
                store = new_database(postgres, name)
                servers.append(ServerVariant(devices, work, services, (store, f"s3://wan-rt-bench/{name}", endpoint)))
        latency = {s.name: s.latency(args.requests) for s in servers}
        variants = {v.name: v for v in (*references, *servers)}
        seconds = interleaved({name: (lambda v=v: v(args.jobs)) for name, v in variants.items()}, args.rounds,
                              warmup=0)
    finally:
        for server in servers:
            server.stop()
        shared.close()
    rows = []
    for name, variant in variants.items():
        batch = median(seconds[name])
        threads = getattr(variant, "threads", max(1, cores // variant.workers))  # as the pool sets them
        rows.append({"variant": name, "threads_per_worker": threads, "jobs": args.jobs,
                     "rounds": args.rounds, "median_s": batch, "batches_s": seconds[name],
                     "jobs_per_min": 60 * args.jobs / batch, **latency.get(name, {})})
    for row in rows:
        row["vs_pipeline"] = row["jobs_per_min"] / rows[0]["jobs_per_min"]
    print_table(rows, ["variant", "threads_per_worker", "median_s", "jobs_per_min", "vs_pipeline", "get_idle_p50_ms",
                       "get_idle_p99_ms", "get_busy_p50_ms", "get_busy_p99_ms"])
    write_json(args.json, {"environment": environment(), "model": MODEL, "job": JOB, "requests": args.requests,
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
