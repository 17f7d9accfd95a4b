"""Checkpoint resolution: a folder or preset name -> model spec, file locations, sampling defaults.

`resolve_checkpoint` is cheap: it reads only config files (and, for the official layout, the
shapes in the weight files' headers) and works out the ModelSpec and the sampling defaults of the
checkpoint's own layout (diffusers: scheduler_config.json and model_index.json; official: the
official config values and default negative prompt). Loading weights is the caller's business.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wan_rt.config import (OFFICIAL_NEGATIVE_PROMPT, SPECS, WAN21_VAE, WAN22_VAE, ModelSpec,
                           Stage, get_spec)
from wan_rt.models import hf_config, read_config
from wan_rt.models.checkpoint import CheckpointError, CheckpointFiles, locate_checkpoint, read_state_dict
from wan_rt.models.shapes import infer_dit_text_dim, infer_text_encoder_config, infer_vae_config
from wan_rt.scheduler import SamplingDefaults, scheduler_from_diffusers_config
from wan_rt.tiny import ensure_tiny_checkpoint, is_tiny_preset

BASE_SPECS = {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B"}


@dataclass(frozen=True)
class ResolvedCheckpoint:
    spec: ModelSpec
    files: CheckpointFiles
    defaults: SamplingDefaults


def resolve_checkpoint(path: str) -> ResolvedCheckpoint:
    """A preset name, a checkpoint folder, or a `compose_model` string (component files over a
    checkpoint or an architecture name) -> spec, file locations and sampling defaults."""
    if path.startswith("{"):
        return _resolve_composed(path)
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


# -------------------------------------------------------------------------------------------------
# Component files: --dit / --dit-2 / --text-encoder / --vae / --tokenizer over --model
# -------------------------------------------------------------------------------------------------
FILE_FLAGS = {"dit": "--dit", "dit_2": "--dit-2", "text_encoder": "--text-encoder", "vae": "--vae",
              "tokenizer": "--tokenizer"}
_CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}  # DiT in / out channels per task


def compose_model(model: Optional[str], **files: Optional[str]) -> Optional[str]:
    """`model` with some components given as files (keys of FILE_FLAGS): one string that names
    them all, which is what engines indexes record and `resolve_checkpoint` takes. Plain `model`
    when no file is given; else a JSON object with absolute paths. `model` may be a checkpoint
    folder or preset (the other components come from it), an architecture name (t2v-A14B,
    i2v-A14B, ti2v-5B: every component a file), or None (the architecture of the DiT file)."""
    unknown = set(files) - set(FILE_FLAGS)
    if unknown:
        raise ValueError(f"unknown component file {sorted(unknown)[0]!r}; known: {', '.join(FILE_FLAGS)}")
    given = {k: str(Path(v).resolve()) for k, v in files.items() if v}
    if not given:
        return model
    for key, value in given.items():
        if not Path(value).exists():
            raise FileNotFoundError(f"{FILE_FLAGS[key]} {files[key]}: no such file")
    if model is not None and model.startswith("{"):  # files over files (an engines dir's composed model)
        return json.dumps({**json.loads(model), **given}, sort_keys=True)
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    return json.dumps({"model": model, **given}, sort_keys=True)


def _resolve_composed(text: str) -> ResolvedCheckpoint:
    from wan_rt.models.single_file import dit_config, file_config

    try:
        source = json.loads(text)
        assert isinstance(source, dict)
    except (json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"not a model, nor component files: {text[:80]}") from None
    model = source.get("model")
    base: Optional[ResolvedCheckpoint] = None
    if model is not None and (Path(model).exists() or is_tiny_preset(model)):
        base = resolve_checkpoint(model)  # a checkpoint: the components not given come from it
    elif model is not None and model not in BASE_SPECS.values():
        raise CheckpointError(f"--model {model}: not a checkpoint folder, preset, or architecture "
                              f"({', '.join(BASE_SPECS.values())})")
    if base is not None:
        task = base.spec.task
    elif model is not None:
        task = get_spec(model).task
    elif source.get("dit"):
        channels = dit_config(source["dit"])
        task = next((t for t, c in _CHANNELS.items() if c == (channels.in_channels, channels.out_channels)), "t2v")
    else:
        raise CheckpointError("component files need --model (a checkpoint, or an architecture: "
                              f"{', '.join(BASE_SPECS.values())}) or --dit")
    arch = get_spec(BASE_SPECS[task])
    names = [s.component for s in arch.stages]
    if len(names) == 1 and source.get("dit_2"):
        raise CheckpointError(f"{source['dit_2']}: {arch.name} has one DiT; --dit-2 is for the A14B models' "
                              "low-noise expert")
    given = {names[0]: source.get("dit"), **({names[1]: source.get("dit_2")} if len(names) > 1 else {})}
    needed = [FILE_FLAGS[k] for k in ("dit", "dit_2", "text_encoder", "vae", "tokenizer")
              if (k != "dit_2" or len(names) > 1) and not source.get(k)]
    if base is None and needed:
        what = "a folder with tokenizer.json or spiece.model, e.g. google/umt5-xxl" if "--tokenizer" in needed else ""
        head = (f"--model {model} names an architecture only" if model else
                "component files without --model (a checkpoint for the other components)")
        raise CheckpointError(f"{head}: every component must come from a file; missing {', '.join(needed)}"
                              + (f" ({what})" if what else ""))

    def path_of(key: str, fallback) -> Path:
        return Path(source[key]) if source.get(key) else fallback

    dits = {c: Path(given[c]) if given[c] else base.files.dits[c] for c in names}  # type: ignore[union-attr]
    # Architecture: files from their shapes, the rest from the base checkpoint.
    dit = base.spec.dit if base is not None else None
    first: Optional[Path] = None
    for c in names:
        if not given[c]:
            continue
        found = dataclasses.replace(file_config(given[c], "dit"), text_len=arch.dit.text_len)
        want = _CHANNELS[task]
        if (found.in_channels, found.out_channels) != want:
            kind = next((t for t, ch in _CHANNELS.items() if ch == (found.in_channels, found.out_channels)), "unknown")
            raise CheckpointError(f"{given[c]}: a {kind} DiT ({found.in_channels} in / {found.out_channels} out "
                                  f"channels), not {task} ({want[0]} / {want[1]})")
        if dit is not None and dataclasses.replace(found, text_len=dit.text_len) != dit:
            other = first or (base.files.dits[names[0]] if base is not None else "the checkpoint")
            raise CheckpointError(f"{given[c]}: a DiT of another model than {other} ({_describe(found)} vs "
                                  f"{_describe(dit)})")
        dit, first = dit or found, first or Path(given[c])
    assert dit is not None
    vae = file_config(source["vae"], "vae") if source.get("vae") else base.spec.vae  # type: ignore[union-attr]
    if vae.version != arch.vae.version:
        raise CheckpointError(f"{source.get('vae') or model}: a Wan {vae.version} VAE; {arch.name} models use the "
                              f"Wan {arch.vae.version} VAE")
    text = (file_config(source["text_encoder"], "text_encoder") if source.get("text_encoder")
            else base.spec.text_encoder)  # type: ignore[union-attr]
    if text.d_model != dit.text_dim:
        raise CheckpointError(f"{source.get('text_encoder') or model}: umT5 width {text.d_model}, but the DiT takes "
                              f"{dit.text_dim}-wide text embeddings")
    tokenizer = path_of("tokenizer", base.files.tokenizer if base is not None else None)
    if not tokenizer.is_dir():
        raise CheckpointError(f"{tokenizer}: --tokenizer takes a folder (tokenizer.json or spiece.model)")
    stages = base.spec.stages if base is not None else arch.stages
    spec = _match_preset(dataclasses.replace(arch, dit=dit, vae=vae, text_encoder=text, stages=stages))
    files = CheckpointFiles(
        layout=base.files.layout if base is not None else "official", root=base.files.root if base else first,
        dits=dits, vae=path_of("vae", base.files.vae if base else None),
        text_encoder=path_of("text_encoder", base.files.text_encoder if base else None), tokenizer=tokenizer,
        model_index=base.files.model_index if base else None, scheduler=base.files.scheduler if base else None)
    # Files alone carry no sampling config: the official one (ComfyUI's workflows use it too).
    defaults = base.defaults if base is not None else SamplingDefaults(
        solver="unipc", grid="official", shift=spec.sample_shift, negative_prompt=OFFICIAL_NEGATIVE_PROMPT)
    return ResolvedCheckpoint(spec, files, defaults)


def _describe(dit) -> str:
    return f"dim {dit.dim}, {dit.num_layers} layers, {dit.in_channels} -> {dit.out_channels} channels"
