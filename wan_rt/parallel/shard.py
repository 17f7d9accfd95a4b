"""`--shard-weights`: each DiT expert sharded over the world with FSDP2 (`fully_shard`).

Every transformer block is one FSDP unit: its weights live as 1/world shards and are
all-gathered just before the block runs, then freed (`reshard_after_forward`), so a rank holds
1/world of each expert plus one block at a time (an A14B expert, 28.6 GB bf16, is 3.6 GB a
rank on 8 GPUs, so both experts stay resident on any 24 GB card and the residency manager never
has to swap them). The text path (`encode_text`, each block's cross-attention `text_kv`) is
registered as FSDP forward methods, so the once-per-prompt text K/V gathers its weights too.

All ranks run the same blocks in the same order (CFG halves run the same DiT on other inputs),
which is what FSDP's collectives need. FSDP2 keeps its gathered weights as inference tensors
when the first call runs in inference mode, which is how the components always call the DiT.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn

from wan_rt.models.dit import Block, WanDiT
from wan_rt.parallel.wrap import ComponentWrapper


def shard_dit(dit: WanDiT, device: torch.device) -> None:
    """FSDP2-shard a WanDiT over the whole world, in place (block by block, so the full weights
    never sit on the device at once when the model arrives on the CPU)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def shard(module: nn.Module) -> None:
        # FSDP wants one parameter dtype per unit; the few float32 tables of a bf16 model
        # (KEEP_IN_FP32: norms, modulation tables, the time embedder) stay whole on every rank.
        own = [p for p in module.parameters() if not hasattr(p, "to_local")]
        sizes: Counter[torch.dtype] = Counter()
        for p in own:
            sizes[p.dtype] += p.numel()
        main = sizes.most_common(1)[0][0]
        ignored = {p for p in own if p.dtype != main}
        for p in ignored:
            p.data = p.data.to(device)
        fully_shard(module, mesh=mesh, ignored_params=ignored or None)

    for block in dit.blocks:
        assert isinstance(block, Block)
        shard(block.attn2)  # its own unit: text_kv runs outside block.forward
        register_fsdp_forward_method(block.attn2, "text_kv")
        shard(block)
    shard(dit)
    register_fsdp_forward_method(dit, "encode_text")


def local_nbytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


class ShardedDiT(ComponentWrapper):
    """An eager DiT component whose module is sharded: its residency footprint is the local
    shards, which stay where FSDP put them (load / unload move nothing)."""

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        return self.inner(**inputs)

    @property
    def nbytes(self) -> int:
        return local_nbytes(self.inner.module)

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def stage(self) -> None:
        pass
