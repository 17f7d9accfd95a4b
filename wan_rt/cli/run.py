"""`wan-rt run`: generate an mp4 from a checkpoint (or the embedded tiny default)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from wan_rt.cli.build import (add_component_file_arguments, add_lora_arguments, built_default_engines,
                              has_component_files, model_with_files)
from wan_rt.cli.plan_flags import add_plan_arguments, plan_from_args
from wan_rt.cli.video_flags import add_video_arguments, check_video_arguments
from wan_rt.config import DEFAULT_SPEC

DEFAULT_PROMPT = "a red fox running through fresh snow at sunrise, cinematic, detailed"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="generate a video")
    p.add_argument("--model", default=None,
                   help="checkpoint folder (diffusers or official Wan2.2 layout) or preset name; default: the "
                        f"model of --engines-dir, else ./engines if built, else {DEFAULT_SPEC}")
    p.add_argument("--engines-dir", default=None, help="run on the engines built there by `wan-rt build`")
    p.add_argument("--backend", default=None, choices=["eager", "ort", "aoti", "trt"],
                   help="eager (PyTorch) or the engines' backend (default: the engines', else eager)")
    p.add_argument("--backend-for", action="append", default=[], metavar="COMPONENT=eager",
                   help="run one component on eager instead of its engine (repeatable)")
    p.add_argument("--rebuild", action="store_true", help="rebuild stale engines instead of refusing them")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to generate")
    p.add_argument("--negative-prompt", default=None, help="default: the checkpoint's own default")
    p.add_argument("--image", default=None, help="first frame for image-to-video (i2v, ti2v)")
    add_video_arguments(p)
    p.add_argument("--height", type=int, default=None, help="default: the model's")
    p.add_argument("--width", type=int, default=None, help="default: the model's")
    p.add_argument("--frames", type=int, default=None, help="4k+1; default: the model's")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--timesteps", default=None, metavar="T1,T2,...",
                   help="few-step distilled models: sample at exactly these training timesteps, e.g. 1000,750,500,250 "
                        "(LightX2V's denoising_step_list; the flow shift applies)")
    p.add_argument("--switch-step", type=int, default=None,
                   help="hand over to the low-noise expert at this step index (a distilled A14B model's "
                        "boundary_step_index, e.g. 2), not at the boundary timestep")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale of the high-noise expert (or the only DiT); default: the model's")
    p.add_argument("--guidance-2", type=float, default=None,
                   help="CFG scale of the low-noise expert; default: the model's")
    p.add_argument("--shift", type=float, default=None, help="flow shift; default: the checkpoint's")
    p.add_argument("--solver", default=None, choices=["unipc", "dpm++", "euler"], help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="eager DiT dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="eager only: Triton kernels (auto: on a CUDA GPU) or PyTorch ops")
    p.add_argument("--cache", default=None, choices=["teacache", "magcache", "fbcache"],
                   help="step cache: skip the DiT blocks on steps whose change the method predicts small (eager, or "
                        "engines built with --step-cache)")
    p.add_argument("--cache-threshold", type=float, default=None,
                   help="the cache's threshold (default: the method's published value for the model; 0 computes "
                        "every step)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="GPU memory to stay within: the cheapest plan that fits (both experts resident, one at a "
                        "time, or block offload for eager experts); out.timings reports the peak")
    p.add_argument("--text-encoder-on-cpu", action="store_true", help="run umT5 on the CPU (no GPU memory)")
    p.add_argument("--vae-on-cpu", action="store_true", help="run the VAE on the CPU (no GPU memory)")
    add_lora_arguments(p)
    add_component_file_arguments(p)
    p.add_argument("--lora-mode", default="fuse", choices=["fuse", "runtime"],
                   help="eager experts: fuse LoRAs into the weights (fastest steps) or apply them at run time "
                        "(weights untouched); engines carry the LoRAs they were built with")
    p.add_argument("--output", default="out.mp4", help="mp4 path")
    p.add_argument("--frames-out", default=None, metavar="FRAMES.safetensors",
                   help="also save the frames before uint8 conversion (float32 [F, H, W, 3] in [0, 1], key 'frames')")
    par = add_plan_arguments(p, "multi-GPU (one video over several processes; README \"Multi-GPU\")")
    par.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                     help="processes to start here (default: cfg x ring x ulysses); under torchrun, ignored")


@dataclass(frozen=True)
class _Request:
    """What `wan-rt run` generates, checked before anything heavy loads."""

    model: str
    engines_dir: Optional[str]
    pinned: dict[str, str]
    image: Any
    height: int
    width: int
    num_frames: int
    steps: int
    output: Path
    timesteps: Optional[list[int]] = None  # --timesteps (few-step distilled models)
    loras: dict = field(default_factory=dict)  # {component: [LoraRef]} from --lora / --lora-2
    memory: Any = None                          # wan_rt.offload.MemoryPlan from --memory-budget
    on_cpu: list = field(default_factory=list)  # components --text-encoder-on-cpu / --vae-on-cpu move
    source: Any = None                          # --video / --extend: the decoded source frames


def run(args: argparse.Namespace) -> int:
    import torch

    from wan_rt.cli import UsageError
    from wan_rt.config import check_request
    from wan_rt.parallel import ParallelPlan
    from wan_rt.parallel.launch import init_process_group, launch
    from wan_rt.parallel.plan import from_environment, local_device
    from wan_rt.loader import check_cpu_components, lora_plan, memory_plan
    from wan_rt.lora import parse_lora_arg
    from wan_rt.pipeline import check_switch_step
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.scheduler import timestep_list_sigmas
    from wan_rt.runtime.engines_dir import check_fits, read_index
    from wan_rt.video import load_image

    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise UsageError(f"--output must end in .mp4; got {args.output}")
    if not output.parent.is_dir():
        raise UsageError(f"--output folder does not exist: {output.parent}")
    frames_out = Path(args.frames_out) if args.frames_out else None
    if frames_out is not None and (frames_out.suffix != ".safetensors" or not frames_out.parent.is_dir()):
        raise UsageError(f"--frames-out must be a .safetensors path in an existing folder; got {args.frames_out}")
    engines_dir = args.engines_dir
    files = has_component_files(args)
    if engines_dir is None and args.model is None and not files and args.backend in (None, "ort", "aoti", "trt"):
        engines_dir = built_default_engines()
    pinned = _parse_backend_for(args.backend_for, UsageError)
    if args.cache_threshold is not None and args.cache is None:
        raise UsageError("--cache-threshold needs --cache teacache|magcache|fbcache")
    if engines_dir is None:
        if args.backend not in (None, "eager"):
            raise UsageError(f"--backend {args.backend} runs built engines: run `wan-rt build --backend "
                             f"{args.backend}` first, then pass --engines-dir")
        model = args.model or (None if files else DEFAULT_SPEC)
    else:
        index = read_index(Path(engines_dir))
        if args.backend not in (None, "eager", index["backend"]):
            raise UsageError(f"{engines_dir} holds {index['backend']} engines, not {args.backend}")
        model = args.model or index["model"]
    model = model_with_files(args, model)

    # Everything about the request is checked before anything heavy loads (or any process starts).
    spec = resolve_checkpoint(model).spec
    pick = lambda value, default: default if value is None else value  # noqa: E731  (0 is a value)
    height, width = pick(args.height, spec.height), pick(args.width, spec.width)
    num_frames, steps = pick(args.frames, spec.num_frames), pick(args.steps, spec.sample_steps)
    timesteps = _parse_timesteps(args.timesteps, UsageError) if args.timesteps is not None else None
    if timesteps is not None:
        if args.steps is not None and args.steps != len(timesteps):
            raise UsageError(f"--steps {args.steps} but --timesteps lists {len(timesteps)}")
        if args.solver is not None:
            raise UsageError("--timesteps runs the distilled models' Euler sampler; drop --solver")
        steps = len(timesteps)
        timestep_list_sigmas(timesteps, 1.0)  # a bad list is one line now, not after loading
    source, num_frames = check_video_arguments(args, spec, num_frames, steps)
    check_request(spec, height, width, num_frames, steps)
    if args.switch_step is not None:
        check_switch_step(spec, steps, args.switch_step)
    if spec.task == "i2v" and not (args.image or args.video or args.extend):  # a source video gives the frame
        raise UsageError(f"{spec.name} is an image-to-video model: pass --image")
    if args.image and spec.task == "t2v":
        raise UsageError(f"{spec.name} is a text-to-video model; --image needs an i2v or ti2v model")
    image = load_image(args.image) if args.image else None
    loras = lora_plan(spec, map(parse_lora_arg, args.lora), map(parse_lora_arg, args.lora_2))
    if engines_dir is not None and args.backend != "eager":
        check_fits(Path(engines_dir), spec, height, width, num_frames)
    on_cpu = check_cpu_components(spec, (["text_encoder"] if args.text_encoder_on_cpu else [])
                                  + (["vae_encoder", "vae_decoder"] if args.vae_on_cpu else []))
    memory = None
    if args.memory_budget is not None:
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        run_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
            args.dtype, torch.bfloat16 if cuda else torch.float32)
        memory = memory_plan(resolve_checkpoint(model), args.memory_budget, run_dtype, on_cpu,
                             engines=engines_dir is not None and args.backend != "eager")
    request = _Request(model, engines_dir, pinned, image, height, width, num_frames, steps, output, timesteps, loras,
                       memory, on_cpu, source)
    plan = _parallel_plan(args, spec)
    if plan is not None and (args.cache or memory is not None or on_cpu):
        raise UsageError("--cache, --memory-budget and --*-on-cpu run in one process; drop them or the multi-GPU flags")
    if plan is not None and engines_dir is not None and args.backend != "eager":
        plan.check_engine_dits([c for c in spec.dit_components if pinned.get(c) != "eager"])
    job = from_environment()
    if job is None:
        if plan is not None:  # start the processes: each runs this same command as one rank
            return launch(["-m", "wan_rt.cli", *args.argv], args.nproc_per_node or plan.world_size,
                          prog="wan-rt run")
        device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return _generate(args, spec, request, device, None, rank=0)
    device = torch.device(args.device) if args.device else local_device()
    init_process_group(device)
    try:
        code = _generate(args, spec, request, device, plan or ParallelPlan(), rank=job[0])
        # No rank tears its process group down while another may still be in a collective with it.
        torch.distributed.barrier()
        return code
    finally:
        torch.distributed.destroy_process_group()


def _generate(args: argparse.Namespace, spec, request: _Request, device, plan, rank: int) -> int:
    import torch

    from wan_rt.loader import WanPipeline, load_components, lora_pairs, memory_placement
    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.video import export_to_video

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    start = time.perf_counter()
    resolved, components, how = load_components(request.model, backend=args.backend, engines_dir=request.engines_dir,
                                                device=device, dtype=dtypes[args.dtype] if args.dtype else None,
                                                backend_for=request.pinned, rebuild=args.rebuild, kernels=args.kernels,
                                                parallel=plan, loras=lora_pairs(request.loras),
                                                placement=memory_placement(spec, request.memory, request.on_cpu),
                                                size=(request.height, request.width, request.num_frames))
    tokenizer = load_tokenizer(resolved.files.tokenizer, spec.text_encoder.vocab_size)  # warns if degenerate
    pipe = WanPipeline(spec, components, tokenizer, resolved.defaults, device)
    pipe.set_progress_bar_config(disable=rank != 0)
    pipe.apply_lora_plan(request.loras, args.lora_mode)
    if request.memory is not None:
        pipe.apply_memory_plan(request.memory)
        print(f"  memory plan: {request.memory.describe()}", file=sys.stderr)
    if args.cache is not None:
        pipe.enable_step_cache(args.cache, args.cache_threshold)
    load_s = time.perf_counter() - start
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    kwargs = dict(negative_prompt=args.negative_prompt, height=request.height, width=request.width,
                  num_frames=request.num_frames, num_inference_steps=request.steps, guidance_scale=args.guidance,
                  guidance_scale_2=args.guidance_2, generator=generator, shift=args.shift, solver=args.solver,
                  timesteps=request.timesteps, switch_step=args.switch_step)
    if args.extend:
        result = pipe.extend(request.source, args.prompt, **kwargs)
    else:
        result = pipe(args.prompt, image=request.image, **kwargs,
                      **(dict(video=request.source, strength=args.strength) if args.video else {}))
    if rank != 0:  # every rank holds the same frames; rank 0 writes them
        return 0
    export_to_video(result.frames[0], request.output, fps=spec.fps)
    if args.frames_out:
        from safetensors.torch import save_file

        save_file({"frames": torch.from_numpy(result.frames[0]).contiguous()}, args.frames_out)
    print(f"wrote {request.output} ({len(result.frames[0])} frames, {request.width}x{request.height}, {spec.fps} fps) "
          f"from {spec.name} ({how})")
    print(f"  load {load_s:.2f}s", file=sys.stderr)
    for line in timing_lines(result.timings, result.steps_per_stage):
        print(f"  {line}", file=sys.stderr)
    return 0


def timing_lines(timings: dict[str, float], steps_per_stage: dict[str, int]) -> list[str]:
    """Seconds per stage, with its steps and (step cache) how many computed / reused; peak GPU memory."""
    lines = []
    for stage, value in timings.items():
        if "." in stage:  # "<component>.<figure>": shown on the component's line
            continue
        if stage == "peak_gpu_memory_gb":
            lines.append(f"peak GPU memory: {value:.2f} GiB")
            continue
        notes = [f"{steps_per_stage[stage]} steps"] if stage in steps_per_stage else []
        if f"{stage}.steps_computed" in timings:
            notes.append(f"{timings[stage + '.steps_computed']:.0f} computed / {timings[stage + '.steps_reused']:.0f} "
                         "reused")
        lines.append(f"{stage}{' (' + ', '.join(notes) + ')' if notes else ''}: {value:.2f}s")
    return lines


def _parse_backend_for(values: list[str], error) -> dict[str, str]:
    pinned = {}
    for value in values:
        name, sep, backend = value.partition("=")
        if not sep or backend != "eager":
            raise error(f"--backend-for takes COMPONENT=eager (e.g. vae_decoder=eager); got {value!r}")
        pinned[name] = backend
    return pinned


def _parallel_plan(args: argparse.Namespace, spec):
    """The multi-process plan the flags ask for (None: one process), checked against the model,
    the guidance and the process count before any process starts."""
    from wan_rt.parallel import ParallelPlan
    from wan_rt.parallel.plan import from_environment
    from wan_rt.pipeline import guide_scales

    job = from_environment()
    plan = plan_from_args(args)
    if plan is None and args.nproc_per_node in (None, 1):
        return None
    plan = plan or ParallelPlan()
    plan.check_model(spec)
    plan.check_guidance(guide_scales(spec, args.guidance, args.guidance_2))
    plan.check_world(job[1] if job is not None else (args.nproc_per_node or plan.world_size))
    return plan


def _parse_timesteps(value: str, error) -> list[int]:
    try:
        return [int(t) for t in value.split(",")]
    except ValueError:
        raise error(f"--timesteps takes comma-separated integers, e.g. 1000,750,500,250; got {value!r}") from None
