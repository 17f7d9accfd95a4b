"""bench/bench_kernels.py --tiny runs end to end and writes its JSON (CPU smoke test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels.py"


def test_bench_kernels_tiny_writes_json(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--only", "conv", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["records"]}
    assert "triton" in impls and all(r["ms_p50"] > 0 for r in data["records"])
    assert "causal_conv3d" in capsys.readouterr().out
