"""`wan-rt build`: export every component of a checkpoint and compile engines, atomically.

Each component is built into a hidden temporary folder of the engines dir, its manifest written
last, and only then renamed into place: an interrupted build leaves nothing that loads. A
component whose manifest already verifies against the checkpoint, backend, precision and
profile is skipped, so building twice costs nothing the second time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from wan_rt.config import ModelSpec, spec_hash
from wan_rt.loader import ResolvedCheckpoint, resolve_checkpoint
from wan_rt.precision import QUALITY_TOLERANCE, QUANTIZED_PRECISIONS, quantized_base_dtype
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.graphs import (ShapeProfile, components_of, graph_module, graph_names, graph_spec,
                                   shape_profile)
from wan_rt.runtime.manifest import (INDEX, EngineManifest, StaleEngineError, device_name, first_difference,
                                     weights_fingerprint)

if TYPE_CHECKING:
    from wan_rt.export.quantize import QuantConfig, QuantPlan
    from wan_rt.export.trt_build import BuildConfig

CALIBRATION_FILE = "calibration.json"
# fp8 / int8: the DiTs' linear layers quantized with Q/DQ after a calibration run (export/quantize.py,
# wan_rt/precision.py); everything else at the backend's base dtype (component_dtype).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp8": torch.float32, "int8": torch.float32}


def best_backend() -> str:
    """TensorRT where it runs; otherwise ONNX Runtime (fast to build, runs on any CPU)."""
    from wan_rt.runtime.backends import trt

    return "trt" if trt.is_available() else "ort"


def default_precision(backend: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "fp16" if backend == "ort" else "bf16"


def component_dtype(component: str, precision: str, backend: Optional[str] = None,
                    device: Optional[torch.device] = None) -> torch.dtype:
    """The VAE stays fp32 (as the official code runs it): it is a small share of the time and
    the streaming cache accumulates rounding. umT5 is never fp16 (its activations overflow it;
    bf16 is fine). Everything else follows the requested precision. A quantized precision
    (fp8, int8) is the base dtype the Q/DQ graph is built in: bf16 under TensorRT, fp32 on
    ONNX Runtime (wan_rt.precision.quantized_base_dtype); an AOTInductor fp8 build is bf16 on
    a GPU and fp32 on a CPU around its FP8 GEMMs."""
    if precision in QUANTIZED_PRECISIONS:
        return quantized_base_dtype(component, backend, device.type if device is not None else "cpu")
    if component.startswith("vae") or (component == "text_encoder" and precision == "fp16"):
        return torch.float32
    return PRECISIONS[precision]


def weight_paths(resolved: ResolvedCheckpoint, component: str) -> list[Path]:
    files = resolved.files
    if component == "text_encoder":
        return [files.text_encoder]
    if component.startswith("vae"):
        return [files.vae]
    return [files.dits[component]]


def expected_manifest(resolved: ResolvedCheckpoint, model: str, component: str, backend: str, precision: str,
                      profile: ShapeProfile, device: torch.device, fingerprint: Optional[str] = None) -> EngineManifest:
    """The manifest a fresh build would write (files and timings aside)."""
    spec = resolved.spec
    graphs = {}
    for g in graph_names(component):
        gs = graph_spec(spec, component, g)
        graphs[g] = {"files": [], "inputs": [dataclasses.asdict(t) for t in gs.inputs],
                     "outputs": [dataclasses.asdict(t) for t in gs.outputs]}
    # JSON round trip so tuples compare equal to what a manifest file holds.
    graphs = json.loads(json.dumps(graphs))
    return EngineManifest(
        component=component, backend=backend, precision=precision, spec_name=spec.name,
        spec_hash=spec_hash(spec),
        weights_fingerprint=fingerprint or weights_fingerprint(weight_paths(resolved, component)),
        profile={"min": profile.min, "opt": profile.opt, "max": profile.max}, graphs=graphs,
        model=model, device=device_name(device),
    )


def _load_model(resolved: ResolvedCheckpoint, component: str, dtype: torch.dtype, device: torch.device):
    from wan_rt.models import load_dit, load_text_encoder, load_vae

    if component == "text_encoder":
        return load_text_encoder(resolved.files, dtype=dtype, device=device)
    if component.startswith("vae"):
        return load_vae(resolved.files, dtype=dtype, device=device)
    return load_dit(resolved.files, component, dtype=dtype, device=device)


def build_engines(model: str, backend: str, engines_dir: Path, *, precision: Optional[str] = None,
                  height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None,
                  components: Optional[list[str]] = None, force: bool = False,
                  device: Optional[str] = None, log: Callable[[str], None] = print,
                  quant_config: Optional["QuantConfig"] = None,
                  trt_config: Optional["BuildConfig"] = None, quick_compile: bool = False,
                  kernels: str = "auto", attention: str = "exact") -> list[EngineManifest]:
    """`quant_config` tunes fp8/int8 builds (calibration prompts and steps, FP8 attention,
    SmoothQuant alpha); `trt_config` the TensorRT builder (optimization level, refit, weight
    streaming); `quick_compile` (aoti) compiles scalar C++ kernels with an -O0 wrapper: about
    half the compile time on a CPU, slower engines, the same ops. `kernels` ("auto": triton on a
    GPU, else torch) and `attention` ("exact" | "int8") choose the ops compiled into AOTInductor
    DiT packages (wan_rt.runtime.fast.dit_variant); with precision fp8 their linear layers are
    FP8 GEMMs (torch._scaled_mm, dynamic activation scales: no calibration). All are recorded in
    the manifests' build_args, so changing one rebuilds."""
    backend_mod = get_backend(backend)
    if not backend_mod.is_available():
        why = getattr(backend_mod, "unavailable_reason", lambda: "its libraries are not installed")()
        raise ValueError(f"backend {backend!r} is not available on this machine: {why}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or default_precision(backend, dev)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported yet; choose from {', '.join(PRECISIONS)}")
    if backend != "aoti":
        for flag, value, default in (("--quick-compile", quick_compile, False), ("--kernels", kernels, "auto"),
                                     ("--attention", attention, "exact")):
            if value != default:
                raise ValueError(f"{flag} is an AOTInductor option; the {backend} backend has no such mode")
    variant = None
    if backend == "aoti":
        from wan_rt.runtime.fast import dit_variant

        variant = dit_variant(precision, dev, kernels=kernels, attention=attention)
    if precision in QUANTIZED_PRECISIONS and not (backend in ("ort", "trt") or (backend, precision) == ("aoti", "fp8")):
        raise ValueError(f"{precision} engines are Q/DQ ONNX graphs: build them with --backend ort or trt "
                         "(aoti takes fp8: FP8 GEMMs through torch._scaled_mm)")
    resolved = resolve_checkpoint(model)
    spec = resolved.spec
    height, width = height or spec.height, width or spec.width
    frames = frames or spec.num_frames
    from wan_rt.pipeline import check_request

    check_request(spec, height, width, frames, 1)
    profile = shape_profile(spec, height=height, width=width, frames=frames)
    wanted = components or list(components_of(spec))
    unknown = [c for c in wanted if c not in components_of(spec)]
    if unknown:
        raise ValueError(f"{spec.name} has no component {unknown[0]!r}; it has {', '.join(components_of(spec))}")
    model_id = model if not Path(model).exists() else str(Path(model).resolve())
    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    _check_index(engines_dir, model_id, spec, backend, precision, force)
    _remove_leftovers(engines_dir)

    quantized = precision in QUANTIZED_PRECISIONS and backend != "aoti"  # aoti fp8: dynamic scales
    if quantized:
        from wan_rt.export.quantize import QuantConfig

        quant_config = quant_config or QuantConfig(precision)
        if quant_config.precision != precision:
            raise ValueError(f"quant_config is for {quant_config.precision}, the build for {precision}")
    if backend == "trt":
        from wan_rt.export.trt_build import BuildConfig

        trt_config = trt_config or BuildConfig()

    built = []
    calibration: Optional[dict] = None
    for name in wanted:
        # Backends that cannot serve the whole profile narrow it (aoti: DiTs need 2+ patches per axis).
        served = getattr(backend_mod, "build_profile", lambda _s, _n, p: p)(spec, name, profile)
        want = expected_manifest(resolved, model_id, name, backend, precision, served, dev)
        want.tool_versions = backend_mod.versions()
        want.build_args = {"height": height, "width": width, "frames": frames}
        options: dict = {}
        if trt_config is not None and backend == "trt":
            want.build_args.update(trt_config.manifest_args())
            options.update(config=trt_config, timing_cache=engines_dir / "timing.cache")
        if backend == "aoti":
            want.build_args["quick_compile"] = quick_compile
            options["fast"] = quick_compile
            if variant is not None and name in spec.dit_components:
                want.build_args.update(variant.manifest_args())
                if precision in QUANTIZED_PRECISIONS:
                    want.build_args["tolerances"] = QUALITY_TOLERANCE[precision]
        quantize = quantized and name in spec.dit_components
        if quantize:
            want.build_args.update(quant_config.manifest_args(), tolerances=QUALITY_TOLERANCE[precision])
        final = engines_dir / name
        if not force and _up_to_date(final, want, backend_mod):
            log(f"  {name:<16} up to date ({final})")
            built.append(EngineManifest.read(final))
            continue
        if quantize:
            if calibration is None:  # once, before the first DiT graph, for every expert
                calibration = _calibrate(resolved, model, wanted, quant_config, (height, width, frames), dev, log)
            options["quant"] = _quant_plan(spec, quant_config, calibration[name])
        log(f"  {name:<16} building ({backend}, {precision}) ...")
        start = time.perf_counter()
        manifest = _build_component(resolved, name, want, backend_mod, served, dev, engines_dir, options,
                                    variant if name in spec.dit_components else None)
        log(f"  {name:<16} built in {time.perf_counter() - start:.1f}s -> {final}")
        built.append(manifest)
    _write_index(engines_dir, model_id, spec, backend, precision, [m.component for m in built])
    return built


