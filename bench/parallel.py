"""Multi-process scaling: the DiT step and the VAE decode at world 1, 2, 4 (and what each
collective moves), plus a written scaling model for A14B 720p on 8×H100 NVLink.

Measured part: one checkpoint (random weights, `--config`, or a real one with `--model`), the
same step the denoise loop runs (one DiT call on the CFG pair [cond; uncond]) and the VAE decode,
for each plan; every world size is one launch of this script's ranks (wan_rt.parallel.launch).
Medians of `--repeats` calls after a warm-up; bytes are what each rank received per call, by
collective (wan_rt.parallel.comm's ledger). Each launch also times the single-process pipeline
(rank 0 alone, the other ranks idle) interleaved with its plans, so every ratio compares like
with like under the same load. On a CPU each rank is one core's worth of threads: with 2 cores
world 2 can at best double the speed and world 4 cannot beat world 2.
On a machine with several GPUs the same command measures GPU scaling (NCCL).

    python bench/parallel.py --json bench/parallel.json              # CPU, small config (minutes)
    python bench/parallel.py --tiny                                  # smoke test
    python bench/parallel.py --model /models/Wan2.2-T2V-A14B-Diffusers --height 720 --width 1280 \\
        --frames 81 --plans 1x1x1,8x1x1,4x1x2 --dtype bf16           # 8 GPUs: measures the model below
    python bench/parallel.py --model-only                            # just the scaling model

Plans are UxRxC (Ulysses × ring × CFG).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, timed, write_json  # noqa: E402

DEFAULT_PLANS = "2x1x1,1x1x2,1x2x1,4x1x1,2x1x2,2x2x1"


# ------------------------------------------------------------------------------- scaling model
@dataclasses.dataclass(frozen=True)
class Hardware:
    """8×H100 SXM with NVLink 4 / NVSwitch. Datasheet: 989 TFLOP/s dense bf16; NVLink 900 GB/s
    per GPU both directions together, i.e. 450 GB/s each way."""

    name: str = "8x H100 SXM, NVLink 4"
    link_bytes_per_s: float = 450e9
    link_efficiency: float = 0.75  # ASSUMED share of the link an all-to-all / all-gather reaches
    # Achieved DiT throughput per GPU, calibrated on the official single-H100 time (1041.5 s for
    # 40 steps x 2 forwards of 6,523 TFLOP) less the ASSUMED text + VAE share below: ~52% of peak.
    text_s: float = 1.0            # ASSUMED: umT5 on one GPU, once per video
    vae_decode_s: float = 30.0     # ASSUMED: Wan 2.1 VAE decode of 720p x 81 frames on one H100


OFFICIAL_1GPU_S, OFFICIAL_8GPU_S, LIGHTX2V_8GPU_S = 1041.5, 155.1, 152.0


def scaling_model(hw: Hardware = Hardware()) -> tuple[list[dict], dict]:
    """Predicted A14B 720p×81 step and end-to-end times for plans on 8 GPUs. Compute is FLOPs
    (wan_rt.flops) over the calibrated throughput, divided by the ranks sharing it; traffic is
    the bytes each rank receives per step over the link; the two are added (no overlap assumed:
    an upper bound) and also max'ed (perfect overlap: a lower bound)."""
    from wan_rt.config import T2V_A14B, seq_len
    from wan_rt.flops import dit_flops

    spec = T2V_A14B
    d = spec.dit
    L = seq_len(spec, 720, 1280, 81)
    steps = spec.sample_steps
    fl = dit_flops(d, L)
    per_forward = fl.total - fl.cross_kv  # the text K/V are computed once per prompt
    achieved = steps * 2 * per_forward / (OFFICIAL_1GPU_S - hw.text_s - hw.vae_decode_s)
    link = hw.link_bytes_per_s * hw.link_efficiency
    bf16 = 2
    expert_bytes = 14.3e9 * bf16
    rows = []
    for name, U, C, shard, split_vae in (
        ("1 GPU (calibration)", 1, 1, False, False),
        ("U=8 (official: Ulysses, CFG in turn, VAE on one GPU)", 8, 1, False, False),
        ("U=8", 8, 1, False, True),
        ("C=2 × U=4", 4, 2, False, True),
        ("C=2 × U=4, --shard-weights", 4, 2, True, True),
    ):
        world = U * C
        batch = 2 // C  # CFG pair per rank: both halves, or one with CFG parallel
        compute = batch * per_forward / U / achieved
        # Ulysses: q, k, v and the output, [batch, L/U, D] bf16 each, (U-1)/U of it from other ranks, per block
        a2a = d.num_layers * 4 * batch * (L / U) * d.dim * bf16 * (U - 1) / U
        gather = batch * L * (U - 1) / U * d.out_channels * 4 * bf16 if U > 1 else 0  # noise_pred tokens
        cfg = (C - 1) * 16 * L * 4 * 4 if C > 1 else 0  # the other half's noise_pred, fp32
        fsdp = batch * expert_bytes * (world - 1) / world if shard else 0
        moved = a2a + gather + cfg + fsdp
        comm = moved / link
        step_hi, step_lo = compute + comm, max(compute, comm)
        vae = hw.vae_decode_s / (world if split_vae else 1)
        rows.append({"plan": name, "gpus": world, "compute_s_per_step": compute, "GB_per_step_per_rank": moved / 1e9,
                     "comm_s_per_step": comm, "step_s": step_hi, "step_s_overlapped": step_lo,
                     "end_to_end_s": hw.text_s + steps * step_hi + vae,
                     "end_to_end_s_overlapped": hw.text_s + steps * step_lo + vae})
    facts = {"tokens": L, "tflop_per_forward": per_forward / 1e12, "achieved_tflops_per_gpu": achieved / 1e12,
             "mfu_bf16": achieved / 989e12, "link_GBps_effective": link / 1e9, "steps": steps,
             "official_8gpu_s": OFFICIAL_8GPU_S, "lightx2v_8gpu_s": LIGHTX2V_8GPU_S,
             "hardware": dataclasses.asdict(hw)}
    return rows, facts


