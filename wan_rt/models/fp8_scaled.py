"""ComfyUI's "fp8 scaled" files: float8_e4m3fn weights, each with a per-tensor `scale_weight`.

Layout (ComfyUI `comfy/ops.py` scaled_fp8): `<layer>.weight` float8, `<layer>.scale_weight` a
float32 scalar (weight = fp8 value x scale), optionally `<layer>.scale_input`, and an empty tensor
named `scaled_fp8` whose dtype marks the format. Plain fp8 files (`*_fp8_e4m3fn.safetensors`)
have the fp8 weights without scales.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

MARKER = "scaled_fp8"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(sd: Mapping[str, Tensor]) -> bool:
    return MARKER in sd or any(getattr(v, "dtype", None) in FP8_DTYPES for v in sd.values())


def dequantize_fp8(sd: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The state dict with every fp8 weight as fp32 value x scale_weight, cast to `dtype`; the
    marker and the scales dropped; other tensors unchanged."""
    out = {}
    for key, value in sd.items():
        if key == MARKER or key.endswith((".scale_weight", ".scale_input")):
            continue
        if value.dtype in FP8_DTYPES:
            scale = sd.get(key.removesuffix("weight") + "scale_weight") if key.endswith("weight") else None
            value = value.float() * (scale.float() if scale is not None else 1.0)
            value = value.to(dtype)
        out[key] = value
    return out
