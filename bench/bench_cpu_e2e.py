"""End to end on the CPU: diffusers eager vs wan_rt eager vs ONNX Runtime vs AOTInductor engines.

A small two-expert T2V config (6 layers, width 512, 4 heads x 128, 128x128x17, 4 steps with
CFG, 512 text tokens) with random weights, written once in the diffusers layout so diffusers and
wan_rt load the very same files. Variants run interleaved (rotating order each round); medians
and the ratio to diffusers are printed and written as JSON. Outputs are compared too: a fast
variant that computes something else would not count.

    python bench/bench_cpu_e2e.py --json bench/cpu_e2e.json          # full (minutes)
    python bench/bench_cpu_e2e.py --tiny                             # smoke test (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved, median, print_table, write_json  # noqa: E402

from wan_rt.config import T2V_A14B, latent_shape, tiny  # noqa: E402


def bench_spec(small: bool):
    base = tiny(T2V_A14B)
    if small:
        return dataclasses.replace(base, name="bench-tiny-t2v", sample_steps=2)
    dit = dataclasses.replace(base.dit, dim=512, num_heads=4, num_layers=6, ffn_dim=1536, text_len=512)
    vae = dataclasses.replace(base.vae, base_dim=16, decoder_base_dim=16)
    return dataclasses.replace(base, name="bench-t2v-6L-512", dit=dit, vae=vae, height=128, width=128,
                               num_frames=17, sample_steps=4)


def bench_checkpoint(small: bool, workdir: str | None):
    """(spec, work folder, checkpoint folder): bench_spec's weights written once in the diffusers
    layout under `workdir` (default: a new temp dir) and reused after."""
    from wan_rt.tiny import write_tiny_checkpoint

    spec = bench_spec(small)
    work = Path(workdir or tempfile.mkdtemp(prefix="wan_rt_bench_"))
    ckpt = work / "checkpoint"
    if not (ckpt / "model_index.json").is_file():
        write_tiny_checkpoint(spec, ckpt)
    return spec, work, ckpt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny config, one round: a smoke test")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="diffusers,eager,ort,aoti")
    p.add_argument("--workdir", default=None, help="where the checkpoint and engines go (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from wan_rt.build import build_engines
    from wan_rt.metrics import max_abs_error
    from wan_rt.loader import WanPipeline
    from wan_rt.runtime.backends import get_backend

    spec, work, ckpt = bench_checkpoint(args.tiny, args.workdir)
    repeats = 1 if args.tiny else args.repeats
    call = dict(prompt="a red fox running through snow", negative_prompt="blurry", height=spec.height,
                width=spec.width, num_frames=spec.num_frames, num_inference_steps=spec.sample_steps,
                guidance_scale=4.0, guidance_scale_2=3.0, max_sequence_length=spec.dit.text_len, output_type="np")
    latents = torch.randn((1, *latent_shape(spec, spec.height, spec.width, spec.num_frames)),
                          generator=torch.Generator().manual_seed(0))

    pipes, notes, build_s = {}, {}, {}
    for name in args.variants.split(","):
        if name == "diffusers":
            from diffusers import WanPipeline as DiffusersWanPipeline

            pipes[name] = DiffusersWanPipeline.from_pretrained(ckpt)
            diffusers_stages = _instrument_diffusers(pipes[name])
        elif name == "eager":
            pipes[name] = WanPipeline.from_pretrained(str(ckpt), backend="eager", device="cpu", dtype=torch.float32)
        else:
            if not get_backend(name).is_available():
                notes[name] = "not available on this machine"
                continue
            import time

            start = time.perf_counter()
            build_engines(str(ckpt), name, work / f"engines-{name}", height=spec.height, width=spec.width,
                          frames=spec.num_frames, device="cpu", log=lambda s: None)
            build_s[name] = time.perf_counter() - start
            pipes[name] = WanPipeline.from_pretrained(str(ckpt), backend=name, engines_dir=str(work / f"engines-{name}"),
                                                      device="cpu")
        pipes[name].set_progress_bar_config(disable=True)

    outputs, stage_runs = {}, {}

    def variant(name):
        def run():
            if name == "diffusers":
                diffusers_stages.clear()
            outputs[name] = pipes[name](latents=latents.clone(), **call)
            stages = diffusers_stages if name == "diffusers" else outputs[name].timings
            stage_runs.setdefault(name, []).append(dict(stages))
        return run

    times = interleaved({n: variant(n) for n in pipes}, repeats=repeats, warmup=0 if args.tiny else 1)
    ref_name = "diffusers" if "diffusers" in pipes else next(iter(pipes))
    ref_ms = median(times[ref_name]) * 1000
    reference = torch.from_numpy(outputs[ref_name].frames)
    rows = []
    for name, ts in times.items():
        ms = median(ts) * 1000
        err = max_abs_error(torch.from_numpy(outputs[name].frames), reference)
        runs = stage_runs[name][-len(ts):]  # the timed rounds, not the warm-up
        stages = {k: median([r.get(k, 0.0) for r in runs]) * 1000 for k in runs[0]}
        dit_ms = sum(v for k, v in stages.items() if k.startswith("dit"))
        rows.append({"variant": name, "median_ms": ms, f"speedup_vs_{ref_name}": ref_ms / ms,
                     "dit_ms": dit_ms, "vae_decode_ms": stages.get("vae_decoder"),
                     "max_abs_err_vs_ref": err, "build_s": build_s.get(name),
                     "stages_ms": {k: round(v, 1) for k, v in stages.items()}, "runs_ms": [t * 1000 for t in ts]})
    print(f"{spec.name}: {spec.width}x{spec.height}x{spec.num_frames}, {spec.sample_steps} steps, CFG, "
          f"{spec.dit.num_layers} layers x {spec.dit.dim}, {repeats} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}")
    print_table(rows, ["variant", "median_ms", f"speedup_vs_{ref_name}", "dit_ms", "vae_decode_ms",
                       "max_abs_err_vs_ref", "build_s"])
    for name, why in notes.items():
        print(f"{name}: skipped ({why})")
    write_json(args.json, {"benchmark": "cpu_e2e", "spec": dataclasses.asdict(spec), "environment": environment(),
                           "command": " ".join(sys.argv), "rows": rows, "skipped": notes})
    return 0


def _instrument_diffusers(pipe) -> dict[str, float]:
    """Time diffusers' stages the way wan_rt reports its own: seconds per expert and VAE decode."""
    import time

    stages: dict[str, float] = {}

    def wrap(obj, attr, key):
        fn = getattr(obj, attr)

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[key] = stages.get(key, 0.0) + time.perf_counter() - start
        setattr(obj, attr, timed_call)

    wrap(pipe.transformer, "forward", "dit_high_noise")
    if pipe.transformer_2 is not None:
        wrap(pipe.transformer_2, "forward", "dit_low_noise")
    wrap(pipe.vae, "decode", "vae_decoder")
    wrap(pipe.text_encoder, "forward", "text_encoder")
    return stages


if __name__ == "__main__":
    sys.exit(main())