def print_model() -> dict:
    rows, facts = scaling_model()
    print(f"\nSCALING MODEL (not a measurement): T2V-A14B 1280x720x81, {facts['tokens']:,} tokens, "
          f"{facts['steps']} steps with CFG, {facts['tflop_per_forward']:,.0f} TFLOP per forward")
    print(f"  throughput {facts['achieved_tflops_per_gpu']:.0f} TFLOP/s per GPU ({facts['mfu_bf16']:.0%} of bf16 peak; "
          f"from the official 1-GPU {OFFICIAL_1GPU_S} s), links {facts['link_GBps_effective']:.0f} GB/s effective")
    print_table(rows, ["plan", "gpus", "compute_s_per_step", "GB_per_step_per_rank", "comm_s_per_step", "step_s",
                       "end_to_end_s", "end_to_end_s_overlapped"])
    print(f"  published, 8x H100: official (Ulysses + FSDP) {OFFICIAL_8GPU_S} s; LightX2V (CFG parallel + Ulysses) "
          f"{LIGHTX2V_8GPU_S} s")
    return {"rows": rows, "facts": facts}


# ------------------------------------------------------------------------------- measurement
def bench_spec(tiny: bool):
    from wan_rt.config import T2V_A14B, tiny as tiny_of

    base = tiny_of(T2V_A14B)
    if tiny:
        dit = dataclasses.replace(base.dit, num_heads=4)
        return dataclasses.replace(base, name="bench-parallel-tiny", dit=dit, height=32, width=48, num_frames=9)
    dit = dataclasses.replace(base.dit, dim=384, num_heads=8, num_layers=4, ffn_dim=1024, text_len=64)
    vae = dataclasses.replace(base.vae, base_dim=16, decoder_base_dim=16)
    return dataclasses.replace(base, name="bench-parallel-4L-384", dit=dit, vae=vae, height=128, width=128,
                               num_frames=17)


def parse_plans(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(n) for n in p.split("x")) for p in text.split(",")]  # type: ignore[misc]


