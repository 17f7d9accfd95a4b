"""One-file components: a DiT expert, the umT5 encoder or a VAE as a single .safetensors (or
.gguf), the way ComfyUI repackages them and the community quantizes them.

The names are the original Wan ones (`blocks.0.self_attn.q.weight`, ComfyUI adds the prefix
`model.diffusion_model.`), diffusers' for a DiT saved by diffusers, transformers' for umT5
(`encoder.block.0...`, ComfyUI's umt5 files). No config travels with the file: the architecture
is read off the tensors' shapes (`*_config` functions look at shapes only, nothing is
dequantized). fp8 "scaled" weights (fp8_scaled.py) and GGUF blocks (gguf_file.py) are
dequantized by `*_state` unless the caller keeps GGUF blocks for on-the-fly dequantization.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

import torch
from torch import Tensor

from wan_rt.config import SPECS, WAN21_VAE, WAN22_VAE, DiTConfig, TextEncoderConfig, VAEConfig
from wan_rt.models.checkpoint import (CheckpointError, hf_t5_to_official, map_keys, official_dit_to_diffusers,
                                      official_t5_to_hf, official_vae_to_diffusers, read_state_dict)
from wan_rt.models.fp8_scaled import dequantize_fp8, is_fp8
from wan_rt.models.gguf_file import GGUFTensor, QuantizedWeight, dequantize_all, read_gguf
from wan_rt.models.shapes import infer_text_encoder_config, infer_vae_config

Kind = Literal["dit", "vae", "text_encoder"]
PathLike = Union[str, Path]
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's, and some community re-saves
_KIND_WORDS = {"dit": "a Wan DiT expert", "vae": "a Wan VAE", "text_encoder": "a umT5 text encoder"}
_HEAD_DIM = 128  # every released Wan DiT; the presets' own widths are matched first


def is_single_file(path: PathLike) -> bool:
    return Path(path).is_file()


def is_gguf(path: PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def read_file(path: PathLike) -> dict[str, GGUFTensor]:
    """The file's tensors as stored (GGUF blocks kept quantized, fp8 kept fp8), a prefix every
    key shares (ComfyUI's `model.diffusion_model.`) removed. Memory-mapped where the format allows."""
    path = Path(path)
    sd = read_gguf(path) if is_gguf(path) else read_state_dict(path)
    if not sd:
        raise CheckpointError(f"{path}: the file holds no tensors")
    prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in sd if k != "scaled_fp8")), "")
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def kind_of(sd: Mapping[str, object]) -> Optional[Kind]:
    if "patch_embedding.weight" in sd:
        return "dit"
    if "encoder.conv1.weight" in sd or "encoder.conv_in.weight" in sd:
        return "vae"
    if "token_embedding.weight" in sd or "shared.weight" in sd or "encoder.final_layer_norm.weight" in sd:
        return "text_encoder"
    return None


def _expect(path: Path, sd: Mapping[str, object], want: Kind) -> None:
    found = kind_of(sd)
    if found != want:
        what = _KIND_WORDS[found] if found else "no Wan component this runtime knows"
        raise CheckpointError(f"{path}: {what}, not {_KIND_WORDS[want]}")


def _dequantize(path: Path, sd: Mapping[str, GGUFTensor], dtype: torch.dtype, keep_quantized: bool) -> dict:
    if is_fp8(sd):  # type: ignore[arg-type]
        return dequantize_fp8(sd, dtype)  # type: ignore[arg-type]
    return dict(sd) if keep_quantized else dequantize_all(sd, dtype)


# -------------------------------------------------------------------------------------------- DiT
def _dit_names(path: Path, sd: dict) -> dict:
    """Our (diffusers) names: official keys translated, diffusers keys kept."""
    if "head.head.weight" in sd:
        return map_keys(sd, official_dit_to_diffusers, source=path)
    return sd


