"""Engines against the eager oracle: per graph on random inputs, then one short video.

The reference is always the float32 eager model built from the same checkpoint. Tolerances are
per precision: an fp32 engine must agree to rounding (1e-4 relative); bf16/fp16 engines to what
half precision can hold (3e-2).

Quantized (fp8 / int8) DiTs are checked differently (`quality_report`): their activation scales
come from calibration on the denoising trajectory, and random inputs (any timestep, random text
K/V) fall outside those ranges by construction. So they run on the fp32 oracle's own trajectory:
the same inputs at every step, noise_pred relative L2 per step, then decoded-frame PSNR, against
the tolerances recorded in their manifests at build time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from wan_rt.loader import WanPipeline
from wan_rt.lora import load_lora
from wan_rt.metrics import max_abs_error, psnr, relative_error
from wan_rt.models import load_component
from wan_rt.precision import QUALITY_TOLERANCE, QUANTIZED_PRECISIONS, component_dtype
from wan_rt.resolve import resolve_checkpoint
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engines_dir import EngineManifest, built_loras, read_index, verify
from wan_rt.runtime.engine_component import module_runner
from wan_rt.runtime.graphs import ShapeProfile, graph_module, graph_spec, sample_inputs

TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}


@dataclass
class ParityRow:
    component: str
    graph: str
    shape: str          # "opt" | "min" | "e2e" | "traj" (a step of the oracle's trajectory)
    error: float        # relative error (frames: max abs error; PSNR rows: dB)
    tolerance: float
    note: str = ""
    higher_is_better: bool = False  # PSNR: the value must reach the tolerance

    @property
    def ok(self) -> bool:
        return self.error >= self.tolerance if self.higher_is_better else self.error <= self.tolerance


def graph_parity(engines_dir: Path, model: Optional[str] = None, device: Optional[torch.device] = None,
                 seed: int = 0) -> list[ParityRow]:
    engines_dir = Path(engines_dir)
    index = read_index(engines_dir)
    model = model or index["model"]
    resolved = resolve_checkpoint(model)
    backend_mod = get_backend(index["backend"])
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    loras = built_loras(engines_dir)  # fused into the engines at build time: the reference gets them too
    for name in index["components"]:
        manifest = verify(engines_dir / name, resolved, index["model"], backend_mod, loras.get(name, ()))
        profile = ShapeProfile(**manifest.profile)
        tol = TOLERANCE.get(manifest.precision, 0.1)
        dtype = component_dtype(name, manifest.precision, manifest.backend, dev)
        if manifest.precision in QUANTIZED_PRECISIONS:
            if name.startswith("dit"):
                continue  # on the trajectory instead: quality_report
            tol = TOLERANCE[{torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]]
        reference_model = load_component(resolved.files, name, dtype=torch.float32, device=dev)
        for path, scale in loras.get(name, ()):
            load_lora(reference_model, path, scale, mode="fuse")
        for graph, info in manifest.graphs.items():
            gspec = graph_spec(resolved.spec, name, graph)
            engine = backend_mod.load_graph(engines_dir / name, gspec, info["files"], compute_dtype=dtype, device=dev)
            reference = module_runner(graph_module(name, graph, reference_model), gspec)
            for which in ("opt", "min"):
                inputs = sample_inputs(gspec, getattr(profile, which), torch.float32, dev, seed=seed)
                want = reference(inputs)
                got = engine({k: v.to(dtype) if v.is_floating_point() and _is_compute(gspec, k) else v
                              for k, v in inputs.items()})
                err = max(relative_error(got[n].float().cpu(), want[n].float().cpu()) for n in gspec.output_names)
                rows.append(ParityRow(name, graph, which, err, tol))
        del reference_model
    return rows


def _is_compute(gspec, name: str) -> bool:
    return next(t.dtype for t in gspec.inputs if t.name == name) == "compute"


def video_parity(engines_dir: Path, model: Optional[str] = None, steps: int = 2,
                 device: Optional[torch.device] = None) -> ParityRow:
    """The same short generation through the engines and through eager fp32, same latents."""
    from wan_rt.config import latent_shape

    index = read_index(Path(engines_dir))
    model = model or index["model"]
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = resolve_checkpoint(model).spec
    loras = built_loras(Path(engines_dir))
    by_expert = dict(lora=loras.get(spec.dit_components[0], []), lora_2=loras.get("dit_low_noise", []))
    engine_pipe = WanPipeline.from_pretrained(model, engines_dir=str(engines_dir), device=dev, **by_expert)
    eager_pipe = WanPipeline.from_pretrained(model, backend="eager", device=dev, dtype=torch.float32, **by_expert)
    manifest_profile = ShapeProfile(**_first_manifest(Path(engines_dir), index).profile)
    st, sh, sw = spec.vae.stride
    height, width = manifest_profile.opt["h"] * sh, manifest_profile.opt["w"] * sw
    frames = (manifest_profile.opt["T"] - 1) * st + 1
    latents = torch.randn((1, *latent_shape(spec, height, width, frames)), generator=torch.Generator().manual_seed(0))
    image = _parity_image(height, width) if spec.task == "i2v" else None
    kwargs = dict(prompt="a red fox running through snow", height=height, width=width, num_frames=frames,
                  num_inference_steps=steps, image=image, output_type="np")
    for pipe in (engine_pipe, eager_pipe):
        pipe.set_progress_bar_config(disable=True)
    got = torch.from_numpy(engine_pipe(latents=latents.clone(), **kwargs).frames)
    want = torch.from_numpy(eager_pipe(latents=latents.clone(), **kwargs).frames)
    tol = 1e-3 if index["precision"] == "fp32" else 0.1
    return ParityRow("pipeline", "video", "e2e", max_abs_error(got, want), tol,
                     note=f"PSNR {psnr(got, want):.1f} dB, {steps} steps, {width}x{height}x{frames}")


def _first_manifest(engines_dir: Path, index: dict):
    dits = [c for c in index["components"] if c.startswith("dit")]
    return EngineManifest.read(engines_dir / (dits[0] if dits else index["components"][0]))


def _parity_image(height: int, width: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def quality_report(engines_dir: Path, model: Optional[str] = None, steps: Optional[int] = None,
                   device: Optional[torch.device] = None) -> list[ParityRow]:
    """Quantized DiTs against the fp32 oracle on its own trajectory (see module doc): one row per
    denoising step (noise_pred relative L2, worst of the step's calls) and one decoded-frame PSNR
    row. `steps`: the schedule length (default: the model's, which calibration used too)."""
    from wan_rt.export.calibrate import record_trajectory, synthetic_image

    engines_dir = Path(engines_dir)
    index = read_index(engines_dir)
    model = model or index["model"]
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dits = [c for c in index["components"] if c.startswith("dit")]
    if index["precision"] not in QUANTIZED_PRECISIONS or not dits:
        return []
    manifest = EngineManifest.read(engines_dir / dits[0])
    tol = manifest.build_args.get("tolerances") or QUALITY_TOLERANCE[index["precision"]]
    pipe = WanPipeline.from_pretrained(model, engines_dir=str(engines_dir), device=dev)
    pipe.set_progress_bar_config(disable=True)
    spec, profile = pipe.spec, ShapeProfile(**manifest.profile)
    st, sh, sw = spec.vae.stride
    height, width, frames = profile.opt["h"] * sh, profile.opt["w"] * sw, (profile.opt["T"] - 1) * st + 1
    steps = steps or spec.sample_steps
    prompt = "a red fox running through snow"
    oracle = record_trajectory(model, prompts=[prompt], steps=steps, height=height, width=width, frames=frames,
                               device=dev)

    errors: dict[tuple[int, str], list[float]] = defaultdict(list)
    timesteps: dict[int, float] = {}
    for call in oracle.calls:  # the engine expert on exactly the oracle's inputs at that step
        got = pipe.components[call.component](**{k: v.to(dev) for k, v in call.inputs.items()})["noise_pred"]
        errors[(call.step, call.component)].append(relative_error(got.float().cpu(), call.noise_pred))
        timesteps[call.step] = float(call.inputs["timestep"].max())
    rows = [ParityRow(component, f"step{step}", "traj", max(errs), tol["noise_pred_rel_l2"],
                      note=f"noise_pred rel L2 vs fp32, t={timesteps[step]:.0f}")
            for (step, component), errs in sorted(errors.items())]

    image = synthetic_image(height, width) if spec.task == "i2v" else None
    video = pipe(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                 image=image, latents=oracle.latents[0].clone(), output_type="pt").frames
    rows.append(ParityRow("pipeline", "video", "psnr", psnr(video.float().cpu(), oracle.frames[0]),
                          tol["frame_psnr_db"], higher_is_better=True,
                          note=f"decoded frames vs fp32 oracle (dB), {steps} steps, {width}x{height}x{frames}"))
    return rows


def parity_rows(engines_dir: Path, model: Optional[str] = None, steps: int = 2,
                device: Optional[torch.device] = None) -> list[ParityRow]:
    """Everything `wan-rt parity` checks: graphs on random inputs, then (steps > 0) the short
    video, or for quantized engines the quality report on the oracle's trajectory."""
    rows = graph_parity(Path(engines_dir), model=model, device=device)
    if steps > 0:
        if read_index(Path(engines_dir))["precision"] in QUANTIZED_PRECISIONS:
            rows += quality_report(Path(engines_dir), model=model, device=device)
        else:
            rows.append(video_parity(Path(engines_dir), model=model, steps=steps, device=device))
    return rows


def format_rows(rows: list[ParityRow]) -> str:
    lines = [f"{'component':<16} {'graph':<6} {'shape':<5} {'error':>10} {'tolerance':>10}  result"]
    for r in rows:
        value, bound = (f"{r.error:>7.1f} dB", f">={r.tolerance:.0f} dB") if r.higher_is_better \
            else (f"{r.error:.2e}", f"{r.tolerance:.0e}")
        lines.append(f"{r.component:<16} {r.graph:<6} {r.shape:<5} {value:>10} {bound:>10}  "
                     f"{'ok' if r.ok else 'FAIL'}{'  ' + r.note if r.note else ''}")
    return "\n".join(lines)
