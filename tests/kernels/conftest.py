"""Kernel-test setup: Triton's CPU interpreter when there is no GPU, Wan RoPE tables (launch
spies: `spy_launches` in tests/conftest.py).

TRITON_INTERPRET must be set before `@triton.jit` runs, i.e. before any wan_rt.kernels kernel
module is imported; this conftest is loaded before the test modules of this directory import
them. On a machine with a CUDA GPU the variable is left alone and the kernels compile for real.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU = torch.cuda.is_available() and not INTERPRETING
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def wan_rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """cos/sin [F·Hp·Wp, head_dim/2] float32, built like Wan2.2 `rope_params` + `rope_apply`.

    The c = head_dim/2 pairs split as [c − 2(c//3), c//3, c//3] over (frame, height, width); axis
    table j rotates by pos · theta^(−2j / D_axis) with D_axis = 2·(pairs of that axis). Tokens are
    flattened row-major over (f, h, w). Angles in float64, as the official code.
    """
    f, h, w = grid
    c = head_dim // 2
    parts = (c - 2 * (c // 3), c // 3, c // 3)
    angles = []
    for n_pos, n_pairs in zip((f, h, w), parts):
        d_axis = 2 * n_pairs
        freqs = 1.0 / theta ** (torch.arange(0, d_axis, 2, dtype=torch.float64) / d_axis)
        angles.append(torch.outer(torch.arange(n_pos, dtype=torch.float64), freqs))
    ang = torch.cat([
        angles[0][:, None, None, :].expand(f, h, w, parts[0]),
        angles[1][None, :, None, :].expand(f, h, w, parts[1]),
        angles[2][None, None, :, :].expand(f, h, w, parts[2]),
    ], dim=-1).reshape(f * h * w, c)
    assert math.isclose(float(ang[-1, 0]), (f - 1) * 1.0)  # frame pair 0 rotates by the frame index
    return ang.cos().float(), ang.sin().float()
