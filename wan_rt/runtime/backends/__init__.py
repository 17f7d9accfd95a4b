"""Engine backends, run side. Each module `wan_rt.runtime.backends.<name>` provides:

    NAME: str
    FILE_SUFFIX: str                       # e.g. ".onnx", ".pt2", ".plan"
    is_available() -> bool                 # can this machine build and run it?
    versions() -> dict[str, str]           # tool versions recorded in the manifest
    load_graph(out_dir, gspec, files, *, compute_dtype, device) -> GraphRunner
        # a callable {input name: tensor} -> {output name: tensor} (runtime.engine_component)

and optionally:

    STRICT_VERSIONS: tuple[str, ...]       # versions() keys that must match at load (else stale)
    CUDA_GRAPHS: bool                      # the runtime replays DiT steps from CUDA graphs

The build side (export, compile) is wan_rt.export.builders; nothing here imports it. Backends
are imported lazily: onnxruntime, torch._inductor and tensorrt load only when used.
"""

from __future__ import annotations

from types import ModuleType

BACKENDS = ("ort", "aoti", "trt")


def get_backend(name: str) -> ModuleType:
    if name == "ort":
        from wan_rt.runtime.backends import ort

        return ort
    if name == "aoti":
        from wan_rt.runtime.backends import aoti

        return aoti
    if name == "trt":
        from wan_rt.runtime.backends import trt

        return trt
    raise ValueError(f"unknown engine backend {name!r}; choose from {', '.join(BACKENDS)}")
