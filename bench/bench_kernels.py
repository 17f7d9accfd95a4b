"""Benchmark the wan_rt Triton kernels against torch in the same run.

    python bench/bench_kernels.py [--json out.json] [--dtype bf16]   # a CUDA GPU: real shapes
    python bench/bench_kernels.py --tiny [--json out.json]           # CPU smoke test (interpreter)

* Attention: rope3d_attention (bf16 and int8) at L = 27,280 / 32,760 / 75,600 tokens with
  H×D = 40×128 (A14B) and 24×128 (TI2V-5B), against torch SDPA restricted to the flash backend
  (no RoPE: the floor the fused kernel competes with) and the eager rope + SDPA path the model
  uses otherwise. TFLOP/s from the closed form 4·B·H·L²·D (q·kᵀ and P·V, 2 FLOP per MAC).
* Causal conv: causal_conv3d on steady-state 4-frame VAE-decoder chunks (with cache) against
  eager F.conv3d over cat(cache, x). GB/s counts x + cache + weight + y once; TFLOP/s from
  2·B·T·H·W·C_out·C_in·27.

GPU timings use triton.testing.do_bench (p50, with p20 / p80); --tiny on a CPU times the
interpreter with a wall clock and only shows that the script and kernels run; its numbers say
nothing about speed. Prints a table; --json writes one record per measurement plus the env
(rewritten after each case, `"partial": true` until the run ends).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class AttnCase:
    grid: tuple[int, int, int]  # (F, Hp, Wp) post-patch token grid
    heads: int
    head_dim: int = 128

    @property
    def tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w


@dataclass(frozen=True)
class ConvCase:
    name: str
    channels: int
    height: int
    width: int
    frames: int = 4


ATTN_CASES = [
    AttnCase((31, 44, 20), 24),  # TI2V-5B 1280×704×121: 27,280 tokens
    AttnCase((31, 44, 20), 40),
    AttnCase((21, 30, 52), 40),  # A14B 832×480×81: 32,760 tokens
    AttnCase((21, 30, 52), 24),
    AttnCase((21, 45, 80), 40),  # A14B 1280×720×81: 75,600 tokens
    AttnCase((21, 45, 80), 24),
]
CONV_CASES = [  # Wan2.1 VAE decoder 3×3×3 convs at 480p (latent 60×104), one 4-frame chunk
    ConvCase("dec-latent", 384, 60, 104),
    ConvCase("dec-up1", 384, 120, 208),
    ConvCase("dec-up2", 192, 240, 416),
    ConvCase("dec-up3", 96, 480, 832),
]
TINY_ATTN = [AttnCase((3, 5, 7), 2, 32), AttnCase((3, 5, 7), 2, 64)]
TINY_CONV = [ConvCase("tiny", 8, 5, 7, frames=2)]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Record:
    kernel: str
    impl: str
    case: str
    dtype: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    tflops: float | None = None
    gbps: float | None = None


def _time(fn: Callable[[], object], cuda: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds."""
    if cuda:
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    fn()  # warm-up (the interpreter's first call parses the kernel)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[0], ts[-1]


def bench_attention(cases: list[AttnCase], dtype: torch.dtype, device: str) -> list[Record]:
    import torch.nn.functional as F

    import wan_rt.kernels as K
    from wan_rt.models import ops as eager_ops

    cuda = device == "cuda"
    records = []
    for case in cases:
        L, H, D = case.tokens, case.heads, case.head_dim
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, L, H, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        ang = torch.rand(L, D // 2, device=device, generator=g) * 6.28
        cos, sin = ang.cos(), ang.sin()
        flops = 4 * L * L * H * D
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def sdpa_flash():
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt)
            return F.scaled_dot_product_attention(qt, kt, vt)

        impls: dict[str, Callable[[], object]] = {
            "triton": lambda: K.rope3d_attention(q, k, v, cos, sin),
            "triton_int8": lambda: K.rope3d_attention(q, k, v, cos, sin, quant="int8"),
            "sdpa_flash_no_rope": sdpa_flash,
            "eager_rope_sdpa": lambda: eager_ops.rope_attention(q, k, v, cos, sin),
        }
        if dtype == torch.float32:
            impls.pop("sdpa_flash_no_rope")  # flash has no fp32 kernel
        label = f"L={L} H={H} D={D}"
        for impl, fn in impls.items():
            p50, p20, p80 = _time(fn, cuda)
            records.append(Record("rope3d_attention", impl, label, str(dtype).split(".")[-1],
                                  p50, p20, p80, tflops=flops / (p50 * 1e-3) / 1e12))
        del q, k, v, qt, kt, vt
    return records


