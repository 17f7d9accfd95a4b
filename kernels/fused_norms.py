"""Small fused memory-bound kernels of the Wan DiT block: one read and one write per tensor.

* `rmsnorm_rope`: the q/k path between the projection and attention — RMSNorm over the full
  model dim (all heads jointly), weight, then Wan's interleaved 3D RoPE (mirrors Wan2.2
  `wan/modules/model.py:WanRMSNorm` + `rope_apply`; spec §2.3–2.4). Eager: 3–4 passes.
* `layernorm_modulate`: LN(x)·(1 + scale) + shift with LN without affine, eps 1e-6 (the
  `norm1` / `norm2` + modulation of a block and the head; spec §2.2, §2.4). Eager: 3 passes.

Both compute in fp32 and reproduce the eager roundings (RMSNorm is cast back to x's dtype before
the weight, as Wan does) so bf16 results sit next to the eager bf16 ones.

Shape glossary: B batch, L tokens, H heads, D head_dim, C = H·D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .targets import Variant, runtime_signature
from ._util import check_device, interpreting, next_pow2, on_device

# ---------------------------------------------------------------------------------------------
# 1. Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rmsnorm_rope_kernel(
    X,  # pointer to x [B, L, H, D]; each token's H·D values contiguous
    Wt,  # pointer to the RMSNorm weight [H·D]
    Cos,  # pointer to the float32 cos table [L, D/2]
    Sin,  # pointer to the float32 sin table [L, D/2]
    Y,  # pointer to the output [B, L, H, D] (contiguous), dtype of x
    stride_xb, stride_xl,  # strides of x over B, L (elements)
    stride_cl,  # row stride of cos/sin
    L,  # tokens per batch item
    n_rows,  # B·L
    eps,  # RMSNorm epsilon
    N: tl.constexpr,  # H·D, the normalized width
    HALF_D: tl.constexpr,  # D / 2, pairs per head
    BLOCK_R: tl.constexpr,  # tokens per program
    BLOCK_C: tl.constexpr,  # N rounded up to a power of two
    ROUND_AFTER_WEIGHT: tl.constexpr,  # weight has x's dtype: round norm·weight to it (torch does)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    b = (rows // L).to(tl.int64)
    pos = rows % L
    offs_c = tl.arange(0, BLOCK_C)
    mask = mask_r[:, None] & (offs_c < N)[None, :]

    # 1. RMSNorm over the whole row, in fp32, cast back to x's dtype, times the weight.
    x = tl.load(X + (b * stride_xb + pos * stride_xl)[:, None] + offs_c[None, :], mask=mask, other=0.0)
    x_f = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x_f * x_f, 1) / N + eps)
    y = (x_f * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(Wt + offs_c, mask=offs_c < N, other=0.0).to(tl.float32)
    y = y * w[None, :]
    if ROUND_AFTER_WEIGHT:
        y = y.to(X.dtype.element_ty).to(tl.float32)

    # 2. RoPE: pair p of the row is pair p % (D/2) of its head.
    y_even, y_odd = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_C // 2, 2)))
    offs_p = tl.arange(0, BLOCK_C // 2)
    cs_ptrs = pos[:, None] * stride_cl + (offs_p % HALF_D)[None, :]
    cs_mask = mask_r[:, None] & (offs_p < N // 2)[None, :]
    cos = tl.load(Cos + cs_ptrs, mask=cs_mask, other=1.0)
    sin = tl.load(Sin + cs_ptrs, mask=cs_mask, other=0.0)
    out = tl.reshape(tl.join(y_even * cos - y_odd * sin, y_even * sin + y_odd * cos), (BLOCK_R, BLOCK_C))
    tl.store(Y + rows.to(tl.int64)[:, None] * N + offs_c[None, :], out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_modulate_kernel(
    X,  # pointer to x [B, L, C]; the C values contiguous
    Shift,  # pointer to shift, broadcast to [B, L, C] (stride 0 over L when per-sample)
    Scale,  # pointer to scale, broadcast like Shift
    Y,  # pointer to the output [B, L, C] (contiguous), dtype of x
    stride_xb, stride_xl,  # strides of x over B, L (elements)
    stride_shb, stride_shl,  # strides of shift over B, L (0 where broadcast)
    stride_scb, stride_scl,  # strides of scale over B, L (0 where broadcast)
    L,  # tokens per batch item
    n_rows,  # B·L
    eps,  # LayerNorm epsilon
    C: tl.constexpr,  # normalized width
    BLOCK_R: tl.constexpr,  # tokens per program
    BLOCK_C: tl.constexpr,  # C rounded up to a power of two
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    b = (rows // L).to(tl.int64)
    pos = (rows % L).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask = mask_r[:, None] & (offs_c < C)[None, :]

    x = tl.load(X + (b * stride_xb + pos * stride_xl)[:, None] + offs_c[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, 1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    shift = tl.load(Shift + (b * stride_shb + pos * stride_shl)[:, None] + offs_c[None, :], mask=mask, other=0.0)
    scale = tl.load(Scale + (b * stride_scb + pos * stride_scl)[:, None] + offs_c[None, :], mask=mask, other=0.0)
    y = xc * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(Y + rows.to(tl.int64)[:, None] * C + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# 2. Launchers
# ---------------------------------------------------------------------------------------------


def _row_config(width: int, interpreter: bool | None = None) -> dict[str, int]:
    """One row per program on the GPU (warps from the row width, as the Triton LayerNorm
    tutorial); several rows per program in the interpreter, where each op costs the same
    whatever its size."""
    block_c = next_pow2(width)
    if interpreting() if interpreter is None else interpreter:
        return dict(BLOCK_R=16, BLOCK_C=block_c, num_warps=4)
    return dict(BLOCK_R=1, BLOCK_C=block_c, num_warps=min(max(block_c // 256, 1), 8))


def aot_variants() -> list[Variant]:
    """What tests/kernels/test_aot_targets.py and bench/aot_targets.py compile for every target:
    both kernels at the A14B width (5120 = 40 heads x 128), bf16, in their one GPU config."""
    cfg = _row_config(5120, interpreter=False)
    tiles = dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
    rms = runtime_signature(_rmsnorm_rope_kernel, X="*bf16", Wt="*bf16", Cos="*fp32", Sin="*fp32", Y="*bf16", eps="fp32")
    ln = runtime_signature(_layernorm_modulate_kernel, X="*bf16", Shift="*bf16", Scale="*bf16", Y="*bf16", eps="fp32")
    return [Variant("rmsnorm_rope", _rmsnorm_rope_kernel, rms, dict(N=5120, HALF_D=64, ROUND_AFTER_WEIGHT=True),
                    [(tiles, cfg["num_warps"], 3)]),
            Variant("layernorm_modulate", _layernorm_modulate_kernel, ln, dict(C=5120), [(tiles, cfg["num_warps"], 3)])]


def _launch_rmsnorm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    B, L, H, D = x.shape
    if not (x.stride(3) == 1 and x.stride(2) == D):
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    weight = weight.contiguous()
    y = torch.empty(B, L, H, D, device=x.device, dtype=x.dtype)
    cfg = _row_config(H * D)
    grid = (triton.cdiv(B * L, cfg["BLOCK_R"]),)
    with on_device(x):
        _rmsnorm_rope_kernel[grid](
            x, weight, cos, sin, y,
            x.stride(0), x.stride(1), cos.stride(0),
            L, B * L, eps,
            N=H * D, HALF_D=D // 2, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
            ROUND_AFTER_WEIGHT=weight.dtype == x.dtype, num_warps=cfg["num_warps"],
        )
    return y


def _launch_layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    B, L, C = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    shift = shift.expand(B, L, C)
    scale = scale.expand(B, L, C)
    if shift.stride(2) != 1:
        shift = shift.contiguous()
    if scale.stride(2) != 1:
        scale = scale.contiguous()
    y = torch.empty(B, L, C, device=x.device, dtype=x.dtype)
    cfg = _row_config(C)
    grid = (triton.cdiv(B * L, cfg["BLOCK_R"]),)
    with on_device(x):
        _layernorm_modulate_kernel[grid](
            x, shift, scale, y,
            x.stride(0), x.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
            L, B * L, eps,
            C=C, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        )
    return y


# ---------------------------------------------------------------------------------------------
# 3. Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("wan_rt::rmsnorm_rope", mutates_args=())
def _rmsnorm_rope_op(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    return _launch_rmsnorm_rope(x, weight, cos, sin, eps)


@_rmsnorm_rope_op.register_fake
def _(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("wan_rt::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _launch_layernorm_modulate(x, shift, scale, eps)


@_layernorm_modulate_op.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# 4. Public wrappers
# ---------------------------------------------------------------------------------------------


def rmsnorm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm across all heads, times weight, then Wan's interleaved 3D RoPE, in one pass.

    x: [B, L, H, D] (bf16 / fp16 / fp32; each token's H·D values contiguous, as a reshaped
    projection output is); weight: [H·D]; cos, sin: float32 [L, D/2]. Returns a contiguous
    [B, L, H, D] in x's dtype: rope((x·rsqrt(mean(x²) + eps)).type_as(x) · weight).
    """
    assert x.dim() == 4, "x must be [B, L, H, D]"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}"
    B, L, H, D = x.shape
    assert D % 2 == 0, f"head_dim must be even, got {D}"
    assert weight.shape == (H * D,), f"weight must be [H·D] = [{H * D}], got {tuple(weight.shape)}"
    assert cos.shape == (L, D // 2) and sin.shape == (L, D // 2), \
        f"cos/sin must be [L, D/2] = [{L}, {D // 2}], got {tuple(cos.shape)} / {tuple(sin.shape)}"
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos/sin must be float32"
    check_device(x, weight, cos, sin)
    return torch.ops.wan_rt.rmsnorm_rope(x, weight, cos, sin, float(eps))


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LN(x)·(1 + scale) + shift, LayerNorm without affine, computed in fp32, in one pass.

    x: [B, L, C] (bf16 / fp16 / fp32); shift, scale: [B, 1, C] (per sample) or [B, L, C]
    (per token, TI2V), any float dtype (Wan keeps them fp32). Returns [B, L, C] in x's dtype.
    """
    assert x.dim() == 3, "x must be [B, L, C]"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}"
    B, L, C = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        assert t.dim() == 3 and t.shape[0] == B and t.shape[1] in (1, L) and t.shape[2] == C, \
            f"{name} must be [B, 1, C] or [B, L, C] = [{B}, 1|{L}, {C}], got {tuple(t.shape)}"
    check_device(x, shift, scale)
    return torch.ops.wan_rt.layernorm_modulate(x, shift, scale, float(eps))


# ---------------------------------------------------------------------------------------------
# 5. Pure-torch references
# ---------------------------------------------------------------------------------------------


def rmsnorm_rope_ref(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float = 1e-6) -> Tensor:
    """Eager composition (pass float64 tensors for an oracle): norm in ≥fp32, cast back, weight,
    rotate in ≥fp32, return x's dtype."""
    B, L, H, D = x.shape
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c = x.reshape(B, L, H * D).to(compute)
    n = (x_c * torch.rsqrt(x_c.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (n * weight).reshape(B, L, H, D).to(compute)
    c = cos.to(compute)[None, :, None, :]
    s = sin.to(compute)[None, :, None, :]
    y_even, y_odd = y[..., 0::2], y[..., 1::2]
    out = torch.stack((y_even * c - y_odd * s, y_even * s + y_odd * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def layernorm_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """F.layer_norm in ≥fp32 (pass float64 for an oracle), modulated, returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    n = F.layer_norm(x.to(compute), (x.shape[-1],), eps=eps)
    return (n * (1 + scale.to(compute)) + shift.to(compute)).to(x.dtype)