def dit_config(path: PathLike, sd: Optional[Mapping[str, object]] = None) -> DiTConfig:
    """A DiT expert file's architecture, from its shapes (text_len 512, the pipelines' own)."""
    path = Path(path)
    raw = dict(sd if sd is not None else read_file(path))
    _expect(path, raw, "dit")
    sd = _dit_names(path, {k: v for k, v in raw.items() if not k.endswith((".scale_weight", ".scale_input"))})
    try:
        dim, in_ch, *patch = sd["patch_embedding.weight"].shape
        out = sd["proj_out.weight"].shape[0] // math.prod(patch)
        ffn = sd["blocks.0.ffn.net.0.proj.weight"].shape[0]
        text_dim = sd["condition_embedder.text_embedder.linear_1.weight"].shape[1]
        freq_dim = sd["condition_embedder.time_embedder.linear_1.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a complete Wan DiT (no {e.args[0]})") from None
    if "blocks.0.attn2.add_k_proj.weight" in sd:
        raise CheckpointError(f"{path}: a Wan 2.1 image-conditioned DiT (img_emb / k_img), not a Wan 2.2 one")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = next((s.dit.num_heads for s in SPECS.values() if (s.dit.dim, s.dit.ffn_dim) == (dim, ffn)),
                 max(1, dim // _HEAD_DIM))
    return DiTConfig(dim=int(dim), ffn_dim=int(ffn), num_heads=int(heads), num_layers=layers,
                     in_channels=int(in_ch), out_channels=int(out), patch_size=tuple(int(p) for p in patch),
                     freq_dim=int(freq_dim), text_dim=int(text_dim), text_len=512,
                     per_token_timestep=int(in_ch) == int(out) == 48)  # TI2V-5B's per-token timesteps


def dit_state(path: PathLike, dtype: torch.dtype = torch.float32,
              keep_quantized: bool = False) -> tuple[DiTConfig, dict[str, GGUFTensor]]:
    """(architecture, tensors in our names); fp8 / GGUF weights dequantized to `dtype` (GGUF
    blocks stay QuantizedWeight with keep_quantized)."""
    path = Path(path)
    raw = read_file(path)
    config = dit_config(path, raw)
    return config, _dit_names(path, _dequantize(path, raw, dtype, keep_quantized))


def fp8_weight_scales(path: PathLike) -> dict[str, float]:
    """{our Linear's path: scale_weight} of an fp8_scaled DiT file (empty for other files): what
    an fp8 build quantizes those weights with, to keep the file's own fp8 values."""
    path = Path(path)
    if is_gguf(path):
        return {}
    raw = read_file(path)
    if not is_fp8(raw):  # type: ignore[arg-type]
        return {}
    scaled = {k.removesuffix("scale_weight") + "weight": v for k, v in raw.items() if k.endswith(".scale_weight")}
    if "head.head.weight" in raw:
        scaled = map_keys(scaled, official_dit_to_diffusers, source=path)
    return {k.removesuffix(".weight"): float(v.float()) for k, v in scaled.items()}


# -------------------------------------------------------------------------------------------- VAE
def _vae_base(path: Path, sd: Mapping[str, object]) -> VAEConfig:
    _expect(path, sd, "vae")
    if "encoder.conv1.weight" not in sd:
        raise CheckpointError(f"{path}: a VAE in diffusers names; pass its folder (config.json beside it) instead")
    # Wan 2.2's VAE patchifies the frame 2x2 before its first conv: 12 input channels, not 3.
    return WAN22_VAE if sd["encoder.conv1.weight"].shape[1] == 12 else WAN21_VAE  # type: ignore[attr-defined]


def vae_config(path: PathLike) -> VAEConfig:
    path = Path(path)
    sd = read_file(path)
    return infer_vae_config(sd, _vae_base(path, sd))  # type: ignore[arg-type]


def vae_state(path: PathLike, dtype: torch.dtype = torch.float32) -> tuple[VAEConfig, dict[str, Tensor]]:
    path = Path(path)
    raw = read_file(path)
    config = infer_vae_config(raw, _vae_base(path, raw))  # type: ignore[arg-type]
    sd = _dequantize(path, raw, dtype, keep_quantized=False)
    return config, map_keys(sd, lambda k: official_vae_to_diffusers(k, config.version, config.num_res_blocks),
                            source=path)


# -------------------------------------------------------------------------------------------- umT5
def _t5_official(path: Path, sd: Mapping[str, object]) -> dict:
    """umT5 in the official names (ComfyUI's files use transformers' names; the input embedding
    `encoder.embed_tokens.weight` is a tie of `shared.weight`)."""
    _expect(path, sd, "text_encoder")
    if "token_embedding.weight" in sd:
        return dict(sd)
    kept = {k: v for k, v in sd.items() if k not in ("encoder.embed_tokens.weight", "spiece_model")}
    if "shared.weight" not in kept and "encoder.embed_tokens.weight" in sd:
        kept["shared.weight"] = sd["encoder.embed_tokens.weight"]
    return map_keys(kept, hf_t5_to_official, source=path)


def text_encoder_config(path: PathLike) -> TextEncoderConfig:
    path = Path(path)
    sd = _t5_official(path, read_file(path))
    try:
        return infer_text_encoder_config(sd)  # type: ignore[arg-type]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a complete umT5 encoder (no {e.args[0]})") from None


def text_encoder_state(path: PathLike, dtype: torch.dtype = torch.float32) -> tuple[TextEncoderConfig, dict]:
    """(config, tensors in transformers' UMT5EncoderModel names)."""
    path = Path(path)
    config = text_encoder_config(path)
    sd = _t5_official(path, _dequantize(path, read_file(path), dtype, keep_quantized=False))
    return config, map_keys(sd, official_t5_to_hf, source=path)


def file_config(path: PathLike, kind: Kind):
    """The config of a one-file component of `kind`; another kind is one CheckpointError."""
    return {"dit": dit_config, "vae": vae_config, "text_encoder": text_encoder_config}[kind](path)


__all__ = ["QuantizedWeight", "dit_config", "dit_state", "file_config", "fp8_weight_scales", "is_gguf", "is_single_file", "kind_of",
           "read_file", "text_encoder_config", "text_encoder_state", "vae_config", "vae_state"]
