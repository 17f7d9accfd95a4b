"""Starting the processes of a parallel job on this machine, with torch.distributed's own
launcher (the elastic agent behind torchrun), and joining the process group inside each.

`launch(argv, nproc)` runs `python <argv>` nproc times with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT on 127.0.0.1, a c10d rendezvous on a free
port) and waits; `wan-rt run --ulysses N` calls it with its own command line, and each process
then finds itself inside a job (`plan.from_environment`), exactly as under
`torchrun --nproc-per-node N -m wan_rt.cli run ...`. `init_process_group` picks NCCL on CUDA
and gloo on the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from datetime import timedelta
from typing import Optional, Sequence

import torch


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run `python *argv` in `nproc` processes of one job; 0 when all succeed, else the exit
    code of the first process that failed (its own error line is on stderr already)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # the ranks share the cores instead of oversubscribing them (theirs only)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"wan_rt-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1)
    # The agent logs each failure with a long report; the failing rank has printed its one line.
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    finally:
        quiet.setLevel(level)
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
    return 0


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
