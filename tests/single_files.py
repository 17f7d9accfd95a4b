"""Write the files people download, from a tiny diffusers-layout checkpoint's weights: ComfyUI
repackaged DiT / VAE / umT5 single files, fp8 "scaled" files, GGUF experts.

Plain helpers (no fixtures) shared by tests/test_single_file*.py and tests/test_gguf*.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from wan_rt.models.checkpoint import (diffusers_dit_to_official, diffusers_vae_to_official, hf_t5_to_official,
                                      read_state_dict)

PREFIX = "model.diffusion_model."


def _save(sd: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def official_dit(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers `transformer/` folder's tensors under the original Wan names."""
    return {diffusers_dit_to_official(k): v for k, v in read_state_dict(folder).items()}


def write_dit(folder: Path, path: Path, *, naming: str = "comfyui", dtype: torch.dtype = torch.bfloat16) -> Path:
    """naming: "comfyui" (Wan names + model.diffusion_model.), "official" (Wan names), "diffusers"."""
    sd = read_state_dict(folder) if naming == "diffusers" else official_dit(folder)
    prefix = PREFIX if naming == "comfyui" else ""
    return _save({prefix + k: v.to(dtype) for k, v in sd.items()}, path)


def fp8_scaled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8: every 2-D weight as float8_e4m3fn with a per-tensor scale_weight
    (amax / 448), the `scaled_fp8` marker; everything else unchanged."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.float().abs().amax().clamp(min=1e-12) / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


def dequantized(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an fp8-scaled file means: fp8 x scale, in fp32 (the test oracle)."""
    return {k: v.float() * sd[k.removesuffix("weight") + "scale_weight"].float() if v.dtype == torch.float8_e4m3fn
            else v for k, v in sd.items() if k != "scaled_fp8" and not k.endswith(".scale_weight")}


def write_fp8_scaled_dit(folder: Path, path: Path) -> Path:
    # ComfyUI keeps the marker at the top level, outside the model's prefix.
    return _save({(k if k == "scaled_fp8" else PREFIX + k): v for k, v in fp8_scaled(official_dit(folder)).items()},
                 path)


def write_vae(folder: Path, path: Path, version: str, num_res_blocks: int) -> Path:
    """ComfyUI's wan_2.1_vae / wan2.2_vae.safetensors: the official names."""
    sd = read_state_dict(folder)
    return _save({diffusers_vae_to_official(k, version, num_res_blocks): v for k, v in sd.items()}, path)


def write_umt5(folder: Path, path: Path, *, naming: str = "comfyui", scaled: bool = False) -> Path:
    """naming: "comfyui" (transformers names, shared.weight only) or "official" (token_embedding...)."""
    sd = {k: v for k, v in read_state_dict(folder).items() if k != "encoder.embed_tokens.weight"}
    if naming == "official":
        sd = {hf_t5_to_official(k): v for k, v in sd.items()}
    return _save(fp8_scaled(sd) if scaled else sd, path)


# ------------------------------------------------------------------------------------------- GGUF
# Where each K-quant block keeps its fp16 super-block scales (d, dmin) and, for Q6_K, its int8
# sub-block scales.
_K_SCALE_OFFSETS = {"Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,)}
_Q6_K_SUB_SCALES = slice(192, 208)


def gguf_blocks(weight: torch.Tensor, qtype_name: str, seed: int = 0) -> np.ndarray:
    """`weight` [rows, cols] as GGUF blocks of `qtype_name`, every fp16 block scale a power of two.

    Why powers of two: diffusers' GGUF dequantization multiplies in float16 (the block scale's
    dtype), so its weights are the exact ones rounded to fp16, off by ~5e-4 relative; with
    power-of-two scales every product is exact in fp16 and both decoders must agree to the bit,
    which is what a 1e-4 comparison can then check. Q8_0 quantizes `weight` (round(w / d), d =
    2^ceil(log2(amax / 127)) per 32 values). gguf 0.19 cannot quantize the K-quants in Python
    (only dequantize), so their blocks are random quants with small power-of-two scales (what
    they decode to is the reference)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = weight.shape
    if qtype_name == "Q8_0":
        w = weight.float().numpy().reshape(-1, per_block)
        d = np.exp2(np.ceil(np.log2(np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-8) / 127))).astype(np.float16)
        q = np.clip(np.round(w / d.astype(np.float32)), -127, 127).astype(np.int8)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1).reshape(rows, -1)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, nbytes), dtype=np.uint8)
    if qtype_name == "Q6_K":  # int8 sub-scales kept small: d x scale x q stays within fp16's 11 bits
        blocks[:, _Q6_K_SUB_SCALES] = rng.integers(-15, 16, size=(len(blocks), 16), dtype=np.int8).view(np.uint8)
    scale = np.float16(2.0 ** -np.ceil(np.log2(8 * cols ** 0.5 * 32)))  # keeps activations O(1)
    for off in _K_SCALE_OFFSETS[qtype_name]:
        blocks[:, off:off + 2] = np.full(len(blocks), scale, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(sd: dict[str, torch.Tensor], path: Path, qtype_name: str, seed: int = 0,
               raw: dict | None = None) -> Path:
    """city96-style GGUF: the Linear weights of the blocks in `qtype_name` (those whose rows
    split into whole blocks), everything else F32 (patch embedding F16), original Wan names.
    `raw`: {name: (uint8 blocks, GGMLQuantizationType)} written as given instead."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "wan")
    per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]][0]
    for i, (name, t) in enumerate(sorted(sd.items())):
        t = t.float()
        if raw and name in raw:
            writer.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif name.startswith("blocks.") and name.endswith(".weight") and t.ndim == 2 and t.shape[1] % per_block == 0:
            if qtype_name == "F16":
                writer.add_tensor(name, t.numpy().astype(np.float16))
            else:
                writer.add_tensor(name, gguf_blocks(t, qtype_name, seed + i),
                                  raw_dtype=gguf.GGMLQuantizationType[qtype_name])
        elif name == "patch_embedding.weight":
            writer.add_tensor(name, t.numpy().astype(np.float16))
        else:
            writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
