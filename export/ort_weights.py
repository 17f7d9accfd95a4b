"""New weights into an exported ONNX graph without exporting it again (LoRAs on ONNX Runtime engines).

An initializer need not hold its parameter as stored: a Linear's weight reaches the file
transposed (export_onnx folds the transpose the exporter traced). So at export time
`write_weights_map` matches every float initializer to the module parameter it holds, by value
(as stored, or transposed for 2-D weights; a reshape has the same bytes), and records the map
beside the graph. `reweight` then
writes a copy of the graph whose mapped initializers hold a module's new parameters: the
protobuf's raw data for a small graph, the bytes in place in the external data file for a large
one. It declines (returns None: export again) when an initializer matched nothing (a value the
exporter computed from parameters) or matched several parameters whose new values differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from wan_rt.export.checkpoint_links import LINKS_DIR

MAP_FILE = "weights_map.json"


def _tensor_key(data: bytes, shape: tuple[int, ...], dtype: str) -> str:
    return hashlib.sha1(data).hexdigest() + f"/{dtype}/{shape}"


def _torch_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: the same two bytes as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ways the exporter may have stored a parameter: as is, or transposed (MatMul weights)."""
    out = {"same": t}
    if t.ndim == 2:
        out["T"] = t.t()
    return out


def _onnx_dtype_name(t) -> str:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(t.data_type).name if t.data_type != 16 else "bfloat16"


def _float_initializers(model, folder: Path):
    from onnx import TensorProto

    from wan_rt.export.onnx_export import initializer_bytes

    from onnx import numpy_helper

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    for init in model.graph.initializer:
        if init.data_type in floats and int(torch.tensor(list(init.dims)).prod()) > 1:
            data = initializer_bytes(init, folder)  # None: held in typed fields, not raw bytes
            yield init, data if data is not None else numpy_helper.to_array(init).tobytes()


def write_weights_map(module: nn.Module, model_path: Path) -> str:
    """Match `model_path`'s float initializers to `module`'s parameters and buffers; write
    MAP_FILE beside it and return its name."""
    import onnx

    model_path = Path(model_path)
    candidates: dict[str, list[list[str]]] = {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        for layout, view in _layouts(t).items():
            key = _tensor_key(_torch_bytes(view), tuple(view.shape), str(view.dtype).removeprefix("torch."))
            candidates.setdefault(key, []).append([name, layout])
    model = onnx.load(str(model_path), load_external_data=False)
    found: dict[str, list[str]] = {}
    ambiguous: dict[str, list[list[str]]] = {}
    unmatched: list[str] = []
    for init, data in _float_initializers(model, model_path.parent):
        hits = candidates.get(_tensor_key(data, tuple(init.dims), _onnx_dtype_name(init)), [])
        if len(hits) == 1:
            found[init.name] = hits[0]
        elif hits:
            ambiguous[init.name] = hits
        else:
            unmatched.append(init.name)
    (model_path.parent / MAP_FILE).write_text(json.dumps(
        {"initializers": found, "ambiguous": ambiguous, "unmatched": unmatched}, indent=1, sort_keys=True) + "\n")
    return MAP_FILE


def _read_at(f, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def reweight(module: nn.Module, built_dir: Path, out_dir: Path, files: list[str]) -> Optional[list[str]]:
    """A copy of the graph in `built_dir` (its `files`) in `out_dir` with `module`'s weights, or
    None when the map cannot account for every weight of the graph."""
    import onnx

    built_dir, out_dir = Path(built_dir), Path(out_dir)
    if MAP_FILE not in files or not (built_dir / MAP_FILE).is_file():
        return None
    mapping = json.loads((built_dir / MAP_FILE).read_text())
    if mapping["unmatched"]:
        return None
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    new: dict[str, bytes] = {}
    for init_name, (param, layout) in mapping["initializers"].items():
        new[init_name] = _torch_bytes(_layouts(state[param])[layout])
    for init_name, hits in mapping["ambiguous"].items():
        values = {_torch_bytes(_layouts(state[p])[layout]) for p, layout in hits}
        if len(values) != 1:
            return None  # parameters that were equal at export time no longer are
        new[init_name] = values.pop()
    model_file = next(f for f in files if f.endswith(".onnx"))
    model = onnx.load(str(built_dir / model_file), load_external_data=False)
    external: dict[str, list[tuple[int, bytes]]] = {}
    for init in model.graph.initializer:
        if init.name not in new:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            external.setdefault(info["location"], []).append((int(info.get("offset", 0)), new[init.name]))
        else:
            for typed in ("float_data", "int32_data"):  # fp16/bf16 may sit in int32_data
                init.ClearField(typed)
            init.raw_data = new[init.name]
    for location in [loc for loc in external if Path(loc).parts[:1] == (LINKS_DIR,)]:
        # A hard link of the checkpoint (export/ort_build.py): only what the LoRA changed is
        # written, into a copy; a file it leaves as it is is linked again, never written to.
        with open(built_dir / location, "rb") as f:
            external[location] = [(o, d) for o, d in external[location] if _read_at(f, o, len(d)) != d]
        if not external[location]:
            del external[location]
    for f in files:
        (out_dir / f).parent.mkdir(parents=True, exist_ok=True)
        if Path(f).parts[:1] == (LINKS_DIR,) and f not in external:
            try:
                os.link(built_dir / f, out_dir / f)
                continue
            except OSError:
                pass
        shutil.copyfile(built_dir / f, out_dir / f)
    for location, writes in external.items():
        with open(out_dir / location, "r+b") as f:
            for offset, data in writes:
                f.seek(offset)
                f.write(data)
    onnx.save_model(model, str(out_dir / model_file))
    return list(files)
