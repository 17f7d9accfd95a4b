"""Post-training calibration on the model's own denoising trajectory.

    stats = calibrate_checkpoint("tiny-t2v-A14B", ["dit_high_noise"], steps=4, height=32, ...)
    # (a build calibrates at calibration_size(spec, height, width, frames): small)
    trajectory = record_trajectory("tiny-t2v-A14B", prompts=[...], steps=4, height=32, ...)
    stats = calibrate_experts(resolved, trajectory, ["dit_high_noise", "dit_low_noise"])

1. `calibrate_checkpoint` is what `wan-rt build --precision fp8|int8` runs: the eager pipeline,
   every calibration prompt in one batch, with each component loaded on its first call and
   released before the next one loads (text encoder, then the experts in stage order; a VAE only
   for an I2V image condition: nothing is decoded), each in the dtype its file stores when that
   is bf16/fp16 (memory-mapped, no copy; `calibration_dtypes`), fp32 where the file is fp32 and
   fits in RAM. Statistics are recorded while the experts run (no replay); the run stops as soon
   as every expert to calibrate has had its stage. Cost, by default (QuantConfig): 2 prompts x
   min(8, the model's steps) steps at calibration_size (at most 256 px on the longer side, 17
   frames), CFG: 4 samples per step; every expert's own steps only.
2. `record_trajectory` runs the eager pipeline (float32 by default: the oracle) once per prompt
   and records every DiT call: its inputs (latents, timestep, context), its noise_pred, and the
   decoded frames. That record serves `wan-rt parity`'s per-step quality report.
3. `calibrate_experts` replays each expert's own calls of a trajectory through a float32 WanDiT.
   Both keep statistics with forward pre-hooks on every nn.Linear (`ActivationRecorder`):
   per-tensor amax (max |x| over all calls) and per-input-channel amax (for SmoothQuant) of each
   linear layer's input, and the amax of q, k (after RoPE) and v at every attention op, read
   through a recording `Ops` (wan_rt.models.ops); maxima are exact in any dtype and kept in fp32.
   A two-expert schedule that gives an expert no step (tiny presets at few steps) calibrates that
   expert on all calls rather than on nothing; `CalibrationStats.note` says so.

Calibrating in bf16 instead of fp32 changes the amax values slightly and the quantized DiT's
error not measurably. Measured (random weights; 2 prompts x 4 steps at 32x32x9; mean relative L2
of noise_pred, Q/DQ graph against the fp32 graph in ONNX Runtime, on a 4-step fp32 trajectory of
another seed), fp32-calibrated -> bf16-calibrated:

    model                         expert  fp8                int8
    tiny-t2v-A14B (2 layers)      high    0.01254 -> 0.01244  0.00658 -> 0.00649
                                  low     0.01025 -> 0.01043  0.00976 -> 0.00944
    tiny-ti2v-5B (2 layers)       dit     0.01065 -> 0.01129  0.01442 -> 0.01455
    tiny-t2v-A14B at 6 layers     high    0.01689 -> 0.01671  0.01355 -> 0.01306
                                  low     0.01494 -> 0.01507  0.01267 -> 0.01284

tests/test_quantize.py fails if bf16 calibration gives more than 1.25x the fp32 one's fp8 error.

Statistics are keyed by module path in the WanDiT ("blocks.3.attn1.to_q"), which is how the Q/DQ
pass (export/quantize.py) finds them from ONNX node names.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

DEFAULT_PROMPTS = (
    "a red fox running through snow, cinematic, golden light",
    "a city street at night, neon lights, rain, a camera tracks a cyclist",
)
# The trajectory is for activation statistics (amax per layer and channel), which depend on the
# content far more than on the token count; a full-size one (720p x 81 frames) would cost 2
# prompts x up to 8 steps x CFG of full-size forwards before the first engine is built.
CALIB_MAX_SIDE = 256    # pixels on the longer side
CALIB_MAX_FRAMES = 17   # 5 latent frames


def calibration_size(spec, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """The (height, width, frames) a build calibrates at: the build's size scaled down to at most
    CALIB_MAX_SIDE px on the longer side (aspect kept, multiples of the model's spatial multiple,
    two DiT patches per axis at least) and CALIB_MAX_FRAMES frames; never larger than the build."""
    m = spec.spatial_multiple
    scale = min(1.0, CALIB_MAX_SIDE / max(height, width))

    def side(n: int) -> int:
        return min(n, max(2 * m, int(n * scale) // m * m))

    return side(height), side(width), min(frames, CALIB_MAX_FRAMES)


# ------------------------------------------------------------------------------------ trajectory
@dataclass
class DiTCall:
    """One call of an expert inside the oracle's denoising loop (tensors on the CPU, float32)."""

    component: str
    prompt_index: int
    step: int                   # denoising step index within its prompt's run
    inputs: dict[str, Tensor]   # latents, timestep, context
    noise_pred: Tensor


