"""fp32 checkpoint files run at bf16/fp16 on the CPU without a converted copy of the model.

Casting a whole DiT stored in fp32 to bf16 makes every weight anonymous memory the process owns
(10 GB for the 5B DiT). Instead, each Linear of the transformer blocks (all but ~2% of a DiT's
weights) keeps its fp32 weight memory-mapped as stored and casts it inside its forward, so one
layer's cast is alive at a time. `weight.to(bf16)` per call gives the same values as casting
once, so the outputs are bit-identical to the fully cast model. The rest (patch embedding,
condition embedders, norms, modulation tables, biases, head) is cast as `cast_dit` always did.
Only the blocks' Linears are swapped: the embedders read their Linear's `weight.dtype` to pick
their input's dtype, and the blocks call their Linears only as modules.

The text encoder stored in fp32 simply runs in fp32 from the mapped weights (`text_encoder_dtype`):
it runs once per prompt, and transformers' T5 feed-forward also reads `wo.weight.dtype` to cast
its hidden states, so swapping its Linears would change what it computes.

A variant applied from outside the pure model (wan_rt.eager), on the CPU only: a GPU load moves
the weights to the device anyway. wan_rt.host_memory counts the weights this keeps mapped with
`cast_on_use_key` / `stored_fp32`, so its refusals and dtype choices follow what loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wan_rt.models.dit import cast_dit
from wan_rt.models.single_file import read_file

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cast_on_use_key(key: str, shape: Sequence[int]) -> bool:
    """A stored DiT tensor that a blocks' Linear casts on use: a 2-D `.weight` under `blocks.`
    (the same in diffusers, official and single-file names, whose prefix read_file drops)."""
    return key.startswith("blocks.") and key.endswith(".weight") and len(shape) == 2


def stored_fp32(tensors: dict[str, object], dit: bool) -> bool:
    """Whether the weights a cast-on-use load would keep mapped are stored in fp32: a DiT's
    blocks' Linear weights, or every floating tensor of a text encoder (not fp8, not GGUF)."""
    chosen = [t for k, t in tensors.items()
              if not dit or (isinstance(t, Tensor) and cast_on_use_key(k, t.shape))]
    floating = [t for t in chosen if not isinstance(t, Tensor) or t.is_floating_point()]
    return bool(floating) and all(isinstance(t, Tensor) and t.dtype == torch.float32 for t in floating)


def applies(path: Union[str, Path], dtype: torch.dtype, device: torch.device, dit: bool) -> bool:
    """A CPU run at bf16/fp16 of a component whose file stores those weights in fp32."""
    return torch.device(device).type == "cpu" and dtype in LOW_PRECISION and stored_fp32(read_file(path), dit)


class CastOnUseLinear(nn.Linear):
    """nn.Linear whose weight stays as stored (fp32, memory-mapped) and is cast per forward."""

    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(self.compute_dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cast on use to {self.compute_dtype}"


def cast_dit_on_use(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A DiT loaded as stored (fp32) made to compute at `dtype`: the blocks' Linears cast their
    weight per call, every other parameter is cast once by `cast_dit`'s policy."""
    kept = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and cast_on_use_key(f"{name}.weight", module.weight.shape) \
                and module.weight.dtype == torch.float32:
            module.__class__ = CastOnUseLinear
            module.compute_dtype = dtype
            kept.append(f"{name}.weight")
    return cast_dit(model, dtype, keep_stored=kept)
