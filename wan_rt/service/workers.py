"""Worker processes: each holds a warm pipeline and runs jobs, alone on one device or as one rank
of a worker group (one job over several devices, wan_rt.parallel). The pool that starts and
restarts them is pool.py.

A worker (a group's rank 0, its leader) claims jobs from the store itself, so workers of several
services (on several machines, with the PostgreSQL store) share one queue. While a job runs, a
thread renews the job's lease every `heartbeat_s` and, once the job was cancelled, deleted or
taken away, has the step callback stop the generation at the next step boundary. The step
callback writes progress.

In a worker group every rank loads its part of the pipeline (`from_pretrained(parallel=plan)`).
The leader claims a job, loads its inputs and broadcasts the pipeline's arguments; every rank
calls the pipeline with them; at every step the ranks agree whether to stop (`comm.any_rank`), so
all stop at the same step. An idle leader broadcasts "nothing" every `poll_s`, so the other ranks
never wait in a collective for long; one that waits longer than the plan's `timeout_s` fails (a
hung rank). A rank whose generation raises cannot tell whether its peers are stuck in a
collective, so it reports the error to the pool and exits; the pool restarts the whole group.

Workers are fresh interpreters, as the spawn start method makes them (no forked CUDA or thread
state), and exit on their own when the service process dies.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Optional

from wan_rt.service.jobs import Job, JobError, JobStore
from wan_rt.service.outputs import JobFiles
from wan_rt.service.served_model import ServedModel
from wan_rt.service.storage import StorageConfig, StorageError, open_storage
from wan_rt.service.stores import open_store

if TYPE_CHECKING:
    from wan_rt.parallel import ParallelPlan

EXIT_RESTART = 75          # a worker asks to be replaced (after CUDA out of memory: a fresh context)
EXIT_GROUP_BROKEN = 76     # a rank's generation failed: its group is restarted (pool.py)


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
    plan: Optional["ParallelPlan"] = None  # what each worker group runs (its size: the plan's world size)
    storage: StorageConfig = StorageConfig()  # where uploads and outputs are kept (default: data_dir)


@dataclass(frozen=True)
class Seat:
    """A worker process's place: its device and its rank in its worker group (world 1: alone).
    Ranks of one group meet at 127.0.0.1:master_port."""

    device: str
    rank: int = 0
    world_size: int = 1
    master_port: int = 0

    @property
    def grouped(self) -> bool:
        return self.world_size > 1

    def agree(self, stop: bool) -> bool:
        """Whether to stop now: in a group, True on every rank when True on any, so all ranks stop
        after the same step (the others would wait forever in the next collective)."""
        if not self.grouped:
            return stop
        from wan_rt.parallel import comm

        return comm.any_rank(stop)

    def share(self, item: Any) -> Any:
        """The leader's `item` on every rank of the group (alone: `item`)."""
        if not self.grouped:
            return item
        from wan_rt.parallel import comm

        return comm.broadcast_object(item)


ALONE = Seat(device="")  # a worker without a group (run_job reads the device from the pipeline)


