"""ONNX Runtime engines, build side: one graph module -> `model.onnx` (+ Q/DQ for fp8/int8 DiTs),
and the same graph with new weights (LoRAs) without a re-export (`reweight_graph`).

Weights that are a checkpoint file's own bytes (the module memory-mapped them, unconverted: an
fp32 engine of fp32 files, say) are not copied: the graph's external data points into a hard
link of that file in the graph's folder (export/checkpoint_links.py), and the manifest says so
(`weights_source`). Where no link can be made (another disk) they are written as before: ONNX
Runtime takes external data only from inside the model's folder.

The run side is wan_rt.runtime.backends.ort.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from wan_rt.export.checkpoint_links import LINKS_DIR, link_files
from wan_rt.export.onnx_export import export_onnx
from wan_rt.export.ort_weights import reweight, write_weights_map
from wan_rt.export.quantize import QDQ_OPSET
from wan_rt.models.checkpoint import file_regions
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
    refs = checkpoint_refs(module, Path(out_dir)) if quant is None else {}
    files = export_onnx(module, gspec, profile, Path(out_dir) / MODEL_FILE, compute_dtype=compute_dtype,
                        device=device, refs=refs, **export_args)
    if quant is not None:
        return quant.apply(Path(out_dir) / MODEL_FILE, module)
    links = keep_used_links(Path(out_dir), {location for location, _ in refs.values()})
    return [*files, *links, write_weights_map(module, Path(out_dir) / MODEL_FILE)]


def checkpoint_refs(module: torch.nn.Module, folder: Path) -> dict[str, tuple[str, int]]:
    """{weight name: (hard link in `folder`, byte offset)} for the module's tensors that are
    their checkpoint file's bytes, the files linked into `folder`; none for files no link
    could be made to."""
    tensors = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    regions = file_regions(tensors)
    links = link_files((source for source, _ in regions.values()), folder)
    return {name: (links[source], offset) for name, (source, offset) in regions.items()
            if links[source] is not None}


def _locations(model_path: Path) -> list[str]:
    """The external data file of each initializer of `model_path` stored that way."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"]


def keep_used_links(folder: Path, links: set[str]) -> list[str]:
    """The links the graph in `folder` reads from, sorted; the others (files holding only
    weights of another graph of the component) are removed."""
    used = set(_locations(folder / MODEL_FILE)) & links
    for unused in links - used:
        (folder / unused).unlink()
    return sorted(used)


def weights_source(graph_dir: Path) -> dict[str, Any] | None:
    """What the manifest says of a built graph's weights: how many initializers point into hard
    links of the checkpoint's files ("linked"); None when every weight was written."""
    model_path = Path(graph_dir) / MODEL_FILE
    if not (Path(graph_dir) / LINKS_DIR).is_dir() or not model_path.is_file():
        return None
    linked = [loc for loc in _locations(model_path) if Path(loc).parts[:1] == (LINKS_DIR,)]
    if not linked:
        return None
    return {"from_checkpoint": "linked", "tensors": len(linked), "files": sorted(set(linked))}


def reweight_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, built_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, files: list[str], *, compute_dtype: torch.dtype,
                   device: torch.device | str, quant=None, **_options) -> Optional[list[str]]:
    """The graph built in `built_dir` (same model, shapes and options) with `module`'s weights,
    written to `out_dir` without exporting again (export/ort_weights.py); None: export instead."""
    if quant is not None:
        return None  # Q/DQ weights are quantized per build
    return reweight(module, Path(built_dir), Path(out_dir), files)