@dataclass
class Trajectory:
    calls: list[DiTCall]
    frames: list[Tensor]        # decoded video per prompt, [1, F, 3, H, W] in [0, 1]
    latents: list[Tensor]       # the initial noise per prompt
    prompts: list[str]
    steps: int
    size: tuple[int, int, int]  # height, width, frames

    def calls_for(self, component: str) -> list[DiTCall]:
        return [c for c in self.calls if c.component == component]


class _RecordingExpert:
    """Stands in for an expert component: forwards everything, records each call."""

    def __init__(self, inner, name: str, sink: Callable[[str, dict[str, Tensor], Tensor], None]):
        self._inner, self._name, self._sink = inner, name, sink

    def __getattr__(self, attr: str):
        return getattr(self._inner, attr)  # load/unload/nbytes for the residency manager

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        out = self._inner(**inputs)
        self._sink(self._name, inputs, out["noise_pred"])
        return out


def record_trajectory(model: str, *, prompts: Sequence[str] = DEFAULT_PROMPTS, steps: int, height: int,
                      width: int, frames: int, device: torch.device | str = "cpu", seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Trajectory:
    """Run the eager pipeline once per prompt (seeded noise) and record every DiT call."""
    from wan_rt.eager import build_eager_components
    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.pipeline import Pipeline
    from wan_rt.resolve import resolve_checkpoint

    resolved, device = resolve_checkpoint(model), torch.device(device)
    pipe = Pipeline(resolved.spec, build_eager_components(resolved, device, dtype, kernels="torch"),
                    load_tokenizer(resolved.files.tokenizer), resolved.defaults, device)
    pipe.set_progress_bar_config(disable=True)
    spec = pipe.spec
    log = _CallLog()
    for name in spec.dit_components:
        pipe.components[name] = _RecordingExpert(pipe.components[name], name, log.sink)
    image = synthetic_image(height, width) if spec.task == "i2v" else None
    videos, noises = [], []
    for i, prompt in enumerate(prompts):
        log.next_prompt(i)
        noise = _noise(spec, (height, width, frames), seed + i)
        out = pipe(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                   image=image, latents=noise.clone(), output_type="pt")
        noises.append(noise)
        videos.append(_frames(out.frames))
    return Trajectory(log.calls, videos, noises, list(prompts), steps, (height, width, frames))


class _CallLog:
    """Collects an expert's calls (CPU, float32) and numbers the steps of the prompt being run."""

    def __init__(self):
        self.calls: list[DiTCall] = []
        self.prompt, self.step, self.t = 0, -1, None

    def calls_for(self, component: str) -> list[DiTCall]:
        return [c for c in self.calls if c.component == component]

    def next_prompt(self, index: int) -> None:
        self.prompt, self.step, self.t = index, -1, None

    def sink(self, name: str, inputs: dict[str, Tensor], noise_pred: Tensor) -> None:
        t = float(inputs["timestep"].flatten().max())
        if t != self.t:  # CFG's two calls share a timestep; every step has a new one
            self.step, self.t = self.step + 1, t
        self.calls.append(DiTCall(name, self.prompt, self.step,
                                  {k: v.detach().float().cpu().clone() for k, v in inputs.items()},
                                  noise_pred.detach().float().cpu().clone()))


def _noise(spec, size: tuple[int, int, int], seed: int) -> Tensor:
    from wan_rt.config import latent_shape

    return torch.randn((1, *latent_shape(spec, *size)), generator=torch.Generator().manual_seed(seed))


def _frames(video) -> Tensor:
    return torch.as_tensor(video).detach().float().cpu()


def synthetic_image(height: int, width: int):
    """A fixed noise image: the I2V condition for calibration and parity runs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ statistics
@dataclass
class LinearStats:
    amax: float                 # max |x| over every element of every call
    channel_amax: list[float]   # max |x[..., j]| per input channel j


@dataclass
class CalibrationStats:
    linear: dict[str, LinearStats] = field(default_factory=dict)
    attention: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> {"q", "k", "v"}
    calls: int = 0
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CalibrationStats":
        data = json.loads(text)
        data["linear"] = {k: LinearStats(**v) for k, v in data["linear"].items()}
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        return cls.from_json(Path(path).read_text())

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class ActivationRecorder:
    """Forward pre-hooks on every nn.Linear of `model`, and a recording Ops on every module that
    calls `self.ops` (attention), while the `with` block is open. Numerics are untouched."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._amax: dict[str, Tensor] = {}
        self._channel: dict[str, Tensor] = {}
        self._attention: dict[str, dict[str, float]] = {}
        self._handles: list = []
        self._ops: dict[str, object] = {}
        self.calls = 0

    def __enter__(self) -> "ActivationRecorder":
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            if hasattr(module, "ops"):
                self._ops[name] = module.ops
                module.ops = self._recording_ops(name, module.ops)
        self._handles.append(self.model.register_forward_pre_hook(self._count))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        modules = dict(self.model.named_modules())
        for name, ops in self._ops.items():
            modules[name].ops = ops
        self._handles, self._ops = [], {}

    def _count(self, _module, _args) -> None:
        self.calls += 1

    def _linear_hook(self, name: str):
        def hook(_module, args) -> None:
            x = args[0].detach()
            channel = x.abs().float().reshape(-1, x.shape[-1]).amax(0)
            self._channel[name] = channel if name not in self._channel else torch.maximum(self._channel[name], channel)
            self._amax[name] = self._channel[name].max()

        return hook

    def _recording_ops(self, name: str, base):
        from wan_rt.models.ops import apply_rope

        def note(q: Tensor, k: Tensor, v: Tensor) -> None:
            seen = self._attention.setdefault(name, {"q": 0.0, "k": 0.0, "v": 0.0})
            for key, t in (("q", q), ("k", k), ("v", v)):
                seen[key] = max(seen[key], float(t.detach().abs().max()))

        def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            note(q, k, v)
            return base.attention(q, k, v)

        def rope_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
            # The eager op's own composition (ops.rope_attention), so q and k are seen after RoPE,
            # as the exported graph's attention matmuls see them.
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            note(q, k, v)
            return base.attention(q, k, v)

        # replace(): any other op the module's Ops carries (fused norms, kernels) stays as it was
        return dataclasses.replace(base, rope_attention=rope_attention, attention=attention)

    def stats(self, note: str = "") -> CalibrationStats:
        linear = {n: LinearStats(float(self._amax[n]), [float(c) for c in self._channel[n]]) for n in self._amax}
        return CalibrationStats(linear, {k: dict(v) for k, v in self._attention.items()}, self.calls, note)


# ------------------------------------------------------------------------------------ experts
def calibrate_module(dit: nn.Module, calls: Iterable[DiTCall], device: torch.device | str = "cpu",
                     note: str = "") -> CalibrationStats:
    """Replay `calls` through `dit` (a float32 WanDiT) with an ActivationRecorder."""
    with ActivationRecorder(dit) as recorder, torch.inference_mode():
        for call in calls:
            x = {k: v.to(device) for k, v in call.inputs.items()}
            dit(x["latents"], x["timestep"], x["context"])
    return recorder.stats(note)


def calibrate_experts(resolved, trajectory: Trajectory, components: Sequence[str],
                      device: torch.device | str = "cpu",
                      log: Optional[Callable[[str], None]] = None) -> dict[str, CalibrationStats]:
    """Stats per expert, each from its own steps of the trajectory (all steps if it had none)."""
    from wan_rt.models import load_dit

    out = {}
    for name in components:
        calls, note = trajectory.calls_for(name), ""
        if not calls:
            calls = trajectory.calls
            note = (f"no step of the {trajectory.steps}-step calibration schedule reached {name}; "
                    "calibrated on every step's inputs")
            if log:
                log(f"  {name:<16} {note}")
        dit = load_dit(resolved.files, name, dtype=torch.float32, device=device)
        out[name] = calibrate_module(dit, calls, device, note)
        del dit
    return out


# ------------------------------------------------------------------------------------ a build's calibration
class _Enough(Exception):
    """Every expert to calibrate has had its stage: the rest of the run would add nothing."""


class _OneResident:
    """Loads a component on its first call and releases the one before: one set of weights at a time."""

    def __init__(self, load: Callable[[str], object], release: Callable[[str, object], None]):
        self._load, self._release = load, release
        self.name: Optional[str] = None
        self.component: object = None

    def get(self, name: str):
        if name != self.name:
            self.drop()
            self.component, self.name = self._load(name), name
        return self.component

    def drop(self) -> None:
        if self.name is not None:
            name, component = self.name, self.component
            self.name = self.component = None
            self._release(name, component)
            del component
            gc.collect()


class _Staged:
    """A component as the Pipeline sees it: loaded (and the previous one released) on first call.
    It has no load/unload/nbytes, so the residency manager leaves it alone."""

    def __init__(self, name: str, holder: _OneResident):
        self._name, self._holder = name, holder

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        return self._holder.get(self._name)(**inputs)


def _stored_dtype(tensors) -> Optional[torch.dtype]:
    """The floating dtype holding most of a component's bytes (None: GGUF blocks or no floats)."""
    by_dtype: dict[torch.dtype, int] = {}
    for dtype, _numel, nbytes, _block_linear in tensors:
        if dtype is not None and dtype.is_floating_point:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None


def calibration_dtypes(resolved, names: Sequence[str], size: Optional[tuple[int, int, int]] = None,
                       budget: Optional[int] = None) -> dict[str, torch.dtype]:
    """The dtype each component calibrates in: the one its file stores when that is bf16 or fp16
    (used memory-mapped, nothing converted); float32 for float32 files (and fp8 / GGUF ones,
    dequantized on load) when that component alone fits in host RAM at `size`
    (wan_rt.host_memory), else bf16. VAEs run in float32 whatever is asked (wan_rt.eager)."""
    from wan_rt.host_memory import available_bytes, host_need, stored_tensors

    budget = available_bytes() if budget is None else budget
    stored = stored_tensors(resolved.spec, resolved.files, names)
    out = {}
    for name in names:
        key = "vae" if name.startswith("vae_") else name
        kept = _stored_dtype(stored[key])
        if kept in (torch.bfloat16, torch.float16):
            out[name] = kept
            continue
        need = host_need(resolved.spec, resolved.files, [name], torch.float32, size, {key: stored[key]})
        out[name] = torch.float32 if need.owned <= budget else torch.bfloat16
    return out


def calibrate_checkpoint(model: str, experts: Sequence[str], *, prompts: Sequence[str] = DEFAULT_PROMPTS,
                         steps: int, height: int, width: int, frames: int, device: torch.device | str = "cpu",
                         seed: int = 0, dtypes: Optional[dict[str, torch.dtype]] = None,
                         log: Optional[Callable[[str], None]] = None) -> dict[str, CalibrationStats]:
    """Statistics of `experts` from one eager run of every prompt (as a batch; prompt i's noise
    seeded seed + i), each component resident alone, in `dtypes` (default calibration_dtypes);
    see the module doc for what it costs."""
    from wan_rt.eager import build_eager_components
    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.pipeline import Pipeline
    from wan_rt.resolve import resolve_checkpoint

    resolved, device = resolve_checkpoint(model), torch.device(device)
    spec = resolved.spec
    image = synthetic_image(height, width) if spec.task == "i2v" else None  # I2V's condition needs the encoder
    names = ["text_encoder", *spec.dit_components, *(["vae_encoder"] if image is not None else [])]
    dtypes = dict(dtypes or calibration_dtypes(resolved, names, (height, width, frames)))
    if log:
        log("  calibration dtypes: " + ", ".join(f"{n} {str(dtypes[n]).removeprefix('torch.')}" for n in names))
    recorded = _CallLog()
    recorders: dict[str, ActivationRecorder] = {}
    stats: dict[str, CalibrationStats] = {}

    def load(name: str):
        if name in spec.dit_components and name not in experts and set(experts) <= set(stats):
            raise _Enough
        component = build_eager_components(resolved, device, dtypes[name], [name], kernels="torch")[name]
        if name not in spec.dit_components:
            return component
        if name in experts:
            recorders[name] = ActivationRecorder(component.module).__enter__()
        return _RecordingExpert(component, name, recorded.sink)

    def release(name: str, _component) -> None:
        if name in recorders:
            stats[name] = _finish(recorders.pop(name), len(recorded.calls_for(name)))

    holder = _OneResident(load, release)
    pipe = Pipeline(spec, {n: _Staged(n, holder) for n in names}, load_tokenizer(resolved.files.tokenizer),
                    resolved.defaults, device)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.cat([_noise(spec, (height, width, frames), seed + i) for i in range(len(prompts))])
    try:
        pipe(prompt=list(prompts), height=height, width=width, num_frames=frames, num_inference_steps=steps,
             image=image, latents=noise, output_type="latent")
    except _Enough:
        pass
    finally:
        holder.drop()
    for name in experts:
        if name not in stats:  # its stage got no step: every call's inputs instead of nothing
            note = (f"no step of the {steps}-step calibration schedule reached {name}; "
                    "calibrated on every step's inputs")
            if log:
                log(f"  {name:<16} {note}")
            component = build_eager_components(resolved, device, dtypes[name], [name], kernels="torch")[name]
            with ActivationRecorder(component.module) as recorder:
                for call in recorded.calls:
                    component(**call.inputs)
            stats[name] = _finish(recorder, len(recorded.calls), note)
            del component
    return {name: stats[name] for name in experts}


def _finish(recorder: ActivationRecorder, calls: int, note: str = "") -> CalibrationStats:
    """The recorder's statistics; its call count is the component's (the eager expert runs the
    DiT's graphs, not its forward, so the recorder's own count stays 0)."""
    recorder.__exit__(None, None, None)
    recorder.calls = calls
    return recorder.stats(note)
