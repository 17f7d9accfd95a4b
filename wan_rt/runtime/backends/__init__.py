"""Engine backends, run side. Each module `wan_rt.runtime.backends.<name>` provides:

    NAME: str
    FILE_SUFFIX: str                       # e.g. ".onnx", ".pt2", ".plan"
    is_available() -> bool                 # can this machine run it (and build it)?
    versions() -> dict[str, str]           # tool versions recorded in the manifest
    load_graph(out_dir, gspec, files, *, compute_dtype, device) -> GraphRunner
        # a callable {input name: tensor} -> {output name: tensor} (runtime.engine_component)

and optionally:

    STRICT_VERSIONS: tuple[str, ...]       # versions() keys that must match at load (else stale)
    CUDA_GRAPHS: bool                      # the runtime replays DiT steps from CUDA graphs
    can_build() -> bool                    # where building needs less than running (trt: TensorRT
    build_unavailable_reason() -> str      #   for RTX builds with no GPU); default: is_available()
    run_refusal(manifest) -> str | None    # why this machine cannot run that engine (no GPU among
                                           #   its targets); refused at load in one line

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
