"""Build TensorRT engines (.plan) from component graphs: the build side of the trt backend.

    files = build_graph(graph_module, gspec, profile, out_dir, compute_dtype=torch.bfloat16,
                        device="cpu", quant=plan, config=BuildConfig(targets=("sm89",)),
                        timing_cache=engines_dir / "timing.cache")

The graph is exported to ONNX on `device` in its compute dtype (Q/DQ-quantized for fp8/int8
DiTs, export/quantize.py), parsed and built by the active TensorRT library
(runtime/backends/trt_lib.py): with TensorRT for RTX on a machine with no GPU, for the compute
capabilities in `BuildConfig.targets`; with TensorRT, for the GPU present. Built here, on CPUs
with no GPU, by tests/test_trt_build.py; never executed (no RTX GPU has been available).

What a build does, and why:
* **strongly typed network**: every tensor's precision comes from the ONNX (exported in the
  compute dtype) and its Q/DQ nodes, so no precision builder flags are set and no layer silently
  changes precision;
* **one optimization profile** from the ShapeProfile: min/opt/max of every input, the VAE's
  `k*h` cache dims resolved from the same symbols, batch 1 (opt) to 2 (max, CFG);
* **timing cache** (TensorRT) shared by the engines of an engines dir (`timing.cache`), loaded
  before and merged back after each build; one from another version or GPU is ignored, with a
  note. TensorRT for RTX times no tactics at build time (its timing cache is a no-op): it
  compiles kernels when an engine first runs, into `runtime.cache` beside the engines
  (runtime/backends/trt_engine.py);
* the **optimization level**, **refit** (BuilderFlag.REFIT: new weights without a rebuild,
  `refit_from_module`) and **weight streaming** (BuilderFlag.WEIGHT_STREAMING) come from
  `BuildConfig`, whose fields, targets included, go into the manifest's build_args;
* a **per-layer precision report** (`layers.json` beside the plan): every layer of the parsed,
  strongly typed network with its operand types, GEMMs fed by DequantizeLinear marked with the
  quantized type (TensorRT fuses Q/DQ into the GEMM). It is the network's view: the built
  engine's own (IEngineInspector) needs a deserialized engine, i.e. a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Mapping, Optional, Sequence, cast

import numpy as np
import torch

from wan_rt.host_memory import return_free_heap
from wan_rt.runtime.backends import trt_lib
from wan_rt.runtime.backends.trt_lib import host_bytes, trt
from wan_rt.runtime.graphs import GraphSpec, ShapeProfile

if TYPE_CHECKING:
    from wan_rt.export.quantize import QuantPlan
    from wan_rt.runtime.backends.trt_engine import TrtRunner

PLAN_FILE = "model.plan"
LAYER_REPORT = "layers.json"
TIMING_CACHE = "timing.cache"
MAX_OPT_LEVEL = 5

Shape = tuple[int, ...]

# The operand kind a compute dtype means for TensorRT's GEMMs (trt_lib.TrtLibrary.min_sm).
DTYPE_KIND = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TrtBuildError(RuntimeError):
    """TensorRT could not parse or build the graph; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class BuildConfig:
    """Build flags; `manifest_args()` is what the manifest records under build_args."""

    targets: tuple[str, ...] = ()      # compute capabilities ("sm89"); () = the GPU present
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
        return {"trt": {**dataclasses.asdict(self), "targets": list(self.targets)}}

    def for_build(self, precision: str, dtypes: Mapping[str, torch.dtype], quantized: Sequence[str] = ()
                  ) -> "BuildConfig":
        """This config with its targets resolved by the active library on this machine (the GPU
        present unless given) and checked against what the build will hold: `dtypes` maps each
        component to build to its compute dtype, `quantized` names those with fp8/int8 GEMMs.
        ValueError (one line naming the target and the precision) before anything is built."""
        lib, gpu = trt_lib.require(), trt_lib.gpu_target()
        targets = lib.build_targets(self.targets, gpu)
        if self.refittable and gpu is None and not lib.refits_without_gpu:
            raise ValueError(f"--refittable: {lib.title} {lib.version} cannot build refittable plans without a GPU "
                             "(its compiler needs CUDA for them); build them on an RTX GPU, or drop --refittable")
        needs: dict[str, str] = {}  # GEMM operand kind -> the first component that has it
        for component in quantized:
            needs.setdefault(precision, component)
        for component, dtype in dtypes.items():
            needs.setdefault(DTYPE_KIND[dtype], component)
        for kind, component in needs.items():
            need = lib.min_sm.get(kind, 0)
            for t in targets:
                if trt_lib.sm_number(t) < need:
                    raise ValueError(f"--precision {precision} cannot target {t}: {component} has {kind} GEMMs, "
                                     f"which {lib.title} runs on sm{need} or newer only")
        return dataclasses.replace(self, targets=targets)


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


