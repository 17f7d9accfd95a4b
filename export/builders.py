"""The build side of each engine backend: a module with

    build_graph(module, gspec, profile, out_dir, *, compute_dtype, device, **options) -> list[str]
        # export/compile one graph module (runtime.graphs.graph_module) into out_dir (a
        # temporary folder the caller renames into place); returns the files written, relative

and optionally

    build_profile(spec, component, profile) -> ShapeProfile
        # the part of the requested profile the backend can serve (written into the manifest)
    reweight_graph(module, gspec, profile, built_dir, out_dir, files, *, compute_dtype, device,
                   **options) -> list[str] | None
        # new weights (a LoRA fused in) for a graph built before that differs in nothing else,
        # without exporting / building it again (ort: the initializers rewritten; trt: a refit);
        # None when it cannot. Backends without it rebuild (aoti: the package cache makes that
        # an export and a copy, no compile)

The run side of the same backend is wan_rt.runtime.backends.<name>; it never imports this.
Imported on first use: ONNX, inductor and TensorRT load only for the backend being built.
"""

from __future__ import annotations

from types import ModuleType

from wan_rt.runtime.backends import BACKENDS


def get_builder(name: str) -> ModuleType:
    if name == "ort":
        from wan_rt.export import ort_build

        return ort_build
    if name == "aoti":
        from wan_rt.export import aoti_export

        return aoti_export
    if name == "trt":
        from wan_rt.export import trt_build

        return trt_build
    raise ValueError(f"unknown engine backend {name!r}; choose from {', '.join(BACKENDS)}")
