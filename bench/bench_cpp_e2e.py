"""End to end on the CPU: the C++ runtime (wan_rt/cpp) vs the Python runtime on the same engines.

Config: bench_cpu_e2e.py's `bench-t2v-6L-512` (the T2V-A14B wiring at 6 layers x 512, 128x128x17,
4 UniPC steps with CFG, 512 text tokens), random weights in the diffusers layout, AOTInductor
engines built once (`--kernels torch`, default compile options). Two measurements, in rounds that
alternate the runtimes:
- generation: a loaded pipeline, one warm-up, then timed generations (Python: WanPipeline on the
  engines dir; C++: wan_rt::Pipeline through `wan-rt-cpp-probe bench`), median ms;
- command: the cold command from process start to the mp4 (`wan-rt run` vs `wan-rt-cpp`).
The frames of both are compared (max |C++ - Python| in the table and the JSON).

    python bench/bench_cpp_e2e.py --workdir /tmp/cppbench --json bench/cpp_e2e.json
    python bench/bench_cpp_e2e.py --tiny            # smoke test: the tiny preset's config
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--tiny", action="store_true", help="tiny config, quick compile, one round: a smoke test")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs both runtimes")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per runtime and round")
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
    rounds, repeats = (1, 1) if args.tiny else (args.rounds, args.repeats)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wan_rt_cpp_bench_"))
    ckpt, engines = work / "checkpoint", work / "engines-aoti"
    if not (ckpt / "model_index.json").is_file():
        write_tiny_checkpoint(spec, ckpt)
    start = time.perf_counter()
    build_engines(str(ckpt), "aoti", engines, height=spec.height, width=spec.width, frames=spec.num_frames,
                  device="cpu", kernels="torch", quick_compile=args.tiny, log=lambda s: None)
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
    cmd: dict[str, list[float]] = {"python": [], "cpp": []}
    stages: dict[str, dict] = {}
    python_generation()  # warm-up
    for r in range(rounds):
        for runtime in (("python", "cpp") if r % 2 == 0 else ("cpp", "python")):
            if runtime == "python":
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    out = python_generation()
                    gen["python"].append((time.perf_counter() - t0) * 1000)
                stages["python"] = {k: v * 1000 for k, v in out.timings.items()}
                python_frames = torch.from_numpy(out.frames[0])
            else:
                proc = subprocess.run([str(probe), "bench", str(engines), str(repeats), str(work / "cpp.safetensors")],
                                      input=json.dumps(request), capture_output=True, text=True, check=True)
                result = json.loads(proc.stdout)
                gen["cpp"] += result["runs_ms"]
                stages["cpp"] = result["stages_ms"]
            t0 = time.perf_counter()
            subprocess.run(commands[runtime], capture_output=True, check=True)
            cmd[runtime].append((time.perf_counter() - t0) * 1000)

    cpp_frames = load_file(str(work / "cpp.safetensors"))["frames"]
    err = max_abs_error(cpp_frames, python_frames)
    rows = []
    for runtime in ("python", "cpp"):
        rows.append({"runtime": runtime, "generation_ms": median(gen[runtime]),
                     "speedup_vs_python": median(gen["python"]) / median(gen[runtime]),
                     "command_ms": median(cmd[runtime]), "command_speedup": median(cmd["python"]) / median(cmd[runtime]),
                     "max_abs_err_vs_python": err if runtime == "cpp" else 0.0,
                     "stages_ms": {k: round(v, 1) for k, v in stages[runtime].items()},
                     "generation_runs_ms": gen[runtime], "command_runs_ms": cmd[runtime]})
    print(f"{spec.name}: {spec.width}x{spec.height}x{spec.num_frames}, {spec.sample_steps} steps, CFG, AOTI engines "
          f"(built in {build_s:.0f} s), {rounds} rounds x {repeats} generations, torch threads {torch.get_num_threads()}")
    print_table(rows, ["runtime", "generation_ms", "speedup_vs_python", "command_ms", "command_speedup",
                       "max_abs_err_vs_python"])
    write_json(args.json, {"benchmark": "cpp_e2e", "spec": dataclasses.asdict(spec), "environment": environment(),
                           "command": " ".join(sys.argv), "build_s": build_s, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