def _up_to_date(folder: Path, want: EngineManifest, backend_mod) -> bool:
    try:
        have = EngineManifest.read(folder)
    except StaleEngineError:
        return False
    # Build flags (quantization recipe, TensorRT options) make a different engine too.
    same_args = all(have.build_args.get(k) == json.loads(json.dumps(v)) for k, v in want.build_args.items())
    return (first_difference(have, want) is None and version_mismatch(have, backend_mod) is None and same_args
            and all((folder / f).is_file() for f in have.files()))


def _calibrate(resolved: ResolvedCheckpoint, model: str, wanted: list[str], config: "QuantConfig",
               size: tuple[int, int, int], device: torch.device, log: Callable[[str], None]) -> dict:
    """Activation statistics of every expert to build, from the fp32 eager pipeline's own
    denoising trajectory at the build's size (export/calibrate.py)."""
    from wan_rt.export.calibrate import calibrate_experts, record_trajectory

    dits = [c for c in wanted if c in resolved.spec.dit_components]
    steps = min(config.calib_steps, resolved.spec.sample_steps)
    log(f"  calibrating {', '.join(dits)}: {len(config.calib_prompts)} prompts x {steps} steps of the fp32 "
        "eager pipeline ...")
    start = time.perf_counter()
    height, width, frames = size
    trajectory = record_trajectory(model, prompts=config.calib_prompts, steps=steps, height=height, width=width,
                                   frames=frames, device=device)
    stats = calibrate_experts(resolved, trajectory, dits, device, log)
    log(f"  calibrated in {time.perf_counter() - start:.1f}s ({len(trajectory.calls)} DiT calls)")
    return stats


