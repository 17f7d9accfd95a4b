"""The Wan 2.2 diffusion transformer (DiT) as one pure, exportable nn.Module.

Mirrors Wan2.2 `wan/modules/model.py: WanModel` and diffusers
`models/transformers/transformer_wan.py: WanTransformer3DModel` (the numerical oracle in tests).
Parameter names are diffusers' state_dict keys, so a diffusers checkpoint loads with
`load_state_dict(strict=True)`. What differs from diffusers, and why:

* RoPE tables are computed from the token grid in `forward` (float32, real form, no buffers), so
  they are never in a checkpoint and the exported graph needs no complex or float64 ops.
* Attention and the blocks' LayerNorm + modulation go through `self.ops` (`wan_rt.models.ops`),
  so Triton / fused kernels are swapped in from outside with `set_ops`; so do the two points
  where sequence parallelism splits and gathers the tokens (the identity here).
* The timestep MLP and the 6-way modulation run once per distinct timestep value (per sample,
  or per latent frame for TI2V), never per token: at TI2V 720p a per-token e0 is ~2 GB fp32.
* Wan 2.1 image cross-attention (CLIP tokens, `add_k_proj`) is not a Wan 2.2 feature; not here.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_rt.config import DiTConfig
from wan_rt.models.ops import EAGER_OPS, Ops

# Parameters that stay float32 when the rest of the model is cast to bf16/fp16: diffusers'
# `_keep_in_fp32_modules`, minus the entries that own no parameters here (rope, norm1, norm3).
# Matched against the dot-separated parts of a parameter name, as diffusers' loader does.
KEEP_IN_FP32 = ("time_embedder", "scale_shift_table", "norm2")


def cast_dit(model: nn.Module, dtype: torch.dtype, keep_stored: Sequence[str] = ()) -> nn.Module:
    """Cast parameters to `dtype`, except those named in `KEEP_IN_FP32` (diffusers' policy) and
    those in `keep_stored` (left as they are: a runtime casts them on use)."""
    skip = set(keep_stored)
    for name, param in model.named_parameters():
        if name in skip:
            continue
        keep = any(part in KEEP_IN_FP32 for part in name.split("."))
        param.data = param.data.to(torch.float32 if keep else dtype)
    return model


# --------------------------------------------------------------------------------------------
# Positional and timestep encodings (plain functions: the Triton kernels and export reuse them)
# --------------------------------------------------------------------------------------------

def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to (frame, height, width): 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=None)
def _split_freqs(dim: int, theta: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-axis RoPE frequencies theta^(-2j/dim), each split as hi + lo in Python (double) math.

    hi keeps 12 significant bits, so `pos * hi` is exact in float32 for integer pos < 4096, and
    lo carries the rest. float32 tables then match diffusers' float64-built ones (~1e-7) even at
    position 1023, where a plain float32 `pos * freq` would be off by ~1e-4 rad.
    """
    hi, lo = [], []
    for j in range(dim // 2):
        freq = theta ** (-2 * j / dim)
        mantissa, exponent = math.frexp(freq)
        freq_hi = math.ldexp(round(mantissa * 4096), exponent - 12)
        hi.append(freq_hi)
        lo.append(freq - freq_hi)
    return tuple(hi), tuple(lo)


def rope_tables(config: DiTConfig, grid: Sequence[int | Tensor], device: torch.device | str | None = None,
                theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin: float32 [L, head_dim/2] for a (f, h, w) token grid, L = f*h*w in (f, h, w) order.

    Column block per axis: frame, then height, then width (spec §2.3); column j rotates the
    interleaved pair (x[2j], x[2j+1]) as `ops.apply_rope` expects. Grid entries may be ints,
    SymInts or 0-d tensors (export). Positions are post-patch grid indices from 0.
    """
    # arange accepts 0-d tensors at runtime; torch's stubs only declare numbers.
    pos = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]  # type: ignore[arg-type]
    f, h, w = (p.shape[0] for p in pos)  # ints/SymInts even when the grid came as tensors
    cos_parts, sin_parts = [], []
    for axis, (p, dim) in enumerate(zip(pos, rope_axis_dims(config.head_dim))):
        hi, lo = _split_freqs(dim, theta)
        a_hi = p[:, None] * torch.tensor(hi, dtype=torch.float32, device=device)  # exact
        a_lo = p[:, None] * torch.tensor(lo, dtype=torch.float32, device=device)  # small: rounding tiny
        # cos/sin(a_hi + a_lo) by the angle-addition formulas: no float64 needed.
        cos = a_hi.cos() * a_lo.cos() - a_hi.sin() * a_lo.sin()
        sin = a_hi.sin() * a_lo.cos() + a_hi.cos() * a_lo.sin()
        view = [1, 1, 1, -1]
        view[axis] = p.shape[0]
        cos_parts.append(cos.view(view).expand(f, h, w, -1))
        sin_parts.append(sin.view(view).expand(f, h, w, -1))
    return torch.cat(cos_parts, -1).flatten(0, 2), torch.cat(sin_parts, -1).flatten(0, 2)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoid [..., dim] = [cos(t*f_k), sin(t*f_k)], f_k = max_period^(-k/(dim/2)); float32.

    Same float32 op order as diffusers' `get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)`, so results match it bit for bit. (Official Wan uses float64; the
    difference is ~1e-5 at t≈1000, well below bf16 resolution.)
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[..., None] * exponent.exp()
    return torch.cat([args.cos(), args.sin()], dim=-1)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input/weight dtype; returns float32."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads jointly, Wan's "across heads" qk-norm), in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))

    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B, n] -> e [B, n, D] (head modulation), e0 [B, n, 6, D] (block modulation); float32."""
        e = self.time_embedder(timestep_embedding(t, self.freq_dim)).float()
        e0 = self.time_proj(F.silu(e).to(self.time_proj.weight.dtype)).float()
        return e, e0.reshape(*e0.shape[:-1], 6, -1)  # not unflatten: see WanDiT.forward, step 2


class Attention(nn.Module):
    """Self-attention with 3D RoPE (`rope` given) or text cross-attention (`context` given)."""

    def __init__(self, cfg: DiTConfig, ops: Ops):
        super().__init__()
        self.heads = cfg.num_heads
        self.ops = ops  # swapped by `set_ops`
        self.to_q = nn.Linear(cfg.dim, cfg.dim)
        self.to_k = nn.Linear(cfg.dim, cfg.dim)
        self.to_v = nn.Linear(cfg.dim, cfg.dim)
        self.to_out = nn.ModuleList([nn.Linear(cfg.dim, cfg.dim)])  # key `to_out.0`, as diffusers
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def text_kv(self, context: Tensor) -> Tensor:
        """Cross-attention keys and values of the embedded text, [2, B, L_txt, D]. They depend
        only on the prompt and the expert, so a runtime can compute them once per prompt."""
        return torch.stack((self.norm_k(self.to_k(context)), self.to_v(context)))

    def forward(self, x: Tensor, context: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None, kv: Tensor | None = None) -> Tensor:
        """x [B, L, D]; context [B, L_txt, D] or its precomputed `kv` [2, B, L_txt, D] for
        cross-attention; neither for self-attention -> [B, L, D]. Heads split after the qk-norm."""
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))  # [B, L, H, Dh]
        if kv is None:
            src = x if context is None else context
            k, v = self.norm_k(self.to_k(src)), self.to_v(src)
        else:
            k, v = kv[0], kv[1]
        k = k.unflatten(-1, (self.heads, -1))
        v = v.unflatten(-1, (self.heads, -1))
        if rope is None:
            out = self.ops.attention(q, k, v)
        else:
            out = self.ops.rope_attention(q, k, v, *rope)
        return self.to_out[0](out.flatten(2))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        # Index 1 is diffusers' (parameter-free) dropout; kept so the keys are net.0 / net.2.
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift. x [B, L, D]; shift, scale [B, n, D], row i covering the i-th
    run of L/n tokens (n = 1: every token; n = F: one latent frame each)."""
    x = x.unflatten(1, (shift.shape[1], -1))  # [B, n, L/n, D]
    return (x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def _gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + y * gate, added in float32 and stored in x's dtype (diffusers). gate as `_modulate`."""
    n = gate.shape[1]
    out = x.float().unflatten(1, (n, -1)) + y.float().unflatten(1, (n, -1)) * gate.unsqueeze(2)
    return out.flatten(1, 2).to(x.dtype)


class PatchEmbed(nn.Conv3d):
    """The patchify Conv3d (kernel == stride), computed as what it is: one linear map per patch.

    Same parameters as nn.Conv3d (key `patch_embedding.weight` [D, C, pt, ph, pw]); written as
    reshape + linear so exported graphs need no Conv, which ONNX has in bf16 only from opset 22
    (TensorRT's bf16 engines are built from these graphs). Returns tokens [B, f*h*w, D].
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        b, c = x.shape[0], x.shape[1]
        pt, ph, pw = self.kernel_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        patches = x.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return F.linear(patches.reshape(b, f * h * w, c * pt * ph * pw), self.weight.flatten(1), self.bias)


class Block(nn.Module):
    """Wan attention block (official `WanAttentionBlock`, diffusers `WanTransformerBlock`)."""

    def __init__(self, cfg: DiTConfig, ops: Ops):
        super().__init__()
        self.ops = ops  # swapped by `set_ops`: the fused norm + modulation (layernorm_modulate)
        self.norm1 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(cfg, ops)
        self.norm2 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=True)  # official `norm3`
        self.attn2 = Attention(cfg, ops)
        self.norm3 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, context: Tensor | None, e0: Tensor, rope: tuple[Tensor, Tensor],
                text_kv: Tensor | None = None) -> Tensor:
        """x [B, L, D]; context [B, L_txt, D] (or its `text_kv` [2, B, L_txt, D]); e0 [B, n, 6, D]
        float32 (n divides L)."""
        dtype = x.dtype
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (
            self.scale_shift_table.float() + e0).unbind(2)  # each [B, n, D]

        # 1. Self-attention, modulated and gated
        h = self.ops.layernorm_modulate(x, shift_msa, scale_msa, self.norm1)  # = _modulate(norm1(x), ...)
        x = _gated_add(x, self.attn1(h, rope=rope), gate_msa)

        # 2. Cross-attention on the text: neither modulated nor gated
        x = x + self.attn2(self.norm2(x).to(dtype), context=context, kv=text_kv)

        # 3. Feed-forward, modulated and gated
        h = self.ops.layernorm_modulate(x, shift_ffn, scale_ffn, self.norm3)
        return _gated_add(x, self.ffn(h), gate_ffn)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class WanDiT(nn.Module):
    """Wan 2.2 DiT: latents [B, C_in, F, H, W] -> flow prediction [B, C_out, F, H, W].

    Compute dtype is the parameters' dtype (x and context are cast to it); the output comes back
    in x's dtype. Norms, modulation and residual adds run in float32 (diffusers' policy; see
    `KEEP_IN_FP32` / `cast_dit` for which parameters stay float32 in a bf16 model).

    timestep: [B] (T2V / I2V), or per-token [B, L] with L = f*h*w post-patch tokens (TI2V).
    A per-token timestep is ASSUMED CONSTANT WITHIN EACH LATENT FRAME, as Wan builds it (0 on a
    clean first frame, t elsewhere): only the first token of each frame is read, the MLP runs on
    [B, f] values and the modulation is broadcast over each frame's tokens. For such inputs the
    result equals diffusers' per-token computation.
    """

    def __init__(self, config: DiTConfig, ops: Ops = EAGER_OPS):
        super().__init__()
        self.config = config
        self.ops = ops  # swapped by `set_ops`: the token split / gather points
        d = config.dim
        self.patch_embedding = PatchEmbed(config.in_channels, d, config.patch_size, stride=config.patch_size)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([Block(config, ops) for _ in range(config.num_layers)])
        self.norm_out = LayerNorm32(d, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(d, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def encode_text(self, context: Tensor) -> Tensor:
        """context [B, L_txt, text_dim] -> every block's cross-attention K and V,
        [num_layers, 2, B, L_txt, D]: the same for every denoising step of a prompt."""
        embedded = self.condition_embedder.text_embedder(context.to(self.patch_embedding.weight.dtype))
        return torch.stack([block.attn2.text_kv(embedded) for block in self.blocks])

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor | None = None,
                text_kv: Tensor | None = None) -> Tensor:
        """x [B, C_in, F, H, W]; timestep [B] or [B, L]; context [B, L_txt, text_dim], or instead
        text_kv = encode_text(context) (same result; lets a runtime reuse it across steps)."""
        hidden, e, e0 = self.embed(x, timestep)
        grid = self.token_grid(x)
        if text_kv is None:
            assert context is not None, "WanDiT needs context or text_kv"
            context = self.condition_embedder.text_embedder(context)  # [B, L_txt, D]
        # The blocks run on the tokens this forward computes (all, unless a runtime split them:
        # RoPE tables stay the full sequence's, attention ops see local q/k/v); head gathers.
        hidden, e, e0 = self.ops.split_tokens(hidden, e, e0)
        hidden = self.run_blocks(hidden, e0, grid, context=context, text_kv=text_kv)
        return self.head(hidden, e, grid).to(x.dtype)

    # The pieces of `forward`, also run one by one (a step cache decides between them; the
    # graphs in wan_rt.runtime.graphs wrap them). Same ops in the same order as forward; the
    # token split of sequence parallelism is forward's only (step caches run unsplit).
    def token_grid(self, x: Tensor) -> tuple[int, int, int]:
        """(f, h, w) post-patch tokens of latents x [B, C, F, H, W]."""
        pt, ph, pw = self.config.patch_size
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw

    def embed(self, x: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> tokens [B, L, D] (compute dtype), e [B, n, D] and e0 [B, n, 6, D] (float32; n = 1, or
        F for a per-token timestep)."""
        # 1. Patch embedding: [B, C_in, F, H, W] -> tokens [B, L, D], L = f*h*w in (f, h, w) order
        hidden = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        # 2. Condition embeddings: one modulation row per distinct timestep (n = 1 or f)
        if timestep.ndim == 2:
            # [B, L] -> [B, f]: first token per frame. reshape, not unflatten: the TorchScript ONNX
            # exporter gives unflatten's output a static shape, which froze f at the export size.
            t = timestep.reshape(timestep.shape[0], self.token_grid(x)[0], -1)[:, :, 0]
        else:
            t = timestep[:, None]  # [B] -> [B, 1]
        e, e0 = self.condition_embedder.embed_time(t)  # [B, n, D], [B, n, 6, D]
        return hidden, e, e0

    def run_blocks(self, hidden: Tensor, e0: Tensor, grid: tuple[int, int, int], *, context: Tensor | None = None,
                   text_kv: Tensor | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        """3. Blocks start..stop-1 on tokens [B, L, D] of a (f, h, w) grid; context [B, L_txt, D]
        (embedded) or every block's text_kv [num_layers, 2, B, L_txt, D]."""
        dtype = self.patch_embedding.weight.dtype
        rope = rope_tables(self.config, grid, hidden.device)  # 2 x [L, Dh/2] float32
        for i in range(start, len(self.blocks) if stop is None else stop):
            hidden = self.blocks[i](hidden, context, e0, rope, None if text_kv is None else text_kv[i].to(dtype))
        return hidden

    def head(self, hidden: Tensor, e: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """4. Output norm, modulation (from e, not e0) and projection; 5. unpatchify to
        [B, C_out, F, H, W] (compute dtype)."""
        dtype = self.patch_embedding.weight.dtype
        shift, scale = (self.scale_shift_table.float() + e.unsqueeze(2)).unbind(2)  # [B, n, D]
        hidden = _modulate(self.norm_out(hidden), shift, scale).to(dtype)
        f, h, w = grid
        hidden = self.ops.gather_tokens(self.proj_out(hidden), f * h * w)  # [B, L, pt*ph*pw*C_out]
        # Unpatchify: feature index ((p*ph + q)*pw + r)*C_out + c -> [B, C_out, F, H, W]
        pt, ph, pw = self.config.patch_size
        hidden = hidden.reshape(hidden.shape[0], f, h, w, pt, ph, pw, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
