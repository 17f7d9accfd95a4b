"""The few numerical ops that have faster implementations than plain PyTorch, and the two
points where a runtime may split the DiT's token sequence.

Models call these through an `Ops` value instead of hard-coding torch calls, so a runtime can
swap in the Triton kernels (wan_rt.kernels) or sequence parallelism (wan_rt.parallel) from
outside without touching model code. The eager versions here are the reference: pure torch,
real arithmetic only, exportable to ONNX (the token split points are the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as Wan does.

    x: [B, L, H, D]; cos, sin: float32 [L, D/2]. Computed in float32, returned in x's dtype.
    """
    x_f = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    x_even, x_odd = x_f[..., 0], x_f[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1)
    return out.flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked multi-head attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def rope_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Self-attention with 3D RoPE applied to q and k. Shapes as `apply_rope` / `attention`."""
    return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    """norm(x)·(1 + scale) + shift in float32, returned in x's dtype: the norm + modulation before
    a block's self-attention and feed-forward (wan_rt.models.dit.Block).

    x: [B, L, D]; shift, scale: float32 [B, n, D], row i covering the i-th run of L/n tokens
    (n = 1: every token; n = F: one latent frame each); norm: the block's LayerNorm without
    affine (dit.LayerNorm32, float32 out; a fused kernel reads its `eps`). The module itself is
    passed, not its width, so the traced ONNX graph keeps a static normalized shape.
    """
    h = norm(x).unflatten(1, (shift.shape[1], -1))  # [B, n, L/n, D]
    return (h * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2).to(x.dtype)


def all_tokens(hidden: Tensor, e: Tensor, e0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The DiT's token split point, before the blocks: which tokens this forward computes.

    hidden [B, L, D]; e [B, n, D] and e0 [B, n, 6, D], the modulation rows, row i covering the
    i-th run of L/n tokens. Returns the same three for the tokens kept (all of them here); a
    sequence-parallel runtime keeps its own share and re-cuts the rows to match."""
    return hidden, e, e0


def gathered_tokens(hidden: Tensor, length: int) -> Tensor:
    """The DiT's gather point, after the output projection: local tokens [B, L', C] -> all
    `length` tokens [B, length, C] (the identity when nothing was split)."""
    return hidden


@dataclass(frozen=True)
class Ops:
    rope_attention: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    attention: Callable[[Tensor, Tensor, Tensor], Tensor]
    layernorm_modulate: Callable[[Tensor, Tensor, Tensor, torch.nn.LayerNorm], Tensor] = layernorm_modulate
    # Sequence parallelism (wan_rt.parallel.sequence): where tokens are split and gathered.
    # `rope_attention` then receives local q/k/v and the full sequence's RoPE tables.
    split_tokens: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] = all_tokens
    gather_tokens: Callable[[Tensor, int], Tensor] = gathered_tokens


EAGER_OPS = Ops(rope_attention=rope_attention, attention=attention)


def set_ops(model: "torch.nn.Module", ops: Ops) -> None:
    """Point every submodule that calls `self.ops` at `ops` (e.g. wan_rt.kernels' Triton ops)."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
