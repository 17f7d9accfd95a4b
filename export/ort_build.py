"""ONNX Runtime engines, build side: one graph module -> `model.onnx` (+ Q/DQ for fp8/int8 DiTs),
and the same graph with new weights (LoRAs) without a re-export (`reweight_graph`).

The run side is wan_rt.runtime.backends.ort.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from wan_rt.export.onnx_export import export_onnx
from wan_rt.export.ort_weights import reweight, write_weights_map
from wan_rt.export.quantize import QDQ_OPSET
from wan_rt.runtime.backends.ort import MODEL_FILE, check_precision
from wan_rt.runtime.graphs import GraphSpec, ShapeProfile


def build_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, out_dir: str | os.PathLike, *,
                compute_dtype: torch.dtype, device: torch.device | str, quant=None, **export_args) -> list[str]:
    """Export one graph module to `out_dir/model.onnx` (+ `model.onnx.data` over 2 GB); returns
    the file names, relative to out_dir. `export_args` go to export_onnx (opset, threshold).
    `quant` (export.quantize.QuantPlan, fp8/int8 DiTs): export at opset 19 and insert Q/DQ."""
    device = torch.device(device)
    check_precision(compute_dtype, device)
    if quant is not None:
        export_args.setdefault("opset", QDQ_OPSET)
    files = export_onnx(module, gspec, profile, Path(out_dir) / MODEL_FILE, compute_dtype=compute_dtype,
                        device=device, **export_args)
    if quant is not None:
        return quant.apply(Path(out_dir) / MODEL_FILE, module)
    return [*files, write_weights_map(module, Path(out_dir) / MODEL_FILE)]


def reweight_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, built_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, files: list[str], *, compute_dtype: torch.dtype,
                   device: torch.device | str, quant=None, **_options) -> Optional[list[str]]:
    """The graph built in `built_dir` (same model, shapes and options) with `module`'s weights,
    written to `out_dir` without exporting again (export/ort_weights.py); None: export instead."""
    if quant is not None:
        return None  # Q/DQ weights are quantized per build
    return reweight(module, Path(built_dir), Path(out_dir), files)
