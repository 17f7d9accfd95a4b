"""Closed-form FLOP count of one WanDiT forward (2 FLOP per multiply-add; attention = QKᵀ + PV).

The count behind docs/perf-anchors.md ("FLOPs per forward") and the TFLOP/s the benchmarks
print. Per layer of a model of width D, FFN width F, L video tokens and T text tokens, batch B:

    self q/k/v/o   4 · 2·B·L·D²         cross q/o   2 · 2·B·L·D²     cross k/v   2 · 2·B·T·D²
    FFN            2 · 2·B·L·D·F        self-attention 4·B·L²·D       cross-attention 4·B·L·T·D

(D = heads · head_dim, so the attention terms hold for any head split). Outside the blocks:
patch embedding 2·B·L·D·(C_in·p), output projection 2·B·L·D·(C_out·p), the text embedder on T
tokens; the timestep MLPs run on one row per distinct timestep (negligible, not counted).
Elementwise work (norms, RoPE, softmax, modulation) is not counted, as is usual for MFU.
The cross-attention K/V depend only on the prompt (a runtime computes them once per prompt);
they are in `total`, as in the anchors, and listed apart in `cross_kv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wan_rt.config import DiTConfig


@dataclass(frozen=True)
class DiTFlops:
    """FLOPs of one forward, by kind. `layer_*` fields are per transformer block."""

    layer_qkvo: float            # self-attention q, k, v, o projections
    layer_cross_qo: float        # cross-attention q, o projections
    layer_cross_kv: float        # cross-attention k, v projections of the text (once per prompt)
    layer_ffn: float
    layer_self_attention: float  # QKᵀ + PV over the video tokens
    layer_cross_attention: float  # QKᵀ + PV against the text tokens
    embeddings: float            # patch embedding + text embedder
    head: float                  # output projection
    num_layers: int

    @property
    def layer_linear(self) -> float:
        return self.layer_qkvo + self.layer_cross_qo + self.layer_cross_kv + self.layer_ffn

    @property
    def layer_total(self) -> float:
        return self.layer_linear + self.layer_self_attention + self.layer_cross_attention

    @property
    def linear(self) -> float:
        """Every matmul with a weight: the blocks' projections and FFN, embeddings, head."""
        return self.num_layers * self.layer_linear + self.embeddings + self.head

    @property
    def self_attention(self) -> float:
        return self.num_layers * self.layer_self_attention

    @property
    def cross_attention(self) -> float:
        return self.num_layers * self.layer_cross_attention

    @property
    def cross_kv(self) -> float:
        return self.num_layers * self.layer_cross_kv

    @property
    def total(self) -> float:
        return self.linear + self.self_attention + self.cross_attention

    def as_dict(self) -> dict[str, float]:
        names = ("layer_qkvo", "layer_cross_qo", "layer_cross_kv", "layer_ffn", "layer_self_attention",
                 "layer_cross_attention", "layer_total", "linear", "self_attention", "cross_attention",
                 "cross_kv", "total")
        return {n: float(getattr(self, n)) for n in names}


def dit_flops(cfg: DiTConfig, tokens: int, text_len: int | None = None, batch: int = 1) -> DiTFlops:
    """FLOPs of one forward of a DiT with config `cfg` over `tokens` post-patch video tokens
    (config.seq_len) and `text_len` text tokens (default cfg.text_len), batch `batch`.

    A14B at 720p × 81 (75,600 tokens): 15.9 / 7.9 / 21.4 / 117 TFLOP per layer for q/k/v/o,
    cross q/o, FFN and self-attention; 6,523 TFLOP per forward.
    """
    B, L, D, F = batch, tokens, cfg.dim, cfg.ffn_dim
    T = cfg.text_len if text_len is None else text_len
    patch = math.prod(cfg.patch_size)
    return DiTFlops(
        layer_qkvo=4 * 2 * B * L * D * D,
        layer_cross_qo=2 * 2 * B * L * D * D,
        layer_cross_kv=2 * 2 * B * T * D * D,
        layer_ffn=2 * 2 * B * L * D * F,
        layer_self_attention=4 * B * L * L * D,
        layer_cross_attention=4 * B * L * T * D,
        embeddings=2 * B * L * D * cfg.in_channels * patch + 2 * B * T * (cfg.text_dim * D + D * D),
        head=2 * B * L * D * cfg.out_channels * patch,
        num_layers=cfg.num_layers,
    )
