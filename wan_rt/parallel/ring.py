"""Ring attention: each rank keeps its queries, key/value blocks go round the ring.

At step j rank r attends to the K/V block of ring chunk r - j while the next block is already
in flight (point-to-point, overlapped with the compute). Blocks are merged exactly with their
log-sum-exp (the online-softmax identity), so the result equals attention over the whole
sequence up to rounding:

    lse = log(e^lse_a + e^lse_b),  out = e^(lse_a - lse)·out_a + e^(lse_b - lse)·out_b

Padding keys (past the true length) are cut off each block by `valid[j]`; a block with none is
skipped. q and k arrive already rotated (RoPE from each chunk's global positions).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from wan_rt.parallel import comm

# (q [B, Lq, H, D], k, v [B, Lk, H, D]) -> (out [B, Lq, H, D] in q's dtype, lse float32 [B, H, Lq])
LseAttention = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def attention_lse_torch(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention and its natural-log log-sum-exp, in float32 PyTorch (any device)."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("blhd,bshd->bhls", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhls,bshd->blhd", torch.exp(s - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def attention_lse_triton(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The same from wan_rt's Triton attention kernel (flash attention, no [Lq, Lk] matrix)."""
    from wan_rt.kernels import attention

    return attention(q, k, v, return_lse=True)


def merge(out: Optional[Tensor], lse: Optional[Tensor], block_out: Tensor, block_lse: Tensor
          ) -> tuple[Tensor, Tensor]:
    """Fold one block's (out, lse) into the running float32 (out, lse)."""
    if out is None or lse is None:
        return block_out.float(), block_lse
    new = torch.logaddexp(lse, block_lse)
    old_w = torch.exp(lse - new).transpose(1, 2)[..., None]      # [B, Lq, H, 1]
    new_w = torch.exp(block_lse - new).transpose(1, 2)[..., None]
    return out * old_w + block_out.float() * new_w, new


def ring_attention(q: Tensor, k: Tensor, v: Tensor, groups, valid: Sequence[int],
                   block_attention: LseAttention) -> Tensor:
    """q, k, v [B, S, H, D] of this rank's ring chunk; valid[j]: real keys in ring chunk j."""
    R = groups.plan.ring
    r = groups.ring_index
    prev, nxt = groups.ring_neighbours()
    kv = torch.stack((k, v))
    out = lse = None
    for step in range(R):
        pending = None
        if step < R - 1:  # send the block on and receive the next one while this one computes
            incoming = torch.empty_like(kv)
            pending = comm.exchange([(kv, nxt)], [(incoming, prev)], "ring_kv")
        n = valid[(r - step) % R]
        if n > 0:
            block_out, block_lse = block_attention(q, kv[0, :, :n], kv[1, :, :n])
            out, lse = merge(out, lse, block_out, block_lse)
        if pending is not None:
            pending.wait()
            kv = incoming
    assert out is not None, "ring chunk 0 always holds keys"
    return out.to(q.dtype)
