"""TensorRT backend, run side: `load_graph` deserializes a plan into a TrtRunner (trt_engine.py:
shared activation memory, one stream, CUDA graphs, runtime cache, weight swapping). The build
side is wan_rt.export.trt_build; this module never imports wan_rt.export.

Which library (tensorrt or tensorrt_rtx) and what each can do: trt_lib.py. Building and running
need different things, and this module answers both explicitly:
* `can_build()` / `build_unavailable_reason()`: a TensorRT library imports and can build here
  (TensorRT for RTX builds on any machine, for the compute capabilities asked; TensorRT needs the
  GPU it builds for);
* `is_available()` / `unavailable_reason()`: this machine can also run plans (a CUDA GPU the
  library runs on).

A plan runs only with the library and version that built it, on a GPU among its targets: the
manifest records `trt_library` and `trt_version` (STRICT_VERSIONS: another is stale) and the
build's `trt_targets` (build_args.trt.targets); `run_refusal(manifest)` says in one line why
this machine cannot run them.

**Never executed**: plans have been built here (CPU only, TensorRT for RTX) but no machine with
an RTX GPU (or with TensorRT and any GPU) has run one; see tests/test_trt.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from wan_rt.runtime.backends import trt_lib
from wan_rt.runtime.graphs import GraphSpec

if TYPE_CHECKING:
    from wan_rt.runtime.backends.trt_engine import TrtRunner

NAME = "trt"
FILE_SUFFIX = ".plan"
STRICT_VERSIONS = ("trt_library", "trt_version")
NO_LIBRARY = "none (no TensorRT library installed)"
NO_GPU = "none (no CUDA GPU)"


def _library() -> tuple[Optional[trt_lib.TrtLibrary], str]:
    """The active library, or None and why."""
    try:
        lib = trt_lib.active()
    except ValueError as exc:  # WAN_RT_TRT_LIBRARY names one that does not import
        return None, str(exc)
    if lib is None:
        return None, f"no TensorRT library is installed ({trt_lib.INSTALL_HINT})"
    return lib, ""


def build_unavailable_reason() -> str:
    lib, why = _library()
    if lib is None:
        return why
    if not lib.builds_without_gpu and trt_lib.gpu_target() is None:
        return (f"{lib.title} builds on the GPU it builds for, and this machine has none; TensorRT for RTX "
                f"builds without one ({trt_lib.INSTALL_HINT})")
    return ""


def can_build() -> bool:
    return not build_unavailable_reason()


def unavailable_reason() -> str:
    """Why this machine cannot run TensorRT engines ("" if it can)."""
    lib, why = _library()
    if lib is None:
        return why
    gpu = trt_lib.gpu_target()
    if gpu is None:
        return f"{lib.title} engines need {lib.gpus}, and this machine has no CUDA GPU"
    if not lib.runs_on(gpu):
        return f"{lib.title} engines need {lib.gpus}; {trt_lib.gpu_identity()} is not one"
    return ""


def is_available() -> bool:
    return not unavailable_reason()


def versions() -> dict[str, str]:
    """The TensorRT library and version plans are tied to, and the GPU (information)."""
    lib, _ = _library()
    return {"trt_library": lib.name if lib else NO_LIBRARY, "trt_version": lib.version if lib else NO_LIBRARY,
            "gpu": trt_lib.gpu_identity() or NO_GPU, "torch": torch.__version__}


def run_refusal(manifest: Any) -> Optional[str]:
    """Why this machine cannot run the plans of `manifest` (an EngineManifest), in one line
    naming the field: no GPU, or a GPU outside the plans' targets. None when it can."""
    kind = trt_lib.library_class(manifest.tool_versions.get("trt_library", ""))
    targets = list(manifest.build_args.get("trt", {}).get("targets") or [])
    if kind is None or not targets:
        return None  # not this format's manifest: version_mismatch names what differs
    planned = f"its plans are for {','.join(targets)} (trt_targets)"
    gpu = trt_lib.gpu_target()
    if gpu is None:
        return f"needs {kind.gpus}: {planned}, and this machine has no CUDA GPU"
    if gpu not in targets:
        lib = trt_lib.load_library(kind.name)
        if lib is not None and not lib.runs_on(gpu):
            return f"needs {kind.gpus}: {planned}, and {trt_lib.gpu_identity()} is not one"
        return f"{planned}, and this GPU is {trt_lib.gpu_identity()}; rebuild with --trt-targets {gpu}"
    return None


def load_graph(out_dir: str | os.PathLike, gspec: GraphSpec, files: Sequence[str], *,
               compute_dtype: torch.dtype, device: torch.device | str) -> "TrtRunner":
    """A runner over the .plan among `files` (relative to out_dir, a component folder of an
    engines dir whose runtime cache it shares), on `device`."""
    from wan_rt.runtime.backends.trt_engine import TrtEngine, TrtRunner

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("TensorRT engines run on a CUDA device")
    plans = [f for f in files if f.endswith(FILE_SUFFIX)]
    if len(plans) != 1:
        raise ValueError(f"expected one {FILE_SUFFIX} file among {list(files)}")
    lib = trt_lib.require()
    engine = TrtEngine.load(Path(out_dir) / plans[0], device, lib=lib, name=f"{gspec.component}/{gspec.graph}",
                            runtime_cache=lib.open_runtime_cache(Path(out_dir).parent))
    return TrtRunner(engine, gspec, compute_dtype)
