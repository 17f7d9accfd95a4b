"""Worker processes: one per device, each holding a warm pipeline, and the pool that keeps them up.

A worker claims jobs from the store itself, so workers of several services (on several machines,
with the PostgreSQL store) share one queue. While a job runs, a thread renews the job's lease
every `heartbeat_s` and stops the generation at the next step boundary (`pipe.interrupt`) when
the job was cancelled, deleted or taken away. The step callback writes progress.

The pool (in the service process) restarts a worker that dies, an exception that escaped, a
kill -9, a CUDA out-of-memory, and hands its job back to the queue (bounded attempts), while the
API keeps answering. Workers are fresh interpreters, as the spawn start method makes them (no
forked CUDA or thread state), and exit on their own when the service process dies.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional

from wan_rt.service.jobs import Job, JobError, JobStore
from wan_rt.service.outputs import JobFiles
from wan_rt.service.served_model import ServedModel
from wan_rt.service.stores import open_store

EXIT_RESTART = 75          # a worker asks to be replaced (after CUDA out of memory: a fresh context)
MAX_BACKOFF_S = 30.0       # a worker that dies before it is ready is restarted 1, 2, 4 ... 30 s later


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs (picklable: it crosses the spawn)."""

    served: ServedModel
    store_url: str
    data_dir: str
    max_attempts: int = 3
    retention_s: Optional[float] = None   # completed outputs expire this long after completion
    poll_s: float = 0.2                   # an idle worker looks for a job this often
    heartbeat_s: float = 0.5              # lease renewal and cancel check while a job runs


# ----------------------------------------------------------------------------- the worker process
def worker_main(settings: WorkerSettings, device: str, worker_id: str, conn: Connection, threads: int) -> None:
    """Load the pipeline once, then run jobs until the process is stopped."""
    import torch

    import wan_rt

    if threads:
        torch.set_num_threads(threads)
    store = open_store(settings.store_url)
    files = JobFiles(settings.data_dir)
    served = settings.served
    pipe = wan_rt.WanPipeline.from_pretrained(served.model, backend=served.backend, device=device,
                                              engines_dir=served.engines_dir)
    pipe.set_progress_bar_config(disable=True)
    conn.send(("ready", {}))
    while True:
        job = store.claim(served.id, worker_id, time.time())
        if job is None:
            time.sleep(settings.poll_s)
            continue
        conn.send(("claimed", job.id))
        report = run_job(pipe, job, store, files, worker_id, settings)
        conn.send(("job", report))
        if report["outcome"] == "out_of_memory":
            os._exit(EXIT_RESTART)


def run_job(pipe, job: Job, store: JobStore, files: JobFiles, worker_id: str, settings: WorkerSettings) -> dict:
    """Generate one claimed job and record how it ended; -> a report for the pool's metrics."""
    import torch

    from wan_rt.pipeline import GenerationInterrupted

    start = time.time()
    report: dict[str, Any] = {"job_id": job.id, "timings": {}, "steps": 0}
    lease = _LeaseKeeper(store, job.id, worker_id, pipe, settings.heartbeat_s)
    lease.start()
    try:
        out = _generate(pipe, job, store, files, worker_id)
        files.write_outputs(job.id, out.frames[0], pipe.spec.fps)
        report.update(timings=out.timings, steps=sum(out.steps_per_stage.values()),
                      denoise_s=sum(out.timings.get(c, 0.0) for c in out.steps_per_stage))
        finished = time.time()
        expires = finished + settings.retention_s if settings.retention_s else None
        report["outcome"] = ("completed" if store.complete(job.id, worker_id, finished, expires, out.timings)
                             else _settle_unowned(store, files, job, worker_id))
    except GenerationInterrupted:
        report["outcome"] = _settle_unowned(store, files, job, worker_id)
    except torch.OutOfMemoryError as exc:
        store.release(f"out of memory on {pipe.device}: {_one_line(exc)}", settings.max_attempts, time.time(),
                      code="out_of_memory", worker_id=worker_id)
        report["outcome"] = "out_of_memory"
    except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the worker goes on
        code = "invalid_request" if isinstance(exc, ValueError) else "generation_failed"
        files.remove(job.id, inputs=False)  # no partial output (a thumbnail before a failed mp4 write)
        store.fail(job.id, worker_id, JobError(code, _one_line(exc)), time.time())
        report["outcome"] = "failed"
        if code == "generation_failed":
            traceback.print_exc()
    finally:
        lease.stop()
    report["seconds"] = time.time() - start
    return report


