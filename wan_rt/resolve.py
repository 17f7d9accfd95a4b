"""Checkpoint resolution: a folder or preset name -> model spec, file locations, sampling defaults.

`resolve_checkpoint` is cheap: it reads only config files (and, for the official layout, the
shapes in the weight files' headers) and works out the ModelSpec and the sampling defaults of the
checkpoint's own layout (diffusers: scheduler_config.json and model_index.json; official: the
official config values and default negative prompt). Loading weights is the caller's business.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from wan_rt.config import (OFFICIAL_NEGATIVE_PROMPT, SPECS, WAN21_VAE, WAN22_VAE, ModelSpec,
                           Stage, get_spec)
from wan_rt.models import hf_config, read_config
from wan_rt.models.checkpoint import CheckpointError, CheckpointFiles, locate_checkpoint, read_state_dict
from wan_rt.models.shapes import infer_dit_text_dim, infer_text_encoder_config, infer_vae_config
from wan_rt.scheduler import SamplingDefaults, scheduler_from_diffusers_config
from wan_rt.tiny import ensure_tiny_checkpoint

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
    # The official layout stores no VAE or umT5 config: read the sizes off the weights' shapes
    # (memory-mapped reads: only the shapes are looked at).
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


def weight_paths(resolved: ResolvedCheckpoint, component: str) -> list[Path]:
    """The weight files (or folders) a component is made from: what its engine's fingerprint covers."""
    files = resolved.files
    if component == "text_encoder":
        return [files.text_encoder]
    if component.startswith("vae"):
        return [files.vae]
    return [files.dits[component]]
