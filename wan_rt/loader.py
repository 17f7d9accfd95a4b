"""Assembly: a checkpoint (path or preset) or an engines dir -> a ready pipeline.

`WanPipeline` is the public class: the denoise loop (`wan_rt.pipeline.Pipeline`, which loads
nothing) plus `from_pretrained`, which builds its components here, eager from the checkpoint or
from the engines `wan-rt build` wrote, rebuilding stale engines when asked to.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from wan_rt.build import build_engines
from wan_rt.caching import apply_step_cache, remove_step_cache
from wan_rt.config import ModelSpec
from wan_rt.eager import build_eager_components, use_triton_kernels
from wan_rt.host_memory import choose_host_dtype
from wan_rt.lora import AppliedLora, LoraRef, expert_component, load_lora
from wan_rt.models.text_encoder import load_tokenizer
from wan_rt.offload import MemoryPlan, apply_plan, choose_plan, weight_bytes
from wan_rt.parallel import ParallelPlan, local_component_names, parallelize
from wan_rt.parallel.plan import local_device
from wan_rt.pipeline import Pipeline
from wan_rt.precision import component_dtype
from wan_rt.resolve import ResolvedCheckpoint, compose_model, resolve_checkpoint
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engines import check_engines_model, load_engine_components
from wan_rt.runtime.engines_dir import LoraPairs, build_size, dit_layout, is_stale, read_index
from wan_rt.runtime.gguf_weights import GGUFLinear
from wan_rt.runtime.graphs import components_of, layout_parts

BACKEND_CHOICES = ("eager", "ort", "aoti", "trt")
LoraArg = Union[str, Path, tuple[Union[str, Path], float], LoraRef]


def lora_plan(spec: ModelSpec, lora: Iterable[LoraArg] = (), lora_2: Iterable[LoraArg] = ()) -> dict[str, list[LoraRef]]:
    """--lora / --lora-2 as {component: [LoraRef]}: `lora` for the high-noise expert (or the only
    DiT), `lora_2` for the low-noise expert. Items: a path, (path, scale) or a LoraRef."""
    def refs(items: Iterable[LoraArg]) -> list[LoraRef]:
        out = []
        for item in items:
            if isinstance(item, LoraRef):
                out.append(item)
            elif isinstance(item, tuple):
                out.append(LoraRef(Path(item[0]), float(item[1])))
            else:
                out.append(LoraRef(Path(item)))
        missing = [r.path for r in out if not r.path.is_file()]
        if missing:
            raise FileNotFoundError(f"LoRA file not found: {missing[0]}")
        return out

    plan = {expert_component(spec, None): refs(lora)}
    second = refs(lora_2)
    if second:
        plan[expert_component(spec, "low_noise")] = second
    return {c: r for c, r in plan.items() if r}


def lora_pairs(plan: Mapping[str, Sequence[LoraRef]]) -> dict[str, LoraPairs]:
    return {c: [r.as_pair() for r in refs] for c, refs in plan.items()}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_components(model: Optional[str], *, backend: Optional[str] = None, engines_dir: Optional[str] = None,
                    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                    backend_for: Optional[Mapping[str, str]] = None, rebuild: bool = False,
                    kernels: str = "auto", parallel: Optional[ParallelPlan] = None,
                    loras: Optional[Mapping[str, LoraPairs]] = None,
                    placement: Optional[Mapping[str, torch.device]] = None,
                    size: Optional[tuple[int, int, int]] = None,
                    ) -> tuple[ResolvedCheckpoint, dict, str]:
    """-> (resolved checkpoint, components, a few words on what runs them).

    With `engines_dir` the components are its engines (backend None: the engines' own; "eager":
    the eager model of the engines' checkpoint), `model` None meaning the model they were built
    from; `backend_for` pins components to "eager". Without it, everything is eager. `parallel`:
    this rank's part of a multi-process plan (wan_rt.parallel), inside an initialized group.
    `loras` ({component: [(file, scale)]}) are what engine experts must have been built with (a
    rebuild fuses them); eager experts take theirs afterwards (WanPipeline.load_lora). `placement`
    puts eager components elsewhere than `device` (memory_placement: a low-VRAM plan). `size`
    (height, width, frames): the largest request, for the host-memory check (wan_rt.host_memory:
    eager components on the CPU that cannot fit in RAM are refused before loading; a dtype left
    open on the CPU is fp32, or bf16 when only that fits)."""
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
    if index is None or backend == "eager":
        names = (list(components_of(resolved.spec)) if groups is None
                 else local_component_names(resolved.spec, groups.plan, groups.rank))
        # FSDP loads the DiTs on the CPU to shard them: cast whole, not on use (wan_rt.eager)
        whole = groups is not None and groups.plan.shard_weights
        dtype = _fit_host_memory(resolved, names, dev, dtype, placement, size, cast_on_use=not whole)
        how = "eager" + (" + Triton kernels" if use_triton_kernels(kernels, dev) else "")
        if groups is None:
            return resolved, build_eager_components(resolved, dev, dtype, kernels=kernels, placement=placement), how
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
        stale = [c for c in engine_names
                 if is_stale(engines / c, resolved, index["model"], backend_mod, (loras or {}).get(c, ()))]
        if stale:
            layout = dit_layout(engines)  # rebuilt as built: step graphs, in as many parts
            build_engines(model, index["backend"], engines, precision=index["precision"], components=stale,
                          loras={c: p for c, p in (loras or {}).items() if c in stale},
                          step_cache=layout != "whole", dit_parts=layout_parts(layout),
                          **build_size(engines / engine_names[0]))
    components = load_engine_components(engines, resolved, dev, engine_names, loras)
    eager = [c for c in components_of(resolved.spec) if c not in components]
    if eager:
        base = component_dtype("dit", index["precision"], index["backend"], dev)
        _fit_host_memory(resolved, eager, dev, base, placement, size)
        components.update(build_eager_components(resolved, dev, base, eager, placement=placement))
    how = f"{index['backend']} engines in {engines_dir}"
    if groups is None:
        return resolved, components, how
    return resolved, parallelize(components, resolved.spec, groups, dev), f"{how}, {groups.plan.describe()}"


def _fit_host_memory(resolved: ResolvedCheckpoint, names: Sequence[str], device: torch.device,
                     dtype: Optional[torch.dtype], placement: Optional[Mapping[str, torch.device]],
                     size: Optional[tuple[int, int, int]], cast_on_use: bool = True) -> torch.dtype:
    """The eager dtype: the caller's, checked against host RAM for what runs on the CPU; left open,
    bf16 on a GPU and on a CPU fp32 unless only bf16 fits (said on stderr). On a CPU run, fp32
    files at bf16 are cast on use (wan_rt.runtime.cast_on_use) unless `cast_on_use` is False."""
    on_cpu = [n for n in names if torch.device((placement or {}).get(n, device)).type == "cpu"]
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    if not on_cpu:
        return dtype or torch.float32
    chosen, note = choose_host_dtype(resolved.spec, resolved.files, on_cpu, dtype, size,
                                     cast_on_use=cast_on_use and device.type == "cpu")
    if note:
        print(f"wan-rt: {note}", file=sys.stderr)
    return chosen


def memory_plan(resolved: ResolvedCheckpoint, budget_gb: float, dtype: torch.dtype,
                cpu_components: Sequence[str] = (), engines: bool = False) -> MemoryPlan:
    """The cheapest low-VRAM plan (wan_rt.offload) for a GPU memory budget, from the checkpoint's sizes."""
    if not budget_gb > 0:
        raise ValueError(f"--memory-budget must be a positive number of GiB; got {budget_gb}")
    return choose_plan(resolved.spec, weight_bytes(resolved, dtype), int(budget_gb * 2**30), cpu_components, engines)


def memory_placement(spec: ModelSpec, plan: Optional[MemoryPlan], cpu_components: Sequence[str]) -> dict[str, torch.device]:
    """Where eager components are built: the CPU for `cpu_components`; host memory for the experts
    of a block-offload plan (they stream to the GPU)."""
    cpu = torch.device("cpu")
    placement = {c: cpu for c in cpu_components}
    if plan is not None and plan.name == "blocks":
        placement.update({c: cpu for c in spec.dit_components})
    return placement


def check_cpu_components(spec: ModelSpec, names: Sequence[str]) -> list[str]:
    allowed = ("text_encoder", "vae_encoder", "vae_decoder")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"only {', '.join(allowed)} can run on the CPU; got {bad[0]!r}")
    return list(names)


