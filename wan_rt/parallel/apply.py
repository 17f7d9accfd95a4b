"""A parallel plan applied to a pipeline's components (the assembly calls this; the loop never
sees the difference).

Per DiT expert: sequence parallelism swapped into the eager model's ops, then FSDP2 sharding of
its weights, then the CFG wrapper around the component. The text encoder runs on rank 0 and is
broadcast; the eager VAE decode is split by height over the world. Engine (ONNX Runtime,
AOTInductor, TensorRT) DiTs take CFG parallel only: their graphs hold no collectives (README,
"Multi-GPU").
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from wan_rt.config import ModelSpec
from wan_rt.models.dit import WanDiT
from wan_rt.models.vae import WanVAE
from wan_rt.parallel.cfg import CFGParallelDiT
from wan_rt.parallel.plan import ParallelGroups, ParallelPlan
from wan_rt.parallel.sequence import apply_sequence_parallel
from wan_rt.parallel.shard import ShardedDiT, shard_dit
from wan_rt.parallel.text import TextEncoderOnOneRank
from wan_rt.parallel.vae import HeightSplitVAEDecoder
from wan_rt.runtime.component import VAEDecodeGraph
from wan_rt.runtime.graphs import components_of


def local_component_names(spec: ModelSpec, plan: ParallelPlan, rank: int) -> list[str]:
    """The components this rank loads: all of them, but the text encoder on rank 0 only."""
    names = list(components_of(spec))
    if plan.text_encoder_on_one_rank and rank != 0:
        names.remove("text_encoder")
    return names


def parallelize(components: Mapping[str, Any], spec: ModelSpec, groups: ParallelGroups,
                device: torch.device) -> dict:
    """`components` (this rank's, see `local_component_names`) with the plan applied."""
    plan = groups.plan
    out = dict(components)
    modules = {name: getattr(out[name], "module", None) for name in spec.dit_components}  # engines have none
    plan.check_engine_dits([name for name, module in modules.items() if not isinstance(module, WanDiT)])
    for name in spec.dit_components:
        component, module = out[name], modules[name]
        if plan.sequence_degree > 1 or plan.shard_weights:
            assert isinstance(module, WanDiT)
            apply_sequence_parallel(module, groups)
            if plan.shard_weights:
                shard_dit(module, device)
                component = ShardedDiT(component)
        if plan.cfg > 1:
            component = CFGParallelDiT(component, groups)
        out[name] = component
    if plan.text_encoder_on_one_rank:
        out["text_encoder"] = TextEncoderOnOneRank(out.get("text_encoder"), spec.text_encoder.d_model, device)
    decoder = out["vae_decoder"]
    graph = getattr(decoder, "module", None)
    if plan.split_vae and groups.world_size > 1 and isinstance(graph, VAEDecodeGraph):
        assert isinstance(graph.vae, WanVAE)
        out["vae_decoder"] = HeightSplitVAEDecoder(decoder, graph.vae, groups.world, range(groups.world_size),
                                                   groups.rank)
    return out
