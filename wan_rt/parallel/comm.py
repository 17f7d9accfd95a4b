"""Every collective wan_rt.parallel uses, and a ledger of the bytes each one moves.

The DiT's collectives are torch's functional collectives (`_functional_collectives`): they are
ordinary ops to torch.compile (per-block compilation traces through them) and to torch.export.
Point-to-point traffic (the ring, the VAE's halo rows) uses `batch_isend_irecv`.

`TRAFFIC` counts, per collective name, calls and the bytes this rank RECEIVED from other ranks
(what crosses its links): an all-to-all over G ranks receives (G-1)/G of its buffer, an
all-gather (G-1) chunks, a broadcast the tensor on every rank but the source. bench/parallel.py
reads it; outside compiled regions only (a compiled block does not update Python counters).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


@dataclass
class Tally:
    calls: int = 0
    bytes: int = 0


TRAFFIC: dict[str, Tally] = defaultdict(Tally)


def _record(name: str, nbytes: float) -> None:
    if torch.compiler.is_compiling():
        return
    tally = TRAFFIC[name]
    tally.calls += 1
    tally.bytes += int(nbytes)


def reset_traffic() -> None:
    TRAFFIC.clear()


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# torch 2.13 renamed the functional all-gather (same signature); 2.11 has only the old name.
_all_gather_single = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_to_all(x: Tensor, group, name: str) -> Tensor:
    """x [G, ...]: slice i goes to rank i of `group`; returns [G, ...], slice i from rank i."""
    g = group_size(group)
    _record(name, x.numel() * x.element_size() * (g - 1) / g)
    # Waited here, not at first use: the result is needed at once, and no work is left pending.
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, group))


def all_gather(x: Tensor, dim: int, group, name: str) -> Tensor:
    """Concatenate every rank's x (same shapes) along `dim`, in group-rank order."""
    g = group_size(group)
    if g == 1:
        return x
    _record(name, x.numel() * x.element_size() * (g - 1))
    out = funcol.wait_tensor(_all_gather_single(x.movedim(dim, 0).contiguous(), 0, group))
    return out.movedim(0, dim)


def all_gather_uneven(x: Tensor, dim: int, sizes: Sequence[int], group, name: str) -> Tensor:
    """all_gather where rank i holds sizes[i] along `dim` (padded to the largest for the wire)."""
    most = max(sizes)
    pad = most - x.shape[dim]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim)
    full = all_gather(x, dim, group, name)
    parts = full.split(most, dim)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


def broadcast(x: Optional[Tensor], src: int, group, name: str, *, shape=None, dtype=None,
              device=None) -> Tensor:
    """`x` on the source rank (global rank `src`), a tensor of `shape`/`dtype` everywhere."""
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=device)
    else:
        x = x.contiguous()
    if dist.get_rank() != src:
        _record(name, x.numel() * x.element_size())
    dist.broadcast(x, src, group=group)
    return x


def broadcast_shape(shape: Optional[Sequence[int]], ndim: int, src: int, group) -> list[int]:
    """A tensor shape known on `src` only, for every rank (the receive buffer's)."""
    t = torch.tensor(list(shape) if shape is not None else [0] * ndim, dtype=torch.int64)
    dist.broadcast(t, src, group=group)
    return t.tolist()


class Pending:
    """Point-to-point transfers in flight; `wait()` before reading the receive buffers."""

    def __init__(self, works: list, tensors: list[Tensor]):
        self._works, self._tensors = works, tensors  # the tensors stay alive until the wait

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._tensors = [], []


def exchange(sends: Sequence[tuple[Tensor, int]], recvs: Sequence[tuple[Tensor, int]], name: str) -> Pending:
    """Post point-to-point sends (tensor, global rank) and receives into given buffers; the
    caller overlaps compute with the transfer and waits on the result."""
    sends = [(t.contiguous(), peer) for t, peer in sends]
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    for t, _ in recvs:
        _record(name, t.numel() * t.element_size())
    works = dist.batch_isend_irecv(ops) if ops else []
    return Pending(works, [t for t, _ in [*sends, *recvs]])


def broadcast_object(obj, src: int = 0, group=None):
    """A picklable object (e.g. one request's pipeline arguments) from rank `src` to every rank:
    how a service with a worker group hands rank 0's job to the others before all call the pipeline."""
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is True on any: a cancel seen by one rank (the one a
    service talks to) must stop all of them at the same step, or the others would wait forever
    in the next collective. Call it from the step callback on every rank."""
    # NCCL reduces CUDA tensors only (on the device init_process_group made current).
    device = "cuda" if dist.get_backend(group) == dist.Backend.NCCL else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
