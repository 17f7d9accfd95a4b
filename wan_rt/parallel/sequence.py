"""DiT sequence parallelism, swapped into the model's ops from outside (dit.py stays pure).

The DiT's token sequence [B, L, D] is cut into R·U equal chunks (zero-padded at the end to a
multiple), one per rank of a CFG half (`ParallelGroups.sequence_index`). Everything in a block
but self-attention is per token, so it runs on the local chunk unchanged: the modulation rows
(one per timestep run: TI2V's per-frame timestep) are re-cut to the chunk's runs, the text
cross-attention uses the full text K/V locally. Self-attention (`Ops.rope_attention`):

* Ulysses (U > 1): one all-to-all turns [B, L/U, H, Dh] q/k/v into [B, L, H/U, Dh] (all tokens,
  a share of the heads); the model's own attention op (eager, Triton, int8) runs on the
  unpadded sequence with the full RoPE tables, so padded keys never take part; a second
  all-to-all turns the output back.
* Ring (R > 1, ring.py): after the Ulysses all-to-all each rank holds ring chunk r; q and k are
  rotated with the RoPE rows of the chunk's global positions and K/V blocks go round the ring,
  merged by their log-sum-exp; keys past L are cut off.

After the output projection the chunks are all-gathered, so every rank returns the full
noise prediction (the denoise loop and the scheduler run identically everywhere).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from wan_rt.models.dit import WanDiT
from wan_rt.models.ops import Ops, apply_rope, set_ops
from wan_rt.parallel import comm
from wan_rt.parallel.plan import ParallelGroups
from wan_rt.parallel.ring import LseAttention, attention_lse_torch, attention_lse_triton, ring_attention


def chunk_size(length: int, parts: int) -> int:
    """Tokens per rank: L padded up to a multiple of `parts`, divided."""
    return -(-length // parts)


def run_rows(length: int, rows: int, start: int, size: int) -> Tensor:
    """Modulation rows for tokens [start, start + size) when `rows` rows cover `length` tokens
    in equal runs (row i: tokens [i·L/rows, (i+1)·L/rows)). Returns the row index of each run of
    g = gcd(L/rows, size, start) tokens, so that the chunk's rows are again equal runs; padding
    tokens past L take the last row (their values are dropped)."""
    per_row = length // rows
    g = math.gcd(per_row, math.gcd(size, start))
    return torch.tensor([min((start + k * g) // per_row, rows - 1) for k in range(size // g)])


class SequenceParallel:
    """The three ops a sequence-parallel DiT swaps in (see the module docstring)."""

    def __init__(self, groups: ParallelGroups, attention: Callable[..., Tensor], lse_attention: LseAttention):
        self.groups = groups
        self.parts = groups.plan.sequence_degree
        self.ulysses, self.ring = groups.plan.ulysses, groups.plan.ring
        self.inner = attention          # the model's own self-attention op (eager, Triton, int8)
        self.lse_attention = lse_attention

    # ------------------------------------------------------------------ split and gather
    def split_tokens(self, hidden: Tensor, e: Tensor, e0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        length = hidden.shape[1]
        size = chunk_size(length, self.parts)
        start = self.groups.sequence_index * size
        local = hidden[:, start:start + size]
        if local.shape[1] < size:  # the last chunks hold the padding
            local = torch.cat([local, local.new_zeros(local.shape[0], size - local.shape[1], local.shape[2])], 1)
        if e.shape[1] > 1:
            rows = run_rows(length, e.shape[1], start, size).to(e.device)
            e, e0 = e.index_select(1, rows), e0.index_select(1, rows)
        return local, e, e0

    def gather_tokens(self, hidden: Tensor, length: int) -> Tensor:
        return comm.all_gather(hidden, 1, self.groups.sequence, "sequence_gather")[:, :length]

    # ------------------------------------------------------------------ self-attention
    def rope_attention(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        length = cos.shape[0]
        if self.ulysses > 1:
            q, k, v = heads_to_sequence(torch.stack((q, k, v)), self.ulysses, self.groups.ulysses).unbind(0)
        if self.ring == 1:  # all tokens here: the model's op, on the unpadded sequence
            out = self.inner(q[:, :length], k[:, :length], v[:, :length], cos, sin)
            if q.shape[1] > length:  # padding rows back, so the all-to-all splits evenly
                out = torch.cat([out, out.new_zeros(out.shape[0], q.shape[1] - length, *out.shape[2:])], 1)
        else:
            out = self._ring(q, k, v, cos, sin, length)
        if self.ulysses > 1:
            out = sequence_to_heads(out, self.ulysses, self.groups.ulysses)
        return out

    def _ring(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, length: int) -> Tensor:
        size = q.shape[1]  # one ring chunk (U local chunks after the all-to-all)
        start = self.groups.ring_index * size
        pad = max(0, start + size - length)
        cos = torch.cat([cos[start:start + size], cos.new_ones(pad, cos.shape[1])])[:size]
        sin = torch.cat([sin[start:start + size], sin.new_zeros(pad, sin.shape[1])])[:size]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        valid = [max(0, min(size, length - j * size)) for j in range(self.ring)]
        return ring_attention(q, k, v, self.groups, valid, self.lse_attention)


def heads_to_sequence(x: Tensor, degree: int, group) -> Tensor:
    """[..., B, S, H, Dh] local tokens, all heads -> [..., B, degree·S, H/degree, Dh]: every
    rank's tokens for this rank's share of the heads (Ulysses' first all-to-all)."""
    *lead, S, H, D = x.shape
    n = len(lead)
    send = x.reshape(*lead, S, degree, H // degree, D).movedim(n + 1, 0)      # [U, ..., S, h, D]
    recv = comm.all_to_all(send, group, "ulysses_qkv")                         # [U (source), ..., S, h, D]
    return recv.movedim(0, n).reshape(*lead, degree * S, H // degree, D)


def sequence_to_heads(x: Tensor, degree: int, group) -> Tensor:
    """Inverse of `heads_to_sequence` for the attention output [B, U·S, h, Dh] -> [B, S, U·h, Dh]."""
    B, US, h, D = x.shape
    send = x.reshape(B, degree, US // degree, h, D).movedim(1, 0)              # [U (dest), B, S, h, D]
    recv = comm.all_to_all(send, group, "ulysses_out")                         # [U (head group), B, S, h, D]
    return recv.movedim(0, 2).reshape(B, US // degree, degree * h, D)


def _uses_triton(fn: Callable) -> bool:
    inner = getattr(fn, "func", fn)  # functools.partial (the int8 variant)
    return getattr(inner, "__module__", "").startswith("wan_rt.kernels")


def apply_sequence_parallel(dit: WanDiT, groups: ParallelGroups) -> None:
    """Swap sequence parallelism into a WanDiT, in place, around whatever ops it has now (apply
    it after kernels or the fast variant). Ring blocks use the Triton kernel's log-sum-exp when
    the model runs the Triton kernels, else a PyTorch one."""
    if groups.plan.sequence_degree == 1:
        return
    current: Ops = dit.ops
    lse = attention_lse_triton if _uses_triton(current.rope_attention) else attention_lse_torch
    sp = SequenceParallel(groups, current.rope_attention, lse)
    set_ops(dit, dataclasses.replace(current, rope_attention=sp.rope_attention, split_tokens=sp.split_tokens,
                                     gather_tokens=sp.gather_tokens))
