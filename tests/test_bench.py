"""The benchmarks run on a CPU at tiny size (a smoke test: numbers are not checked, shapes are)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_cpu_e2e_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_cpu_e2e.py"), "--tiny", "--variants", "eager,ort",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["eager", "ort"]
    ort = data["rows"][1]
    assert ort["max_abs_err_vs_ref"] < 1e-4, "a fast variant must compute the same video"
    assert ort["median_ms"] > 0 and "dit_high_noise" in ort["stages_ms"] and data["environment"]["torch"]