def _generate(pipe, job: Job, store: JobStore, files: JobFiles, worker_id: str):
    import torch

    from wan_rt.pipeline import GenerationInterrupted

    req = job.request
    reported = [-1]

    def on_step(pipe_, step_index: int, timestep, tensors):
        # Every step is one part and the decode the last one, so 100 means written and done.
        progress = 100 * (step_index + 1) // (pipe_.num_timesteps + 1)
        if progress != reported[0]:
            store.set_progress(job.id, worker_id, progress)
            reported[0] = progress
        return {}

    if not store.heartbeat(job.id, worker_id, time.time()):  # cancelled while it was being claimed
        raise GenerationInterrupted("cancelled before it started")
    image = str(files.input_image(job.id)) if job.has_image else None
    # The seed drives a CPU generator, as `wan-rt run` does: the same request gives the same video
    # on every device and after every restart.
    assert req.seed is not None, "the service sets every job's seed at submit"
    generator = torch.Generator("cpu").manual_seed(req.seed)
    return pipe(req.prompt, negative_prompt=req.negative_prompt, image=image, height=req.height,
                width=req.width, num_frames=req.num_frames, num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale, guidance_scale_2=req.guidance_scale_2, generator=generator,
                shift=req.shift, solver=req.solver, output_type="np", callback_on_step_end=on_step)


def _settle_unowned(store: JobStore, files: JobFiles, job: Job, worker_id: str) -> str:
    """The job stopped being this worker's to finish: a cancel fails it as cancelled, a delete
    leaves nothing behind, a job handed to another worker (lease lost) is left to that one."""
    if store.fail(job.id, worker_id, JobError("cancelled", "cancelled by request"), time.time()):
        files.remove(job.id, inputs=False)
        return "cancelled"
    if store.get(job.id) is None:
        files.remove(job.id)
        return "deleted"
    return "lost"


class _LeaseKeeper:
    """Renews the job's lease; sets `pipe.interrupt` once the job is no longer wanted."""

    def __init__(self, store: JobStore, job_id: str, worker_id: str, pipe, interval: float):
        self._args = (store, job_id, worker_id, pipe, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-rt-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        store, job_id, worker_id, pipe, interval = self._args
        while not self._stop.wait(interval):
            try:
                wanted = store.heartbeat(job_id, worker_id, time.time())
            except Exception:  # noqa: BLE001 - a store hiccup is not a cancel; the lease may lapse
                continue
            if not wanted:
                pipe.interrupt = True
                return


# A worker is a fresh interpreter (`python -c _BOOT FD`), as the spawn start method makes, but it
# does not re-import the service's __main__ (a script without a main guard would start services
# in its workers). Its settings arrive on stdin, which the service keeps open: end of file means
# the service is gone (even by kill -9) and the worker leaves, so no orphan keeps generating.
# Its messages go back on the pipe FD. The working directory is dropped from sys.path, so a
# checkout's top-level folders (kernels/) never shadow installed packages.
_BOOT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
         "from wan_rt.service.workers import worker_process; worker_process(int(sys.argv[1]))")


