"""Error measures shared by the parity command, the quality report and the tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_error(actual: Tensor, reference: Tensor) -> float:
    """‖actual − reference‖ / ‖reference‖, in float64."""
    a, r = torch.as_tensor(actual).double(), torch.as_tensor(reference).double()
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(r.shape)}")
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def max_abs_error(actual: Tensor, reference: Tensor) -> float:
    a, r = torch.as_tensor(actual).double(), torch.as_tensor(reference).double()
    return float((a - r).abs().max()) if torch.isfinite(a).all() else math.inf


def psnr(actual: Tensor, reference: Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for signals in [0, peak]."""
    mse = float(((torch.as_tensor(actual).double() - torch.as_tensor(reference).double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
