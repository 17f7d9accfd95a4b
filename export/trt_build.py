"""Build a TensorRT engine (a .plan) from one component graph's ONNX and its GraphSpec.

    build_engine(onnx_path, gspec, profile, plan_path, config=BuildConfig(), timing_cache=cache)

**This module has never run**: TensorRT cannot be installed on any machine this project has had.
It is type-checked with mypy against tensorrt-stubs 10.13 (tests/test_trt.py), its pure parts
(`profile_shapes`, `BuildConfig`, the identity strings) are unit-tested, and it is written
against NVIDIA's documented Python API (TensorRT 10: Builder, strongly typed networks,
IOptimizationProfile, ITimingCache, BuilderFlag.REFIT / WEIGHT_STREAMING).

What a build does, and why:
* **strongly typed network** (NetworkDefinitionCreationFlag.STRONGLY_TYPED): every tensor's
  precision comes from the ONNX (exported in the compute dtype, bf16 for the DiTs) and from its
  Q/DQ nodes (export/quantize.py), so no FP16/BF16/FP8 builder flags are set (TensorRT rejects
  them on strongly typed networks) and no layer silently changes precision;
* **one optimization profile** from the ShapeProfile: min/opt/max of every input, the VAE's
  `k*h` cache dims resolved from the same symbols, batch 1 (opt) to 2 (max, CFG);
* **timing cache** shared by every engine of an engines dir (`engines_dir/timing.cache`), loaded
  before and merged back after each build, so rebuilding (new weights, other sizes) skips most
  tactic timing. A cache from another TensorRT or GPU is ignored, with a warning;
* the **builder optimization level** (0-5, TensorRT's default 3) and optional **refittable**
  engines (BuilderFlag.REFIT: new weights without a rebuild, runtime/backends/trt.py) and
  **weight streaming** (BuilderFlag.WEIGHT_STREAMING: weights stay in host memory and stream in,
  for experts larger than the GPU) come from `BuildConfig`, whose fields go into the manifest.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from wan_rt.runtime.backends.trt import gpu_identity, trt_version  # noqa: F401  (re-exported)
from wan_rt.runtime.graphs import GraphSpec, ShapeProfile

if TYPE_CHECKING:
    import tensorrt as trt

    from wan_rt.export.quantize import QuantPlan
    from wan_rt.runtime.backends.trt_engine import TrtRunner

PLAN_FILE = "model.plan"
TIMING_CACHE = "timing.cache"
MAX_OPT_LEVEL = 5

Shape = tuple[int, ...]


class TrtBuildError(RuntimeError):
    """TensorRT could not parse or build the graph; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class BuildConfig:
    """Build flags; `manifest_args()` is what the manifest records under build_args."""

    opt_level: int = 3                 # IBuilderConfig.builder_optimization_level
    refittable: bool = False           # BuilderFlag.REFIT
    weight_streaming: bool = False     # BuilderFlag.WEIGHT_STREAMING (needs a strongly typed network)
    workspace_gib: Optional[float] = None  # tactic workspace limit; None: TensorRT's default
    keep_onnx: bool = False            # keep model.onnx beside the plan (e.g. to refit from it later)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            raise ValueError(f"opt_level must be 0..{MAX_OPT_LEVEL}, got {self.opt_level}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise ValueError(f"workspace_gib must be positive, got {self.workspace_gib}")

    def manifest_args(self) -> dict[str, Any]:
        return {"trt": dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------ profiles
def profile_shapes(gspec: GraphSpec, profile: ShapeProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input of the graph, as TensorRT's optimization profile
    wants them. Raises ValueError if a dim's min > opt or opt > max (a profile TensorRT rejects)."""
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in gspec.inputs:
        lo, mid, hi = profile.shape(t.dims, "min"), profile.shape(t.dims, "opt"), profile.shape(t.dims, "max")
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ValueError(f"{gspec.component}/{gspec.graph}: input {t.name} {list(t.dims)} has min {lo}, "
                             f"opt {mid}, max {hi}: each dim needs min <= opt <= max")
        out[t.name] = (lo, mid, hi)
    return out


# ------------------------------------------------------------------------------------ build
def _logger() -> "trt.ILogger":
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _parse(builder: "trt.Builder", onnx_path: Path, gspec: GraphSpec,
           logger: "trt.ILogger") -> tuple["trt.INetworkDefinition", "trt.OnnxParser"]:
    import tensorrt as trt

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): it finds model.onnx.data beside the file itself.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TrtBuildError(f"{gspec.component}/{gspec.graph}: TensorRT could not parse {onnx_path}:\n  "
                            + "\n  ".join(errors[:20]))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != gspec.input_names:
        raise TrtBuildError(f"{gspec.component}/{gspec.graph}: network inputs {names} are not the contract's "
                            f"{gspec.input_names}")
    return network, parser  # the parser owns weights the network points to: keep it alive


def _load_timing_cache(config: "trt.IBuilderConfig", path: Optional[Path],
                       log: Callable[[str], None]) -> "trt.ITimingCache":
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log(f"  timing cache {path} was made by another TensorRT or GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(cache: "trt.ITimingCache", path: Path) -> None:
    """Write atomically: a concurrent reader never sees half a cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(cache.serialize())
    os.replace(tmp, path)


def build_engine(onnx_path: Path, gspec: GraphSpec, profile: ShapeProfile, plan_path: Path, *,
                 config: BuildConfig = BuildConfig(), timing_cache: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse `onnx_path`, build with one optimization profile, write `plan_path`; returns facts
    for the manifest (plan size, TensorRT version, GPU)."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network, _parser = _parse(builder, Path(onnx_path), gspec, logger)
    bconfig = builder.create_builder_config()
    bconfig.builder_optimization_level = config.opt_level
    if config.workspace_gib is not None:
        bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 2**30))
    if config.refittable:
        bconfig.set_flag(trt.BuilderFlag.REFIT)
    if config.weight_streaming:
        bconfig.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)

    opt_profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes(gspec, profile).items():
        opt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
    if bconfig.add_optimization_profile(opt_profile) < 0:
        raise TrtBuildError(f"{gspec.component}/{gspec.graph}: TensorRT rejected the optimization profile")
    cache = _load_timing_cache(bconfig, timing_cache, log)

    serialized = builder.build_serialized_network(network, bconfig)
    if serialized is None:
        raise TrtBuildError(f"{gspec.component}/{gspec.graph}: TensorRT failed to build {onnx_path} "
                            "(its log above says why)")
    plan_path = Path(plan_path)
    plan_path.write_bytes(serialized)
    if timing_cache is not None:
        _save_timing_cache(cache, Path(timing_cache))
    return {"plan_bytes": plan_path.stat().st_size, "tensorrt": trt.__version__, "gpu": gpu_identity()}


# ------------------------------------------------------------------ the builder interface
def build_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, out_dir: str | os.PathLike, *,
                compute_dtype: torch.dtype, device: torch.device | str, quant: Optional["QuantPlan"] = None,
                config: Optional["BuildConfig"] = None, timing_cache: Optional[Path] = None) -> list[str]:
    """Export `module` to ONNX (opset 19 with Q/DQ when `quant` is given), build `model.plan`
    into out_dir; returns the files written (the ONNX only with config.keep_onnx)."""
    from wan_rt.export.onnx_export import DEFAULT_OPSET, export_onnx
    from wan_rt.export.quantize import QDQ_OPSET, REPORT_FILE

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("TensorRT engines are built on a CUDA device")
    config = config or BuildConfig()
    out = Path(out_dir)
    onnx_dir = out / "onnx" if config.keep_onnx else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    try:
        onnx_path = onnx_dir / "model.onnx"
        files = export_onnx(module, gspec, profile, onnx_path, compute_dtype=compute_dtype, device=device,
                            opset=QDQ_OPSET if quant is not None else DEFAULT_OPSET)
        kept = [PLAN_FILE]
        if quant is not None:
            files = quant.apply(onnx_path, module)
            shutil.copy(onnx_dir / REPORT_FILE, out / REPORT_FILE)  # which matmuls are quantized
            kept.append(REPORT_FILE)
        build_engine(onnx_path, gspec, profile, out / PLAN_FILE, config=config, timing_cache=timing_cache)
    finally:
        if not config.keep_onnx:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    return [*kept, *([f"onnx/{f}" for f in files if f != REPORT_FILE] if config.keep_onnx else [])]


def reweight_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, built_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, files: list[str], *, compute_dtype: torch.dtype,
                   device: torch.device | str, quant: Optional["QuantPlan"] = None,
                   config: Optional["BuildConfig"] = None, **_options: Any) -> Optional[list[str]]:
    """New weights (e.g. a LoRA fused in) for a plan built before that differs in nothing else:
    the plan in `built_dir` refitted from the re-exported ONNX and written to `out_dir`, no engine
    build. None (build anew) for plans built without --refittable or with Q/DQ.
    NOT RUN: no machine this was written on has TensorRT (type-checked against tensorrt-stubs)."""
    from wan_rt.export.onnx_export import DEFAULT_OPSET, export_onnx
    from wan_rt.runtime.backends.trt_engine import TrtEngine, refit_from_onnx

    config = config or BuildConfig()
    if not config.refittable or quant is not None or PLAN_FILE not in files:
        return None
    engine = TrtEngine.deserialize((Path(built_dir) / PLAN_FILE).read_bytes(), torch.device(device))
    out = Path(out_dir)
    onnx_dir = out / "onnx" if config.keep_onnx else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    try:
        onnx_files = export_onnx(module, gspec, profile, onnx_dir / "model.onnx", compute_dtype=compute_dtype,
                                 device=device, opset=DEFAULT_OPSET)
        refit_from_onnx(engine.engine, onnx_dir / "model.onnx")
        (out / PLAN_FILE).write_bytes(bytes(engine.engine.serialize()))
    finally:
        if not config.keep_onnx:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    return [PLAN_FILE, *([f"onnx/{f}" for f in onnx_files] if config.keep_onnx else [])]


def refit_from_module(runner: "TrtRunner", module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, *,
                      compute_dtype: torch.dtype, quant: Optional["QuantPlan"] = None) -> int:
    """Refit a refittable engine with new weights: `module` is the graph module
    (runtime.graphs.graph_module) holding them, e.g. after `model.load_state_dict(new)`. The graph
    is re-exported exactly as the build did (and re-quantized with `quant`), and TensorRT takes the
    new initializers by name. Returns the number of weights in the engine."""
    from wan_rt.export.onnx_export import DEFAULT_OPSET, export_onnx
    from wan_rt.export.quantize import QDQ_OPSET
    from wan_rt.runtime.backends.trt_engine import refit_from_onnx

    work = Path(tempfile.mkdtemp(prefix="wan-rt-refit-"))
    try:
        path = work / "model.onnx"
        export_onnx(module, gspec, profile, path, compute_dtype=compute_dtype, device=runner.engine.device,
                    opset=QDQ_OPSET if quant is not None else DEFAULT_OPSET)
        if quant is not None:
            quant.apply(path, module)
        count = refit_from_onnx(runner.engine.engine, path)
        runner.engine.invalidate_graphs()  # weights may have moved
        return count
    finally:
        shutil.rmtree(work, ignore_errors=True)
