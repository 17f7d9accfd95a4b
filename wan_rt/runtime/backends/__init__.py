"""Engine backends. Each module `wan_rt.runtime.backends.<name>` provides:

    NAME: str
    FILE_SUFFIX: str                       # e.g. ".onnx", ".pt2", ".plan"
    is_available() -> bool                 # can this machine build and run it?
    versions() -> dict[str, str]           # tool versions recorded in the manifest
    build_graph(module, gspec, profile, out_dir, *, compute_dtype, device) -> list[str]
        # export/compile one graph module (runtime.graphs.graph_module) into out_dir (a
        # temporary folder the caller renames into place); returns the files written, relative
    load_graph(out_dir, gspec, files, *, compute_dtype, device) -> GraphRunner
        # a callable {input name: tensor} -> {output name: tensor} (runtime.engine_component)

and optionally:

    STRICT_VERSIONS: tuple[str, ...]       # versions() keys that must match at load (else stale)
    build_profile(spec, component, profile) -> ShapeProfile
        # the part of the requested profile the backend can serve (written into the manifest)
    CUDA_GRAPHS: bool                      # the runtime replays DiT steps from CUDA graphs

Backends are imported lazily: onnxruntime, torch._inductor and tensorrt load only when used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("ort", "aoti", "trt")


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; choose from {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"wan_rt.runtime.backends.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"wan_rt.runtime.backends.{name}":
            raise
        raise ValueError(f"engine backend {name!r} is not part of this version of wan_rt") from None
