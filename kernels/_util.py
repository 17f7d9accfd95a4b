"""Helpers shared by the kernel wrappers: interpreter detection, launch guards, block sizes.

Nothing here imports triton, so `wan_rt.kernels` stays importable without it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when `@triton.jit` decorates a function, i.e. when a kernel
    module is first imported; the tests set it before that (tests/kernels/conftest.py).
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse a launch that cannot work, with a message that names the fix."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "wan_rt.kernels run on a CUDA GPU; for CPU tensors set TRITON_INTERPRET=1 before "
            "wan_rt.kernels' kernel modules are first imported (Triton's interpreter)"
        )


@contextlib.contextmanager
def on_device(t: torch.Tensor) -> Iterator[None]:
    """Launch on t's GPU, not the current one: Triton launches on torch's current device."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device.index):
            yield
    else:
        yield


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
