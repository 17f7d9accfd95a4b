"""From a path (or preset name) to a ready WanPipeline.

`resolve_checkpoint` is cheap: it reads only config files and works out the ModelSpec and the
sampling defaults of the checkpoint's own layout (diffusers: scheduler_config.json and
model_index.json; official: the official config values and default negative prompt).
`build_eager_components` then loads the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from wan_rt.config import (OFFICIAL_NEGATIVE_PROMPT, SPECS, WAN21_VAE, WAN22_VAE, ModelSpec,
                           Stage, get_spec)
from wan_rt.models import hf_config, read_config
from wan_rt.models.checkpoint import CheckpointError, CheckpointFiles, locate_checkpoint
from wan_rt.pipeline import SamplingDefaults
from wan_rt.scheduler import scheduler_from_diffusers_config

BASE_SPECS = {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B"}


@dataclass(frozen=True)
class ResolvedCheckpoint:
    spec: ModelSpec
    files: CheckpointFiles
    defaults: SamplingDefaults


def resolve_checkpoint(path: str) -> ResolvedCheckpoint:
    """A preset name or a checkpoint folder -> spec, file locations and sampling defaults."""
    folder = Path(path)
    if not folder.exists():
        if path in SPECS:
            from wan_rt.tiny import ensure_tiny_checkpoint

            folder = ensure_tiny_checkpoint(path)
        else:
            known = ", ".join(n for n in SPECS if n.startswith("tiny-"))
            raise FileNotFoundError(f"model path not found: {path} (embedded presets: {known})")
    files = locate_checkpoint(folder)
    if files.layout == "diffusers":
        return _resolve_diffusers(files)
    return _resolve_official(files)


def _resolve_diffusers(files: CheckpointFiles) -> ResolvedCheckpoint:
    index = read_config(files.model_index or files.root / "model_index.json")
    expand = bool(index.get("expand_timesteps", False))
    dit_cfg = read_config(next(iter(files.dits.values())) / "config.json")
    task = "ti2v" if expand else ("i2v" if int(dit_cfg["in_channels"]) > int(dit_cfg["out_channels"]) else "t2v")
    base = get_spec(BASE_SPECS[task])
    dit = hf_config.dit_from_diffusers(dit_cfg, text_len=base.dit.text_len, per_token_timestep=expand)
    vae = hf_config.vae_from_diffusers(read_config(files.vae / "config.json"))
    text = hf_config.text_encoder_from_hf(read_config(files.text_encoder / "config.json"))
    stages = base.stages
    boundary = index.get("boundary_ratio")
    if len(stages) > 1 and boundary is not None:
        stages = (dataclasses.replace(stages[0], min_timestep=float(boundary) * 1000), stages[1])
    if len(stages) > 1 and "dit_low_noise" not in files.dits:
        raise CheckpointError(f"{files.root}: {task} needs two experts but transformer_2/ is missing")
    spec = _match_preset(dataclasses.replace(base, dit=dit, vae=vae, text_encoder=text, stages=stages))
    sched_path = (files.scheduler or files.root / "scheduler") / "scheduler_config.json"
    sched = read_config(sched_path)
    try:  # rejects what wan_rt cannot sample exactly (non-flow prediction, Karras sigmas, ...)
        scheduler_from_diffusers_config(sched, steps=2)
    except ValueError as exc:
        raise CheckpointError(f"{sched_path}: {exc}") from None
    defaults = SamplingDefaults(solver=_solver_name(sched, sched_path), grid="diffusers",
                                shift=float(sched.get("flow_shift", sched.get("shift", spec.sample_shift))),
                                negative_prompt="", scheduler_config=sched)
    return ResolvedCheckpoint(spec, files, defaults)


def _resolve_official(files: CheckpointFiles) -> ResolvedCheckpoint:
    dit_cfg = read_config(next(iter(files.dits.values())) / "config.json")
    task = str(dit_cfg.get("model_type", "t2v"))
    if task not in BASE_SPECS:
        raise CheckpointError(f"{files.root}: model_type {task!r} is not a Wan 2.2 model (t2v, i2v, ti2v)")
    base = get_spec(BASE_SPECS[task])
    dit = hf_config.dit_from_official(dit_cfg, per_token_timestep=task == "ti2v")
    # The official layout stores no VAE or umT5 config: read the sizes off the weights' shapes.
    from wan_rt.models.checkpoint import read_state_dict
    from wan_rt.models.shapes import infer_text_encoder_config, infer_vae_config

    # Memory-mapped reads: only the shapes are looked at here.
    from wan_rt.models.shapes import infer_dit_text_dim

    dit = dataclasses.replace(dit, text_dim=infer_dit_text_dim(read_state_dict(next(iter(files.dits.values())))))
    vae = infer_vae_config(read_state_dict(files.vae), WAN22_VAE if "2.2" in files.vae.name else WAN21_VAE)
    text = infer_text_encoder_config(read_state_dict(files.text_encoder))
    spec = _match_preset(dataclasses.replace(base, dit=dit, vae=vae, text_encoder=text))
    defaults = SamplingDefaults(solver="unipc", grid="official", shift=spec.sample_shift,
                                negative_prompt=OFFICIAL_NEGATIVE_PROMPT)
    return ResolvedCheckpoint(spec, files, defaults)


def _match_preset(spec: ModelSpec) -> ModelSpec:
    """A checkpoint whose architecture equals a preset's is that preset (name, sizes, steps)."""
    for known in SPECS.values():
        if known.task != spec.task or known.vae != spec.vae or known.text_encoder != spec.text_encoder:
            continue
        if dataclasses.replace(known.dit, text_len=spec.dit.text_len) == spec.dit:
            return dataclasses.replace(known, stages=_with_boundary(known.stages, spec.stages))
    return dataclasses.replace(spec, name=f"custom-{spec.task}")


