"""The worker pool (in the service process): the worker processes, alone or in groups, kept up.

The devices ("cpu", "cpu", "cuda:0", ...) are split into worker groups of the parallel plan's
world size (1 without a plan; workers.py runs both). A group runs one job at a time, so several
groups run several jobs at once. A monitor thread restarts a worker that dies (an exception that
escaped, a kill -9, a CUDA out-of-memory) and hands its job back to the queue (bounded
attempts), while the API keeps answering. In a group, a rank that dies or fails takes the whole
group down: the other ranks may be blocked in a collective and cannot go on without it.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from wan_rt.child_process import child_environment, python_command
from wan_rt.service.jobs import JobError, JobStore
from wan_rt.service.served_model import ServedModel
from wan_rt.service.workers import BOOT, DRAIN, GROUP_LOADED, Seat, WorkerSettings

if TYPE_CHECKING:
    from wan_rt.parallel import ParallelPlan

MAX_BACKOFF_S = 30.0       # a worker that dies before it is ready is restarted 1, 2, 4 ... 30 s later
# A worker that fails to load this many times in a row is not restarted again: the model cannot
# load here (too little memory, a broken checkpoint) and another try would end the same way.
MAX_LOAD_FAILURES = 3


def worker_groups(devices: Sequence[str], plan: Optional["ParallelPlan"], served: ServedModel) -> list[list[str]]:
    """`devices` split into worker groups of the plan's world size, the plan checked against the
    served model first; a PlanError (a ValueError, one line) for what cannot run."""
    if plan is None or plan.world_size == 1:
        return [[device] for device in devices]
    from wan_rt.parallel import PlanError
    from wan_rt.pipeline import guide_scales

    plan.check_model(served.spec)
    plan.check_guidance(guide_scales(served.spec, None, None))  # the model's default guidance
    if served.engines_dir is not None:
        plan.check_engine_dits(list(served.spec.dit_components))
    size = plan.world_size
    if len(devices) % size:
        raise PlanError(f"--devices lists {len(devices)} device(s), not a multiple of the worker group size "
                        f"{size} ({plan.describe()})")
    groups = [list(devices[i:i + size]) for i in range(0, len(devices), size)]
    for group in groups:
        named = ",".join(group)
        if len({device.split(":")[0] for device in group}) > 1:
            raise PlanError(f"--devices: a worker group is all cpu or all cuda devices; got {named}")
        if "cuda" in group:
            raise PlanError(f"--devices: name each GPU of a worker group (cuda:0,cuda:1,...); got {named}")
        gpus = [device for device in group if device.startswith("cuda:")]
        if len(set(gpus)) != len(gpus):
            raise PlanError(f"--devices: the worker group {named} uses a GPU twice (one rank per GPU)")
    return groups


@dataclass
class _Rank:
    """One process of a group."""

    device: str
    process: Optional[subprocess.Popen] = None
    conn: Optional[Connection] = None
    ready: bool = False
    failure: Optional[JobError] = None   # what it reported before it left its group
    load_error: Optional[str] = None     # why its pipeline could not load (one line)


@dataclass
class _Group:
    """One worker: a single process, or the ranks of one worker group."""

    index: int
    ranks: list[_Rank] = field(default_factory=list)
    worker_id: str = ""
    running: bool = False   # its processes are up (else it waits for restart_at)
    restarts: int = 0
    restart_at: float = 0.0
    backoff: float = 0.0
    last_exit: Optional[str] = None
    jobs_done: int = 0
    job: Optional[str] = None   # the job it runs now
    drained: bool = False       # it said it claims no more jobs (the pool drains)
    load_failures: int = 0      # consecutive ends before it was ready
    gave_up: Optional[str] = None   # why it is not restarted any more (MAX_LOAD_FAILURES loads failed)

    @property
    def device(self) -> str:
        return ",".join(rank.device for rank in self.ranks)

    @property
    def ready(self) -> bool:
        return self.running and all(rank.ready for rank in self.ranks)

    def who(self, rank: _Rank) -> str:
        if len(self.ranks) == 1:
            return f"the worker on {self.device}"
        return f"rank {self.ranks.index(rank)} of the worker group on {self.device}"


class WorkerPool:
    """One worker per group of devices ([["cpu"], ["cpu"]], [["cuda:0", "cuda:1"]], ...), kept
    alive by a monitor thread; `on_job(device, report)` and `on_restart(device, reason)` feed the
    metrics (device: the group's devices, comma-separated) and `on_tick()` runs about once a
    second (lease reclaim, retention)."""

    def __init__(self, settings: WorkerSettings, groups: Sequence[Sequence[str]], store: JobStore,
                 on_job: Callable[[str, dict], None] = lambda device, report: None,
                 on_restart: Callable[[str, str], None] = lambda device, reason: None,
                 on_tick: Callable[[], None] = lambda: None,
                 on_give_up: Callable[[str], None] = lambda reason: None):
        self.settings = settings
        self.store = store
        self._groups = [_Group(i, [_Rank(device) for device in devices]) for i, devices in enumerate(groups)]
        self._on_job, self._on_restart, self._on_tick = on_job, on_restart, on_tick
        self._on_give_up = on_give_up  # called once when every group has given up
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="wan-rt-workers", daemon=True)
        self._lock = threading.Lock()
        self._node = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        cpu_processes = sum(1 for devices in groups for device in devices if device == "cpu")
        self._cpu_threads = max(1, _usable_cpus() // cpu_processes) if cpu_processes else 0
        self._generation = 0

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        for group in self._groups:
            self._spawn(group)
        self._monitor.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; a job one of them was running goes back to the queue, uncharged."""
        self._stopping.set()
        if self._monitor.is_alive():
            self._monitor.join(timeout)
        for group in self._groups:
            if group.running:
                self._end(group.ranks, timeout)
                self.store.release("the service stopped", self.settings.max_attempts, time.time(),
                                   worker_id=group.worker_id, charge=False)

    def drain(self, timeout: float) -> bool:
        """Workers claim no more jobs and none is restarted; wait up to `timeout` s for the jobs
        they run to end. True once every worker is idle; False at the timeout (stop() then hands
        the jobs still running back to the queue, uncharged)."""
        self._draining.set()
        for group in self._groups:
            if group.running:
                _tell_all(group.ranks[:1], DRAIN)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                # A worker still loading has no job; the flag it will read before claiming stops it.
                if all(g.drained or not g.ready for g in self._groups):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    @property
    def ready(self) -> bool:
        return any(group.ready for group in self._groups)

    @property
    def load_error(self) -> Optional[str]:
        """Why no worker will run: set once every group failed to load MAX_LOAD_FAILURES times."""
        with self._lock:
            reasons = [g.gave_up for g in self._groups]
        return reasons[0] if reasons and all(reasons) else None

    def status(self) -> list[dict]:
        with self._lock:
            return [{"device": g.device, "pid": _pid(g.ranks[0]), "pids": [_pid(r) for r in g.ranks],
                     "ready": g.ready, "job": g.job, "jobs_done": g.jobs_done, "restarts": g.restarts,
                     "last_exit": g.last_exit, "gave_up": g.gave_up}
                    for g in self._groups]

    # ---------------------------------------------------------------- monitor
    def _spawn(self, group: _Group) -> None:
        self._generation += 1
        worker_id = f"{self._node}/{group.device}#{group.index}.{self._generation}"
        world = len(group.ranks)
        port = _free_port() if world > 1 else 0
        started = [self._start_process(Seat(rank.device, i, world, port), worker_id)
                   for i, rank in enumerate(group.ranks)]
        with self._lock:
            for rank, (process, conn) in zip(group.ranks, started):
                rank.process, rank.conn, rank.ready, rank.failure = process, conn, False, None
            group.worker_id, group.running, group.drained = worker_id, True, False

    def _start_process(self, seat: Seat, worker_id: str) -> tuple[subprocess.Popen, Connection]:
        threads = self._cpu_threads if seat.device == "cpu" else 0
        read_fd, write_fd = os.pipe()
        try:
            # Safe-path mode, inherited by the worker's own children: the service's folder
            # (a clone's root) must not shadow installed packages in them.
            process = subprocess.Popen(python_command("-c", BOOT, str(write_fd)), stdin=subprocess.PIPE,
                                       pass_fds=(write_fd,), env=child_environment())
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        payload = pickle.dumps((self.settings, seat, worker_id, threads))
        process.stdin.write(struct.pack("<Q", len(payload)) + payload)
        process.stdin.flush()  # and stays open: the worker's lifeline
        return process, Connection(read_fd, writable=False)

    def _watch(self) -> None:
        next_tick = 0.0
        while not self._stopping.is_set():
            conns = {rank.conn: (group, rank) for group in self._groups for rank in group.ranks
                     if rank.conn is not None}
            for conn in wait(list(conns), timeout=0.25):
                group, rank = conns[conn]  # type: ignore[index]
                if rank.conn is not conn:
                    continue  # its group was taken down a moment ago
                if not self._receive(group, rank) and not self._stopping.is_set():
                    self._died(group, rank)
            now = time.monotonic()
            for group in self._groups:
                if not group.running and group.gave_up is None and now >= group.restart_at \
                        and not self._stopping.is_set() and not self._draining.is_set():
                    self._spawn(group)
            if now >= next_tick:
                next_tick = now + 1.0
                try:
                    self._on_tick()
                except Exception:  # noqa: BLE001 - housekeeping must not stop the monitor
                    traceback.print_exc()

    def _receive(self, group: _Group, rank: _Rank) -> bool:
        """Handle a worker's messages; False once its pipe closed (the process ended)."""
        assert rank.conn is not None
        try:
            while rank.conn.poll():
                kind, payload = rank.conn.recv()
                if kind == "ready":
                    with self._lock:
                        rank.ready = True
                    if group.ready and len(group.ranks) > 1:
                        _tell_all(group.ranks, GROUP_LOADED)
                elif kind == "claimed":
                    group.job = payload
                elif kind == "job":
                    group.jobs_done, group.job = group.jobs_done + 1, None
                    self._on_job(group.device, payload)
                elif kind == "broken":
                    rank.failure = JobError(*payload)
                elif kind == "load_failed":
                    rank.load_error = payload
                elif kind == "drained":
                    with self._lock:
                        group.drained = True
        except (EOFError, OSError):
            return False
        return True

    def _died(self, group: _Group, first: _Rank) -> None:
        """`first` ended: end the rest of its group, hand its job back with the reason, and
        schedule the restart."""
        assert first.process is not None
        try:
            first.process.wait(10)
        except subprocess.TimeoutExpired:  # closed its pipe but lingers: make sure it is gone
            first.process.kill()
            first.process.wait()
        # The cause: the first rank to end without a report of its own (a kill -9, an escaped
        # exception); a failure a rank reported may be the echo of that (a collective whose peer
        # vanished), so it is the cause only when no rank ended unannounced.
        ended = [first]
        for rank in group.ranks:
            if rank is not first and rank.process is not None and rank.process.poll() is not None:
                self._receive(group, rank)
                ended.append(rank)
        cause = next((rank for rank in ended if rank.failure is None), first)
        self._end(group.ranks, 10.0)
        code = cause.process.returncode  # type: ignore[union-attr]
        if cause.failure is not None:
            reason, error_code = f"{group.who(cause)} failed: {cause.failure.message}", cause.failure.code
        elif (load_error := next((r.load_error for r in group.ranks if r.load_error), None)) is not None:
            reason, error_code = f"{group.who(cause)} could not load the model: {load_error}", "model_load_failed"
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            reason, error_code = f"{group.who(cause)} {how}", "worker_crashed"
        self.store.release(reason, self.settings.max_attempts, time.time(), code=error_code,
                           worker_id=group.worker_id)
        was_ready = group.ready
        with self._lock:
            for rank in group.ranks:
                rank.process, rank.conn, rank.ready, rank.failure, rank.load_error = None, None, False, None, None
            group.running, group.job = False, None
            group.last_exit = reason
            # A worker that never got ready (a load that fails) is retried ever more slowly, and
            # not at all after MAX_LOAD_FAILURES tries in a row.
            group.load_failures = 0 if was_ready else group.load_failures + 1
            if group.load_failures >= MAX_LOAD_FAILURES:
                group.gave_up = f"{reason} ({group.load_failures} tries; not restarted again)"
            else:
                group.restarts += 1
                group.backoff = 0.0 if was_ready else min(MAX_BACKOFF_S, max(1.0, 2 * group.backoff))
                group.restart_at = time.monotonic() + group.backoff
            every_group_gave_up = all(g.gave_up for g in self._groups)
        if group.gave_up is None:
            self._on_restart(group.device, reason)
        elif every_group_gave_up:
            self._on_give_up(group.gave_up)

    @staticmethod
    def _end(ranks: Sequence[_Rank], timeout: float) -> None:
        """Stop these processes (terminate, then kill what lingers) and close their pipes."""
        for rank in ranks:
            if rank.process is not None and rank.process.poll() is None:
                rank.process.terminate()
        for rank in ranks:
            if rank.process is None:
                continue
            try:
                rank.process.wait(timeout)
            except subprocess.TimeoutExpired:
                rank.process.kill()
                rank.process.wait(timeout)
            for handle in (rank.conn, rank.process.stdin):
                try:
                    if handle is not None:
                        handle.close()
                except OSError:
                    pass


def _tell_all(ranks: Sequence[_Rank], message: bytes) -> None:
    for rank in ranks:
        try:
            assert rank.process is not None and rank.process.stdin is not None
            rank.process.stdin.write(message)
            rank.process.stdin.flush()
        except OSError:
            pass  # it has just ended: its pipe's end of file tells the monitor


def _pid(rank: _Rank) -> Optional[int]:
    return rank.process.pid if rank.process is not None else None


def _usable_cpus() -> int:
    """The cores this process may run on (a `taskset` or a container's CPU set), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _free_port() -> int:
    """A port for a group's rendezvous (its rank 0 listens there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
