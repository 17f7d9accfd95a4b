"""TensorRT backend: availability probe only so far (engine build and runtime: issue 4).

TensorRT cannot be installed on any machine this project has used, so this module must import
without it; `is_available()` is False there and `wan-rt build` picks another backend.
"""

from __future__ import annotations

NAME = "trt"
FILE_SUFFIX = ".plan"
STRICT_VERSIONS = ("tensorrt", "gpu")


def unavailable_reason() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    return "the TensorRT engine builder is not implemented yet"


def is_available() -> bool:
    return False if unavailable_reason() else True


def versions() -> dict[str, str]:
    return {}


def build_graph(*args, **kwargs):
    raise RuntimeError(f"TensorRT backend unavailable: {unavailable_reason()}")


def load_graph(*args, **kwargs):
    raise RuntimeError(f"TensorRT backend unavailable: {unavailable_reason()}")
