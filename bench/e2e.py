"""The whole pipeline at real size, per stage: text encoder, each expert, swap stall, VAE decode.

    python bench/e2e.py --variants eager --json bench/e2e_eager.json     # A14B 720p x 81, a CUDA GPU
    python bench/e2e.py --variants fast --json bench/e2e_fast.json       # the fast path (optimize_dit)
    python bench/e2e.py --model ti2v-5B --json bench/e2e_5b.json
    python bench/e2e.py --tiny --json out.json                           # CPU smoke test
    python bench/e2e.py --layers 4 --one-expert-resident --size 480x832 --frames 33   # short, labelled

`--layers N` runs a REDUCED-DEPTH model (N blocks per expert; its extrapolated line scales the
expert stages back to full depth, and says so); `--one-expert-resident` leaves room for one
expert only, so the swap and its stall happen on any card and at any depth.

Weights: random, real-size, made on the device without a checkpoint (a 14B expert written to
disk and read back would need ~29 GB of disk per expert). Each module is built with its
parameters on the meta device (buffers real), materialized on the GPU in its runtime dtype and
filled with seeded noise (bench/dit_step.py: randomize_), then wrapped as the very components
`WanPipeline.from_pretrained` would make (EagerComponent, EagerDiTComponent) and handed to
`WanPipeline`. The same seed gives the same weights in every run, so `--variants eager` and
`--variants fast` (separate commands, to stay within a GPU session's time limits) compare like
with like. The tokenizer is the tiny presets' (ids < 256, valid for umT5's 256,384-row table);
with random weights the prompt's words do not matter, only its padded length (512) does.
Where the experts do not fit beside each other (bf16 A14B on 80 GB), they start in host memory
and the pipeline's residency swaps them, as it would with loaded checkpoints.

Steps: the fewest inference steps that give every expert `--steps-per-expert` steps (2 by
default) are run and timed; each expert's time per step is then multiplied by its share of the
default step count (40 for A14B, 50 for TI2V-5B) in the EXTRAPOLATED line. Text encoding, the
first expert's load, the swap stall and the VAE decode happen once per video and are taken as
measured. Variants with compilation or CUDA graphs get one warm-up generation first (its time
is reported as warmup_s); eager variants are not warmed up (one-time costs are < 1 s against
steps of seconds).

Variants: eager (wan_rt eager bf16, PyTorch ops) and fast (optimize_dit's defaults on both
experts + the Triton causal-conv kernels in the VAE). On a CPU (--tiny): fp32, the Triton
interpreter for the DiT kernels (the VAE keeps PyTorch's convs there: interpreted, a decode
takes minutes), FP8 EMULATED, no compile: the numbers mean nothing, the run checks the plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, sync, write_json  # noqa: E402
from dit_step import random_dit, randomize_, release_compiled  # noqa: E402

from wan_rt.config import ModelSpec, get_spec, seq_len  # noqa: E402

FAST = dict(kernels=True, attention_quant="int8", fp8_linear=True, compile="max-autotune", cuda_graphs=True)
PROMPT = "a red fox running through snow, cinematic, slow motion"


# ---------------------------------------------------------------------------------------------
# Random real-size components
# ---------------------------------------------------------------------------------------------

def materialize_(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Give a module built under `meta_parameters()` real, random parameters on `device` in
    `dtype` (ties kept), and move its (real) buffers there."""
    new: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
            setattr(sub, name, new[id(p)])
    module.to(device)  # buffers
    randomize_(module, seed)
    return module.eval()


