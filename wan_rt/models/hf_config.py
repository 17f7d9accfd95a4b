"""Translate between wan_rt's config dataclasses and the config.json files of both layouts.

diffusers layout: `transformer/config.json` (WanTransformer3DModel), `vae/config.json`
(AutoencoderKLWan), `text_encoder/config.json` (transformers UMT5Config).
Official layout: `high_noise_model/config.json` (WanModel: dim, ffn_dim, in_dim, ...); the VAE and
umT5 have no config file there, so their numbers come from the spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from wan_rt.config import DiTConfig, TextEncoderConfig, VAEConfig


def dit_to_diffusers(cfg: DiTConfig) -> dict[str, Any]:
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


def dit_from_diffusers(d: dict[str, Any], *, text_len: int, per_token_timestep: bool) -> DiTConfig:
    """`text_len` and `per_token_timestep` are pipeline facts (model_index.json), not in config.json."""
    if d.get("image_dim") or d.get("added_kv_proj_dim"):
        raise ValueError("Wan 2.1 image cross-attention (image_dim / added_kv_proj_dim) is not a Wan 2.2 model")
    if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not d.get("cross_attn_norm", True):
        raise ValueError("only qk_norm='rms_norm_across_heads' with cross_attn_norm=True is supported")
    heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
    return DiTConfig(
        dim=heads * head_dim, ffn_dim=int(d["ffn_dim"]), num_heads=heads, num_layers=int(d["num_layers"]),
        in_channels=int(d["in_channels"]), out_channels=int(d["out_channels"]),
        patch_size=tuple(int(p) for p in d.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
        freq_dim=int(d.get("freq_dim", 256)), text_dim=int(d.get("text_dim", 4096)), text_len=text_len,
        eps=float(d.get("eps", 1e-6)), rope_max_seq_len=int(d.get("rope_max_seq_len", 1024)),
        per_token_timestep=per_token_timestep,
    )


def dit_from_official(d: dict[str, Any], *, per_token_timestep: bool) -> DiTConfig:
    """Official WanModel config.json: dim, ffn_dim, freq_dim, in_dim, out_dim, num_heads, ..."""
    return DiTConfig(
        dim=int(d["dim"]), ffn_dim=int(d["ffn_dim"]), num_heads=int(d["num_heads"]),
        num_layers=int(d["num_layers"]), in_channels=int(d["in_dim"]), out_channels=int(d["out_dim"]),
        freq_dim=int(d.get("freq_dim", 256)), text_len=int(d.get("text_len", 512)),
        eps=float(d.get("eps", 1e-6)), per_token_timestep=per_token_timestep,
    )


def dit_to_official(cfg: DiTConfig, model_type: str) -> dict[str, Any]:
    return {
        "_class_name": "WanModel", "model_type": model_type, "dim": cfg.dim, "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_channels,
        "text_len": cfg.text_len,
    }


def vae_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    d: dict[str, Any] = {
        "_class_name": "AutoencoderKLWan",
        "base_dim": cfg.base_dim,
        "decoder_base_dim": cfg.decoder_base_dim if cfg.version == "2.2" else None,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),
        "dropout": 0.0,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
        "is_residual": cfg.version == "2.2",
        "in_channels": 3 * cfg.patch_size ** 2,
        "out_channels": 3 * cfg.patch_size ** 2,
        "patch_size": cfg.patch_size if cfg.patch_size > 1 else None,
        "scale_factor_temporal": cfg.stride[0],
        "scale_factor_spatial": cfg.stride[1],
    }
    return d


def vae_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    if d.get("attn_scales"):
        raise ValueError("VAE attn_scales other than [] are not part of Wan 2.1/2.2")
    is_22 = bool(d.get("is_residual", False))
    base = int(d.get("base_dim", 96))
    return VAEConfig(
        version="2.2" if is_22 else "2.1", base_dim=base,
        decoder_base_dim=int(d.get("decoder_base_dim") or base), z_dim=int(d.get("z_dim", 16)),
        patch_size=int(d.get("patch_size") or 1),
        latents_mean=tuple(float(x) for x in d["latents_mean"]),
        latents_std=tuple(float(x) for x in d["latents_std"]),
        dim_mult=tuple(int(x) for x in d.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=int(d.get("num_res_blocks", 2)),
        temporal_downsample=tuple(bool(x) for x in d.get("temperal_downsample", (False, True, True))),
    )


def text_encoder_to_hf(cfg: TextEncoderConfig) -> dict[str, Any]:
    """Keyword arguments for transformers.UMT5Config (encoder-only use)."""
    return {
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0, "is_encoder_decoder": False, "use_cache": False,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "tie_word_embeddings": False,
    }


def text_encoder_from_hf(d: dict[str, Any]) -> TextEncoderConfig:
    fields = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    return TextEncoderConfig(**{k: d[k] for k in fields if k in d})
