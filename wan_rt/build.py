"""`wan-rt build`: export every component of a checkpoint and compile engines, atomically.

Each component is built into a hidden temporary folder of the engines dir, its manifest written
last, and only then renamed into place: an interrupted build leaves nothing that loads. A
component whose manifest already verifies against the checkpoint, backend, precision and
profile is skipped, so building twice costs nothing the second time.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch

from wan_rt.config import ModelSpec, check_request
from wan_rt.export.builders import get_builder
from wan_rt.host_memory import (BuildNeed, HostMemoryError, available_bytes, build_need, free_disk_bytes,
                                same_disk, stored_tensors)
from wan_rt.models import load_component
from wan_rt.precision import PRECISIONS, QUALITY_TOLERANCE, QUANTIZED_PRECISIONS, component_dtype
from wan_rt.resolve import ResolvedCheckpoint, resolve_checkpoint, weight_paths
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engines_dir import (EngineManifest, LoraPairs, StaleEngineError, check_index, commit_component,
                                        component_fingerprint, expected_manifest, first_difference, identity, lora_args,
                                        new_component_dir, remove_leftovers, version_mismatch, write_index)
from wan_rt.runtime.graphs import (ShapeProfile, components_of, dit_layout_name, graph_module, graph_spec,
                                   shape_profile)
from wan_rt.runtime.pipeline_config import write_pipeline_config

if TYPE_CHECKING:
    from wan_rt.export.quantize import QuantConfig, QuantPlan
    from wan_rt.export.trt_build import BuildConfig

CALIBRATION_FILE = "calibration.json"


def best_backend() -> str:
    """TensorRT where it runs; otherwise ONNX Runtime (fast to build, runs on any CPU)."""
    from wan_rt.runtime.backends import trt

    return "trt" if trt.is_available() else "ort"


def default_precision(backend: str, device: torch.device) -> str:
    if backend == "trt":  # built for a GPU even where it is built without one
        return "bf16"
    if device.type != "cuda":
        return "fp32"
    return "fp16" if backend == "ort" else "bf16"


def build_engines(model: str, backend: str, engines_dir: Path, *, precision: Optional[str] = None,
                  height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None,
                  text_len: Optional[int] = None, components: Optional[list[str]] = None, force: bool = False,
                  device: Optional[str] = None, log: Callable[[str], None] = print,
                  quant_config: Optional["QuantConfig"] = None,
                  trt_config: Optional["BuildConfig"] = None, quick_compile: bool = False,
                  kernels: str = "auto", attention: str = "exact",
                  loras: Optional[Mapping[str, LoraPairs]] = None, step_cache: bool = False,
                  dit_parts: Optional[int] = None) -> list[EngineManifest]:
    """`quant_config` tunes fp8/int8 builds (calibration prompts and steps, FP8 attention,
    SmoothQuant alpha); `trt_config` the TensorRT builder (optimization level, refit, weight
    streaming); `quick_compile` (aoti) compiles scalar C++ kernels with an -O0 wrapper: about
    half the compile time on a CPU, slower engines, the same ops. `kernels` ("auto": triton on a
    GPU, else torch) and `attention` ("exact" | "int8") choose the ops compiled into AOTInductor
    DiT packages (wan_rt.runtime.fast.dit_variant); with precision fp8 their linear layers are
    FP8 GEMMs (torch._scaled_mm, dynamic activation scales: no calibration). All are recorded in
    the manifests' build_args, so changing one rebuilds. `loras` ({DiT component: [(file, scale)]})
    are fused into those experts' weights before export; the weights fingerprint covers them.
    `step_cache` builds each DiT step as the four graphs a step cache drives (graphs.DIT_LAYOUTS
    "split") instead of one `main` graph. `dit_parts` builds each DiT's blocks after the first as
    that many graphs ("split:N", also step-cache ready), one engine each, so a builder holds one
    part of an expert at a time (TensorRT's builder holds the plan it serializes); None: one, or,
    where a TensorRT build would not fit this machine's RAM and disk, the fewest parts that fit
    (said in the log)."""
    backend_mod, builder = get_backend(backend), get_builder(backend)
    # Building may need less than running (TensorRT for RTX builds with no GPU): ask for building.
    if not getattr(backend_mod, "can_build", backend_mod.is_available)():
        why = getattr(backend_mod, "build_unavailable_reason",
                      getattr(backend_mod, "unavailable_reason", lambda: "its libraries are not installed"))()
        raise ValueError(f"backend {backend!r} cannot build on this machine: {why}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen_by_user = precision is not None
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
    check_request(spec, height, width, frames, 1)
    profile = shape_profile(spec, height=height, width=width, frames=frames, text_len=text_len)
    wanted = components or list(components_of(spec))
    unknown = [c for c in wanted if c not in components_of(spec)]
    if unknown:
        raise ValueError(f"{spec.name} has no component {unknown[0]!r}; it has {', '.join(components_of(spec))}")
    loras = {c: list(pairs) for c, pairs in (loras or {}).items() if pairs}
    bad = [c for c in loras if c not in spec.dit_components]
    if bad:
        raise ValueError(f"LoRAs go on DiT experts; {spec.name} has {', '.join(spec.dit_components)}, not {bad[0]}")
    if loras and precision in QUANTIZED_PRECISIONS and backend != "aoti":
        raise ValueError(f"LoRAs with {precision} Q/DQ engines are not supported (their calibration runs without "
                         "the LoRAs); fuse them into an fp32/bf16 build, or use --backend aoti --precision fp8")
    most_parts = spec.dit.num_layers - 1  # every part holds at least one block
    if dit_parts is not None and not 1 <= dit_parts <= most_parts:
        raise ValueError(f"--dit-parts must be 1 to {most_parts} ({spec.name}'s DiT has {spec.dit.num_layers} blocks, "
                         f"the first its own graph); got {dit_parts}")
    # Before anything is written: the build must fit this machine's RAM and disk.
    precision, dit_parts = _fit_build(resolved, wanted, backend, precision, dev, Path(engines_dir), chosen_by_user,
                                      dit_parts, log)
    if backend == "trt":  # targets resolved and checked against the precision before anything is written
        from wan_rt.export.trt_build import BuildConfig

        quantized_dits = [c for c in wanted if c in spec.dit_components and precision in QUANTIZED_PRECISIONS]
        trt_config = (trt_config or BuildConfig()).for_build(
            precision, {c: component_dtype(c, precision, backend, dev) for c in wanted}, quantized_dits)
    # A composed model (component files, resolve.compose_model) already names absolute paths.
    model_id = model if model.startswith("{") or not Path(model).exists() else str(Path(model).resolve())
    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    check_index(engines_dir, model_id, spec, force)
    remove_leftovers(engines_dir)

    quantized = precision in QUANTIZED_PRECISIONS and backend != "aoti"  # aoti fp8: dynamic scales
    if quantized:
        from wan_rt.export.quantize import QuantConfig

        quant_config = quant_config or QuantConfig(precision)
        if quant_config.precision != precision:
            raise ValueError(f"quant_config is for {quant_config.precision}, the build for {precision}")
    built = []
    calibration: Optional[dict] = None
    for name in wanted:
        # Backends that cannot serve the whole profile narrow it (aoti: DiTs need 2+ patches per axis).
        served = getattr(builder, "build_profile", lambda _s, _n, p: p)(spec, name, profile)
        fingerprint = component_fingerprint(resolved, name, loras.get(name, ()))
        layout = dit_layout_name(step_cache, dit_parts) if name in spec.dit_components else "whole"
        want = expected_manifest(resolved, model_id, name, backend, precision, served, dev, fingerprint, layout)
        want.tool_versions = backend_mod.versions()
        want.build_args = {"height": height, "width": width, "frames": frames}
        if layout != "whole":
            want.build_args["dit_graphs"] = layout
        if name in loras:
            want.build_args["loras"] = lora_args(loras[name])
        options: dict = {}
        if trt_config is not None and backend == "trt":
            want.build_args.update(trt_config.manifest_args())
            options.update(config=trt_config, timing_cache=engines_dir / "timing.cache", log=log)
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
            options["quant"] = _quant_plan(spec, quant_config, calibration[name], resolved.files.dits[name])
        # Only the weights differ (other LoRAs): the backend may swap them in without a rebuild.
        in_place = _weights_only_change(final, want, backend_mod) if hasattr(builder, "reweight_graph") else None
        log(f"  {name:<16} {'re-weighting' if in_place else 'building'} ({backend}, {precision}) ...")
        start = time.perf_counter()
        manifest = _build_component(resolved, name, want, builder, served, dev, engines_dir, options,
                                    variant if name in spec.dit_components else None, loras.get(name, ()), in_place)
        how = "re-weighted (no re-export)" if manifest.build_args.get("reweighted") else "built"
        log(f"  {name:<16} {how} in {time.perf_counter() - start:.1f}s -> {final}")
        built.append(manifest)
    write_index(engines_dir, model_id, spec, backend, precision, [m.component for m in built])
    # What a runtime without Python needs beyond the manifests (wan_rt/cpp): pipeline.json + tokenizer.
    write_pipeline_config(engines_dir, resolved, backend, precision, dev)
    return built


def _fit_build(resolved: ResolvedCheckpoint, wanted: list[str], backend: str, precision: str, device: torch.device,
               engines_dir: Path, chosen_by_user: bool, dit_parts: Optional[int],
               log: Callable[[str], None]) -> tuple[str, int]:
    """The precision and DiT parts to build with: `precision` whole (or in `dit_parts`) if its
    build fits this machine's RAM and disk (wan_rt.host_memory.build_need); else what the user
    left open: the fewest DiT parts that fit at `precision`, or bf16 if that fits (said in the
    log); otherwise HostMemoryError naming what it needs, what there is and what would fit."""
    spec = resolved.spec
    stored = stored_tensors(spec, resolved.files, wanted)  # the headers, once for every precision weighed
    files = resolved.files
    links = same_disk([p for c in wanted for p in weight_paths(resolved, c)], engines_dir)

    def need(p: str, parts: int = dit_parts or 1) -> BuildNeed:
        quantized = [c for c in wanted if c in spec.dit_components and p in QUANTIZED_PRECISIONS]
        return build_need(spec, files, {c: component_dtype(c, p, backend, device) for c in wanted},
                          backend, quantized, stored, links, parts)

    ram, disk = available_bytes(), free_disk_bytes(engines_dir)

    def fits(n: BuildNeed) -> bool:
        return n.owned <= ram and n.disk <= disk

    asked = need(precision)
    if fits(asked):
        return precision, dit_parts or 1
    # Parts only shrink what TensorRT's builder holds (build_need); up to 8: a part per 5 blocks of 40.
    splits_dits = backend == "trt" and any(c in spec.dit_components for c in wanted)
    tries = range(2, min(8, spec.dit.num_layers - 1) + 1) if splits_dits else range(0)
    if dit_parts is None:
        for parts in tries:
            if fits(split := need(precision, parts)):
                log(f"  a {precision} build in one piece needs {asked.describe()}; building each DiT in {parts} parts "
                    f"({split.describe()}): pass --dit-parts to choose")
                return precision, parts
    def supported(p: str) -> bool:  # by the backend, on this device (ort has no bf16, say)
        if p in QUANTIZED_PRECISIONS and backend not in ("ort", "trt"):
            return False
        try:
            for c in wanted:
                getattr(get_backend(backend), "check_precision", lambda *_: None)(
                    component_dtype(c, p, backend, device), device)
        except ValueError:
            return False
        return True

    others = [p for p in ("bf16", "fp8") if p != precision and supported(p)]
    if not chosen_by_user and "bf16" in others and fits(bf16 := need("bf16")):
        log(f"  a {precision} build needs {asked.describe()}; building bf16 ({bf16.describe()}): "
            "pass --precision to choose")
        return "bf16", dit_parts or 1
    hint = [f"--precision {p} needs {n.describe()}" for p in others if fits(n := need(p))]
    hint += [f"--dit-parts {n} needs {split.describe()}" for n in tries if n != dit_parts
             and fits(split := need(precision, n))][:1]
    if asked.owned <= ram:  # only the disk is short
        hint.append(f"an --engines-dir on a disk with {asked.disk / 2**30:.1f} GiB free")
    if len(wanted) > 1:
        hint.append("fewer --components at a time")
    raise HostMemoryError(f"building {spec.name} ({backend}, {precision}) needs {asked.describe()}; this machine has "
                          f"{ram / 2**30:.1f} GiB of RAM available and {disk / 2**30:.1f} GiB free under {engines_dir}. "
                          "What would fit: " + "; ".join([*hint, "a bigger machine"]))


def _up_to_date(folder: Path, want: EngineManifest, backend_mod) -> bool:
    try:
        have = EngineManifest.read(folder)
    except StaleEngineError:
        return False
    # Build flags (quantization recipe, TensorRT options) make a different engine too.
    same_args = all(have.build_args.get(k) == json.loads(json.dumps(v)) for k, v in want.build_args.items())
    return (first_difference(have, want) is None and version_mismatch(have, backend_mod) is None and same_args
            and all((folder / f).is_file() for f in have.files()))


def _weights_only_change(folder: Path, want: EngineManifest, backend_mod) -> Optional[EngineManifest]:
    """The engine built in `folder` if it is `want` but for its weights (LoRAs), else None."""
    try:
        have = EngineManifest.read(folder)
    except StaleEngineError:
        return None
    same = {k: v for k, v in identity(have).items() if k != "weights_fingerprint"} == \
        {k: v for k, v in identity(want).items() if k != "weights_fingerprint"}
    args = {k: v for k, v in have.build_args.items() if k not in ("loras", "reweighted")}
    wanted = {k: v for k, v in json.loads(json.dumps(want.build_args)).items() if k != "loras"}
    complete = all((folder / f).is_file() for f in have.files())
    return have if same and args == wanted and version_mismatch(have, backend_mod) is None and complete else None


def _calibrate(resolved: ResolvedCheckpoint, model: str, wanted: list[str], config: "QuantConfig",
               size: tuple[int, int, int], device: torch.device, log: Callable[[str], None]) -> dict:
    """Activation statistics of every expert to build, from the eager pipeline's own denoising
    trajectory at a small size, one component resident at a time, in the checkpoint's stored
    dtype where that is bf16/fp16 (export/calibrate.py: calibrate_checkpoint, calibration_size)."""
    from wan_rt.export.calibrate import calibrate_checkpoint, calibration_size

    dits = [c for c in wanted if c in resolved.spec.dit_components]
    steps = min(config.calib_steps, resolved.spec.sample_steps)
    height, width, frames = calibration_size(resolved.spec, *size)
    log(f"  calibrating {', '.join(dits)}: {len(config.calib_prompts)} prompts x {steps} steps of the eager "
        f"pipeline at {width}x{height}x{frames} ...")
    start = time.perf_counter()
    stats = calibrate_checkpoint(model, dits, prompts=config.calib_prompts, steps=steps, height=height, width=width,
                                 frames=frames, device=device, log=log)
    log(f"  calibrated in {time.perf_counter() - start:.1f}s ({sum(s.calls for s in stats.values())} DiT calls)")
    return stats


def _quant_plan(spec: ModelSpec, config: "QuantConfig", stats, weights: Path) -> "QuantPlan":
    """An fp8 build of an fp8_scaled DiT file keeps the file's fp8 weights and scales."""
    from wan_rt.export.quantize import QuantPlan
    from wan_rt.models.single_file import fp8_weight_scales

    scales = fp8_weight_scales(weights) if config.precision == "fp8" and weights.is_file() else {}
    return QuantPlan(config, stats, spec.dit.num_layers, spec.dit.head_dim, scales)


def _build_component(resolved: ResolvedCheckpoint, name: str, want: EngineManifest, builder,
                     profile: ShapeProfile, device: torch.device, engines_dir: Path,
                     options: Optional[dict] = None, variant=None, loras: LoraPairs = (),
                     built: Optional[EngineManifest] = None) -> EngineManifest:
    """`options` go to the builder's build_graph (quant: a QuantPlan; TensorRT's config);
    `loras` are fused into a DiT's weights, then `variant` (a fast.DiTVariant) is applied to it,
    before its graphs are exported. `built`: the manifest of the engine now in place when only
    its weights change; the builder's reweight_graph then writes each graph from it where it can."""
    start = time.perf_counter()
    options = options or {}
    dtype = component_dtype(name, want.precision, want.backend, device)
    model = load_component(resolved.files, name, dtype=dtype, device=device)
    if loras:
        from wan_rt.lora import load_lora

        for path, scale in loras:
            load_lora(model, path, scale, mode="fuse")
    if variant is not None:
        variant.apply(model)
    tmp = new_component_dir(engines_dir, name)
    try:
        if "quant" in options:  # the statistics the Q/DQ scales came from, for audits and refits
            options["quant"].stats.save(tmp / CALIBRATION_FILE)
            want.build_args["calibration_sha256"] = options["quant"].stats.fingerprint()
        reweighted = built is not None
        for g in want.graphs:
            gspec = graph_spec(resolved.spec, name, g)
            sub = tmp / g
            sub.mkdir()
            module = graph_module(name, g, model)
            files = None
            if built is not None:
                old = [f.split("/", 1)[1] for f in built.graphs[g]["files"]]
                files = builder.reweight_graph(module, gspec, profile, engines_dir / name / g, sub, old,
                                               compute_dtype=dtype, device=device, **options)
            reweighted = files is not None and reweighted
            if files is None:
                files = builder.build_graph(module, gspec, profile, sub, compute_dtype=dtype, device=device, **options)
            want.graphs[g]["files"] = [f"{g}/{f}" for f in files]
            # Weights the engine points at in the checkpoint's files instead of holding a copy.
            source = getattr(builder, "weights_source", None)
            if source is not None and (note := source(sub)) is not None:
                want.graphs[g]["weights"] = note
        if reweighted:  # information: every graph got its new weights without an export
            want.build_args["reweighted"] = True
        want.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        want.build_seconds = round(time.perf_counter() - start, 2)
        want.write(tmp)  # last: a folder without a manifest never loads
        commit_component(tmp, engines_dir, name)
        return want
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del model
