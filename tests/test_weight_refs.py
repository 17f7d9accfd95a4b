"""Engines point at the checkpoint's own bytes instead of copying them (issue 18): which tensors
can be pointed at (`checkpoint.file_regions`), and the weights.json an AOTInductor graph keeps
for them (`aoti_export.write_weight_refs`, read back by the Python runtime; the C++ runtime's
reader is exercised by test_cpp.py on the same engines)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_rt.export.aoti_export import weights_source, write_weight_refs
from wan_rt.models.checkpoint import file_regions, read_state_dict
from wan_rt.runtime.backends.aoti import read_weight_refs

CPU = torch.device("cpu")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(4, 8, generator=g), "b": torch.randn(3, 5, generator=g).bfloat16(),
               "c": torch.randn(7, generator=g)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def _header_offsets(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_file_regions_are_the_safetensors_offsets_of_unchanged_tensors(checkpoint):
    sd = read_state_dict(checkpoint)
    regions = file_regions(sd)
    assert {k: (p.resolve(), o) for k, (p, o) in regions.items()} == \
        {k: (checkpoint.resolve(), o) for k, o in _header_offsets(checkpoint).items()}
    # Converted, copied or written-to tensors are not the file's bytes any more.
    sd["a"].mul_(2)  # a private map keeps the changed page to itself
    changed = {"a": sd["a"], "b32": sd["b"].float(), "c_copy": sd["c"].clone(), "b": sd["b"]}
    assert set(file_regions(changed)) == {"b"}


def _refs_round_trip(checkpoint, folder) -> tuple[dict, dict]:
    sd = read_state_dict(checkpoint)
    regions = {f"dit.{k}": (t, *file_regions(sd)[k]) for k, t in sd.items()}
    folder.mkdir()
    files = write_weight_refs(regions, folder)
    got = read_weight_refs(folder / "weights.json", CPU)
    assert set(got) == set(regions) and all(torch.equal(got[k], regions[k][0]) for k in got)
    return json.loads((folder / "weights.json").read_text()), {"files": files}


def test_weights_json_hard_links_the_checkpoint_file(checkpoint, tmp_path):
    refs, out = _refs_round_trip(checkpoint, tmp_path / "graph")
    link = tmp_path / "graph" / refs["files"][0]["path"]
    assert refs["files"][0]["linked"] and os.path.samefile(link, checkpoint)
    assert out["files"] == ["weights.json", refs["files"][0]["path"]]
    assert weights_source(tmp_path / "graph")["from_checkpoint"] == "linked"
    # The link keeps the engine's bytes when the checkpoint is replaced by a new file.
    checkpoint.unlink()
    assert len(read_weight_refs(tmp_path / "graph" / "weights.json", CPU)) == 3


def test_weights_json_points_at_the_file_where_links_fail(checkpoint, tmp_path, monkeypatch):
    def refuse(*_args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    refs, out = _refs_round_trip(checkpoint, tmp_path / "graph")
    assert refs["files"][0] == {"path": str(checkpoint.resolve()), "linked": False,
                                "size": checkpoint.stat().st_size}
    assert out["files"] == ["weights.json"]
    assert weights_source(tmp_path / "graph")["from_checkpoint"] == "referenced"
    checkpoint.unlink()
    with pytest.raises(ValueError, match="is missing or changed; rebuild the engines with `wan-rt build`"):
        read_weight_refs(tmp_path / "graph" / "weights.json", CPU)
