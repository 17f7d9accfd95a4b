"""Assembly: a checkpoint (path or preset) or an engines dir -> a ready pipeline.

`WanPipeline` is the public class: the denoise loop (`wan_rt.pipeline.Pipeline`, which loads
nothing) plus `from_pretrained`, which builds its components here, eager from the checkpoint or
from the engines `wan-rt build` wrote, rebuilding stale engines when asked to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from wan_rt.build import build_engines
from wan_rt.eager import build_eager_components, use_triton_kernels
from wan_rt.models.text_encoder import load_tokenizer
from wan_rt.parallel import ParallelPlan, local_component_names, parallelize
from wan_rt.parallel.plan import local_device
from wan_rt.pipeline import Pipeline
from wan_rt.precision import component_dtype
from wan_rt.resolve import ResolvedCheckpoint, resolve_checkpoint
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engines import check_engines_model, load_engine_components
from wan_rt.runtime.engines_dir import build_size, is_stale, read_index
from wan_rt.runtime.graphs import components_of

BACKEND_CHOICES = ("eager", "ort", "aoti", "trt")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_components(model: Optional[str], *, backend: Optional[str] = None, engines_dir: Optional[str] = None,
                    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                    backend_for: Optional[Mapping[str, str]] = None, rebuild: bool = False,
                    kernels: str = "auto", parallel: Optional[ParallelPlan] = None,
                    ) -> tuple[ResolvedCheckpoint, dict, str]:
    """-> (resolved checkpoint, components, a few words on what runs them).

    With `engines_dir` the components are its engines (backend None: the engines' own; "eager":
    the eager model of the engines' checkpoint), `model` None meaning the model they were built
    from; `backend_for` pins components to "eager". Without it, everything is eager. `parallel`:
    this rank's part of a multi-process plan (wan_rt.parallel), inside an initialized group."""
    dev = device or (default_device() if parallel is None else local_device())
    groups = parallel.groups() if parallel is not None else None
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}; got {backend!r}")
    index = read_index(Path(engines_dir)) if engines_dir is not None else None
    if index is None and backend not in (None, "eager"):
        raise ValueError(f"backend {backend!r} runs built engines: pass engines_dir (see `wan-rt build`)")
    if index is not None and backend not in (None, "eager", index["backend"]):
        raise ValueError(f"{engines_dir} holds {index['backend']} engines, not {backend}")
    model = model or (index["model"] if index is not None else None)
    if model is None:
        raise ValueError("from_pretrained needs a checkpoint path or preset name (or an engines_dir)")
    resolved = resolve_checkpoint(model)
    if parallel is not None:
        parallel.check_model(resolved.spec)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if index is None or backend == "eager":
        how = "eager" + (" + Triton kernels" if use_triton_kernels(kernels, dev) else "")
        if groups is None:
            return resolved, build_eager_components(resolved, dev, dtype, kernels=kernels), how
        names = local_component_names(resolved.spec, groups.plan, groups.rank)
        sharded = torch.device("cpu") if groups.plan.shard_weights else None  # FSDP moves the shards
        components = build_eager_components(resolved, dev, dtype, names, kernels=kernels, dit_load_device=sharded)
        return resolved, parallelize(components, resolved.spec, groups, dev), f"{how}, {groups.plan.describe()}"

    engines = Path(engines_dir)
    check_engines_model(engines, resolved, model)
    pinned = dict(backend_for or {})
    for name, b in pinned.items():
        if name not in components_of(resolved.spec):
            raise ValueError(f"backend_for: {resolved.spec.name} has no component {name!r}")
        if b not in ("eager", index["backend"]):
            raise ValueError(f"backend_for {name}={b}: only 'eager' or the engines' backend ({index['backend']})")
    engine_names = [c for c in components_of(resolved.spec) if pinned.get(c, index["backend"]) != "eager"]
    if rebuild:
        backend_mod = get_backend(index["backend"])
        stale = [c for c in engine_names if is_stale(engines / c, resolved, index["model"], backend_mod)]
        if stale:
            build_engines(model, index["backend"], engines, precision=index["precision"], components=stale,
                          **build_size(engines / engine_names[0]))
    components = load_engine_components(engines, resolved, dev, engine_names)
    eager = [c for c in components_of(resolved.spec) if c not in components]
    if eager:
        base = component_dtype("dit", index["precision"], index["backend"], dev)
        components.update(build_eager_components(resolved, dev, base, eager))
    how = f"{index['backend']} engines in {engines_dir}"
    if groups is None:
        return resolved, components, how
    return resolved, parallelize(components, resolved.spec, groups, dev), f"{how}, {groups.plan.describe()}"


class WanPipeline(Pipeline):
    """The pipeline, plus diffusers-style loading."""

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, backend: Optional[str] = None,
                        device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                        engines_dir: Optional[str] = None, backend_for: Optional[Mapping[str, str]] = None,
                        rebuild: bool = False, kernels: str = "auto",
                        parallel: Optional[ParallelPlan] = None) -> "WanPipeline":
        """path: a diffusers-layout folder, an official Wan2.2 folder, or a preset name (None with
        engines_dir: the model the engines were built from). engines_dir: run the engines
        `wan-rt build` wrote there, on their own backend unless `backend="eager"`; backend_for
        pins components to eager; rebuild=True rebuilds stale engines instead of refusing them.
        Without engines_dir everything runs eager (dtype: default bf16 on a GPU, fp32 on a CPU).
        kernels: "auto" (Triton kernels in eager components on a CUDA GPU), "triton" or "torch".
        parallel: a `wan_rt.parallel.ParallelPlan`; inside an initialized torch.distributed group
        every rank calls from_pretrained and then the pipeline with the same arguments, and every
        rank gets the same frames (device default: cuda:LOCAL_RANK, else the CPU)."""
        dev = torch.device(device) if device else (default_device() if parallel is None else local_device())
        resolved, components, _ = load_components(path, backend=backend, engines_dir=engines_dir, device=dev,
                                                  dtype=dtype, backend_for=backend_for, rebuild=rebuild,
                                                  kernels=kernels, parallel=parallel)
        tokenizer = load_tokenizer(resolved.files.tokenizer, resolved.spec.text_encoder.vocab_size)  # warns if degenerate
        return cls(resolved.spec, components, tokenizer, resolved.defaults, dev)
