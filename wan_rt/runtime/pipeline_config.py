"""`pipeline.json`: what a process without Python needs to run an engines dir end to end.

The engine manifests say how to run each graph; this file says how to make a video from them:
the stages and their guidance, the sampling defaults of the checkpoint (solver, sigma grid,
shift, negative prompt, its diffusers scheduler config), the latent geometry, the default
request and the tokenizer. `wan-rt build` writes it next to `engines.json` and copies the
checkpoint's SentencePiece model beside it, so the C++ library (wan_rt/cpp) needs no checkpoint
and no Python. Everything here is read off the resolved checkpoint: nothing is typed twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from wan_rt.config import spec_hash
from wan_rt.models.spiece import SPIECE, TOKENIZER_JSON, spiece_model_bytes
from wan_rt.precision import component_dtype
from wan_rt.resolve import ResolvedCheckpoint
from wan_rt.runtime.graphs import components_of
from wan_rt.scheduler import diffusers_sampling

PIPELINE_CONFIG = "pipeline.json"
TOKENIZER_FILE = "tokenizer/spiece.model"  # relative to the engines dir
FORMAT = 1

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def pipeline_config(resolved: ResolvedCheckpoint, backend: str, precision: str, device: torch.device) -> dict[str, Any]:
    """The pipeline.json of engines built from `resolved` with this backend, precision and device."""
    spec, defaults = resolved.spec, resolved.defaults
    folder = Path(resolved.files.tokenizer)
    has_spiece = any((folder / f).is_file() for f in (SPIECE, TOKENIZER_JSON))  # written by write_pipeline_config
    # A diffusers folder is sampled by its scheduler_config.json unless the solver is overridden
    # (Pipeline._scheduler): that scheduler's solver, shift and corrector, on the diffusers grid.
    from_config = diffusers_sampling(defaults.scheduler_config) if defaults.scheduler_config else None
    return {
        "format": FORMAT,
        "spec_name": spec.name,
        "spec_hash": spec_hash(spec),
        "task": spec.task,
        "stages": [{"component": s.component, "min_timestep": s.min_timestep, "guide_scale": s.guide_scale}
                   for s in spec.stages],
        "request_defaults": {"height": spec.height, "width": spec.width, "num_frames": spec.num_frames,
                             "steps": spec.sample_steps},
        "fps": spec.fps,
        "sampling": {"solver": defaults.solver, "grid": defaults.grid, "shift": defaults.shift,
                     "negative_prompt": defaults.negative_prompt,
                     "scheduler_config": dict(defaults.scheduler_config) if from_config else None,
                     "from_scheduler_config": None if from_config is None else {
                         "solver": from_config.solver, "shift": from_config.shift,
                         "disable_corrector": list(from_config.disable_corrector)}},
        "vae": {"stride": list(spec.vae.stride), "z_dim": spec.vae.z_dim},
        "dit": {"patch_size": list(spec.dit.patch_size), "text_len": spec.dit.text_len,
                "per_token_timestep": spec.dit.per_token_timestep},
        "tokenizer": TOKENIZER_FILE if has_spiece else None,  # None: a folder with no tokenizer files
        # The dtype each engine takes its "compute" tensors in (the graphs' other inputs say theirs).
        "compute_dtypes": {name: _DTYPE_NAMES[component_dtype(name, precision, backend, device)]
                           for name in components_of(spec)},
    }


def write_pipeline_config(engines_dir: Path, resolved: ResolvedCheckpoint, backend: str, precision: str,
                          device: torch.device) -> Path:
    """pipeline.json and tokenizer/spiece.model in `engines_dir`, each replaced atomically and only
    when its bytes change (a build with nothing to do leaves the engines dir as it was). A
    tokenizer.json-only folder (transformers 5) gets its spiece.model converted from the Unigram
    model (wan_rt.models.spiece)."""
    engines_dir = Path(engines_dir)
    spiece = spiece_model_bytes(resolved.files.tokenizer)
    if spiece is not None:
        _replace_if_changed(engines_dir / TOKENIZER_FILE, spiece)
    path = engines_dir / PIPELINE_CONFIG
    config = pipeline_config(resolved, backend, precision, device)
    _replace_if_changed(path, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def _replace_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
