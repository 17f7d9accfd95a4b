"""The one prepared GPU check: run this first whenever a GPU machine (H100 / H200) is lent.

    bash bench/gpu_check.sh                       # on the GPU machine: all stages, files into $OUT
    bash bench/gpu_check.sh --cpu-smoke           # anywhere: the same stages at tiny sizes on the CPU (CI)
    python bench/gpu_check.py --download-wheels   # here, before: fill .whl/ with what the GPU image lacks
    python bench/gpu_check.py --fold DIR          # here, after: fold DIR's results into bench/RESULTS.md

A GPU session is short (about 15 minutes in all, one command at most 10, on a bare machine with
no network), so this runs every GPU figure bench/RESULTS.md owes in one command of at most 9
minutes. Each stage is its own process under its own time limit (its whole process group is
killed at the limit, so one hang costs only its own slot), and every stage's limit is also cut
to what is left of the total budget:

    machine   what the machine is; measured copy GB/s and bf16 GEMM TFLOP/s (bench/machine.py)
    tests     pytest -m gpu (every test that needs a CUDA GPU)
    kernels   bench/bench_kernels.py at real sizes: wan_rt's Triton attention (bf16, int8) vs torch
              SDPA (flash) and eager RoPE+SDPA; causal conv vs conv3d
    dit_a14b  bench/dit_step.py, one T2V-A14B expert (480x832x81 = 32,760 tokens by default):
              diffusers' WanTransformer3DModel (the reference) vs wan_rt eager, + kernels, + int8
              attention, + FP8 linears. Random weights built on the meta device and materialised on
              the GPU; a 2-block probe is timed and EXTRAPOLATED to the full 40 blocks (labelled so)
    dit_ti2v  the same for TI2V-5B at its real size (1280x704x121 = 27,280 tokens, 30 blocks)
    aoti      the fast path as AOTInductor packages (one per block kind), replayed from CUDA
              graphs, against diffusers and eager in the same run (A14B expert, as dit_a14b)
    e2e       bench/e2e.py: a short generation (REDUCED DEPTH: 4 blocks per expert, 480x832x33,
              2 steps) with stage timings, one expert resident at a time so the swap stall is real

Files (at most 8; here 3) written to $OUT (or --out), rewritten after every stage:
    summary.md      the tables, with ratios against diffusers (DiT) / SDPA flash (kernels) / wan_rt
                    eager (e2e) measured in the same run
    gpu_check.json  every stage's status, seconds, command and full JSON result
    gpu_check.log   every stage's output (the tail of each when long)
A short table is printed last. Exit status 0 when every stage is ok or skipped with a reason.

Installing on the bare machine: wan_rt is linked, not built: <work>/site/wan_rt holds symlinks
to this checkout's wan_rt/ with kernels/ and export/ mounted as pyproject's package-dir says, and
<work>/site goes first on the stages' PYTHONPATH (no build backend, no network, the image's
Python untouched, and the repo root never on sys.path). Wheels in .whl/ (carried with the run)
are installed there with `pip install --no-index --no-deps --target`. The GPU image has torch,
triton, transformers, onnx, onnxruntime, pytest, safetensors, sentencepiece...; it lacks
diffusers, which the DiT reference and some test modules need: `--download-wheels` runs

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 ... -d .whl diffusers==<pyproject's test pin>

Without it the diffusers reference is left out of the DiT stages (and said so).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from gpu_summary import fold, judge, read_junit, render_summary, short_table  # noqa: E402

GPU_BUDGET_S = 540        # 9 minutes: a device command may run 10, the rest is margin
SMOKE_BUDGET_S = 600
LOG_TAIL_BYTES = 300_000  # per stage, in gpu_check.log
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
A14B_SIZE = "480x832x81"  # 32,760 tokens; 720x1280x81 (75,600) is the goal size, ~4x the work per block


@dataclass
class Stage:
    name: str
    timeout_s: int                    # on a GPU; --cpu-smoke uses smoke_timeout_s
    args: Callable[["Run", str], list[str]]  # (run, where the stage writes its JSON) -> command
    smoke_timeout_s: int = 120


@dataclass
class Run:
    smoke: bool
    work: Path
    out: Path
    a14b_size: str
    diffusers: bool = True            # set from the machine stage
    env: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def _py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


def _tiny(run: Run) -> list[str]:
    return ["--tiny"] if run.smoke else []


def machine_cmd(run: Run, js: str) -> list[str]:
    return _py("machine.py", *_tiny(run), "--json", js)


def tests_cmd(run: Run, js: str) -> list[str]:
    # Run from the work dir, so `python -m` puts no checkout folder on sys.path; the junit XML beside
    # `js` is the stage's result (gpu_summary.read_junit).
    return [sys.executable, "-m", "pytest", "-m", "gpu", str(REPO / "tests"), "-q", "-rs",
            "--continue-on-collection-errors", f"--junitxml={Path(js).with_suffix('.xml')}"]


def kernels_cmd(run: Run, js: str) -> list[str]:
    return _py("bench_kernels.py", *_tiny(run), "--json", js)


def dit_cmd(model: str, variants: str, at_a14b_size: bool) -> Callable[[Run, str], list[str]]:
    """bench/dit_step.py on one model (its tiny preset in the smoke run); the diffusers reference
    is left out when diffusers does not import on the machine."""
    def command(run: Run, js: str) -> list[str]:
        where = ["--tiny", "--models", f"tiny-{model}"] if run.smoke else [
            "--models", model, *(["--size", run.a14b_size] if at_a14b_size else []), "--full-forward", ""]
        chosen = [v for v in variants.split(",") if run.diffusers or v != "diffusers"]
        return _py("dit_step.py", *where, "--variants", ",".join(chosen), "--compile", "default", "--json", js)
    return command


def e2e_cmd(run: Run, js: str) -> list[str]:
    where = ["--tiny", "--layers", "1"] if run.smoke else [
        "--model", "t2v-A14B", "--size", "480x832", "--frames", "33", "--layers", "4", "--steps-per-expert", "1",
        "--compile", "none"]
    return _py("e2e.py", *where, "--variants", "eager,fast", "--one-expert-resident", "--workdir",
               str(run.work / "e2e"), "--json", js)


DIT_LADDER = "diffusers,eager,kernels,kernels+int8,kernels+int8+fp8"
STAGES = [
    Stage("machine", 30, machine_cmd, smoke_timeout_s=60),
    Stage("tests", 110, tests_cmd),
    Stage("kernels", 70, kernels_cmd),
    Stage("dit_a14b", 70, dit_cmd("t2v-A14B", DIT_LADDER, at_a14b_size=True)),
    Stage("dit_ti2v", 55, dit_cmd("ti2v-5B", DIT_LADDER, at_a14b_size=False)),
    Stage("aoti", 130, dit_cmd("t2v-A14B", "diffusers,eager,aoti", at_a14b_size=True)),
    Stage("e2e", 70, e2e_cmd),
]
# Every stage at its full limit fits the budget (the install takes the last few seconds; a stage that
# runs long is cut to what is left, so the budget holds whatever happens).
assert sum(s.timeout_s for s in STAGES) <= GPU_BUDGET_S - 5, "the stages' limits must fit the GPU budget"


# ------------------------------------------------------------------------------------ install
def package_dirs() -> dict[str, str]:
    """pyproject's package-dir: import name -> folder of this checkout."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def link_wan_rt(site: Path) -> None:
    """site/wan_rt: symlinks to the checkout's wan_rt/ entries, with each sub-package that
    pyproject maps elsewhere (wan_rt.kernels -> kernels/, wan_rt.export -> export/) linked in."""
    mapping = package_dirs()
    top = site / "wan_rt"
    top.mkdir(parents=True)
    subs = {name.split(".", 1)[1]: folder for name, folder in mapping.items() if name.startswith("wan_rt.")}
    for entry in (REPO / mapping["wan_rt"]).iterdir():
        if entry.name not in subs and entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for sub, folder in subs.items():
        (top / sub).symlink_to(REPO / folder, target_is_directory=True)


