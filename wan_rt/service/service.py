"""VideoService: the in-process API a Python program embeds (the HTTP server is a thin layer on it).

    with VideoService("tiny-t2v-A14B", devices=["cpu"], data_dir="serve-data") as service:
        job = service.submit(VideoRequest("a fox in the snow", num_frames=5, seed=0))
        for snapshot in service.events(job.id):        # or: async for ... in service.events_async(...)
            print(snapshot.status, snapshot.progress)
        path = service.content_path(job.id)             # the mp4 (service.content(): from a bucket too)

It owns the job store, the worker processes (warm pipelines), the data dir and the storage of
uploads and outputs (the data dir, or an S3 bucket that services on several machines share). Every method is
thread-safe; `wait_async` / `events_async` serve asyncio. Jobs, progress and cancellation live in
the store, so they survive a restart and are shared by services on one PostgreSQL queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import io
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Optional, Sequence, Union

from PIL import Image

from wan_rt.service.jobs import InvalidRequest, Job, JobError, JobNotFound, ModelUnavailable, QueueFull, VideoRequest, new_job_id
from wan_rt.service.metrics import ServiceMetrics
from wan_rt.service.outputs import VARIANTS, JobFiles
from wan_rt.service.served_model import ServedModel, describe
from wan_rt.service.storage import Download, StorageConfig, open_storage
from wan_rt.service.stores import open_store
from wan_rt.service.pool import WorkerPool, worker_groups
from wan_rt.service.workers import WorkerSettings

if TYPE_CHECKING:
    from wan_rt.parallel import ParallelPlan

SOLVERS = ("unipc", "dpm++", "euler")
MAX_SEED = 2**63 - 1
POLL_S = 0.1    # how often wait() and events() look at the store
# A worker group's collectives wait this long for a slow rank (rank 0 also loads and runs the
# text encoder, and writes the outputs while the others wait) before the group counts as hung.
GROUP_TIMEOUT_S = 300.0


class VideoNotReady(RuntimeError):
    """The job has no video (yet, or ever: it failed)."""


class VideoExpired(LookupError):
    """The job's files were removed by the retention setting."""


class DataDirBusy(RuntimeError):
    pass