# ------------------------------------------------------------------------------------ graph -> plan
def build_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, out_dir: str | os.PathLike, *,
                compute_dtype: torch.dtype, device: torch.device | str, quant: Optional["QuantPlan"] = None,
                config: Optional[BuildConfig] = None, timing_cache: Optional[Path] = None,
                log: Callable[[str], None] = print) -> list[str]:
    """Export `module` to ONNX on `device` (opset 19 with Q/DQ when `quant` is given), build
    `model.plan` and its `layers.json` into out_dir; returns the files written (the ONNX too
    with config.keep_onnx). `config.targets` must be resolved (BuildConfig.for_build)."""
    from wan_rt.export.onnx_export import export_graph, export_onnx
    from wan_rt.export.quantize import QDQ_OPSET, REPORT_FILE

    config = config or BuildConfig()
    out = Path(out_dir)
    onnx_dir = out / "onnx" if config.keep_onnx else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    try:
        onnx_path = onnx_dir / "model.onnx"
        kept = [PLAN_FILE, LAYER_REPORT]
        modules: dict[str, str] = {}
        if quant is not None:
            # The graph's weights are written once, as the Q/DQ pass makes them (fp8/int8 GEMM
            # weights, the rest as they are): its bf16 export is never staged on disk beside them.
            weights = export_graph(module, gspec, profile, onnx_path, compute_dtype=compute_dtype, device=device,
                                   opset=QDQ_OPSET)
            files = quant.apply(onnx_path, module, weights)
            shutil.copy(onnx_dir / REPORT_FILE, out / REPORT_FILE)  # which matmuls are quantized
            modules = json.loads((out / REPORT_FILE).read_text())["weights"]
            kept.append(REPORT_FILE)
        else:
            # Weights always in external data, whatever their size: the parser then takes them from
            # a memory map (_parse) instead of from a protobuf the process owns.
            files = export_onnx(module, gspec, profile, onnx_path, compute_dtype=compute_dtype, device=device,
                                external_data_threshold=0)
        build_engine(onnx_path, gspec, profile, out / PLAN_FILE, config=config, timing_cache=timing_cache,
                     modules=modules, log=log)
    finally:
        if not config.keep_onnx:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    return [*kept, *([f"onnx/{f}" for f in files if f != REPORT_FILE] if config.keep_onnx else [])]


