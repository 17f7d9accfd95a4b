"""Starting the processes of a parallel job on this machine, with torch.distributed's own
launcher (the elastic agent behind torchrun), and joining the process group inside each.

`launch(argv, nproc)` runs `python <argv>` nproc times with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT on 127.0.0.1, a c10d rendezvous on a free
port), in safe-path mode (wan_rt/child_process.py: the folder it was started in stays off the
ranks' sys.path), and waits; a failed rank's one-line error comes back through torch elastic's
error file and is printed once. `wan-rt run --ulysses N` calls it with its own command line,
and each process then finds itself inside a job (`plan.from_environment`), exactly as under
`torchrun --nproc-per-node N -m wan_rt.cli run ...`. `init_process_group` picks NCCL on CUDA
and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from datetime import timedelta
from typing import Iterator, Optional, Sequence

import torch

from wan_rt.child_process import child_environment, python_command

# Set in the ranks this launcher starts: a rank records why it failed (record_failure) instead of
# printing it, and the launcher prints the cause once.
REPORTING_ENV = "WAN_RT_LAUNCHER"


def launch(argv: Sequence[str], nproc: int, prog: str = "wan-rt") -> int:
    """Run `python *argv` (argv: -m MODULE, -c CODE or a script, then its arguments) in `nproc`
    processes of one job, with the current folder kept off their sys.path; 0 when all succeed,
    else the exit code of the failure that caused the others, after one line on stderr saying
    which rank failed and why (`prog: error: ...`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    command = python_command(*argv)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"wan_rt-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1)
    env = child_environment()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # share the cores
    env[REPORTING_ENV] = "1"
    # The agent logs each failure with a long report; this function prints the one line instead.
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with _environment(env):  # the agent copies os.environ into every rank it starts
            elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as failed:
        code, line = failure_cause(failed.failures)
        if line:
            print(f"{prog}: error: {line}", file=sys.stderr)
        return code
    finally:
        quiet.setLevel(level)
    return 0


def record_failure(exc: BaseException, user_error: bool) -> bool:
    """In a rank this launcher started: record why it fails (its one-line error, the traceback,
    when) in the file the agent reads back; False elsewhere (the caller prints it itself)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not os.environ.get(REPORTING_ENV) or not path:
        return False
    line = str(exc) if user_error else f"{type(exc).__name__}: {exc}".splitlines()[0]
    now = time.time()
    # torch elastic's own error-file layout (what torchrun reads), plus the precise time.
    data = {"message": {"message": line, "extraInfo": {"py_callstack": traceback.format_exc(),
                                                       "timestamp": str(int(now))}},
            "wan_rt": {"line": line, "time": now, "user_error": user_error}}
    with open(path, "w") as f:
        json.dump(data, f)
    return True


def failure_cause(failures: dict) -> tuple[int, str]:
    """The exit code and the line for a failed launch, from torch elastic's ProcessFailure per
    rank. The rank that failed first is the cause: the others' errors are usually its echo (a
    collective whose peer vanished), and once one rank fails the agent stops the rest with
    SIGTERM. So, in order: a rank that died of another signal (kill -9, a crash: no record of
    its own), the earliest recorded error, a rank's own exit code, a SIGTERM."""
    def died(f) -> bool:
        return f.exitcode < 0 and -f.exitcode != signal.SIGTERM

    def recorded(f) -> Optional[dict]:
        data = f.error_file_data
        return data.get("wan_rt") if isinstance(data, dict) else None

    crashed = sorted(rank for rank, f in failures.items() if died(f))
    if crashed:
        return 1, f"rank {crashed[0]} was killed by {_signal_name(-failures[crashed[0]].exitcode)}"
    records = sorted((info["time"], rank, info) for rank, f in failures.items() if (info := recorded(f)))
    if records:
        _, rank, info = records[0]
        if info["user_error"]:
            return 2, info["line"]
        return 1, f"rank {rank} failed: {info['line']} (WAN_RT_DEBUG=1 shows the tracebacks)"
    exited = sorted(rank for rank, f in failures.items() if f.exitcode > 0)
    rank = exited[0] if exited else min(failures)
    code = failures[rank].exitcode
    if code < 0:
        return 1, f"rank {rank} was killed by {_signal_name(-code)}"
    return code, f"rank {rank} exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ is `env` inside (only the keys that differ are touched), restored after."""
    saved = {key: os.environ.get(key) for key in set(env) | set(os.environ) if os.environ.get(key) != env.get(key)}
    for key in saved:
        if key in env:
            os.environ[key] = env[key]
        else:
            del os.environ[key]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_process_group(device: torch.device, timeout_s: Optional[float] = None) -> None:
    """Join the job this process was launched into (torchrun's environment variables).
    timeout_s: how long a collective may wait for the other ranks before it fails (torch's
    default: 10 min for NCCL, 30 for gloo); a service's worker group sets a shorter one."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