class _GroupBroken(Exception):
    """A grouped rank's generation raised: the group cannot go on (see the module docstring)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# ----------------------------------------------------------------------------- the worker process
def worker_main(settings: WorkerSettings, seat: Seat, worker_id: str, conn: Connection, threads: int,
                group_loaded: threading.Event, draining: Optional[threading.Event] = None) -> None:
    """Load the pipeline once, then run jobs (lead them, or follow the leader) until stopped.
    group_loaded: set by the pool once every rank of the group has loaded. draining: set by the
    pool when the service drains: the leader claims no more jobs."""
    import torch

    import wan_rt

    if threads:
        torch.set_num_threads(threads)
    store = open_store(settings.store_url) if seat.rank == 0 else None  # only the leader talks to the store
    files = JobFiles(settings.data_dir, open_storage(settings.storage, settings.data_dir))
    served = settings.served
    try:
        if seat.grouped:
            _join_group(seat, settings.plan.timeout_s if settings.plan is not None else None)
        try:
            pipe = wan_rt.WanPipeline.from_pretrained(served.model, backend=served.backend, device=seat.device,
                                                      engines_dir=served.engines_dir,
                                                      parallel=settings.plan if seat.grouped else None)
        except Exception as exc:  # the pool counts failed loads and gives up after a few
            conn.send(("load_failed", _failure(exc, seat.device).message))
            raise
        pipe.set_progress_bar_config(disable=True)
        conn.send(("ready", {}))
        if seat.grouped:
            # Loads take unequal times (rank 0 also loads the text encoder): no rank enters a
            # collective, where that wait would count against the timeout, before all have loaded.
            group_loaded.wait()
        if store is None:
            _follow(pipe, seat)
        else:
            _lead(pipe, store, files, worker_id, settings, seat, conn, draining or threading.Event())
    except Exception as exc:  # noqa: BLE001 - alone, it escapes (the pool restarts the worker)
        if not seat.grouped:
            raise
        _leave_group(conn, seat, exc.error if isinstance(exc, _GroupBroken) else exc)


def _lead(pipe, store: JobStore, files: JobFiles, worker_id: str, settings: WorkerSettings, seat: Seat,
          conn: Connection, draining: threading.Event) -> None:
    """A worker alone, or a group's rank 0: claim jobs and run them. Once `draining` is set it
    finishes the job it runs, tells the pool "drained" and claims nothing more (idling, so the
    other ranks of its group are not left waiting in a collective) until the pool stops it."""
    drained = False
    while True:
        if draining.is_set() and not drained:
            conn.send(("drained", None))
            drained = True
        job = None if drained else store.claim(settings.served.id, worker_id, time.time())
        if job is None:
            seat.share(None)  # the others wait in this broadcast: never longer than poll_s when idle
            time.sleep(settings.poll_s)
            continue
        conn.send(("claimed", job.id))
        report = run_job(pipe, job, store, files, worker_id, settings, seat)
        conn.send(("job", report))
        if report["outcome"] == "out_of_memory":
            os._exit(EXIT_RESTART)


def _join_group(seat: Seat, timeout_s: Optional[float]) -> None:
    """torch.distributed's process group of this worker group, from torchrun's environment
    variables as wan_rt.parallel reads them (set in this process only). LOCAL_RANK names the GPU,
    as under torchrun with every GPU visible (a group may sit on cuda:2,cuda:3)."""
    import torch

    from wan_rt.parallel.launch import init_process_group

    device = torch.device(seat.device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(seat.master_port), RANK=str(seat.rank),
                      WORLD_SIZE=str(seat.world_size),
                      LOCAL_RANK=str(device.index if device.type == "cuda" else seat.rank))
    init_process_group(device, timeout_s)


def _follow(pipe, seat: Seat) -> None:
    """A rank other than the leader: run each generation the leader broadcasts, stop when it stops."""
    from wan_rt.pipeline import GenerationInterrupted

    def on_step(pipe_, step_index: int, timestep, tensors):
        pipe_.interrupt = seat.agree(False)
        return {}

    while True:
        args = seat.share(None)
        if args is None:
            continue
        try:
            _call(pipe, args, on_step)
        except GenerationInterrupted:
            pass


def _leave_group(conn: Connection, seat: Seat, error: BaseException) -> None:
    """Report why this rank's group cannot go on, and exit; the pool restarts the group."""
    failure = _failure(error, seat.device)
    if failure.code == "generation_failed":
        traceback.print_exception(error)
    try:
        conn.send(("broken", (failure.code, failure.message)))
    except OSError:
        pass  # the service is gone
    os._exit(EXIT_GROUP_BROKEN)


def run_job(pipe, job: Job, store: JobStore, files: JobFiles, worker_id: str, settings: WorkerSettings,
            seat: Seat = ALONE) -> dict:
    """Generate one claimed job (as the leader of `seat`'s group) and record how it ended;
    -> a report for the pool's metrics."""
    import torch

    from wan_rt.pipeline import GenerationInterrupted

    start = time.time()
    report: dict[str, Any] = {"job_id": job.id, "timings": {}, "steps": 0}
    lease = _LeaseKeeper(store, job.id, worker_id, settings.heartbeat_s)
    lease.start()
    try:
        out = _generate(pipe, job, store, files, worker_id, seat, lease.unwanted)
        files.write_outputs(job.id, out.frames[0], pipe.spec.fps)
        report.update(timings=out.timings, steps=sum(out.steps_per_stage.values()),
                      denoise_s=sum(out.timings.get(c, 0.0) for c in out.steps_per_stage))
        finished = time.time()
        expires = finished + settings.retention_s if settings.retention_s else None
        report["outcome"] = ("completed" if store.complete(job.id, worker_id, finished, expires, out.timings)
                             else _settle_unowned(store, files, job, worker_id))
    except GenerationInterrupted:
        report["outcome"] = _settle_unowned(store, files, job, worker_id)
    except _GroupBroken:
        raise  # the pool restarts the group and hands the job back with the reason
    except torch.OutOfMemoryError as exc:
        failure = _failure(exc, pipe.device)
        store.release(failure.message, settings.max_attempts, time.time(), code=failure.code, worker_id=worker_id)
        report["outcome"] = "out_of_memory"
    except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the worker goes on
        failure = _failure(exc, pipe.device)
        store.fail(job.id, worker_id, failure, time.time())
        files.remove_quietly(job.id, inputs=False)  # no partial output (a thumbnail before a failed mp4 write)
        report["outcome"] = "failed"
        if failure.code == "generation_failed":
            traceback.print_exc()
    finally:
        lease.stop()
    report["seconds"] = time.time() - start
    return report