def _parse(builder: "trt.Builder", onnx_path: Path, gspec: GraphSpec,
           logger: "trt.ILogger") -> tuple["trt.INetworkDefinition", "trt.OnnxParser", list]:
    """The strongly typed network of `onnx_path`. Weights in external data are handed to the
    parser as pointers into a read-only memory map of the data file (`load_initializer`), so the
    build holds them as file pages, not as a copy it owns: parse_from_file would read all of them
    into anonymous memory. Returns the network, the parser and the maps, which must outlive it."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    where = f"{gspec.component}/{gspec.graph}"

    def fail(what: str) -> TrtBuildError:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return TrtBuildError(f"{where}: TensorRT could not {what} {onnx_path}:\n  " + "\n  ".join(errors[:20]))

    graph = onnx_path.read_bytes()  # the graph only: the weights are in the data file
    # `path` lets the parser find any external data it is not handed here.
    if not parser.load_model_proto(graph, str(onnx_path)):
        raise fail("load")
    maps: list[tuple[Path, np.memmap]] = []
    for name, (data_file, offset, length) in external_initializers(graph, onnx_path.parent).items():
        if not maps or maps[-1][0] != data_file:
            maps.append((data_file, np.memmap(data_file, dtype=np.uint8, mode="r")))
        mapped = maps[-1][1]
        if offset + length > mapped.size or not parser.load_initializer(name, mapped.ctypes.data + offset, length):
            raise fail(f"take initializer {name} ({length} bytes at {offset} of {data_file.name}) for")
    if not parser.parse_model_proto():
        raise fail("parse")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != gspec.input_names:
        raise TrtBuildError(f"{where}: network inputs {names} are not the contract's {gspec.input_names}")
    return network, parser, [m for _, m in maps]  # the parser points into the maps: keep all alive


def external_initializers(graph: bytes, folder: Path) -> dict[str, tuple[Path, int, int]]:
    """{initializer: (data file, offset, length)} for the weights the serialized model `graph`
    (its file's bytes) keeps in external data beside it in `folder`."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load_model_from_string(graph)
    out = {}
    for t in model.graph.initializer:
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            data_file = folder / info.location
            length = info.length if info.length else data_file.stat().st_size - (info.offset or 0)
            out[t.name] = (data_file, int(info.offset or 0), int(length))
    return out


def _load_timing_cache(config: "trt.IBuilderConfig", path: Optional[Path],
                       log: Callable[[str], None]) -> "trt.ITimingCache":
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log(f"  timing cache {path} was made by another TensorRT or GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_atomically(data: bytes, path: Path) -> None:
    """A concurrent reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engine(onnx_path: Path, gspec: GraphSpec, profile: ShapeProfile, plan_path: Path, *,
                 config: BuildConfig = BuildConfig(), timing_cache: Optional[Path] = None,
                 modules: Optional[Mapping[str, str]] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse `onnx_path`, build with one optimization profile for `config.targets`, write
    `plan_path` and the layer report beside it (`modules`: weight initializer -> module path,
    from the quantization report); returns facts for the manifest."""
    lib = trt_lib.require()
    return_free_heap()  # the builder's peak is the build's: start it from what is really in use
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser, _weights = _parse(builder, Path(onnx_path), gspec, logger)
    bconfig = builder.create_builder_config()
    bconfig.builder_optimization_level = config.opt_level
    lib.set_targets(bconfig, config.targets)
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
    if not lib.has_timing_cache:
        timing_cache = None
    cache = _load_timing_cache(bconfig, timing_cache, log) if timing_cache is not None else None

    plan_path = Path(plan_path)
    report = layer_report(network, modules or {})
    report.update(library=f"{lib.name} {lib.version}", targets=list(config.targets))
    write_layer_report(report, plan_path.parent / LAYER_REPORT)
    if not _serialize_to(plan_path, builder, network, bconfig):
        raise TrtBuildError(f"{gspec.component}/{gspec.graph}: {lib.title} failed to build {onnx_path} for "
                            f"{','.join(config.targets)} (its log above says why)")
    if timing_cache is not None and cache is not None:
        _save_atomically(host_bytes(cache.serialize()), Path(timing_cache))
    builder_said = {"opt_level": bconfig.builder_optimization_level, "refit": bconfig.get_flag(trt.BuilderFlag.REFIT),
                    "weight_streaming": bconfig.get_flag(trt.BuilderFlag.WEIGHT_STREAMING)}
    return {"plan_bytes": plan_path.stat().st_size, "library": lib.name, "version": lib.version,
            "builder": builder_said}


def _plan_writer(file: BinaryIO) -> "trt.IStreamWriter":
    """A stream writer putting the plan into `file` as the builder serializes it (the class is
    made here: `trt` is the library chosen at run time)."""

    class PlanWriter(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)

        def write(self, data: Any, size: Any = None) -> int:  # the bindings pass the chunk only
            return file.write(memoryview(data))

    return PlanWriter()


def _serialize_to(plan_path: Path, builder: "trt.Builder", network: "trt.INetworkDefinition",
                  bconfig: "trt.IBuilderConfig") -> bool:
    """Build and write the plan; False if the build failed (nothing left at plan_path). The plan
    streams to disk where the library can: holding it in host memory (IHostMemory, plus a copy as
    bytes) would add twice its size, about the weights' own, to the build's peak."""
    tmp = plan_path.with_name(f".{plan_path.name}.{os.getpid()}.tmp")
    try:
        if hasattr(builder, "build_serialized_network_to_stream"):
            with open(tmp, "wb") as f:
                built = builder.build_serialized_network_to_stream(network, bconfig, _plan_writer(f))
        else:  # TensorRT before 10.x's stream writer
            serialized = builder.build_serialized_network(network, bconfig)
            built = serialized is not None
            if built:
                with open(tmp, "wb") as f:
                    f.write(memoryview(cast(Any, serialized)))  # IHostMemory has the buffer protocol
        if built:
            os.replace(tmp, plan_path)
        return bool(built)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ layer report
_DTYPE_NAMES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "FP8": "fp8", "INT8": "int8", "INT4": "int4",
                "FP4": "fp4", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}
GEMM_LAYERS = ("MATRIX_MULTIPLY", "CONVOLUTION", "DECONVOLUTION")
# Layers a weight passes through between its constant and the GEMM (layout and type only).
_LAYOUT = ("SHUFFLE", "IDENTITY")
_PASS_THROUGH = (*_LAYOUT, "CAST")


def _dtype(t: "trt.ITensor") -> str:
    return _DTYPE_NAMES.get(t.dtype.name, t.dtype.name.lower())


def layer_report(network: "trt.INetworkDefinition", modules: Mapping[str, str]) -> dict[str, Any]:
    """Every layer of a parsed (strongly typed) network: its operand and result types and its
    precision. A GEMM (MatMul, Conv) whose float operands all come from DequantizeLinear runs in
    the quantized type those dequantize (TensorRT fuses the DQ into the GEMM), else in its
    operands' type. A GEMM with a constant operand names it ("weight", the ONNX initializer) and,
    where `modules` knows that initializer, the model's module path ("module")."""
    producer: dict[str, "trt.ILayer"] = {}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    for layer in layers:
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer

    def source(t: "trt.ITensor") -> "trt.ILayer | None":
        return producer.get(t.name)

    rows: list[dict[str, Any]] = []
    gemms: dict[str, int] = {}  # precision -> GEMM layers
    for layer in layers:
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        row: dict[str, Any] = {"name": layer.name, "type": layer.type.name,
                               "inputs": [_dtype(t) if t is not None else None for t in inputs],
                               "outputs": [_dtype(layer.get_output(j)) for j in range(layer.num_outputs)]}
        row["precision"] = row["outputs"][0] if row["outputs"] else None
        if layer.type.name in GEMM_LAYERS:
            operands = [t for t in inputs[:2] if t is not None]
            sources = [source(t) for t in operands]
            # The parser broadcasts a weight with a SHUFFLE after its DQ; TensorRT moves DQ past layout ops.
            behind = [_behind_layout(s, source) for s in sources]
            dequantized = [s for s in behind if s is not None and s.type.name == "DEQUANTIZE"]
            if operands and len(dequantized) == len(operands):
                row["precision"] = _dtype(dequantized[0].get_input(0))
            else:
                row["precision"] = _dtype(operands[0]) if operands else row["precision"]
            weight = next((w for w in (_constant_behind(s, source) for s in sources) if w), None)
            if weight is not None:
                row["weight"] = weight
                module = modules.get(weight) or (_parameter_module(weight) if modules else None)
                if module:
                    row["module"] = module
            gemms[row["precision"]] = gemms.get(row["precision"], 0) + 1
        rows.append(row)
    return {"source": "parsed network (strongly typed; Q/DQ fused into the GEMMs they feed)",
            "gemms": gemms, "layers": rows}


def write_layer_report(report: Mapping[str, Any], path: Path) -> None:
    """JSON with one layer per line (a 40-block expert has tens of thousands of layers)."""
    head = json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=1)
    rows = ",\n  ".join(json.dumps(row) for row in report["layers"])
    path.write_text(f'{head[:-2]},\n "layers": [\n  {rows}\n ]\n}}\n')


