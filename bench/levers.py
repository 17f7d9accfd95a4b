"""The levers users pull first, measured: step caches, the 4-step list, LoRA fused vs at run
time, and (on a GPU) the low-VRAM plans' peak memory.

The small two-expert T2V config of bench_cpu_e2e.py (6 layers x 512, the A14B wiring, random
weights written once in the diffusers layout) at a 40-step schedule with CFG. The reference is
the uncached 40-step video; every variant reports its time, the ratio to the reference's time
measured in the same run, its steps computed / reused, and the PSNR of its frames against the
reference's. The models' weights are random: TeaCache's polynomial and MagCache's ratio curve
are fitted on this model by one calibration run each (the published ones are for the real
checkpoints), and the 4-step list is timed on a model that was never distilled for it (its PSNR
says how far a non-distilled model is from its 40-step video, nothing about distill quality).

    python bench/levers.py --json bench/levers.json          # CPU: minutes
    python bench/levers.py --tiny                            # smoke test (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_e2e import bench_spec  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402

THRESHOLDS = {"teacache": (0.05, 0.1, 0.2), "magcache": (0.03, 0.06, 0.12), "fbcache": (0.05, 0.1, 0.2)}
FOUR_STEPS = [1000, 750, 500, 250]


def lever_spec(tiny: bool, steps: int, frames: int):
    spec = bench_spec(tiny)
    return dataclasses.replace(spec, name=spec.name + "-levers", sample_steps=steps, num_frames=frames)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny config, 8 steps, one threshold each: a smoke test")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--workdir", default=None, help="where the checkpoint and LoRA go (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from wan_rt.caching import calibrate_magcache, fit_teacache
    from wan_rt.loader import WanPipeline
    from wan_rt.metrics import psnr
    from wan_rt.tiny import write_tiny_checkpoint

    steps = 8 if args.tiny else args.steps
    spec = lever_spec(args.tiny, steps, 5 if args.tiny else args.frames)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wan_rt_levers_"))
    ckpt = work / f"checkpoint-{spec.name}"
    if not (ckpt / "model_index.json").is_file():
        write_tiny_checkpoint(spec, ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(str(ckpt), device=str(device), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 16, (spec.num_frames - 1) // 4 + 1, spec.height // 8, spec.width // 8),
                          generator=torch.Generator().manual_seed(0))
    call = dict(prompt="a red fox running through snow", negative_prompt="blurry", height=spec.height,
                width=spec.width, num_frames=spec.num_frames, num_inference_steps=steps, guidance_scale=4.0,
                guidance_scale_2=3.0, max_sequence_length=spec.dit.text_len, output_type="pt")

    def run(**overrides):
        start = time.perf_counter()
        out = pipe(**{**call, "latents": latents.clone(), **overrides})
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    rows: list[dict] = []
    pipe(**{**call, "num_inference_steps": 2, "latents": latents.clone()})  # warm-up
    reference, ref_s = run()

    def row(variant: str, setting, out, seconds: float, against=None) -> dict:
        counts = {k.split(".")[1]: 0.0 for k in out.timings if ".steps_" in k}
        for k, v in out.timings.items():
            if ".steps_" in k:
                counts[k.split(".")[1]] += v
        r = {"variant": variant, "setting": setting, "seconds": round(seconds, 3), "speedup": round(ref_s / seconds, 3),
             "steps_computed": counts.get("steps_computed"), "steps_reused": counts.get("steps_reused"),
             "psnr_db": round(psnr(out.frames.float(), (against if against is not None else reference.frames).float()), 2),
             "peak_gpu_memory_gb": out.timings.get("peak_gpu_memory_gb")}
        rows.append(r)
        print(f"  {variant:<10} {str(setting):<34} {seconds:7.2f} s  {r['speedup']:5.2f}x  {r['psnr_db']:6.1f} dB",
              file=sys.stderr)
        return r

    row("uncached", f"{steps} steps", reference, ref_s)

    # Step caches: fit / calibrate on this model once, then each threshold.
    start = time.perf_counter()
    coefficients = fit_teacache(pipe, **{**call, "latents": latents.clone()})
    ratios = calibrate_magcache(pipe, **{**call, "latents": latents.clone()})
    calibration_s = time.perf_counter() - start
    options = {"teacache": dict(coefficients=coefficients), "magcache": dict(ratios=ratios, retention=0.2),
               "fbcache": {}}
    for method, thresholds in THRESHOLDS.items():
        for threshold in thresholds[:1] if args.tiny else thresholds:
            pipe.enable_step_cache(method, threshold, **options[method])
            out, seconds = run()
            row(method, threshold, out, seconds)
        pipe.disable_step_cache()

    # The 4-step distill list: switch by step index, CFG off (guidance 1: one pass per step).
    out, seconds = run(num_inference_steps=None, timesteps=FOUR_STEPS, switch_step=2, shift=5.0,
                       guidance_scale=1.0, guidance_scale_2=1.0)
    row("4-step", "1000,750,500,250 switch 2, cfg off", out, seconds)

    # LoRA: rank-64 deltas on every Linear of both experts, fused vs at run time.
    lora_files = _write_loras(pipe, work)
    for mode in ("runtime", "fuse"):
        for expert, path in lora_files.items():
            pipe.load_lora(path, expert=expert, fuse=mode == "fuse")
        out, seconds = run()
        if mode == "runtime":
            runtime_frames = out.frames
            row("lora", "at run time (hooks)", out, seconds)
        else:
            row("lora", "fused (vs run-time video)", out, seconds, against=runtime_frames)
        pipe.unload_lora()

    if device.type == "cuda":
        _offload_rows(ckpt, call, latents, rows, run_reference=reference)

    print(f"{spec.name}: {spec.width}x{spec.height}x{spec.num_frames}, {steps} steps, CFG 4/3, "
          f"{spec.dit.num_layers} layers x {spec.dit.dim}, {device}, torch threads {torch.get_num_threads()}; "
          f"calibration (TeaCache fit + MagCache curve) {calibration_s:.1f} s")
    print_table(rows, ["variant", "setting", "seconds", "speedup", "steps_computed", "steps_reused", "psnr_db",
                       "peak_gpu_memory_gb"])
    write_json(args.json, {"benchmark": "levers", "spec": dataclasses.asdict(spec), "environment": environment(),
                           "command": " ".join(sys.argv), "reference_seconds": ref_s,
                           "calibration_seconds": calibration_s, "teacache_coefficients": coefficients,
                           "magcache_ratios": ratios, "rows": rows})
    return 0


def _write_loras(pipe, work: Path) -> dict[str, Path]:
    """One rank-64 LoRA per expert (original / LightX2V format, alpha 64) on every block Linear."""
    from safetensors.torch import save_file

    from wan_rt.models.checkpoint import diffusers_dit_to_official

    out = {}
    for seed, (expert, component) in enumerate((("high_noise", "dit_high_noise"), ("low_noise", "dit_low_noise"))):
        gen = torch.Generator().manual_seed(100 + seed)
        tensors = {}
        for name, module in pipe.components[component].module.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
                key = "diffusion_model." + diffusers_dit_to_official(name + ".weight").removesuffix(".weight")
                tensors[f"{key}.lora_down.weight"] = torch.randn(64, module.in_features, generator=gen) / module.in_features
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 64, generator=gen) * 0.05
                tensors[f"{key}.alpha"] = torch.tensor(64.0)
        out[expert] = work / f"lora-{expert}.safetensors"
        save_file(tensors, str(out[expert]))
    return out


def _offload_rows(ckpt: Path, call: dict, latents, rows: list, run_reference) -> None:
    """GPU only: each low-VRAM plan (budget just above its needs) and its peak memory."""
    from wan_rt.loader import WanPipeline
    from wan_rt.metrics import psnr
    from wan_rt.offload import RESERVE_FRACTION, plan_needs, weight_bytes
    from wan_rt.resolve import resolve_checkpoint

    resolved = resolve_checkpoint(str(ckpt))
    for plan, need in plan_needs(resolved.spec, weight_bytes(resolved, torch.bfloat16)).items():
        pipe = WanPipeline.from_pretrained(str(ckpt), memory_budget_gb=need / (1 - RESERVE_FRACTION) / 2**30 * 1.001)
        pipe.set_progress_bar_config(disable=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe(**{**call, "latents": latents.clone()})
        torch.cuda.synchronize()
        rows.append({"variant": "offload", "setting": pipe.memory_plan.name,
                     "seconds": round(time.perf_counter() - start, 3), "speedup": None,
                     "steps_computed": None, "steps_reused": None,
                     "psnr_db": round(psnr(out.frames.float(), run_reference.frames.float()), 2),
                     "peak_gpu_memory_gb": out.timings.get("peak_gpu_memory_gb")})
        del pipe


if __name__ == "__main__":
    sys.exit(main())