def _with_boundary(known: tuple[Stage, ...], found: tuple[Stage, ...]) -> tuple[Stage, ...]:
    return tuple(dataclasses.replace(k, min_timestep=f.min_timestep) for k, f in zip(known, found))


def _solver_name(sched: dict, path: Path) -> str:
    name = sched.get("_class_name", "UniPCMultistepScheduler")
    solvers = {"UniPCMultistepScheduler": "unipc", "DPMSolverMultistepScheduler": "dpm++",
               "FlowMatchEulerDiscreteScheduler": "euler"}
    if name not in solvers:
        raise CheckpointError(f"{path}: scheduler {name} is not supported (UniPC, DPM++ or flow Euler)")
    return solvers[name]


# ---------------------------------------------------------------------- components
def use_triton_kernels(choice: str, device: torch.device) -> bool:
    """"auto": the Triton kernels on a CUDA GPU when triton is installed; PyTorch ops otherwise
    (on a CPU they would only run in Triton's interpreter). "triton" / "torch" force a side."""
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be auto, triton or torch; got {choice!r}")
    if choice != "auto":
        return choice == "triton"
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def build_eager_components(resolved: ResolvedCheckpoint, device: torch.device, dtype: torch.dtype,
                           names: Optional[list[str]] = None, kernels: str = "auto") -> dict:
    from wan_rt.models import load_dit, load_text_encoder, load_vae
    from wan_rt.runtime.component import EagerComponent, VAEDecodeGraph, VAEEncodeGraph
    from wan_rt.runtime.engine_component import EagerDiTComponent

    spec, files = resolved.spec, resolved.files
    wanted = names or ["text_encoder", *spec.dit_components, "vae_encoder", "vae_decoder"]
    out = {}
    fast = use_triton_kernels(kernels, device)
    if fast:
        from wan_rt.kernels import install
    # The VAE and text encoder stay in fp32 unless asked otherwise: they are a small share of the
    # time and the official code runs the VAE in fp32 too.
    if "text_encoder" in wanted:
        te_dtype = dtype if dtype != torch.float16 else torch.float32  # umT5 overflows in fp16
        out["text_encoder"] = EagerComponent("text_encoder", load_text_encoder(files, dtype=te_dtype, device=device),
                                             device, te_dtype)
    for name in spec.dit_components:
        if name in wanted:
            dit = load_dit(files, name, dtype=dtype, device=device)
            if fast:
                install(dit)
            out[name] = EagerDiTComponent(name, spec, dit, dtype, device)
    if "vae_encoder" in wanted or "vae_decoder" in wanted:
        vae = load_vae(files, dtype=torch.float32, device=device)
        if fast:
            install(vae)
        if "vae_encoder" in wanted:
            out["vae_encoder"] = EagerComponent("vae_encoder", VAEEncodeGraph(vae), device, torch.float32)
        if "vae_decoder" in wanted:
            out["vae_decoder"] = EagerComponent("vae_decoder", VAEDecodeGraph(vae), device, torch.float32)
    return out


def load_pipeline(cls, path: Optional[str], backend: str = "eager", device: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, engines_dir: Optional[str] = None,
                  backend_for: Optional[Mapping[str, str]] = None, rebuild: bool = False,
                  kernels: str = "auto"):
    """Eager from the checkpoint, or engines from `engines_dir` (built for `path`'s model)."""
    from wan_rt.models.text_encoder import load_tokenizer

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if engines_dir is not None and backend != "eager":
        from wan_rt.build import read_index
        from wan_rt.runtime.engines import load_engine_components

        built = read_index(Path(engines_dir))["backend"]
        if backend not in (built, "auto"):
            raise ValueError(f"{engines_dir} holds {built} engines, not {backend}")
        resolved, components = load_engine_components(Path(engines_dir), model=path, backend_for=backend_for,
                                                      device=dev, rebuild=rebuild)
    else:
        if backend != "eager":
            raise ValueError(f"backend {backend!r} runs built engines: pass engines_dir (see `wan-rt build`)")
        if path is None:
            raise ValueError("from_pretrained needs a checkpoint path or preset name")
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        resolved = resolve_checkpoint(path)
        components = build_eager_components(resolved, dev, dtype, kernels=kernels)
    return cls(resolved.spec, components, load_tokenizer(resolved.files.tokenizer), resolved.defaults, dev)