def _parameter_module(weight: str) -> Optional[str]:
    """"dit.patch_embedding.weight" -> "patch_embedding": a parameter the exporter kept by name
    (the patch embedding is a Conv3d exported as a MatMul, so no nn.Linear matches it)."""
    parts = weight.split(".")
    return ".".join(parts[1:-1]) if len(parts) > 2 and parts[0] == "dit" and parts[-1] == "weight" else None


def _behind_layout(layer: "trt.ILayer | None", source: Callable[["trt.ITensor"], "trt.ILayer | None"]
                   ) -> "trt.ILayer | None":
    """The first layer at or before `layer` that is not a pure layout change (reshape, transpose)."""
    for _ in range(8):
        if layer is None or layer.type.name not in _LAYOUT or layer.num_inputs == 0:
            return layer
        layer = source(layer.get_input(0))
    return layer


def _constant_behind(layer: "trt.ILayer | None", source: Callable[["trt.ITensor"], "trt.ILayer | None"]
                     ) -> Optional[str]:
    """The constant (ONNX initializer) name a GEMM operand comes from, through DQ and layout layers."""
    for _ in range(8):
        if layer is None:
            return None
        if layer.type.name == "CONSTANT":
            return str(layer.name)
        if layer.type.name not in ("DEQUANTIZE", *_PASS_THROUGH) or layer.num_inputs == 0:
            return None
        layer = source(layer.get_input(0))
    return None


