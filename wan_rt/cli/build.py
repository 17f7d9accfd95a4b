"""`wan-rt build`: export components and compile engines into an engines dir."""

from __future__ import annotations

import argparse
import time

from wan_rt.config import DEFAULT_SPEC

DEFAULT_ENGINES_DIR = "engines"


def built_default_engines() -> str | None:
    """./engines when `wan-rt build` has written engines there: what `wan-rt run` and `wan-rt
    serve` use when given no model."""
    from pathlib import Path

    from wan_rt.runtime.engines_dir import INDEX

    return DEFAULT_ENGINES_DIR if (Path(DEFAULT_ENGINES_DIR) / INDEX).is_file() else None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("build", help="export components and build engines")
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder (diffusers or official layout) or preset name (default: {DEFAULT_SPEC}); "
                        "with component files also an architecture: t2v-A14B, i2v-A14B, ti2v-5B")
    p.add_argument("--backend", default=None, choices=["ort", "aoti", "trt"],
                   help="engine kind (default: the best this machine has: trt, else ort)")
    p.add_argument("--precision", default=None,
                   help="fp32 | bf16 | fp16 | fp8 | int8 (default: fp32 on CPU, bf16/fp16 on GPU); fp8 and int8 "
                        "calibrate on the eager pipeline (2 prompts x up to 8 steps at most 256 px / 17 frames; "
                        "each component loaded alone, in its file's dtype when bf16/fp16, else fp32 where it fits) "
                        "and quantize the DiTs' linear layers as Q/DQ (ort, trt); "
                        "aoti fp8: FP8 GEMMs with dynamic scales (torch._scaled_mm)")
    p.add_argument("--height", type=int, default=None, help="largest height the engines serve (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="largest width (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="largest frame count, 4k+1 (default: the model's)")
    p.add_argument("--text-len", type=int, default=None,
                   help="text tokens the engines serve: prompts are padded to this length (max_sequence_length; "
                        "default: the model's, 512)")
    p.add_argument("--components", default=None,
                   help="comma-separated subset, e.g. dit_high_noise,vae_decoder (default: all of the model's)")
    p.add_argument("--engines-dir", default=DEFAULT_ENGINES_DIR, help="where the engines go")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifests verify")
    p.add_argument("--quick-compile", action="store_true",
                   help="aoti: scalar C++ kernels and an -O0 wrapper (about half the compile time on a CPU, "
                        "slower engines); for development")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="aoti: ops compiled into the DiT packages (auto: wan_rt's Triton kernels on a GPU, torch's "
                        "ops on a CPU)")
    p.add_argument("--attention", default="exact", choices=["exact", "int8"],
                   help="aoti: int8 q·kᵀ in self-attention (SageAttention-style; needs the Triton kernels)")
    p.add_argument("--fp8-attention", action="store_true", help="fp8: quantize the attention matmuls too")
    p.add_argument("--trt-targets", default=None,
                   help="TensorRT: compute capabilities to build for, e.g. sm89,sm120 (TensorRT for RTX: RTX GPUs, "
                        "built with or without a GPU; required without one). Default: the GPU present")
    p.add_argument("--trt-opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    p.add_argument("--refittable", action="store_true", help="TensorRT: engines whose weights can be refitted")
    p.add_argument("--weight-streaming", action="store_true",
                   help="TensorRT: weights stay in host memory and stream in (experts larger than the GPU)")
    p.add_argument("--step-cache", action="store_true",
                   help="build each DiT step as the graphs a step cache drives (embed, first block, other blocks, "
                        "head), so `wan-rt run --cache` works on these engines")
    p.add_argument("--dit-parts", type=int, default=None, metavar="N",
                   help="build each DiT's blocks after the first as N engines run in order (step-cache ready; "
                        "Python runtime only), so the builder holds 1/N of an expert at a time; default: 1, or the "
                        "fewest parts whose TensorRT build fits this machine's RAM")
    add_lora_arguments(p)
    add_component_file_arguments(p)


def add_component_file_arguments(p) -> None:
    """--dit / --dit-2 / --text-encoder / --vae / --tokenizer, shared by `wan-rt build` and `wan-rt run`."""
    g = p.add_argument_group("component files", "one file per component, overriding that component of --model "
                             "(ComfyUI repackaged, fp8_scaled, GGUF, official .pth); README \"Checkpoint files\"")
    g.add_argument("--dit", metavar="FILE", help="the high-noise expert, or the only DiT (.safetensors or .gguf)")
    g.add_argument("--dit-2", metavar="FILE", help="the low-noise expert of an A14B model")
    g.add_argument("--text-encoder", metavar="FILE", help="umT5-XXL encoder (.safetensors or .pth)")
    g.add_argument("--vae", metavar="FILE", help="Wan 2.1 VAE (A14B models) or Wan 2.2 VAE (TI2V-5B)")
    g.add_argument("--tokenizer", metavar="DIR", help="umT5 tokenizer folder (tokenizer.json or spiece.model)")


def model_with_files(args: argparse.Namespace, model: str | None) -> str | None:
    """`model` with the component files of the command line (wan_rt.resolve.compose_model)."""
    from wan_rt.resolve import compose_model

    return compose_model(model, dit=args.dit, dit_2=args.dit_2, text_encoder=args.text_encoder, vae=args.vae,
                         tokenizer=args.tokenizer)


def has_component_files(args: argparse.Namespace) -> bool:
    return any((args.dit, args.dit_2, args.text_encoder, args.vae, args.tokenizer))


def add_lora_arguments(p) -> None:
    """--lora / --lora-2, shared by `wan-rt build` (fused before export) and `wan-rt run`."""
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA for the high-noise expert, or the only DiT (repeatable; any Wan format: diffusers/PEFT, "
                        "original/ComfyUI/LightX2V, kohya/musubi)")
    p.add_argument("--lora-2", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA for the low-noise expert (repeatable)")


def run(args: argparse.Namespace) -> int:
    from wan_rt.build import best_backend, build_engines
    from wan_rt.loader import lora_pairs, lora_plan
    from wan_rt.lora import parse_lora_arg
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.backends import get_backend
    from wan_rt.runtime.engines_dir import run_refusal

    backend = args.backend or best_backend()
    components = [c.strip() for c in args.components.split(",")] if args.components else None
    model = model_with_files(args, args.model or (None if has_component_files(args) else DEFAULT_SPEC))
    spec = resolve_checkpoint(model).spec  # a wrong file is one line before anything is written
    loras = lora_plan(spec, map(parse_lora_arg, args.lora),
                      map(parse_lora_arg, args.lora_2)) if args.lora or args.lora_2 else {}
    print(f"building {spec.name if model.startswith('{') else model} -> {args.engines_dir} ({backend})")
    start = time.perf_counter()
    quant_config = trt_config = None
    if args.fp8_attention:
        from wan_rt.export.quantize import QuantConfig

        if args.precision != "fp8":
            raise ValueError("--fp8-attention needs --precision fp8")
        quant_config = QuantConfig("fp8", fp8_attention=True)
    if backend == "trt":
        from wan_rt.export.trt_build import BuildConfig
        from wan_rt.runtime.backends.trt_lib import parse_targets

        trt_config = BuildConfig(targets=parse_targets(args.trt_targets) if args.trt_targets else (),
                                 opt_level=args.trt_opt_level, refittable=args.refittable,
                                 weight_streaming=args.weight_streaming)
    elif args.trt_targets:
        raise ValueError(f"--trt-targets is a TensorRT option; the {backend} backend has no such mode")
    manifests = build_engines(model, backend, args.engines_dir, precision=args.precision,
                              height=args.height, width=args.width, frames=args.frames, text_len=args.text_len,
                              components=components, force=args.force, device=args.device,
                              quant_config=quant_config, trt_config=trt_config, quick_compile=args.quick_compile,
                              kernels=args.kernels, attention=args.attention, loras=lora_pairs(loras),
                              step_cache=args.step_cache, dit_parts=args.dit_parts)
    ready = f"{len(manifests)} components ready in {time.perf_counter() - start:.1f}s"
    # Built for another machine (TensorRT plans for GPUs this one lacks): say so, not "run them".
    refusal = next((r for m in manifests if (r := run_refusal(m, get_backend(m.backend)))), None)
    if refusal:
        print(f"{ready}; they cannot run on this machine ({refusal}); on one that can: "
              f"wan-rt run --engines-dir {args.engines_dir}")
    else:
        print(f"{ready}; run them with: wan-rt run --engines-dir {args.engines_dir}")
    return 0
