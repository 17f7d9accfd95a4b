"""bench/gpu_check.sh, the prepared GPU check: its --cpu-smoke run goes through every stage at
tiny sizes on the CPU and reports into at most 8 well-named files; its GPU-mode commands are
accepted by the scripts they call (which then refuse, in one line, for want of a CUDA GPU); results
shaped like a GPU run's get the right verdicts, ratios and summary, and fold into RESULTS.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
STAGES = ["machine", "tests", "kernels", "dit_a14b", "dit_ti2v", "aoti", "e2e"]


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_into_few_named_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu-smoke", "--workdir", str(work)],
                          env=dict(os.environ, PYTHON=sys.executable, OUT=str(out)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("files in"), "the short table is printed last"

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["gpu_check.json", "gpu_check.log", "summary.md"]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)

    record = json.loads((out / "gpu_check.json").read_text())
    assert record["mode"] == "cpu-smoke"
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == STAGES
    for s in stages.values():
        assert s["status"] == "ok" or (s["status"] == "skipped" and "needs a CUDA GPU" in s["note"]), s

    machine = stages["machine"]["result"]  # wan_rt came from the check's own linked install of this checkout
    assert machine["wan_rt_file"].startswith(str(work / "site" / "wan_rt"))
    assert machine["wan_rt_from"] == str(REPO / "wan_rt") and machine["ceilings"]["gemm_tflops"] > 0
    tests = stages["tests"]["result"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 10
    assert tests["skip_reasons"].get("needs a CUDA GPU", 0) >= 9  # every needs-a-GPU test is marked gpu
    impls = {(r["kernel"], r["impl"]) for r in stages["kernels"]["result"]["records"]}
    assert {("rope3d_attention", "triton"), ("rope3d_attention", "triton_int8"), ("causal_conv3d", "triton")} <= impls
    for name in ("dit_a14b", "dit_ti2v"):
        (scenario,) = stages[name]["result"]["scenarios"]
        rows = {r["variant"]: r for r in scenario["rows"]}
        assert list(rows) == ["diffusers", "eager", "kernels", "kernels+int8"]
        assert rows["diffusers"]["forward_rel_l2_vs_eager"] < 1e-5  # the reference runs on the same weights
        assert all(r["est_forward_ms"] > 0 for r in rows.values())
    (scenario,) = stages["aoti"]["result"]["scenarios"]
    aoti = {r["variant"]: r for r in scenario["rows"]}["aoti"]
    assert "AOTInductor packages" in aoti["description"] and aoti["forward_rel_l2_vs_eager"] < 0.1
    e2e = stages["e2e"]["result"]
    assert [r["variant"] for r in e2e["rows"]] == ["eager", "fast"]
    assert e2e["request"]["layers"] < e2e["request"]["full_layers"]  # reduced depth, and labelled so
    for row in e2e["rows"]:
        assert "swap_stall" in row["stages_ms"] and ["unload", "dit_high_noise"] in row["residency_events"]

    summary = (out / "summary.md").read_text()
    for label in ("CPU SMOKE RUN", "EXTRAPOLATED", "REDUCED DEPTH", "vs diffusers", "vs flash", "| aoti |"):
        assert label in summary, label


def test_gpu_mode_commands_are_accepted_and_refused_without_a_gpu(tmp_path):
    """The commands a GPU run would start: every flag parses; without a GPU each script says so."""
    plan = json.loads(subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--plan", "--workdir",
                                      str(tmp_path)], capture_output=True, text=True, check=True).stdout)
    assert list(plan) == STAGES and "--cpu-smoke" not in json.dumps(plan) and "--tiny" not in json.dumps(plan)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    procs = {name: subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in plan.items() if name not in ("machine", "tests")}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "need a CUDA GPU" in err and "unrecognized" not in err, (name, err)
        assert "Traceback" not in err, err


# ------------------------------------------------------------------ GPU-shaped results (no GPU needed)
def _summary_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wan_rt_bench_gpu_summary", BENCH / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attention(impl: str, ms: float) -> dict:
    return {"kernel": "rope3d_attention", "impl": impl, "case": "L=75600 H=40 D=128", "dtype": "bfloat16",
            "ms_p50": ms, "ms_p20": ms, "ms_p80": ms, "tflops": 117.0 / ms, "gbps": None}


def _dit(rows: list[dict]) -> dict:
    return {"scenarios": [{"name": "t2v-A14B", "size": [832, 480, 81], "tokens": 32760, "batch": 1, "num_layers": 40,
                           "flops": {"total": 1.68e15}, "rows": rows}]}


def test_gpu_verdicts_ratios_and_fold(tmp_path):
    """What a GPU run's files would say, from results shaped like the GPU scripts' JSON: ratios
    against the same-run reference, an AOTI stage without CUDA-graph replays is a failure, a
    killed stage keeps its partial rows, failed tests are named; `--fold` takes GPU runs only."""
    gs = _summary_module()
    kernels = {"records": [_attention("triton", 200.0), _attention("triton_int8", 125.0),
                           _attention("sdpa_flash_no_rope", 250.0), _attention("eager_rope_sdpa", 400.0)]}
    assert gs.judge("kernels", {"returncode": 0, "result": kernels}, smoke=False) == (
        "ok", "L=75600 H=40 D=128: triton 0.6 TFLOP/s = 1.25× flash, int8 0.9 = 2.00×")
    ladder = _dit([{"variant": "diffusers", "est_forward_ms": 1000.0}, {"variant": "eager", "est_forward_ms": 800.0},
                   {"variant": "kernels+int8+fp8", "est_forward_ms": 400.0}])
    status, note = gs.judge("dit_a14b", {"returncode": 0, "result": ladder}, smoke=False)
    assert status == "ok" and "kernels+int8+fp8 400 ms est. = 2.50× diffusers (1,000 ms)" in note
    aoti = {"variant": "aoti", "est_forward_ms": 500.0, "description": "AOTInductor packages + CUDA graphs"}
    no_replay = _dit([{"variant": "diffusers", "est_forward_ms": 1000.0}, dict(aoti, cuda_graph_replays=0)])
    assert gs.judge("aoti", {"returncode": 0, "result": no_replay}, smoke=False)[0] == "failed"
    replayed = _dit([{"variant": "diffusers", "est_forward_ms": 1000.0}, dict(aoti, cuda_graph_replays=12)])
    assert gs.judge("aoti", {"returncode": 0, "result": replayed}, smoke=False)[0] == "ok"
    broken = _dit([{"variant": "diffusers", "est_forward_ms": 1000.0}, {"variant": "kernels", "error": "OOM"}])
    assert gs.judge("dit_ti2v", {"returncode": 1, "result": broken}, smoke=False) == ("failed", "kernels: OOM")
    assert gs.judge("dit_ti2v", {"returncode": None, "timed_out": True, "timeout_s": 55, "result": ladder},
                    smoke=False) == ("timeout", "killed at its 55 s limit; partial results kept")

    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_x" name="test_ok"/>'
                     '<testcase classname="tests.test_x" name="test_bad"><failure message="assert 1 == 2">'
                     '</failure></testcase><testcase classname="tests.test_y" name="test_trt">'
                     '<skipped message="needs TensorRT and a CUDA GPU"/></testcase></testsuite></testsuites>')
    tests = gs.read_junit(junit)
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert gs.judge("tests", {"returncode": 1, "result": tests}, smoke=False) == (
        "failed", "1 failed, 0 errors (test_bad); 1 passed")

    record = {"mode": "gpu", "date": "2026-12-01T12:00:00+00:00", "argv": [], "budget_s": 540, "wall_s": 500,
              "install": {"ok": True, "wheels": ["diffusers-0.42.1-py3-none-any.whl"]},
              "stages": [{"name": "kernels", "status": "ok", "note": "", "result": kernels},
                         {"name": "dit_a14b", "status": "ok", "note": "", "result": ladder},
                         {"name": "aoti", "status": "ok", "note": "", "result": replayed}]}
    summary = gs.render_summary(record)
    assert "| kernels+int8+fp8 | 400.0 |" in summary and "2.50×" in summary and "| 12 |" in summary
    assert "EXTRAPOLATED" in summary and "CPU SMOKE" not in summary

    runs, bench = tmp_path / "files", tmp_path / "bench"
    runs.mkdir(), bench.mkdir()
    (bench / "RESULTS.md").write_text("# Measured results\n")
    (runs / "summary.md").write_text(summary)
    (runs / "gpu_check.json").write_text(json.dumps(dict(record, mode="cpu-smoke")))
    assert gs.fold(runs, bench) == 2 and (bench / "RESULTS.md").read_text() == "# Measured results\n"
    (runs / "gpu_check.json").write_text(json.dumps(record))
    assert gs.fold(runs, bench) == 0
    results = (bench / "RESULTS.md").read_text()
    assert "## GPU check of 2026-12-01" in results and "### DiT forward: t2v-A14B" in results
    assert json.loads((bench / "gpu_check_2026-12-01.json").read_text())["mode"] == "gpu"
