"""Tiny LoRA files for the tests, one set of deltas written in each Wan format.

The deltas are drawn for a tiny WanDiT's Linear layers (every block's attention and FFN) and
written as diffusers / PEFT (`transformer.` + our names, alpha folded into lora_A), original /
LightX2V (`diffusion_model.` + official names, lora_down/up, `.alpha`, `.diff_b`, a zero norm
`.diff`) and kohya / musubi (`lora_unet_` + official names with underscores, `.alpha`).
Loaded by path from the tests (the tests folder is not a package)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from wan_rt.models.checkpoint import diffusers_dit_to_official

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
           "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def draw_deltas(model: torch.nn.Module, seed: int, rank: int = 4, alpha: float = 2.0, strength: float = 0.3) -> dict:
    """{our module: (down [r, in], up [out, r], alpha, diff_b or None)}; large enough to move the video."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, _ in enumerate(model.blocks):
        for t in TARGETS:
            layer = model.get_submodule(f"blocks.{i}.{t}")
            down = torch.randn(rank, layer.in_features, generator=gen) * strength / layer.in_features ** 0.5
            up = torch.randn(layer.out_features, rank, generator=gen) * strength
            # Every target gets a bias delta: PEFT (diffusers' oracle) gives all of a LoRA's layers
            # a lora_B bias once one has it, and fails on the missing ones.
            diff_b = torch.randn(layer.out_features, generator=gen) * 0.05
            out[f"blocks.{i}.{t}"] = (down, up, alpha, diff_b)
    return out


def official(module: str) -> str:
    return diffusers_dit_to_official(module + ".weight").removesuffix(".weight")


def write(deltas: dict, fmt: str, path: Path) -> Path:
    tensors = {}
    for module, (down, up, alpha, diff_b) in deltas.items():
        rank = down.shape[0]
        if fmt == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"] = down * (alpha / rank)
            tensors[f"transformer.{module}.lora_B.weight"] = up
            if diff_b is not None:
                tensors[f"transformer.{module}.lora_B.bias"] = diff_b
        elif fmt == "original":
            name = f"diffusion_model.{official(module)}"
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            if diff_b is not None:
                tensors[f"{name}.diff_b"] = diff_b
        elif fmt == "kohya":
            name = "lora_unet_" + official(module).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            raise ValueError(fmt)
    if fmt == "original":  # LightX2V's distill LoRAs carry norm diffs, all zero
        width = next(iter(deltas.values()))[1].shape[0]
        tensors["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(width)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
