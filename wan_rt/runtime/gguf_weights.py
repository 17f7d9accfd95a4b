"""GGUF experts in eager: the quantized blocks stay in memory, each Linear dequantizes its own
weight inside its forward (the ComfyUI-GGUF / diffusers GGUFLinear scheme; torch code on the
blocks' device, wan_rt.models.gguf_dequant), so a 14B Q4_K expert holds ~9 GB of weights
instead of 28 GB of bf16.

A variant applied from outside the pure model: `load_gguf_dit` builds wan_rt's WanDiT and swaps
every Linear whose weight the file quantizes for a `GGUFLinear`. Float tensors of the file (norms,
biases, modulation tables, F16/F32 layers) load as usual. Builds do not use this: an engine takes
the weights dequantized to its precision (wan_rt.models.load_dit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wan_rt.models.checkpoint import load_into, meta_parameters
from wan_rt.models.dit import WanDiT, cast_dit
from wan_rt.models.gguf_file import QuantizedWeight
from wan_rt.models.single_file import dit_state


class GGUFLinear(nn.Module):
    """y = x @ dequantize(W)ᵀ + b, W kept as GGUF blocks (a buffer: `.to(device)` moves it)."""

    def __init__(self, weight: QuantizedWeight, has_bias: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype, self.weight_shape = weight.qtype, weight.shape
        self.register_buffer("qweight", weight.data, persistent=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, device="meta"), requires_grad=False) if has_bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return QuantizedWeight(self.qweight, self.qtype, self.weight_shape).dequantize(dtype, self.qweight.device)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


def load_gguf_dit(path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                  device: Union[str, torch.device, None] = None) -> WanDiT:
    """A .gguf DiT expert with its quantized Linear weights dequantized per forward; quantized
    tensors of other layers (the patch-embedding conv) are dequantized once, to `dtype`."""
    config, sd = dit_state(path, dtype or torch.float32, keep_quantized=True)
    with meta_parameters():
        model = WanDiT(config)
    for key in [k for k, v in sd.items() if isinstance(v, QuantizedWeight)]:
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf != "weight" or type(module) is not nn.Linear:
            sd[key] = sd[key].dequantize(dtype or torch.float32)
            continue
        parent, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                GGUFLinear(sd.pop(key), module.bias is not None))
    model = load_into(model, sd, source=path)
    if dtype is not None:
        cast_dit(model, dtype)
    return model.to(device) if device is not None else model