def build_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype, workdir: Path,
                   reserve_gb: float, one_at_a_time: bool = False, log=print):
    from wan_rt.models import hf_config
    from wan_rt.models.checkpoint import meta_parameters
    from wan_rt.models.text_encoder import TextEncoder, build_umt5_encoder, load_tokenizer
    from wan_rt.models.vae import WanVAE
    from wan_rt.loader import WanPipeline
    from wan_rt.scheduler import SamplingDefaults
    from wan_rt.runtime.component import EagerComponent, VAEDecodeGraph
    from wan_rt.runtime.engine_component import EagerDiTComponent
    from wan_rt.tiny import _write_tokenizer

    start = time.perf_counter()
    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "spiece.model").is_file():
        _write_tokenizer(tok_dir, 256)
    tokenizer = load_tokenizer(tok_dir)

    with meta_parameters():
        encoder = build_umt5_encoder(hf_config.text_encoder_to_hf(spec.text_encoder))
    te_dtype = dtype if dtype != torch.float16 else torch.float32  # umT5 overflows in fp16
    text_encoder = TextEncoder(materialize_(encoder, device, te_dtype, seed=1)).eval()

    experts = {}
    for i, name in enumerate(spec.dit_components):
        experts[name] = random_dit(spec.dit, device, dtype, seed=10 + i)
    with meta_parameters():
        vae = WanVAE(spec.vae)
    vae = materialize_(vae, device, torch.float32, seed=2)

    components: dict = {"text_encoder": EagerComponent("text_encoder", text_encoder, device, te_dtype),
                        "vae_decoder": EagerComponent("vae_decoder", VAEDecodeGraph(vae), device, torch.float32)}
    for name, dit in experts.items():
        components[name] = EagerDiTComponent(name, spec, dit, dtype, device)
    defaults = SamplingDefaults(solver="unipc", grid="official", shift=spec.sample_shift, negative_prompt="blurry")
    pipe = WanPipeline(spec, components, tokenizer, defaults, device)
    if device.type == "cuda" or one_at_a_time:
        set_expert_budget(pipe, reserve_gb, one_at_a_time)
    if device.type == "cuda" and not pipe.residency.all_fit:
        for name in experts:  # the residency loads each expert when its stage begins
            components[name].unload()
        log(f"experts do not fit together ({sum(components[n].nbytes for n in experts) / 2**30:.1f} GiB, "
            f"budget {pipe.residency.budget / 2**30:.1f} GiB): they wait in host memory and swap")
    log(f"built random {spec.name} components in {time.perf_counter() - start:.1f} s")
    return pipe, vae


def set_expert_budget(pipe, reserve_gb: float, one_at_a_time: bool = False) -> None:
    """The experts' memory budget: the card less the other components less `reserve_gb` for
    activations. (The pipeline's default keeps 15% of the card, ~12 GB on an 80 GB H100, which
    eager bf16 A14B at 720p with CFG as a batch of 2 can exceed: fp32 temporaries of
    [2, 75,600, 5120] are 3.1 GB each.) `one_at_a_time`: room for the larger expert only, as on
    a card too small for both, so the swap and its stall are exercised at any size."""
    if one_at_a_time:
        pipe.residency.budget = max(int(pipe.components[n].nbytes) for n in pipe.spec.dit_components)
        return
    total = torch.cuda.get_device_properties(pipe.device).total_memory
    others = sum(int(getattr(c, "nbytes", 0) or 0) for n, c in pipe.components.items() if not n.startswith("dit"))
    pipe.residency.budget = int(total - others - reserve_gb * 2**30)


def make_fast(pipe, vae: nn.Module, device: torch.device, options: dict, log=print) -> str:
    """optimize_dit on every expert (on the device, one at a time) and the VAE conv kernels;
    returns a description. Changes the modules in place: the same random weights."""
    from wan_rt.runtime.fast import optimize_dit

    descriptions = []
    for name in pipe.spec.dit_components:
        comp = pipe.components[name]
        comp.module.to(device)
        descriptions.append(optimize_dit(comp.module, **options).describe())
        comp.text_kv.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if options.get("kernels") and device.type == "cuda":  # in the CPU interpreter a decode takes minutes
        from wan_rt.kernels import install

        install(vae)
        descriptions.append("VAE causal-conv kernels")
    return "; ".join(dict.fromkeys(descriptions))


# ---------------------------------------------------------------------------------------------
# Steps and extrapolation
# ---------------------------------------------------------------------------------------------

def steps_per_stage(pipe, steps: int) -> dict[str, int]:
    from wan_rt.pipeline import _group_by_stage

    sched = pipe._scheduler(steps, None, None)
    return {stage.component: len(idx) for stage, idx in _group_by_stage(pipe.spec, sched.timesteps)}


def fewest_steps(pipe, per_expert: int) -> int:
    """The smallest step count giving every expert at least `per_expert` steps."""
    for n in range(per_expert * len(pipe.spec.stages), 200):
        split = steps_per_stage(pipe, n)
        if len(split) == len(pipe.spec.stages) and min(split.values()) >= per_expert:
            return n
    raise RuntimeError("no step count up to 200 gives every expert enough steps")