def worker(args: argparse.Namespace) -> int:
    """One rank: the single-process pipeline (rank 0 alone, the others wait: world 1 on one
    rank's share of the machine) and every plan of this world size; rank 0 appends rows to
    args.out. On a CPU all are built first and timed round by round (interleaved, so load from
    elsewhere hits all alike); on GPUs one at a time (real models do not fit twice)."""
    import torch
    import torch.distributed as dist

    from wan_rt.config import latent_shape
    from wan_rt.loader import WanPipeline
    from wan_rt.parallel import ParallelPlan, comm
    from wan_rt.parallel.launch import init_process_group
    from wan_rt.parallel.plan import local_device

    device = local_device()
    init_process_group(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    names = ["1x1x1"] + [f"{u}x{r}x{c}" for u, r, c in parse_plans(args.plans) if u * r * c == world > 1]
    solo = world > 1  # the single-process pipeline runs on rank 0 while the others wait

    def build(name: str):
        if name == "1x1x1":
            return WanPipeline.from_pretrained(args.checkpoint, device=str(device), dtype=dtype) \
                if rank == 0 or not solo else None
        u, r, c = (int(n) for n in name.split("x"))
        return WanPipeline.from_pretrained(args.checkpoint, device=str(device), dtype=dtype,
                                           parallel=ParallelPlan(ulysses=u, ring=r, cfg=c))

    from wan_rt.resolve import resolve_checkpoint

    spec = resolve_checkpoint(args.checkpoint).spec
    shape = latent_shape(spec, args.height, args.width, args.frames)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((2, *shape), generator=gen).to(device)
    context = torch.randn(2, spec.dit.text_len, spec.text_encoder.d_model, generator=gen).to(device)
    timestep = torch.full((2,), 900.0, device=device)
    if spec.dit.per_token_timestep:
        _, t, h, w = shape
        timestep = timestep[:, None].expand(2, t * h * w // (spec.dit.patch_size[1] * spec.dit.patch_size[2]))

    def calls(pipe) -> dict:
        if pipe is None:  # an idle rank while rank 0 runs the single-process pipeline
            return {"step": lambda: None, "decode": lambda: None}
        dit, vae = pipe.components[spec.dit_components[0]], pipe.components["vae_decoder"]
        return {"step": lambda: dit(latents=latents, timestep=timestep, context=context),
                "decode": lambda: vae(latents=latents[:1])}

    def run(fn) -> float:
        dist.barrier()
        elapsed = timed(fn)
        dist.barrier()
        return elapsed

    times: dict[tuple[str, str], list[float]] = {(n, w): [] for n in names for w in ("step", "decode")}
    traffic: dict[tuple[str, str], dict[str, int]] = {}

    def warm_up(name: str, work: dict) -> None:
        for what in ("step", "decode"):  # communicators, caches; then one call that records traffic
            run(work[what])
            comm.reset_traffic()
            run(work[what])
            traffic[name, what] = {k: v.bytes for k, v in comm.TRAFFIC.items()}

    if device.type == "cpu":
        work = {name: calls(build(name)) for name in names}
        for name in names:
            warm_up(name, work[name])
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for what in ("step", "decode"):
                    times[name, what].append(run(work[name][what]))
    else:
        for name in names:
            work_one = calls(build(name))
            warm_up(name, work_one)
            for _ in range(args.repeats):
                for what in ("step", "decode"):
                    times[name, what].append(run(work_one[what]))
            del work_one
            torch.cuda.empty_cache()
    if rank == 0:
        single = {w: median(times["1x1x1", w]) for w in ("step", "decode")}
        with open(args.out, "a") as f:
            for name in names:
                step, decode = median(times[name, "step"]), median(times[name, "decode"])
                f.write(json.dumps({
                    "plan": name, "world": 1 if name == "1x1x1" else world, "launch_world": world,
                    "dit_step_ms": step * 1000, "vae_decode_ms": decode * 1000,
                    "step_vs_single": single["step"] / step, "decode_vs_single": single["decode"] / decode,
                    "step_bytes_by_collective": traffic[name, "step"],
                    "decode_bytes_by_collective": traffic[name, "decode"],
                    "step_runs_ms": [t * 1000 for t in times[name, "step"]]}) + "\n")
    dist.destroy_process_group()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny config, one repeat: a smoke test")
    p.add_argument("--model", default=None, help="a checkpoint folder (default: a random-weight bench config)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--plans", default=DEFAULT_PLANS, help="UxRxC,... (Ulysses x ring x CFG)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--model-only", action="store_true", help="print the scaling model only")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # rows file: run as one rank
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.out = args.worker
        return worker(args)
    model = print_model()
    if args.model_only:
        write_json(args.json, {"benchmark": "parallel", "scaling_model": model, "environment": environment()})
        return 0

    from wan_rt.parallel.launch import launch
    from wan_rt.tiny import write_tiny_checkpoint

    if args.model is None:
        spec = bench_spec(args.tiny)
        checkpoint = Path(tempfile.mkdtemp(prefix="wan_rt_bench_parallel_")) / "checkpoint"
        write_tiny_checkpoint(spec, checkpoint)
        args.height, args.width, args.frames = spec.height, spec.width, spec.num_frames
    else:
        checkpoint = Path(args.model)
    repeats = 1 if args.tiny else args.repeats
    rows_file = Path(tempfile.mkdtemp(prefix="wan_rt_bench_rows_")) / "rows.jsonl"
    worlds = sorted({u * r * c for u, r, c in parse_plans(args.plans)} - {1}) or [1]
    for world in worlds:
        code = launch([os.path.abspath(__file__), "--worker", str(rows_file), "--checkpoint", str(checkpoint),
                       "--plans", args.plans, "--repeats", str(repeats), "--dtype", args.dtype,
                       "--height", str(args.height), "--width", str(args.width), "--frames", str(args.frames)], world)
        if code:
            print(f"world {world}: a rank failed (exit {code})", file=sys.stderr)
            return code
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    for r in rows:
        r["step_MB_received"] = sum(r["step_bytes_by_collective"].values()) / 1e6
        r["decode_MB_received"] = sum(r["decode_bytes_by_collective"].values()) / 1e6
        r["step_bytes"] = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(r["step_bytes_by_collective"].items()))
    print(f"\nMEASURED: {checkpoint.name} {args.width}x{args.height}x{args.frames}, {args.dtype}, median of {repeats}; "
          f"each launch times the single-process pipeline too (rank 0 alone), ratios are against that")
    print_table(rows, ["launch_world", "plan", "dit_step_ms", "step_vs_single", "vae_decode_ms", "decode_vs_single",
                       "step_MB_received", "decode_MB_received", "step_bytes"])
    write_json(args.json, {"benchmark": "parallel", "command": " ".join(sys.argv), "environment": environment(),
                           "checkpoint": str(checkpoint), "size": [args.height, args.width, args.frames],
                           "rows": rows, "scaling_model": model})
    return 0


if __name__ == "__main__":
    sys.exit(main())