# ------------------------------------------------------------------------------------ reweight
def reweight_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, built_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, files: list[str], *, compute_dtype: torch.dtype,
                   device: torch.device | str, quant: Optional["QuantPlan"] = None,
                   config: Optional["BuildConfig"] = None, **_options: Any) -> Optional[list[str]]:
    """New weights (e.g. a LoRA fused in) for a plan built before that differs in nothing else:
    the plan in `built_dir` refitted from the re-exported ONNX and written to `out_dir`, no engine
    build. None (build anew) for plans built without --refittable, with Q/DQ, or where no GPU can
    deserialize the plan. NOT RUN: refitting needs a GPU, which no machine this ran on had."""
    from wan_rt.export.onnx_export import DEFAULT_OPSET, export_onnx
    from wan_rt.runtime.backends.trt_engine import refit_from_onnx

    config = config or BuildConfig()
    device = torch.device(device)
    if not config.refittable or quant is not None or PLAN_FILE not in files or device.type != "cuda":
        return None
    lib = trt_lib.require()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((Path(built_dir) / PLAN_FILE).read_bytes())
    if engine is None:
        raise TrtBuildError(f"{gspec.component}/{gspec.graph}: {lib.title} could not deserialize the plan to refit")
    out = Path(out_dir)
    onnx_dir = out / "onnx" if config.keep_onnx else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    try:
        onnx_files = export_onnx(module, gspec, profile, onnx_dir / "model.onnx", compute_dtype=compute_dtype,
                                 device=device, opset=DEFAULT_OPSET)
        refit_from_onnx(engine, onnx_dir / "model.onnx")
        (out / PLAN_FILE).write_bytes(host_bytes(engine.serialize()))
        for extra in (f for f in files if f != PLAN_FILE and not f.startswith("onnx/")):
            shutil.copy(Path(built_dir) / extra, out / extra)  # layers.json: the same network
    finally:
        if not config.keep_onnx:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    kept = [f for f in files if not f.startswith("onnx/")]
    return [*kept, *([f"onnx/{f}" for f in onnx_files] if config.keep_onnx else [])]


# ------------------------------------------------------------------------------------ refit
def refit_from_module(runner: "TrtRunner", module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, *,
                      compute_dtype: torch.dtype, quant: Optional["QuantPlan"] = None) -> int:
    """Refit a refittable engine with new weights: `module` is the graph module
    (runtime.graphs.graph_module) holding them, e.g. after `model.load_state_dict(new)` or a
    LoRA merge. The graph is re-exported exactly as the build did (and re-quantized with
    `quant`), and TensorRT takes the new initializers by name. Returns the engine's weight count."""
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