def install(run: Run, log: Callable[[str], None]) -> dict:
    site = run.work / "site"
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    info: dict = {"site": str(site), "wheels": [w.name for w in wheels], "ok": True}
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            info.update(ok=False, error=(proc.stdout + proc.stderr).strip()[-2000:])
    link_wan_rt(site)
    log(f"install: wan_rt linked into {site}; wheels: {', '.join(info['wheels']) or 'none (.whl/ is empty)'}"
        + ("" if info["ok"] else f"; pip FAILED: {info['error'].splitlines()[-1]}"))
    return info


def stage_env(run: Run) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(run.work / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("WAN_RT_CACHE", str(run.work / "cache"))
    if run.smoke:  # the same stages on the CPU, whatever the machine has
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    return env


def download_wheels() -> int:
    """Fill .whl/ (here, with network) with the wheels the GPU image lacks."""
    with open(REPO / "pyproject.toml", "rb") as f:
        pins = [r for r in tomllib.load(f)["project"]["optional-dependencies"]["test"] if r.startswith("diffusers")]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)],
           "-d", str(REPO / ".whl"), *pins]
    print(" ".join(cmd))
    return subprocess.run(cmd).returncode


# ------------------------------------------------------------------------------------ stages
def run_stage(stage: Stage, run: Run, timeout_s: float, log_file: Path) -> dict:
    """Run one stage in its own process group; kill the group at the limit."""
    json_file = run.work / f"{stage.name}.json"
    cmd = stage.args(run, str(json_file))
    result: dict = {"name": stage.name, "command": " ".join(cmd), "timeout_s": round(timeout_s)}
    start = time.monotonic()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=run.work, env=run.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            result["returncode"] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result["returncode"] = None
            result["timed_out"] = True
        _kill_group(proc)  # also after a normal exit: no straggler (a compile worker) keeps GPU memory
    result["seconds"] = round(time.monotonic() - start, 1)
    result["log_tail"] = _tail(log_file, 3000)
    if stage.name == "tests":
        result["result"] = read_junit(json_file.with_suffix(".xml"))
    elif json_file.is_file():
        try:
            result["result"] = json.loads(json_file.read_text())
        except json.JSONDecodeError as exc:  # cut mid-write by the limit
            result["result_error"] = f"unreadable JSON: {exc}"
    result["status"], result["note"] = judge(stage.name, result, run.smoke)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (its own session): TERM, up to 5 s for the leader, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, nbytes: int) -> str:
    data = path.read_bytes() if path.is_file() else b""
    return data[-nbytes:].decode("utf-8", "replace")


