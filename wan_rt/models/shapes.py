"""Read model sizes off checkpoint tensor shapes where the official layout ships no config.

Official Wan2.2 folders have config.json for the DiT only; the VAE (.pth) and umT5 (.pth) sizes
are fixed in the official code. Reading them from the weights instead keeps one loader for the
real models and for tiny test checkpoints converted to the official names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from torch import Tensor

from wan_rt.config import TextEncoderConfig, VAEConfig


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_vae_config(sd: Mapping[str, Tensor], base: VAEConfig) -> VAEConfig:
    """`sd` in official names; `base` gives the version, normalisation and stage layout."""
    levels = len(base.dim_mult)
    if base.version == "2.1":  # flat: r resnets per level plus a resample between levels
        num_res_blocks = (_count(sd, r"encoder\.downsamples\.(\d+)\.") - (levels - 1)) // levels
    else:  # nested: the last level has only its resnets
        num_res_blocks = _count(sd, rf"encoder\.downsamples\.{levels - 1}\.downsamples\.(\d+)\.")
    return dataclasses.replace(
        base,
        base_dim=int(sd["encoder.conv1.weight"].shape[0]),
        decoder_base_dim=int(sd["decoder.conv1.weight"].shape[0]) // base.dim_mult[-1],
        z_dim=int(sd["conv2.weight"].shape[0]),
        num_res_blocks=num_res_blocks,
    )


def infer_dit_text_dim(sd: Mapping[str, Tensor]) -> int:
    """The official DiT config.json has no text_dim (the code fixes 4096): read the text
    embedding's input width (official name `text_embedding.0.weight`, [dim, text_dim])."""
    for key in ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"):
        if key in sd:
            return int(sd[key].shape[1])
    raise KeyError("no text embedding weight found to read text_dim from")


def infer_text_encoder_config(sd: Mapping[str, Tensor]) -> TextEncoderConfig:
    """`sd` in official umT5 names (token_embedding, blocks.N.attn.q, ...)."""
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    return TextEncoderConfig(
        vocab_size=int(vocab), d_model=int(d_model), num_heads=int(heads),
        d_kv=int(sd["blocks.0.attn.q.weight"].shape[0]) // int(heads),
        d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=_count(sd, r"blocks\.(\d+)\."),
        relative_attention_num_buckets=int(buckets),
    )