class WanPipeline(Pipeline):
    """The pipeline, plus diffusers-style loading and LoRAs per expert."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loras: dict[str, list[AppliedLora]] = {}
        self.memory_plan: Optional[MemoryPlan] = None  # set by apply_memory_plan

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, backend: Optional[str] = None,
                        device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                        engines_dir: Optional[str] = None, backend_for: Optional[Mapping[str, str]] = None,
                        rebuild: bool = False, kernels: str = "auto",
                        parallel: Optional[ParallelPlan] = None, lora: Iterable[LoraArg] = (),
                        lora_2: Iterable[LoraArg] = (), lora_mode: str = "fuse",
                        memory_budget_gb: Optional[float] = None, cpu_components: Sequence[str] = (),
                        files: Optional[Mapping[str, Union[str, Path]]] = None) -> "WanPipeline":
        """path: a diffusers-layout folder, an official Wan2.2 folder, or a preset name (None with
        engines_dir: the model the engines were built from). engines_dir: run the engines
        `wan-rt build` wrote there, on their own backend unless `backend="eager"`; backend_for
        pins components to eager; rebuild=True rebuilds stale engines instead of refusing them.
        Without engines_dir everything runs eager (dtype: default bf16 on a GPU, fp32 on a CPU).
        kernels: "auto" (Triton kernels in eager components on a CUDA GPU), "triton" or "torch".
        lora / lora_2: LoRA files (or (file, scale)) for the high-noise expert (or the only DiT) and
        the low-noise expert; eager experts take them fused (lora_mode "fuse") or at run time
        ("runtime"), engines must have been built with them (rebuild=True re-weights them).
        parallel: a `wan_rt.parallel.ParallelPlan`; inside an initialized torch.distributed group
        every rank calls from_pretrained and then the pipeline with the same arguments, and every
        rank gets the same frames (device default: cuda:LOCAL_RANK, else the CPU).
        memory_budget_gb: GPU memory to stay within; the cheapest plan that fits is applied
        (wan_rt.offload: all resident, one expert at a time, or block offload for eager experts).
        cpu_components: "text_encoder", "vae_encoder", "vae_decoder" to run on the CPU.
        files: components as single files over `path` ({"dit", "dit_2", "text_encoder", "vae":
        file, "tokenizer": folder}; ComfyUI / fp8 scaled / GGUF / official files); with every
        component a file, `path` may name the architecture ("t2v-A14B", "i2v-A14B", "ti2v-5B")."""
        if files:
            base = path if path is not None or engines_dir is None else read_index(Path(engines_dir))["model"]
            path = compose_model(base, **{k: str(v) for k, v in files.items()})
        dev = torch.device(device) if device else (default_device() if parallel is None else local_device())
        if parallel is not None and (memory_budget_gb is not None or cpu_components):
            raise ValueError("memory_budget_gb and cpu_components run in one process, not with a parallel plan")
        lora, lora_2 = list(lora), list(lora_2)
        plan: dict[str, list[LoraRef]] = {}
        memory, placement = None, {}
        if lora or lora_2 or memory_budget_gb is not None or cpu_components:
            model = path if path is not None or engines_dir is None else read_index(Path(engines_dir))["model"]
            if model is None:
                raise ValueError("from_pretrained needs a checkpoint path or preset name (or an engines_dir)")
            resolved = resolve_checkpoint(model)
            plan = lora_plan(resolved.spec, lora, lora_2)
            cpu_components = check_cpu_components(resolved.spec, cpu_components)
            if memory_budget_gb is not None:
                run_dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
                memory = memory_plan(resolved, memory_budget_gb, run_dtype, cpu_components,
                                     engines=engines_dir is not None and backend != "eager")
            placement = memory_placement(resolved.spec, memory, cpu_components)
        resolved, components, _ = load_components(path, backend=backend, engines_dir=engines_dir, device=dev,
                                                  dtype=dtype, backend_for=backend_for, rebuild=rebuild,
                                                  kernels=kernels, parallel=parallel, loras=lora_pairs(plan),
                                                  placement=placement)
        tokenizer = load_tokenizer(resolved.files.tokenizer, resolved.spec.text_encoder.vocab_size)  # warns if degenerate
        pipe = cls(resolved.spec, components, tokenizer, resolved.defaults, dev)
        pipe.apply_lora_plan(plan, lora_mode)
        if memory is not None:
            pipe.apply_memory_plan(memory)
        return pipe

    def apply_memory_plan(self, plan: MemoryPlan) -> None:
        """Run under a low-VRAM plan (wan_rt.offload.choose_plan): block offload wraps the eager
        experts, and the expert residency gets the plan's budget (None: both resident)."""
        self.components.update(apply_plan(self.components, self.spec, plan, self.device))
        self.residency.budget = plan.expert_budget
        self.memory_plan = plan

    # ------------------------------------------------------------------ step caches (wan_rt.caching)
    def enable_step_cache(self, method: str, threshold: Optional[float] = None, **options) -> None:
        """TeaCache / MagCache / First Block Cache on every expert ("teacache" | "magcache" |
        "fbcache"; threshold None: the method's published default for the model, 0: compute every
        step). Eager experts, or engines built with `wan-rt build --step-cache`. `out.timings`
        reports each expert's steps computed and reused."""
        self.components.update(apply_step_cache(self.components, self.spec, method, threshold, **options))

    def disable_step_cache(self) -> None:
        self.components.update(remove_step_cache(self.components))

    # ------------------------------------------------------------------ LoRA (wan_rt.lora)
    def load_lora(self, path: Union[str, Path], scale: float = 1.0, expert: Optional[str] = None,
                  fuse: bool = False, name: Optional[str] = None) -> AppliedLora:
        """Put a LoRA file (any Wan format) on one expert: `expert` "high_noise" / "low_noise"
        (default: the high-noise expert, or the only DiT of TI2V-5B, which takes none). At run
        time (a hook per Linear; `fuse_lora()` later) or fused into the weights at once."""
        component = expert_component(self.spec, expert)
        applied = load_lora(self._eager_module(component), path, scale, "fuse" if fuse else "runtime", name)
        self._loras.setdefault(component, []).append(applied)
        self._text_kv_changed(component)
        return applied

    def fuse_lora(self, expert: Optional[str] = None) -> None:
        """Fold the run-time LoRAs of one expert (default: all) into its weights: faster steps."""
        for component in self._lora_components(expert):
            for applied in self._loras.get(component, []):
                applied.fuse()

    def unload_lora(self, expert: Optional[str] = None) -> None:
        """Remove every LoRA of one expert (default: all), fused or not."""
        for component in self._lora_components(expert):
            for applied in reversed(self._loras.pop(component, [])):
                applied.remove()
            self._text_kv_changed(component)

    def apply_lora_plan(self, plan: Mapping[str, Sequence[LoraRef]], mode: str = "fuse") -> None:
        """A lora_plan's LoRAs on the eager experts (engine experts carry theirs from the build)."""
        for component, refs in plan.items():
            if getattr(self.components[component], "module", None) is None:
                continue
            self._eager_module(component)  # refuses GGUF experts
            for ref in refs:
                applied = load_lora(self.components[component].module, ref.path, ref.scale, mode)  # type: ignore[arg-type]
                self._loras.setdefault(component, []).append(applied)

    def _lora_components(self, expert: Optional[str]) -> list[str]:
        return list(self._loras) if expert is None else [expert_component(self.spec, expert)]

    def _eager_module(self, component: str) -> torch.nn.Module:
        module = getattr(self.components[component], "module", None)
        if module is None:
            raise ValueError(f"{component} runs as a compiled engine with its weights built in: LoRAs go in at build "
                             "time (`wan-rt build --lora PATH[:SCALE]` / `--lora-2`, or from_pretrained(lora=..., "
                             "rebuild=True); engines are re-weighted without recompiling)")
        if any(isinstance(m, GGUFLinear) for m in module.modules()):
            raise ValueError(f"{component} is a GGUF expert whose weights stay quantized in eager: LoRAs on it are "
                             "not supported; build engines with the LoRA (`wan-rt build --lora-2 ...`), which "
                             "dequantizes first")
        return module

    def _text_kv_changed(self, component: str) -> None:
        """The per-prompt cross-attention K/V depend on the weights a LoRA changes."""
        cache = getattr(self.components[component], "text_kv", None)
        if cache is not None:
            cache.clear()