class VideoService:
    def __init__(self, model: Optional[str] = None, *, engines_dir: Optional[str] = None,
                 devices: Sequence[str] = ("cpu",), data_dir: Union[str, os.PathLike] = "serve-data",
                 store: Optional[str] = None, max_queue: Optional[int] = 64,
                 retention_s: Optional[float] = 24 * 3600.0, max_attempts: int = 3, lease_s: float = 30.0,
                 parallel: Optional["ParallelPlan"] = None, storage: Optional[StorageConfig] = None):
        """model / engines_dir: as WanPipeline.from_pretrained takes them (neither: the embedded
        tiny preset). devices: one worker each ("cpu", "cuda:0", ...). store: None for SQLite in
        `data_dir`, or a postgresql:// URL. max_queue: waiting jobs before submit raises QueueFull.
        retention_s: a completed job's files are removed this long after it finished (None: kept).
        max_attempts: runs of a job whose worker died before it is failed. lease_s: a running job
        whose worker has not renewed it for this long is handed back (workers on other machines).
        parallel: a wan_rt.parallel.ParallelPlan; the devices then make worker groups of its world
        size, each running one job over all its devices (checked here: PlanError, one line). A plan
        without `timeout_s` gets GROUP_TIMEOUT_S: a group's collective that waits longer fails (a
        hung rank) and the group restarts. storage: where uploads and outputs are kept (None: the
        data dir; StorageConfig("s3://bucket/prefix"): a bucket, shared by services on one queue)."""
        if not devices:
            raise ValueError("devices: give at least one (cpu, cuda:0, ...)")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1; got {max_attempts}")
        self.model: ServedModel = describe(model, engines_dir)
        self.devices = list(devices)
        if parallel is not None and parallel.timeout_s is None:
            parallel = dataclasses.replace(parallel, timeout_s=GROUP_TIMEOUT_S)
        self.plan = parallel
        self.groups = worker_groups(self.devices, parallel, self.model)
        self.data_dir = Path(data_dir)
        self.max_queue = max_queue
        self.retention_s = retention_s
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        self._store_url = store or str(self.data_dir / "jobs.sqlite")
        self._exclusive = store is None  # a SQLite store belongs to this service alone
        self._lock_file: Optional[io.TextIOWrapper] = None
        self._pool: Optional[WorkerPool] = None
        self._draining = False
        self.storage = storage or StorageConfig()
        self.files = JobFiles(self.data_dir, open_storage(self.storage, self.data_dir))
        self._unremoved: set[str] = set()   # expired jobs whose files could not be removed (told once)
        self._mean_job_s, self._jobs_seen = 5.0, 0   # seconds per completed job (Retry-After)

    # ---------------------------------------------------------------- life cycle
    def start(self) -> "VideoService":
        if self._exclusive:
            self._lock_data_dir()
        self.files.storage.check()  # StorageError (one line) for a bucket that cannot be reached
        self.store = open_store(self._store_url)
        if self._exclusive:
            # Nothing else runs on this store, so a job still marked running was interrupted by a
            # crash of this service (kill -9, power): it re-runs, within its attempts.
            self.store.release("the service stopped while it ran", self.max_attempts, time.time(),
                               model=self.model.id)
        settings = WorkerSettings(self.model, self._store_url, str(self.data_dir), self.max_attempts,
                                  self.retention_s, plan=self.plan, storage=self.storage)
        self.metrics = ServiceMetrics(self.store, self.model.id, lambda: sum(w["ready"] for w in self.workers()))
        self._pool = WorkerPool(settings, self.groups, self.store, on_job=self._job_finished,
                                on_restart=lambda device, reason: self.metrics.worker_restarts.labels(device).inc(),
                                on_tick=self._housekeeping, on_give_up=self._workers_gave_up)
        self._pool.start()
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
            self.store.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "VideoService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        """At least one worker (or worker group) has its pipeline loaded, and the service is not draining."""
        return self._pool is not None and self._pool.ready and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout: float) -> bool:
        """Before a shutdown: `ready` turns False at once (a load balancer stops sending traffic),
        the workers claim no more jobs, and the jobs they run may finish for up to `timeout` s.
        True when none is left running; False otherwise: close() hands those back to the queue
        without charging them an attempt. The API keeps answering meanwhile."""
        self._draining = True
        return self._pool is None or self._pool.drain(timeout)

    @property
    def load_error(self) -> Optional[str]:
        """Why no worker will ever run a job: every worker failed to load the model a few times
        in a row and is not restarted (wan_rt.service.pool.MAX_LOAD_FAILURES); None otherwise."""
        return self._pool.load_error if self._pool is not None else None

    def _workers_gave_up(self, reason: str) -> None:
        """Jobs waiting for this service's workers fail with the reason instead of waiting forever;
        on a shared store other services may still run them, so they are left queued there."""
        if self._exclusive:
            self.store.fail_queued(self.model.id, JobError("model_load_failed", reason), time.time())

    def workers(self) -> list[dict]:
        return self._pool.status() if self._pool is not None else []

    # ---------------------------------------------------------------- jobs
    def submit(self, request: VideoRequest, image: Union[bytes, Image.Image, None] = None) -> Job:
        """Queue a generation; InvalidRequest (one line) for what this model cannot run,
        QueueFull when max_queue jobs wait."""
        if (reason := self.load_error) is not None:
            raise ModelUnavailable(reason)
        request = self._complete(request)
        picture = _read_image(image) if image is not None else None
        task, name = self.model.spec.task, self.model.spec.name
        if task == "t2v" and picture is not None:
            raise InvalidRequest(f"{name} is a text-to-video model; input_reference needs an i2v or ti2v model",
                                 "input_reference")
        if task == "i2v" and picture is None:
            raise InvalidRequest(f"{name} is an image-to-video model: pass input_reference", "input_reference")
        job = Job(id=new_job_id(), model=self.model.id, request=request, created_at=time.time(),
                  has_image=picture is not None)
        if picture is not None:
            self.files.save_input(job.id, picture)
        try:
            return self.store.add(job, self.max_queue)
        except QueueFull as exc:
            self.files.remove(job.id)
            # A slot frees when a running job ends: about one job's time, spread over the workers.
            exc.retry_after_s = self._mean_job_s / len(self.groups)
            raise
        except BaseException:
            self.files.remove(job.id)
            raise

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def page(self, after: Optional[str] = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        """Jobs in submission order (desc: newest first) after the job `after`; -> (jobs, has_more)."""
        return self.store.page(after, limit, order)

    def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job; it ends `failed` with error code "cancelled" (a running
        one at its next step boundary: wait() for it). A finished job is returned unchanged."""
        return self.store.cancel(job_id, time.time())

    def delete(self, job_id: str) -> Job:
        """Cancel the job if it runs, remove it and its files; its id is unknown afterwards."""
        job = self.store.delete(job_id)
        if (error := self.files.remove_quietly(job_id)) is not None:  # the job is gone; say what is left over
            print(f"wan-rt serve: video {job_id} was deleted but its files were not: {error}", file=sys.stderr)
        return job

    def content_path(self, job_id: str, variant: str = "video") -> Path:
        """The output's file in the data dir (local storage; content() serves any storage)."""
        download = self.content(job_id, variant)
        if download.path is None:
            raise TypeError("the outputs are in a bucket, not in the data dir: use content()")
        return download.path

    def content(self, job_id: str, variant: str = "video") -> Download:
        """How to hand a completed job's output to a client: a local file, a stream from the
        bucket, or a presigned URL (StorageConfig.presign). StorageError when the store fails."""
        if variant not in VARIANTS:
            raise InvalidRequest(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}", "variant")
        job = self.get(job_id)
        if job.status != "completed":
            reason = f": {job.error.message}" if job.error else ""
            raise VideoNotReady(f"video {job_id} is {job.status}, not completed{reason}")
        download = None if job.expired else self.files.storage.download(self.files.output_key(job_id, variant))
        if download is None:
            raise VideoExpired(f"the files of video {job_id} were removed when they expired")
        return download

    # ---------------------------------------------------------------- waiting
    def wait(self, job_id: str, timeout: Optional[float] = None) -> Job:
        """Block until the job is completed or failed; TimeoutError after `timeout` seconds."""
        for job in self.events(job_id, timeout):
            if job.done:
                return job
        raise AssertionError("unreachable: events() ends with a finished job")

    def events(self, job_id: str, timeout: Optional[float] = None) -> Iterator[Job]:
        """The job now, then each time its status or progress changes, ending with it finished."""
        watch = _Watch(job_id, timeout)
        while not watch.finished:
            if watch.changed(job := self.get(job_id)):
                yield job
            if not watch.finished:
                time.sleep(POLL_S)

    async def wait_async(self, job_id: str, timeout: Optional[float] = None) -> Job:
        async for job in self.events_async(job_id, timeout):
            if job.done:
                return job
        raise AssertionError("unreachable: events_async() ends with a finished job")

    async def events_async(self, job_id: str, timeout: Optional[float] = None) -> AsyncIterator[Job]:
        """events() for asyncio: the store is read in a thread, the wait is asyncio's."""
        watch = _Watch(job_id, timeout)
        while not watch.finished:
            if watch.changed(job := await asyncio.to_thread(self.get, job_id)):
                yield job
            if not watch.finished:
                await asyncio.sleep(POLL_S)

    # ---------------------------------------------------------------- internals
    def _complete(self, r: VideoRequest) -> VideoRequest:
        """The request with the model's size, frames and steps and a seed filled in, checked."""
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string", "prompt")
        spec = self.model.spec
        pick = lambda value, default: default if value is None else value  # noqa: E731  (0 is a value)
        height, width = pick(r.height, spec.height), pick(r.width, spec.width)
        frames, steps = pick(r.num_frames, spec.num_frames), pick(r.num_inference_steps, spec.sample_steps)
        try:
            self.model.check(height, width, frames, steps)
        except ValueError as exc:
            raise InvalidRequest(str(exc), getattr(exc, "field", None)) from None
        if r.solver is not None and r.solver not in SOLVERS:
            raise InvalidRequest(f"solver must be one of {', '.join(SOLVERS)}; got {r.solver!r}", "solver")
        for name in ("guidance_scale", "guidance_scale_2", "shift"):
            value = getattr(r, name)
            if value is not None and not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number; got {value}", name)
        if r.shift is not None and r.shift <= 0:
            raise InvalidRequest(f"shift must be > 0; got {r.shift}", "shift")
        if self.plan is not None:  # CFG parallel needs guidance on every expert
            from wan_rt.pipeline import guide_scales

            try:
                self.plan.check_guidance(guide_scales(spec, r.guidance_scale, r.guidance_scale_2))
            except ValueError as exc:
                raise InvalidRequest(str(exc), "guidance_scale") from None
        seed = secrets.randbelow(2**31) if r.seed is None else r.seed
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}; got {seed}", "seed")
        return VideoRequest(r.prompt, r.negative_prompt, height, width, frames, steps, r.guidance_scale,
                            r.guidance_scale_2, seed, r.shift, r.solver)

    def _job_finished(self, device: str, report: dict) -> None:
        self.metrics.observe_job(device, report)
        if report["outcome"] == "completed":  # a running mean that follows recent jobs
            weight = 0.2 if self._jobs_seen else 1.0
            self._mean_job_s += weight * (report["seconds"] - self._mean_job_s)
            self._jobs_seen += 1

    def _housekeeping(self) -> None:
        now = time.time()
        # Jobs of workers that vanished without their service noticing (another machine's crash).
        self.store.release(f"its worker stopped renewing its lease for {self.lease_s:g} s", self.max_attempts, now,
                           model=self.model.id, stale_before=now - self.lease_s)
        for job in self.store.expired_now(now):
            error = self.files.remove_quietly(job.id)
            if error is None:
                self.store.mark_expired(job.id)
            elif job.id not in self._unremoved:  # tried again each tick, told once
                self._unremoved.add(job.id)
                print(f"wan-rt serve: cannot remove the expired files of video {job.id} (will retry): {error}",
                      file=sys.stderr)

    def _lock_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.data_dir / "serve.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise DataDirBusy(f"{self.data_dir} is in use by another wan-rt serve; stop it or pass another "
                              "--data-dir") from None
        self._lock_file = handle


class _Watch:
    """Follows one job for events(): a snapshot is news when its status or progress moved; the
    watch is over once the job is finished, or raises TimeoutError past its deadline."""

    def __init__(self, job_id: str, timeout: Optional[float]):
        self.job_id, self.timeout, self.finished = job_id, timeout, False
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last: Optional[tuple[str, int]] = None

    def changed(self, job: Job) -> bool:
        news = (job.status, job.progress) != self.last
        self.last, self.finished = (job.status, job.progress), job.done
        if not job.done and self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"video {self.job_id} still {job.status} after {self.timeout} s")
        return news


def _read_image(image: Union[bytes, Image.Image]) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; all mean "not an image we can read"
        raise InvalidRequest(f"input_reference is not an image (PNG, JPEG, WebP...): {exc}", "input_reference") \
            from None
