"""TensorRT backend: `build_graph` exports ONNX in the compute dtype (Q/DQ-quantized for fp8/int8
DiTs) and builds a strongly typed plan (wan_rt.export.trt_build); `load_graph` deserializes it
into a TrtRunner (trt_engine.py: shared activation memory, one stream, CUDA graphs).

**Never run**: TensorRT cannot be installed on any machine this project has used (PyPI's
tensorrt wheels fetch from NVIDIA's index, unreachable here, and the GPU machine has none). This
module imports without it; `is_available()` is False there and `wan-rt build` picks ONNX Runtime.
What was checked: mypy against tensorrt-stubs 10.13, and the CPU-testable parts (profiles,
version refusal, memory sharing and binding with a stand-in engine) in tests/test_trt.py.

Versions: a plan runs only with the TensorRT it was built by, on the GPU kind it was built for,
so both are in the manifest and `STRICT_VERSIONS` makes the engines loader refuse a mismatch
with one line (engines.verify -> build.version_mismatch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from wan_rt.runtime.graphs import GraphSpec, ShapeProfile

if TYPE_CHECKING:
    from wan_rt.export.quantize import QuantPlan
    from wan_rt.export.trt_build import BuildConfig
    from wan_rt.runtime.backends.trt_engine import TrtRunner

NAME = "trt"
FILE_SUFFIX = ".plan"
STRICT_VERSIONS = ("tensorrt", "gpu")
NO_TENSORRT = "none (tensorrt not installed)"
NO_GPU = "none (no CUDA GPU)"


def unavailable_reason() -> str:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    return ""


def is_available() -> bool:
    return not unavailable_reason()


def versions() -> dict[str, str]:
    """TensorRT version and GPU ("<name> (sm<cc>)"): the two a plan is tied to."""
    from wan_rt.export.trt_build import gpu_identity, trt_version

    return {"tensorrt": trt_version() or NO_TENSORRT, "gpu": gpu_identity() or NO_GPU, "torch": torch.__version__}


def build_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, out_dir: str | os.PathLike, *,
                compute_dtype: torch.dtype, device: torch.device | str, quant: Optional["QuantPlan"] = None,
                config: Optional["BuildConfig"] = None, timing_cache: Optional[Path] = None) -> list[str]:
    """Export `module` to ONNX (opset 19 with Q/DQ when `quant` is given), build `model.plan`
    into out_dir; returns the files written (the ONNX only with config.keep_onnx)."""
    from wan_rt.export.onnx_export import DEFAULT_OPSET, export_onnx
    from wan_rt.export.quantize import QDQ_OPSET, REPORT_FILE
    from wan_rt.export.trt_build import PLAN_FILE, BuildConfig, build_engine

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


def load_graph(out_dir: str | os.PathLike, gspec: GraphSpec, files: Sequence[str], *,
               compute_dtype: torch.dtype, device: torch.device | str) -> "TrtRunner":
    """A runner over the .plan among `files` (relative to out_dir), on `device`."""
    from wan_rt.runtime.backends.trt_engine import TrtEngine, TrtRunner

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("TensorRT engines run on a CUDA device")
    plans = [f for f in files if f.endswith(FILE_SUFFIX)]
    if len(plans) != 1:
        raise ValueError(f"expected one {FILE_SUFFIX} file among {list(files)}")
    engine = TrtEngine.deserialize((Path(out_dir) / plans[0]).read_bytes(), device,
                                   name=f"{gspec.component}/{gspec.graph}")
    return TrtRunner(engine, gspec, compute_dtype)


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

