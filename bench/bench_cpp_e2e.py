"""End to end on the CPU: the C++ runtime (wan_rt/cpp) vs the Python runtime on the same engines.

Config: bench_cpu_e2e.py's `bench-t2v-6L-512` (the T2V-A14B wiring at 6 layers x 512, 128x128x17,
4 UniPC steps with CFG, 512 text tokens), random weights in the diffusers layout, AOTInductor
engines built once (`--kernels torch`, default compile options). Two measurements, alternating
the runtimes one sample at a time so a shared machine's drifting load falls on both:
- generation: a loaded pipeline, one warm-up each, then timed generations (Python: WanPipeline on
  the engines dir in this process; C++: wan_rt::Pipeline in a `wan-rt-cpp-probe serve` process fed
  one request at a time), median wall ms and median CPU ms (the process's, every thread: what a
  busy shared machine distorts least);
- command: the cold command from process start to the mp4 (`wan-rt run` vs `wan-rt-cpp`).
The frames of both are compared (max |C++ - Python| in the table and the JSON).

    python bench/bench_cpp_e2e.py --workdir /tmp/cppbench --json bench/cpp_e2e.json
    python bench/bench_cpp_e2e.py --tiny --workdir /tmp/cppbench-tiny --json bench/cpp_e2e_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_e2e import bench_spec  # noqa: E402
from common import environment, median, print_table, write_json  # noqa: E402

PROMPT, NEGATIVE = "a red fox running through snow", "blurry"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny preset's config (quick compile): what overhead costs")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each runs both runtimes")
    p.add_argument("--repeats", type=int, default=1, help="timed generations per runtime and round")
    p.add_argument("--workdir", default=None, help="where the checkpoint and engines go (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from safetensors.torch import load_file

    from wan_rt.build import build_engines
    from wan_rt.cpp import build as build_cpp
    from wan_rt.loader import WanPipeline
    from wan_rt.metrics import max_abs_error
    from wan_rt.tiny import write_tiny_checkpoint

    spec = bench_spec(args.tiny)
    rounds, repeats = args.rounds, args.repeats
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wan_rt_cpp_bench_"))
    ckpt, engines = work / "checkpoint", work / "engines-aoti"
    if not (ckpt / "model_index.json").is_file():
        write_tiny_checkpoint(spec, ckpt)
    start = time.perf_counter()
    # --tiny builds at tests/test_aoti.py's profile (twice the size, 9 frames): the same graphs as the
    # tiny preset's, so its packages come from the package cache; the request is the default size.
    size = dict(height=2 * spec.height, width=2 * spec.width, frames=9) if args.tiny else \
        dict(height=spec.height, width=spec.width, frames=spec.num_frames)
    build_engines(str(ckpt), "aoti", engines, **size, device="cpu", kernels="torch", quick_compile=args.tiny,
                  log=lambda s: None)
    build_s = time.perf_counter() - start
    exe = build_cpp()
    probe = exe.with_name("wan-rt-cpp-probe")

    request = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": spec.height, "width": spec.width,
               "num_frames": spec.num_frames, "steps": spec.sample_steps, "seed": 0}
    pipe = WanPipeline.from_pretrained(str(ckpt), engines_dir=str(engines), device="cpu")
    pipe.set_progress_bar_config(disable=True)

    def python_generation():
        return pipe(PROMPT, negative_prompt=NEGATIVE, height=spec.height, width=spec.width,
                    num_frames=spec.num_frames, num_inference_steps=spec.sample_steps,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np")

    common_args = ["--engines-dir", str(engines), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                   "--height", str(spec.height), "--width", str(spec.width), "--frames", str(spec.num_frames),
                   "--steps", str(spec.sample_steps), "--seed", "0"]
    commands = {"python": ["wan-rt", "run", *common_args, "--output", str(work / "py.mp4")],
                "cpp": [str(exe), *common_args, "--output", str(work / "cpp.mp4")]}
    gen: dict[str, list[float]] = {"python": [], "cpp": []}
    gen_cpu: dict[str, list[float]] = {"python": [], "cpp": []}
    cmd: dict[str, list[float]] = {"python": [], "cpp": []}
    stage_runs: dict[str, list[dict]] = {"python": [], "cpp": []}
    load_before = os.getloadavg()
    server = subprocess.Popen([str(probe), "serve", str(engines), str(work / "cpp.safetensors")], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdin is not None and server.stdout is not None
    json.loads(server.stdout.readline())  # ready

    def cpp_generation() -> dict:
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    python_generation(), cpp_generation()  # warm-up
    for r in range(rounds):
        for runtime in (("python", "cpp") if r % 2 == 0 else ("cpp", "python")):
            for _ in range(repeats):
                if runtime == "python":
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = python_generation()
                    gen["python"].append((time.perf_counter() - t0) * 1000)
                    gen_cpu["python"].append((time.process_time() - c0) * 1000)
                    stage_runs["python"].append({k: v * 1000 for k, v in out.timings.items()})
                    python_frames = torch.from_numpy(out.frames[0])
                else:
                    result = cpp_generation()
                    gen["cpp"].append(result["ms"])
                    gen_cpu["cpp"].append(result["cpu_ms"])
                    stage_runs["cpp"].append(result["stages_ms"])
            t0 = time.perf_counter()
            subprocess.run(commands[runtime], capture_output=True, check=True)
            cmd[runtime].append((time.perf_counter() - t0) * 1000)
    server.stdin.close()
    server.wait()
    load_after = os.getloadavg()

    cpp_frames = load_file(str(work / "cpp.safetensors"))["frames"]
    err = max_abs_error(cpp_frames, python_frames)
    rows = []
    for runtime in ("python", "cpp"):
        rows.append({"runtime": runtime, "generation_ms": median(gen[runtime]),
                     "speedup_vs_python": median(gen["python"]) / median(gen[runtime]),
                     "generation_cpu_ms": median(gen_cpu[runtime]),
                     "cpu_speedup": median(gen_cpu["python"]) / median(gen_cpu[runtime]),
                     "command_ms": median(cmd[runtime]), "command_speedup": median(cmd["python"]) / median(cmd[runtime]),
                     "max_abs_err_vs_python": err if runtime == "cpp" else 0.0,
                     "stages_ms": {k: round(median([run.get(k, 0.0) for run in stage_runs[runtime]]), 1)
                                   for k in stage_runs[runtime][0]},
                     "generation_runs_ms": gen[runtime], "generation_cpu_runs_ms": gen_cpu[runtime],
                     "command_runs_ms": cmd[runtime]})
    print(f"{spec.name}: {spec.width}x{spec.height}x{spec.num_frames}, {spec.sample_steps} steps, CFG, AOTI engines "
          f"(built in {build_s:.0f} s), {rounds} rounds x {repeats} generations, torch threads {torch.get_num_threads()}, "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print_table(rows, ["runtime", "generation_ms", "speedup_vs_python", "generation_cpu_ms", "cpu_speedup",
                       "command_ms", "command_speedup", "max_abs_err_vs_python"])
    write_json(args.json, {"benchmark": "cpp_e2e", "spec": dataclasses.asdict(spec), "environment": environment(),
                           "command": " ".join(sys.argv), "build_s": build_s,
                           "load_average": {"before": load_before, "after": load_after}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
