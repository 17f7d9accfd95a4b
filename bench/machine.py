"""What this machine is, and its two measured ceilings: device memory bandwidth and bf16 GEMM rate.

    python bench/machine.py --json machine.json          # a CUDA GPU: 4 GiB copy, 8192^3 bf16 GEMM
    python bench/machine.py --tiny --json machine.json   # CPU smoke test (tiny sizes, fp32)

The ceilings are what the other benchmarks' figures are read against (the datasheet peaks are
leads, not readings): bytes read + bytes written of a device-to-device copy over its time, and
2·M·N·K of one matrix product on random data (never zeros: they run faster) over its time,
each the median of repeated timed runs after warm-up. Also records where `wan_rt` was imported
from (so a stale install is seen) and which optional packages are importable.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, timed, write_json  # noqa: E402

OPTIONAL = ("diffusers", "triton", "onnxruntime", "tensorrt")


def nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def packages() -> dict[str, str | None]:
    """Version of each optional package, or None when it does not import."""
    found: dict[str, str | None] = {}
    for name in OPTIONAL:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: both mean "not usable here"
            found[name] = None
    return found


def copy_gbps(nbytes: int, device: str, repeats: int) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src)) for _ in range(repeats + 2)][2:]  # two warm-ups
    return 2 * nbytes / median(times) / 1e9  # read + write


def gemm_tflops(n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    times = [timed(lambda: a @ b) for _ in range(repeats + 3)][3:]
    return 2 * n**3 / median(times) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized buffers (a smoke test; numbers mean nothing)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    import wan_rt

    info: dict = {"environment": environment(), "wan_rt_from": str(Path(wan_rt.__file__).resolve().parent),
                  "wan_rt_file": wan_rt.__file__, "packages": packages(), "nvidia_smi": nvidia_smi(),
                  "device": device}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu_properties"] = {"name": props.name, "sm_count": props.multi_processor_count,
                                  "memory_gib": props.total_memory / 2**30,
                                  "capability": f"{props.major}.{props.minor}"}
    copy_bytes, n, dtype = (4 * 2**30, 8192, torch.bfloat16) if cuda else (64 * 2**20, 256, torch.float32)
    info["ceilings"] = {
        "copy_gbps": copy_gbps(copy_bytes, device, repeats=10),
        "copy_bytes": copy_bytes,
        "gemm_tflops": gemm_tflops(n, dtype, device, repeats=10),
        "gemm": f"{n}x{n}x{n} {str(dtype).split('.')[-1]}, random data",
    }
    print_table([{"gpu": info["environment"]["gpu"] or "none (CPU)", **info["ceilings"]}],
                ["gpu", "copy_gbps", "gemm_tflops", "gemm"])
    print(f"wan_rt from {info['wan_rt_from']}; packages: {info['packages']}")
    write_json(args.json, {"benchmark": "machine", **info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