def _generate(pipe, job: Job, store: JobStore, files: JobFiles, worker_id: str, seat: Seat,
              unwanted: threading.Event):
    from wan_rt.pipeline import GenerationInterrupted

    args = _pipeline_args(job, files)  # a bad input fails here, on the leader alone: the group goes on
    if not store.heartbeat(job.id, worker_id, time.time()):  # cancelled while it was being claimed
        raise GenerationInterrupted("cancelled before it started")
    seat.share(args)
    reported = [-1]

    def on_step(pipe_, step_index: int, timestep, tensors):
        # Every step is one part and the decode the last one, so 100 means written and done.
        progress = 100 * (step_index + 1) // (pipe_.num_timesteps + 1)
        if progress != reported[0]:
            store.set_progress(job.id, worker_id, progress)
            reported[0] = progress
        pipe_.interrupt = seat.agree(unwanted.is_set())
        return {}

    try:
        return _call(pipe, args, on_step)
    except GenerationInterrupted:
        raise
    except Exception as exc:
        if seat.grouped:
            raise _GroupBroken(exc) from exc
        raise


def _pipeline_args(job: Job, files: JobFiles) -> dict[str, Any]:
    """The pipeline's arguments for a job (picklable: a group's leader broadcasts them)."""
    req = job.request
    assert req.seed is not None, "the service sets every job's seed at submit"
    image = files.load_input(job.id) if job.has_image else None
    return dict(prompt=req.prompt, negative_prompt=req.negative_prompt, image=image, height=req.height,
                width=req.width, num_frames=req.num_frames, num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale, guidance_scale_2=req.guidance_scale_2, shift=req.shift,
                solver=req.solver, seed=req.seed)


def _call(pipe, args: dict[str, Any], on_step):
    import torch

    args = dict(args)
    # The seed drives a CPU generator, as `wan-rt run` does: the same request gives the same video
    # on every device, on every rank of a group and after every restart.
    generator = torch.Generator("cpu").manual_seed(args.pop("seed"))
    return pipe(**args, generator=generator, output_type="np", callback_on_step_end=on_step)


def _failure(exc: BaseException, device) -> JobError:
    """How a failed generation is reported: out of memory (retried), a bad request, or another failure."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return JobError("out_of_memory", f"out of memory on {device}: {_one_line(exc)}")
    if isinstance(exc, StorageError):  # the outputs could not be kept (a bucket that refuses writes)
        return JobError("storage_failed", str(exc))
    return JobError("invalid_request" if isinstance(exc, ValueError) else "generation_failed", _one_line(exc))


def _settle_unowned(store: JobStore, files: JobFiles, job: Job, worker_id: str) -> str:
    """The job stopped being this worker's to finish: a cancel fails it as cancelled, a delete
    leaves nothing behind, a job handed to another worker (lease lost) is left to that one."""
    if store.fail(job.id, worker_id, JobError("cancelled", "cancelled by request"), time.time()):
        files.remove_quietly(job.id, inputs=False)
        return "cancelled"
    if store.get(job.id) is None:
        files.remove_quietly(job.id)
        return "deleted"
    return "lost"


class _LeaseKeeper:
    """Renews the job's lease; sets `unwanted` once the job is no longer wanted. (It does not set
    `pipe.interrupt` itself: in a group, the step callback must decide for every rank at once.)"""

    def __init__(self, store: JobStore, job_id: str, worker_id: str, interval: float):
        self._args = (store, job_id, worker_id, interval)
        self.unwanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-rt-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        store, job_id, worker_id, interval = self._args
        while not self._stop.wait(interval):
            try:
                wanted = store.heartbeat(job_id, worker_id, time.time())
            except Exception:  # noqa: BLE001 - a store hiccup is not a cancel; the lease may lapse
                continue
            if not wanted:
                self.unwanted.set()
                return


# A worker is a fresh interpreter (`python -c BOOT FD`), as the spawn start method makes, but it
# does not re-import the service's __main__ (a script without a main guard would start services
# in its workers). Its settings arrive on stdin, which the service keeps open: end of file means
# the service is gone (even by kill -9) and the worker leaves, so no orphan keeps generating.
# GROUP_LOADED, sent on stdin later, tells a rank that every rank of its group has loaded; DRAIN
# tells a leader to claim no more jobs (the service is draining).
# Its messages go back on the pipe FD. The working directory is dropped from sys.path, so a
# checkout's top-level folders (kernels/) never shadow installed packages.
BOOT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        "from wan_rt.service.workers import worker_process; worker_process(int(sys.argv[1]))")
GROUP_LOADED = b"L"
DRAIN = b"D"


def worker_process(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which stops its workers
    os.set_inheritable(fd, False)
    size = struct.unpack("<Q", _read_exactly(sys.stdin.buffer, 8))[0]
    settings, seat, worker_id, threads = pickle.loads(_read_exactly(sys.stdin.buffer, size))

    group_loaded, draining = threading.Event(), threading.Event()

    def watch_service() -> None:
        while byte := sys.stdin.buffer.read(1):
            if byte == GROUP_LOADED:
                group_loaded.set()
            elif byte == DRAIN:
                draining.set()
        os._exit(1)

    threading.Thread(target=watch_service, name="wan-rt-service-watch", daemon=True).start()
    worker_main(settings, seat, worker_id, Connection(fd, readable=False), threads, group_loaded, draining)


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        os._exit(1)  # the service went away before it finished starting this worker
    return data


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
