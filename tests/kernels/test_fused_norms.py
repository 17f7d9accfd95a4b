"""rmsnorm_rope and layernorm_modulate (wan_rt.kernels.fused_norms) against fp64 references.

Tolerance policy as tests/kernels/test_rope3d_attention.py (fp32: 1e-4 relative L2 vs fp64;
fp16/bf16: ratio rule vs the eager composition in the same dtype, k = 2, bf16 k = 4 under the
interpreter, whose fp32→bf16 casts round toward zero: measured 3.1× for rmsnorm_rope).
"""

from __future__ import annotations

import pytest
import torch

from wan_rt.kernels import fused_norms
from wan_rt.kernels.fused_norms import (
    layernorm_modulate,
    layernorm_modulate_ref,
    rmsnorm_rope,
    rmsnorm_rope_ref,
)

from .conftest import GPU, INTERPRETING, needs_gpu, rel_err, wan_rope_tables

DEVICE = "cuda" if GPU else "cpu"
K_BF16 = 4.0 if INTERPRETING else 2.0
GRID = (3, 5, 7)


def _rand(*shape, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + offset).to(DEVICE)


@pytest.mark.parametrize("heads,head_dim", [(3, 32), (2, 64)])
def test_rmsnorm_rope_fp32_matches_fp64(heads, head_dim, spy_launches):
    """B = 2, L = 105 tokens (row tail), H·D = 96 (not a power of two) and 128."""
    counts = spy_launches(fused_norms, "_rmsnorm_rope_kernel")
    cos, sin = (t.to(DEVICE) for t in wan_rope_tables(GRID, head_dim))
    x = _rand(2, 105, heads, head_dim, seed=head_dim, scale=3.0, offset=1.0)
    w = _rand(heads * head_dim, seed=1)
    out = rmsnorm_rope(x, w, cos, sin, eps=1e-6)
    ref = rmsnorm_rope_ref(x.double(), w.double(), cos.double(), sin.double(), eps=1e-6)
    assert counts["_rmsnorm_rope_kernel"] == 1, "the Triton kernel must run (no torch fallback)"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= 1e-4


def test_rmsnorm_rope_strided_input():
    """q as a view of a packed [B, L, 2, H, D] projection output (token stride ≠ H·D)."""
    H, D = 2, 32
    cos, sin = (t.to(DEVICE) for t in wan_rope_tables(GRID, D))
    qk = _rand(1, 105, 2, H, D, seed=3)
    x = qk[:, :, 1]
    w = _rand(H * D, seed=4)
    ref = rmsnorm_rope_ref(x.double(), w.double(), cos.double(), sin.double())
    assert rel_err(rmsnorm_rope(x, w, cos, sin), ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_rope_lowp_ratio_rule(dtype):
    H, D = 2, 64
    cos, sin = (t.to(DEVICE) for t in wan_rope_tables(GRID, D))
    x = _rand(1, 105, H, D, seed=5, scale=3.0, offset=1.0).to(dtype)
    w = _rand(H * D, seed=6).to(dtype)
    ref = rmsnorm_rope_ref(x.double(), w.double(), cos.double(), sin.double())
    out = rmsnorm_rope(x, w, cos, sin)
    eager = rmsnorm_rope_ref(x, w, cos, sin)
    k_ratio = 2.0 if dtype == torch.float16 else K_BF16
    assert out.dtype == dtype
    assert rel_err(out, ref) <= k_ratio * rel_err(eager, ref)


@pytest.mark.parametrize("per_token", [False, True])
def test_layernorm_modulate_fp32_matches_fp64(per_token, spy_launches):
    """C = 48 (not a power of two); shift/scale per sample [B, 1, C] or per token [B, L, C]."""
    counts = spy_launches(fused_norms, "_layernorm_modulate_kernel")
    B, L, C = 2, 105, 48
    x = _rand(B, L, C, seed=7, scale=2.0, offset=0.5)
    shift = _rand(B, L if per_token else 1, C, seed=8)
    scale = _rand(B, L if per_token else 1, C, seed=9)
    out = layernorm_modulate(x, shift, scale, eps=1e-6)
    ref = layernorm_modulate_ref(x.double(), shift.double(), scale.double(), eps=1e-6)
    assert counts["_layernorm_modulate_kernel"] == 1
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_modulate_lowp_ratio_rule(dtype):
    """x in low precision, shift/scale in fp32 (as Wan keeps the modulation)."""
    B, L, C = 1, 105, 64
    x = _rand(B, L, C, seed=10, scale=2.0, offset=0.5).to(dtype)
    shift, scale = _rand(B, 1, C, seed=11), _rand(B, 1, C, seed=12)
    ref = layernorm_modulate_ref(x.double(), shift.double(), scale.double())
    out = layernorm_modulate(x, shift, scale)
    eager = layernorm_modulate_ref(x, shift, scale)
    k_ratio = 2.0 if dtype == torch.float16 else K_BF16
    assert rel_err(out, ref) <= k_ratio * rel_err(eager, ref)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("H", [40, 24])
def test_fused_norms_real_shapes_bf16_ratio_rule(H):
    """A14B (40×128) / TI2V-5B (24×128) widths over 32,760 tokens."""
    D, L = 128, 21 * 30 * 52
    cos, sin = (t.cuda() for t in wan_rope_tables((21, 30, 52), D))
    x = _rand(1, L, H, D, seed=13, scale=3.0).bfloat16()
    w = _rand(H * D, seed=14).bfloat16()
    ref = rmsnorm_rope_ref(x.double(), w.double(), cos.double(), sin.double())
    out, eager = rmsnorm_rope(x, w, cos, sin), rmsnorm_rope_ref(x, w, cos, sin)
    assert (out.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max()
    h = x.reshape(1, L, H * D)
    shift, scale = _rand(1, 1, H * D, seed=15), _rand(1, 1, H * D, seed=16)
    ref = layernorm_modulate_ref(h.double(), shift.double(), scale.double())
    out, eager = layernorm_modulate(h, shift, scale), layernorm_modulate_ref(h, shift, scale)
    assert (out.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max()
