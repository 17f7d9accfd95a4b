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


def test_serve_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--jobs", "1", "--rounds", "1",
                           "--requests", "5", "--devices", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows][-1] == "wan-rt serve, 1 CPU worker"
    assert rows[0]["variant"].startswith("warm pipeline in-process") and rows[0]["vs_pipeline"] == 1.0
    assert rows[-1]["jobs_per_min"] > 0 and rows[-1]["get_busy_p99_ms"] >= rows[-1]["get_busy_p50_ms"] > 0


def test_levers_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "levers.json"
    proc = subprocess.run([sys.executable, str(BENCH / "levers.py"), "--tiny", "--workdir", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(r["variant"], str(r["setting"])): r for r in data["rows"]}
    assert {v for v, _ in rows} == {"uncached", "teacache", "magcache", "fbcache", "4-step", "lora"}
    uncached = next(r for (v, _), r in rows.items() if v == "uncached")
    assert uncached["psnr_db"] == float("inf") or uncached["psnr_db"] > 100  # the reference against itself
    fused = rows["lora", "fused (vs run-time video)"]
    assert fused["psnr_db"] > 60, "fused and run-time LoRA must make the same video"
    caches = [r for (v, _), r in rows.items() if v in ("teacache", "magcache", "fbcache")]
    assert all(r["steps_computed"] + r["steps_reused"] == 8 for r in caches)


def test_build_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "build.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_build.py"), "--tiny", "--workdir", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["build"] for r in rows] == ["default size", "128x128x17"]
    assert all(r["seconds"] > 0 and "--components dit_high_noise" in r["command"] for r in rows)
    assert rows[1]["vs 128x128x17"] == 1.0
