"""`wan-rt build` at the model's default size against the same build at a small size.

The checkpoint is bench_cpu_e2e.py's 6-layer x 512 two-expert T2V (diffusers layout, resolved
as a custom T2V-A14B-shaped model, so its default size is 1280x720x81). An export traces one
example; when that example was the profile's size, the default-size build ran a 75,600-token
forward at batch 2 (issue 10). Each build goes into a fresh engines dir; the small-size build is
the reference measured in the same run.

    python bench/bench_build.py --json bench/build_default_size.json     # minutes
    python bench/bench_build.py --tiny                                   # smoke test (CI)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_e2e import bench_checkpoint  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402

SMALL = ["--height", "128", "--width", "128", "--frames", "17"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny config: a smoke test")
    p.add_argument("--backend", default="ort")
    p.add_argument("--components", default="dit_high_noise")
    p.add_argument("--workdir", default=None, help="where the checkpoint and engines go (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    spec, work, ckpt = bench_checkpoint(args.tiny, args.workdir)
    rows = []
    for label, sizes in (("default size", []), ("128x128x17", SMALL)):
        engines = Path(tempfile.mkdtemp(prefix="engines-", dir=work))
        cmd = ["build", "--model", str(ckpt), "--backend", args.backend, "--components", args.components,
               "--engines-dir", str(engines), *sizes]
        cpu0, start = _children_cpu(), time.perf_counter()
        # A fresh process per build, as a user runs it (nothing cached in memory).
        proc = subprocess.run([sys.executable, "-c", "import sys; from wan_rt.cli import main; sys.exit(main())",
                               *cmd], capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu0
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        rows.append({"build": label, "seconds": seconds, "cpu_seconds": cpu, "command": "wan-rt " + " ".join(cmd)})
    for row in rows:
        row["vs 128x128x17"] = row["seconds"] / rows[-1]["seconds"]
    print(f"`wan-rt build --backend {args.backend} --components {args.components}` on {spec.name} "
          f"({spec.dit.num_layers} layers x {spec.dit.dim})")
    print_table(rows, ["build", "seconds", "cpu_seconds", "vs 128x128x17"])
    if args.json:
        write_json(args.json, {"environment": environment(), "spec": spec.name, "rows": rows})
    return 0


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (steadier than wall time on a
    shared machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