def _quant_plan(spec: ModelSpec, config: "QuantConfig", stats) -> "QuantPlan":
    from wan_rt.export.quantize import QuantPlan

    return QuantPlan(config, stats, spec.dit.num_layers, spec.dit.head_dim)


def version_mismatch(manifest: EngineManifest, backend_mod) -> Optional[str]:
    """Backends whose artifacts are tied to a tool version (AOTI .so files, TensorRT plans)."""
    now = backend_mod.versions()
    for key in getattr(backend_mod, "STRICT_VERSIONS", ()):
        if manifest.tool_versions.get(key) != now.get(key):
            return f"built with {key} {manifest.tool_versions.get(key)}, this machine has {now.get(key)}"
    return None


def _build_component(resolved: ResolvedCheckpoint, name: str, want: EngineManifest, backend_mod,
                     profile: ShapeProfile, device: torch.device, engines_dir: Path,
                     options: Optional[dict] = None, variant=None) -> EngineManifest:
    """`options` go to the backend's build_graph (quant: a QuantPlan; TensorRT's config);
    `variant` (a fast.DiTVariant) is applied to a DiT before its graphs are exported."""
    start = time.perf_counter()
    options = options or {}
    dtype = component_dtype(name, want.precision, want.backend, device)
    model = _load_model(resolved, name, dtype, device)
    if variant is not None:
        variant.apply(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=engines_dir))
    try:
        if "quant" in options:  # the statistics the Q/DQ scales came from, for audits and refits
            options["quant"].stats.save(tmp / CALIBRATION_FILE)
            want.build_args["calibration_sha256"] = options["quant"].stats.fingerprint()
        for g in graph_names(name):
            gspec = graph_spec(resolved.spec, name, g)
            sub = tmp / g
            sub.mkdir()
            files = backend_mod.build_graph(graph_module(name, g, model), gspec, profile, sub,
                                            compute_dtype=dtype, device=device, **options)
            want.graphs[g]["files"] = [f"{g}/{f}" for f in files]
        want.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        want.build_seconds = round(time.perf_counter() - start, 2)
        want.write(tmp)  # last: a folder without a manifest never loads
        final = engines_dir / name
        if final.exists():
            old = engines_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        return want
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del model


def _remove_leftovers(engines_dir: Path) -> None:
    for leftover in engines_dir.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in engines_dir.glob(".old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def read_index(engines_dir: Path) -> dict:
    path = Path(engines_dir) / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no engines in {engines_dir} (no {INDEX}); run `wan-rt build` first") from None
    except json.JSONDecodeError as exc:
        raise StaleEngineError(f"{path}: unreadable ({exc}); re-run `wan-rt build`") from None


def _check_index(engines_dir: Path, model_id: str, spec: ModelSpec, backend: str, precision: str, force: bool):
    """One engines dir holds one model's engines: refuse to mix, unless --force."""
    try:
        index = read_index(engines_dir)
    except (FileNotFoundError, StaleEngineError):
        return
    if force:
        return
    if index.get("spec_name") != spec.name or index.get("model") != model_id:
        raise ValueError(f"{engines_dir} holds engines of {index.get('model')} ({index.get('spec_name')}); "
                         f"use another --engines-dir for {model_id}, or --force to replace them")


def _write_index(engines_dir: Path, model_id: str, spec: ModelSpec, backend: str, precision: str,
                 components: list[str]) -> None:
    index = {"format": 1, "model": model_id, "spec_name": spec.name, "spec_hash": spec_hash(spec),
             "backend": backend, "precision": precision, "components": components}
    tmp = engines_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, engines_dir / INDEX)