def write_outputs(run: Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "gpu_check.json").write_text(json.dumps(run.record, indent=1, default=str))
    (run.out / "summary.md").write_text(render_summary(run.record))
    with open(run.out / "gpu_check.log", "w") as log:
        for stage in run.record["stages"]:
            log.write(f"\n===== {stage['name']}: {stage['status']} ({stage.get('seconds', 0)} s) =====\n"
                      f"$ {stage.get('command', '')}\n")
            log.write(_tail(run.work / f"{stage['name']}.log", LOG_TAIL_BYTES))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu-smoke", action="store_true", help="every stage at tiny sizes on the CPU (CI)")
    p.add_argument("--out", default=None, help="where the files go (default: $OUT)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"total seconds for all stages (default {GPU_BUDGET_S} on a GPU, {SMOKE_BUDGET_S} smoke)")
    p.add_argument("--stages", default=",".join(s.name for s in STAGES), help="comma list, in the order above")
    p.add_argument("--a14b-size", default=A14B_SIZE, help="HxWxF of the A14B DiT and aoti stages")
    p.add_argument("--download-wheels", action="store_true", help="fill .whl/ for the GPU image, then exit")
    p.add_argument("--plan", action="store_true", help="print each stage's command (JSON) and exit")
    p.add_argument("--fold", metavar="DIR", default=None,
                   help="append DIR/summary.md to bench/RESULTS.md and copy DIR/gpu_check.json beside it, then exit")
    args = p.parse_args(argv)

    if args.download_wheels:
        return download_wheels()
    if args.fold:
        return fold(Path(args.fold), BENCH)
    if args.plan:
        work = Path(args.workdir or Path(tempfile.gettempdir()) / "wan_rt_gpu_check")
        run = Run(smoke=args.cpu_smoke, work=work, out=work, a14b_size=args.a14b_size)
        print(json.dumps({s.name: s.args(run, str(work / f"{s.name}.json")) for s in STAGES}, indent=1))
        return 0
    out = args.out or os.environ.get("OUT")
    if not out:
        p.error("no output folder: set $OUT or pass --out DIR")
    chosen = [s for s in args.stages.split(",") if s]
    unknown = set(chosen) - {s.name for s in STAGES}
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; known: {', '.join(s.name for s in STAGES)}")

    started, clock = time.monotonic(), datetime.now(timezone.utc)
    budget = args.budget_s or (SMOKE_BUDGET_S if args.cpu_smoke else GPU_BUDGET_S)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wan_rt_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(smoke=args.cpu_smoke, work=work, out=Path(out), a14b_size=args.a14b_size)
    run.record = {"check": "gpu_check", "mode": "cpu-smoke" if run.smoke else "gpu",
                  "date": clock.isoformat(timespec="seconds"), "argv": sys.argv[1:], "budget_s": budget,
                  "a14b_size": args.a14b_size, "stages": []}
    run.record["install"] = install(run, print)
    run.env = stage_env(run)
    write_outputs(run)

    for stage in STAGES:
        if stage.name not in chosen:
            continue
        left = budget - (time.monotonic() - started) - 12  # a stage killed at its limit gets 10 s to die
        limit = min(stage.smoke_timeout_s if run.smoke else stage.timeout_s, left)
        if limit < 15:
            result = {"name": stage.name, "status": "skipped",
                      "note": f"not started: {max(left, 0):.0f} s left of the {budget:.0f} s budget"}
        elif stage.name != "machine" and run.record.get("fatal"):
            result = {"name": stage.name, "status": "skipped", "note": run.record["fatal"]}
        else:
            print(f"[{time.monotonic() - started:5.0f} s] {stage.name} (limit {limit:.0f} s) ...", flush=True)
            result = run_stage(stage, run, limit, work / f"{stage.name}.log")
            if stage.name == "machine":
                check_machine(run, result)
        run.record["stages"].append(result)
        run.record["wall_s"] = round(time.monotonic() - started, 1)
        write_outputs(run)
        print(f"        {result['status']}: {result['note']}", flush=True)
        if result["status"] in ("failed", "timeout") and result.get("log_tail"):
            print("        " + "\n        ".join(result["log_tail"].strip().splitlines()[-8:]), flush=True)

    print()
    print(short_table(run.record))
    print(f"\nfiles in {run.out}: {', '.join(sorted(os.listdir(run.out)))}")
    if run.record.get("fatal"):
        print(run.record["fatal"], file=sys.stderr)
        return 2
    return 0 if all(s["status"] in ("ok", "skipped") for s in run.record["stages"]) else 1


def check_machine(run: Run, result: dict) -> None:
    """What the later stages depend on: a CUDA GPU (unless smoke), this checkout's wan_rt, diffusers."""
    info = result.get("result") or {}
    if result["status"] != "ok":
        run.record["fatal"] = "not started: the machine stage failed (see its log)"
        return
    if info.get("wan_rt_from") != str((REPO / "wan_rt").resolve()):
        run.record["fatal"] = f"not started: wan_rt imports from {info.get('wan_rt_from')}, not this checkout"
    elif not run.smoke and info.get("device") != "cuda":
        run.record["fatal"] = "not started: no CUDA GPU visible (torch.cuda.is_available() is False); " \
                              "use --cpu-smoke on a machine without one"
    run.diffusers = bool(info.get("packages", {}).get("diffusers"))
    if not run.diffusers:
        result["note"] += "; diffusers missing: the DiT stages run without their reference (carry .whl/)"


if __name__ == "__main__":
    sys.exit(main())