def extrapolate(timings: dict[str, float], measured: dict[str, int], default: dict[str, int],
                depth_scale: float = 1.0) -> dict[str, float]:
    """Milliseconds per stage at the default step counts: expert stages scale with their step
    count (and `depth_scale`, full depth over the layers run, for a reduced-depth model),
    once-per-video stages stay as measured."""
    out = {}
    for stage, seconds in timings.items():
        scale = default[stage] / measured[stage] * depth_scale if stage in measured else 1.0
        out[stage] = seconds * scale * 1e3
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny preset on the CPU in fp32: a smoke test")
    p.add_argument("--model", default="t2v-A14B", help="t2v-A14B | ti2v-5B (a spec name)")
    p.add_argument("--size", default=None, help="HxW, default the spec's (720x1280 / 704x1280)")
    p.add_argument("--frames", type=int, default=None, help="default the spec's (81 / 121)")
    p.add_argument("--layers", type=int, default=None,
                   help="blocks per expert (default: the model's 40 / 30); fewer is a REDUCED-DEPTH run, and its "
                        "extrapolated line scales the expert stages back to full depth")
    p.add_argument("--steps-per-expert", type=int, default=None, help="default 2 (1 with --tiny)")
    p.add_argument("--variants", default="eager,fast", help="eager, fast (run in this order, same weights)")
    p.add_argument("--compile", default="max-autotune", choices=("max-autotune", "default", "none"),
                   help="the fast variant's torch.compile mode")
    p.add_argument("--reserve-gb", type=float, default=24.0,
                   help="GPU memory kept free for activations when deciding whether both experts stay resident")
    p.add_argument("--one-expert-resident", action="store_true",
                   help="room for one expert only, as on a card too small for both: the swap (and its stall) "
                        "happens whatever the size")
    p.add_argument("--workdir", default=None, help="where the tokenizer goes (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if not cuda and not args.tiny:
        p.error("real sizes need a CUDA GPU; use --tiny on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = get_spec(f"tiny-{args.model}" if args.tiny else args.model)
    full_layers = spec.dit.num_layers
    if args.layers is not None:
        if not 1 <= args.layers <= full_layers:
            p.error(f"--layers {args.layers}: {spec.name} has 1 to {full_layers} blocks per expert")
        spec = dataclasses.replace(spec, dit=dataclasses.replace(spec.dit, num_layers=args.layers))
    height, width = (int(v) for v in args.size.split("x")) if args.size else (spec.height, spec.width)
    frames = args.frames or spec.num_frames
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - {"eager", "fast"}:
        p.error(f"unknown variants in {args.variants!r}: eager, fast")
    options = dict(FAST, compile=None if args.compile == "none" else args.compile)
    if not cuda:
        options.update(compile=None, cuda_graphs=False)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wan_rt_e2e_"))
    workdir.mkdir(parents=True, exist_ok=True)

    pipe, vae = build_pipeline(spec, device, dtype, workdir, args.reserve_gb, args.one_expert_resident)
    pipe.set_progress_bar_config(disable=True)
    steps = fewest_steps(pipe, args.steps_per_expert or (1 if args.tiny else 2))
    measured_split = steps_per_stage(pipe, steps)
    default_split = steps_per_stage(pipe, spec.sample_steps)
    depth = f"REDUCED DEPTH {spec.dit.num_layers} of {full_layers} blocks per expert; " \
        if spec.dit.num_layers != full_layers else ""
    print(f"{spec.name}: {width}x{height}x{frames}, {seq_len(spec, height, width, frames)} tokens, CFG as one "
          f"batch of 2; {depth}measuring {steps} steps {measured_split}, extrapolating to {spec.sample_steps} "
          f"{default_split}")
    call = dict(prompt=PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="np")
    depth_scale = full_layers / spec.dit.num_layers
    rows: list[dict] = []

    def save(partial: bool) -> None:
        # Rewritten after every variant, so a run cut short (a time limit) still leaves its rows.
        write_json(args.json, {
            "benchmark": "e2e", "spec": dataclasses.asdict(spec), "environment": environment(),
            "command": " ".join(sys.argv), "device": str(device), "dtype": str(dtype), "partial": partial,
            "request": {"height": height, "width": width, "frames": frames,
                        "tokens": seq_len(spec, height, width, frames), "cfg_batch": 2,
                        "layers": spec.dit.num_layers, "full_layers": full_layers,
                        "one_expert_resident": args.one_expert_resident, "steps_measured": steps,
                        "steps_per_stage_measured": measured_split, "steps_default": spec.sample_steps,
                        "steps_per_stage_default": default_split},
            "extrapolated": "extrapolated_ms scales each expert's measured per-step time to the default step "
                            "count" + (f" and by {depth_scale:g} (full depth {full_layers} over the {spec.dit.num_layers} "
                                       "blocks run)" if depth else "")
                            + "; text encoder, expert load, swap stall and VAE decode are as measured",
            "fast_options": options, "rows": rows,
        }, quiet=partial)

    reference = None
    for name in variants:
        try:
            row, video, pipe = run_variant(name, pipe, vae, call, options, device, args, default_split, depth_scale)
        except Exception as exc:  # noqa: BLE001 - a broken variant must not cost the other one's figures
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {message}"})
            print(f"-- {name}: FAILED: {rows[-1]['error']}")
            save(partial=True)
            continue
        if reference is None:
            reference = video
        else:  # the same seed and weights: how far this variant's video is from the first's
            from wan_rt.metrics import psnr, relative_error

            row["frames_psnr_db_vs_first"] = psnr(video, reference)
            row["frames_rel_l2_vs_first"] = relative_error(video, reference)
        rows.append(row)
        print(f"-- {name}: {row['description']}")
        print(f"   measured {row['measured_total_ms'] / 1e3:.1f} s; EXTRAPOLATED to {spec.sample_steps} steps"
              f"{' and full depth' if depth else ''}: {row['extrapolated_total_s']:.1f} s")
        save(partial=True)
    release_compiled()

    done = [r for r in rows if "error" not in r]
    stage_names = list(dict.fromkeys(k for r in done for k in r["stages_ms"]))
    extrapolated = f"extrapolated_{spec.sample_steps}_steps_s"
    table = [{"variant": r["variant"], **{f"{k}_ms": r["stages_ms"][k] for k in r["stages_ms"]},
              **{f"{k}_ms/step": v for k, v in r["per_step_ms"].items()}, "total_ms": r["measured_total_ms"],
              extrapolated: r["extrapolated_total_s"], "psnr_db_vs_first": r.get("frames_psnr_db_vs_first")}
             for r in done]
    print(f"\n{spec.name} {width}x{height}x{frames}: {depth}measured with {steps} steps {measured_split}; the last "
          f"column is EXTRAPOLATED to {spec.sample_steps} steps {default_split}{' and full depth' if depth else ''}")
    print_table(table, ["variant", *[f"{k}_ms" for k in stage_names],
                        *[f"{k}_ms/step" for k in spec.dit_components], "total_ms", extrapolated, "psnr_db_vs_first"])
    if not cuda:
        print("\nCPU run (fp32, Triton interpreter, FP8 EMULATED, no compile): the numbers mean nothing here.")
    save(partial=False)
    return 1 if len(done) < len(rows) else 0


def run_variant(name: str, pipe, vae: nn.Module, call: dict, options: dict, device: torch.device, args,
                default_split: dict[str, int], depth_scale: float):
    """One timed generation of `name` -> (row, video, the pipeline it ran on)."""
    spec = pipe.spec
    row: dict = {"variant": name}
    if name == "fast":
        row["description"] = make_fast(pipe, vae, device, options)
        pipe = type(pipe)(pipe.spec, pipe.components, pipe.tokenizer, pipe.defaults, pipe.device)  # new residency
        pipe.set_progress_bar_config(disable=True)
        if device.type == "cuda" or args.one_expert_resident:
            set_expert_budget(pipe, args.reserve_gb, args.one_expert_resident)
    else:
        row["description"] = "wan_rt eager, PyTorch ops"
    graphs = name == "fast" and (options["compile"] is not None or options["cuda_graphs"])
    if graphs:
        start = time.perf_counter()
        pipe(**dict(call, generator=torch.Generator().manual_seed(0), output_type="latent"))
        pipe.components["vae_decoder"](latents=torch.zeros(1, spec.vae.z_dim, 1, 8, 8, device=device))
        sync()
        row["warmup_s"] = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipe(**dict(call, generator=torch.Generator().manual_seed(0)))
    sync()
    row["measured_total_ms"] = (time.perf_counter() - start) * 1e3
    row["steps_per_stage"] = dict(out.steps_per_stage)
    row["stages_ms"] = {k: v * 1e3 for k, v in out.timings.items()}
    row["per_step_ms"] = {k: out.timings[k] * 1e3 / n for k, n in out.steps_per_stage.items()}
    row["extrapolated_ms"] = extrapolate(out.timings, out.steps_per_stage, default_split, depth_scale)
    row["extrapolated_total_s"] = row["extrapolated_ms"]["total"] / 1e3
    video = torch.as_tensor(out.frames)
    row["frames_finite"] = bool(torch.isfinite(video).all())
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["experts_resident_together"] = pipe.residency.all_fit
    row["residency_events"] = [list(e) for e in pipe.residency.events]
    return row, video, pipe


if __name__ == "__main__":
    sys.exit(main())
