"""bench/gpu_check.sh, the prepared GPU check: its --cpu-smoke run goes through every stage at
tiny sizes on the CPU and reports into at most 8 well-named files; its GPU-mode commands are
accepted by the scripts they call (which then refuse, in one line, for want of a CUDA GPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
STAGES = ["machine", "tests", "kernels", "dit_a14b", "dit_ti2v", "aoti", "e2e"]


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