def bench_conv(cases: list[ConvCase], dtype: torch.dtype, device: str) -> list[Record]:
    import wan_rt.kernels as K

    cuda = device == "cuda"
    records = []
    for case in cases:
        C, Hh, W, T = case.channels, case.height, case.width, case.frames
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, C, T, Hh, W, device=device, dtype=dtype, generator=g)
        cache = torch.randn(1, C, 2, Hh, W, device=device, dtype=dtype, generator=g)
        w = torch.randn(C, C, 3, 3, 3, device=device, dtype=dtype, generator=g) / (27 * C) ** 0.5
        b = torch.randn(C, device=device, dtype=dtype, generator=g)
        itemsize = x.element_size()
        nbytes = (x.numel() + cache.numel() + w.numel() + x.numel()) * itemsize  # y has x's size
        flops = 2 * T * Hh * W * C * C * 27
        label = f"{case.name} C={C} {T}x{Hh}x{W}"
        impls: dict[str, Callable[[], object]] = {
            "triton": lambda: K.causal_conv3d(x, w, b, cache),
            "eager_conv3d": lambda: K.causal_conv3d_ref(x, w, b, cache),
        }
        if not cuda and dtype != torch.float32:
            impls.pop("eager_conv3d")  # CPU conv3d lacks low-precision kernels
        for impl, fn in impls.items():
            p50, p20, p80 = _time(fn, cuda)
            records.append(Record("causal_conv3d", impl, label, str(dtype).split(".")[-1], p50, p20, p80,
                                  tflops=flops / (p50 * 1e-3) / 1e12, gbps=nbytes / (p50 * 1e-3) / 1e9))
        del x, cache, w
    return records


def env_info(device: str) -> dict[str, object]:
    import triton

    info: dict[str, object] = {"torch": torch.__version__, "triton": triton.__version__,
                               "python": platform.python_version(), "device": device,
                               "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(records: list[Record]) -> None:
    head = f"{'kernel':<17} {'case':<28} {'impl':<19} {'dtype':<9} {'ms p50':>10} {'TFLOP/s':>9} {'GB/s':>8}"
    print(head)
    print("-" * len(head))
    for r in records:
        gb = f"{r.gbps:8.1f}" if r.gbps is not None else " " * 8
        tf = f"{r.tflops:9.2f}" if r.tflops is not None else " " * 9
        print(f"{r.kernel:<17} {r.case:<28} {r.impl:<19} {r.dtype:<9} {r.ms_p50:10.3f} {tf} {gb}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes; on a CPU runs Triton's interpreter (a smoke test, not a speed test)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="activation dtype (default bf16 on a GPU, fp32 with --tiny on a CPU)")
    parser.add_argument("--only", choices=("attention", "conv"), default=None, help="run one kernel family")
    parser.add_argument("--json", type=str, default=None, help="write the records and env here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.tiny:
            parser.error("real shapes need a CUDA GPU; use --tiny for the CPU smoke test")
        # must happen before wan_rt.kernels' kernel modules are imported (they are, lazily, below)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]

    records: list[Record] = []

    def save(partial: bool) -> None:
        # Rewritten after every case, so a run cut short (a time limit) still leaves its records.
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env_info(device), "partial": partial, "records": [asdict(r) for r in records]},
                          f, indent=1)

    with torch.inference_mode():
        if args.only in (None, "attention"):
            for case in TINY_ATTN if args.tiny else ATTN_CASES:
                records += bench_attention([case], dtype, device)
                save(partial=True)
        if args.only in (None, "conv"):
            for conv_case in TINY_CONV if args.tiny else CONV_CASES:
                records += bench_conv([conv_case], dtype, device)
                save(partial=True)
    print_table(records)
    save(partial=False)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
