"""TensorRT backend, run side: `load_graph` deserializes a plan into a TrtRunner (trt_engine.py:
shared activation memory, one stream, CUDA graphs). The build side (ONNX export in the compute
dtype, Q/DQ for fp8/int8 DiTs, a strongly typed plan; refits) is wan_rt.export.trt_build.

**Never run**: TensorRT cannot be installed on any machine this project has used (PyPI's
tensorrt wheels fetch from NVIDIA's index, unreachable here, and the GPU machine has none). This
module imports without it; `is_available()` is False there and `wan-rt build` picks ONNX Runtime.
What was checked: mypy against tensorrt-stubs 10.13, and the CPU-testable parts (profiles,
version refusal, memory sharing and binding with a stand-in engine) in tests/test_trt.py.

Versions: a plan runs only with the TensorRT it was built by, on the GPU kind it was built for,
so both are in the manifest and `STRICT_VERSIONS` makes the engines loader refuse a mismatch
with one line (runtime.engines_dir.verify -> version_mismatch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from wan_rt.runtime.graphs import GraphSpec

if TYPE_CHECKING:
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


def trt_version() -> Optional[str]:
    """The installed TensorRT's version, or None when it cannot be imported."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(tensorrt.__version__)


def gpu_identity(device: Any = None) -> Optional[str]:
    """"<name> (sm<major><minor>)" of a CUDA device (a plan runs only on the GPU kind it was
    built for), or None without one. Same format as runtime.engines_dir.device_name."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{torch.cuda.get_device_name(dev)} (sm{major}{minor})"


def versions() -> dict[str, str]:
    """TensorRT version and GPU ("<name> (sm<cc>)"): the two a plan is tied to."""
    return {"tensorrt": trt_version() or NO_TENSORRT, "gpu": gpu_identity() or NO_GPU, "torch": torch.__version__}


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