def worker_process(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which stops its workers
    os.set_inheritable(fd, False)
    size = struct.unpack("<Q", _read_exactly(sys.stdin.buffer, 8))[0]
    settings, device, worker_id, threads = pickle.loads(_read_exactly(sys.stdin.buffer, size))

    def exit_with_service() -> None:
        sys.stdin.buffer.read()
        os._exit(1)

    threading.Thread(target=exit_with_service, name="wan-rt-service-watch", daemon=True).start()
    worker_main(settings, device, worker_id, Connection(fd, readable=False), threads)


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        os._exit(1)  # the service went away before it finished starting this worker
    return data


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- the pool
@dataclass
class _Slot:
    index: int
    device: str
    process: Optional[subprocess.Popen] = None
    conn: Optional[Connection] = None
    worker_id: str = ""
    ready: bool = False
    restarts: int = 0
    restart_at: float = 0.0
    backoff: float = 0.0
    last_exit: Optional[str] = None
    jobs_done: int = 0
    job: Optional[str] = None   # the job it runs now


class WorkerPool:
    """One worker process per device entry ("cpu", "cpu", "cuda:0", ...), kept alive by a monitor
    thread; `on_job(device, report)` and `on_restart(device, reason)` feed the metrics and
    `on_tick()` runs about once a second (lease reclaim, retention)."""

    def __init__(self, settings: WorkerSettings, devices: list[str], store: JobStore,
                 on_job: Callable[[str, dict], None] = lambda device, report: None,
                 on_restart: Callable[[str, str], None] = lambda device, reason: None,
                 on_tick: Callable[[], None] = lambda: None):
        self.settings = settings
        self.store = store
        self._slots = [_Slot(i, d) for i, d in enumerate(devices)]
        self._on_job, self._on_restart, self._on_tick = on_job, on_restart, on_tick
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="wan-rt-workers", daemon=True)
        self._lock = threading.Lock()
        self._node = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        cpu_workers = sum(1 for d in devices if d == "cpu")
        self._cpu_threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0
        self._generation = 0

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self._monitor.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; a job one of them was running goes back to the queue, uncharged."""
        self._stopping.set()
        if self._monitor.is_alive():
            self._monitor.join(timeout)
        for slot in self._slots:
            if slot.process is not None:
                slot.process.terminate()
        for slot in self._slots:
            if slot.process is None:
                continue
            try:
                slot.process.wait(timeout)
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait(timeout)
            self._close(slot)
            self.store.release("the service stopped", self.settings.max_attempts, time.time(),
                               worker_id=slot.worker_id, charge=False)

    @property
    def ready(self) -> bool:
        return any(slot.ready for slot in self._slots)

    def status(self) -> list[dict]:
        with self._lock:
            return [{"device": s.device, "pid": s.process.pid if s.process is not None else None,
                     "ready": s.ready, "job": s.job, "jobs_done": s.jobs_done, "restarts": s.restarts,
                     "last_exit": s.last_exit}
                    for s in self._slots]

    # ---------------------------------------------------------------- monitor
    def _spawn(self, slot: _Slot) -> None:
        self._generation += 1
        worker_id = f"{self._node}/{slot.device}#{slot.index}.{self._generation}"
        threads = self._cpu_threads if slot.device == "cpu" else 0
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen([sys.executable, "-c", _BOOT, str(write_fd)], stdin=subprocess.PIPE,
                                       pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        payload = pickle.dumps((self.settings, slot.device, worker_id, threads))
        process.stdin.write(struct.pack("<Q", len(payload)) + payload)
        process.stdin.flush()  # and stays open: the worker's lifeline
        with self._lock:
            slot.process, slot.conn, slot.worker_id, slot.ready = process, Connection(read_fd, writable=False), \
                worker_id, False

    def _watch(self) -> None:
        next_tick = 0.0
        while not self._stopping.is_set():
            conns = {s.conn: s for s in self._slots if s.conn is not None}
            for conn in wait(list(conns), timeout=0.25):
                slot = conns[conn]  # type: ignore[index]
                if not self._receive(slot) and not self._stopping.is_set():
                    self._died(slot)
            now = time.monotonic()
            for slot in self._slots:
                if slot.process is None and now >= slot.restart_at and not self._stopping.is_set():
                    self._spawn(slot)
            if now >= next_tick:
                next_tick = now + 1.0
                try:
                    self._on_tick()
                except Exception:  # noqa: BLE001 - housekeeping must not stop the monitor
                    traceback.print_exc()

    def _receive(self, slot: _Slot) -> bool:
        """Handle the worker's messages; False once its pipe closed (the process ended)."""
        assert slot.conn is not None
        try:
            while slot.conn.poll():
                kind, payload = slot.conn.recv()
                if kind == "ready":
                    with self._lock:
                        slot.ready, slot.backoff = True, 0.0
                elif kind == "claimed":
                    slot.job = payload
                elif kind == "job":
                    slot.jobs_done, slot.job = slot.jobs_done + 1, None
                    self._on_job(slot.device, payload)
        except (EOFError, OSError):
            return False
        return True

    def _died(self, slot: _Slot) -> None:
        assert slot.process is not None
        try:
            code = slot.process.wait(10)
        except subprocess.TimeoutExpired:  # closed its pipe but lingers: make sure it is gone
            slot.process.kill()
            code = slot.process.wait()
        reason = (f"the worker on {slot.device} was killed by signal {-code}" if code < 0
                  else f"the worker on {slot.device} exited with code {code}")
        self.store.release(reason, self.settings.max_attempts, time.time(), worker_id=slot.worker_id)
        was_ready = slot.ready
        self._close(slot)
        with self._lock:
            slot.process, slot.conn, slot.ready, slot.job = None, None, False, None
            slot.restarts += 1
            slot.last_exit = reason
            # A worker that never got ready (a load that fails) is retried ever more slowly.
            slot.backoff = 0.0 if was_ready else min(MAX_BACKOFF_S, max(1.0, 2 * slot.backoff))
            slot.restart_at = time.monotonic() + slot.backoff
        self._on_restart(slot.device, reason)

    @staticmethod
    def _close(slot: _Slot) -> None:
        for handle in (slot.conn, slot.process.stdin if slot.process is not None else None):
            try:
                if handle is not None:
                    handle.close()
            except OSError:
                pass
