"""ONNX Runtime engines, build side: one graph module -> `model.onnx` (+ Q/DQ for fp8/int8 DiTs).

The run side is wan_rt.runtime.backends.ort.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wan_rt.export.onnx_export import export_onnx
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
    return files if quant is None else quant.apply(Path(out_dir) / MODEL_FILE, module)
