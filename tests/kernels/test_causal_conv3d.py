"""causal_conv3d (wan_rt.kernels.causal_conv) against fp64 F.conv3d over cat(cache, x).

Tolerance policy as tests/kernels/test_rope3d_attention.py: fp32 within 1e-4 relative L2 of fp64;
fp16/bf16 by the ratio rule vs eager F.conv3d in the same dtype (k = 2; bf16 k = 4 under the
interpreter, whose fp32→bf16 casts round toward zero).
"""

from __future__ import annotations

import pytest
import torch

from wan_rt.kernels import causal_conv
from wan_rt.kernels.causal_conv import causal_conv3d, causal_conv3d_ref

from .conftest import GPU, INTERPRETING, needs_gpu, rel_err

DEVICE = "cuda" if GPU else "cpu"
K_BF16 = 4.0 if INTERPRETING else 2.0

# (C_in, C_out, kernel, H, W): odd H, W; C_in 5 takes the flattened-K path, 20 the per-tap path
# (two channel chunks, the second a tail)
CASES = {
    "flat-3x3x3": (5, 6, (3, 3, 3), 7, 9),
    "taps-3x3x3": (20, 6, (3, 3, 3), 3, 5),
    "flat-3x1x1": (5, 7, (3, 1, 1), 5, 3),
    "flat-1x1x1": (5, 6, (1, 1, 1), 3, 5),
}


def _make(case: str, T: int, dtype=torch.float32, seed: int = 0, bias: bool = True):
    c_in, c_out, (kt, kh, kw), H, W = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c_in, T, H, W, generator=g)
    w = torch.randn(c_out, c_in, kt, kh, kw, generator=g) / (c_in * kt * kh * kw) ** 0.5
    b = torch.randn(c_out, generator=g) if bias else None
    cache = torch.randn(1, c_in, kt - 1, H, W, generator=g)
    conv = (lambda t: None if t is None else t.to(DEVICE, dtype))
    return conv(x), conv(w), conv(b), conv(cache)


def _fp64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_cache", [False, True])
def test_causal_conv3d_fp32_matches_fp64(case, with_cache, spy_launches):
    counts = spy_launches(causal_conv, "_causal_conv3d_kernel")
    x, w, b, cache = _make(case, T=3, bias=case != "flat-3x1x1")
    cache = cache if with_cache else None
    y, new_cache = causal_conv3d(x, w, b, cache)
    y_ref, cache_ref = causal_conv3d_ref(_fp64(x), _fp64(w), _fp64(b), _fp64(cache))
    assert counts["_causal_conv3d_kernel"] == 1, "the Triton kernel must run (no torch fallback)"
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) <= 1e-4
    assert new_cache.shape == cache_ref.shape
    assert torch.equal(new_cache.double(), cache_ref)


@pytest.mark.skipif(not INTERPRETING, reason="on a GPU the fp32 tests here autotune among these tiles themselves")
@pytest.mark.parametrize("tiles", sorted({tiles for tiles, _, _ in causal_conv.FP32_CONFIGS}))
def test_causal_conv3d_fp32_gpu_tiles_match_fp64(tiles, monkeypatch):
    """The tiles fp32 launches take on a GPU (FP32_CONFIGS, small enough not to spill), run in the
    interpreter: taps unrolled (a channel tail) and K flattened, with a cache."""
    block_m, block_n, block_k = tiles
    monkeypatch.setattr(causal_conv, "_conv_config", lambda c_in, c_out: dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FLAT_K=c_in < 16, num_warps=4, num_stages=1))
    for case in ("taps-3x3x3", "flat-3x3x3"):
        x, w, b, cache = _make(case, T=2, seed=5)
        y, _ = causal_conv3d(x, w, b, cache)
        assert rel_err(y, causal_conv3d_ref(_fp64(x), _fp64(w), _fp64(b), _fp64(cache))[0]) <= 1e-4, case


@pytest.mark.parametrize("case", ["flat-3x3x3", "taps-3x3x3"])
def test_causal_conv3d_chunked_equals_full(case):
    """Wan's chunking (1 frame, then 4, 4) with the returned cache equals one call on 9 frames."""
    x, w, b, _ = _make(case, T=9, seed=1)
    y_full, cache_full = causal_conv3d(x, w, b)
    ys, cache = [], None
    for t0, t1 in ((0, 1), (1, 5), (5, 9)):
        y, cache = causal_conv3d(x[:, :, t0:t1], w, b, cache)
        ys.append(y)
        # after a 1-frame chunk the cache is [zeros, frame 0]: last kt-1 frames of cat(cache, x)
        if t1 == 1:
            assert torch.equal(cache[:, :, 0], torch.zeros_like(cache[:, :, 0]))
            assert torch.equal(cache[:, :, 1], x[:, :, 0])
    assert torch.equal(torch.cat(ys, dim=2), y_full)
    assert torch.equal(cache, cache_full)
    y_ref, _ = causal_conv3d_ref(_fp64(x), _fp64(w), _fp64(b))
    assert rel_err(y_full, y_ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_causal_conv3d_lowp_ratio_rule(dtype):
    x, w, b, cache = _make("flat-3x3x3", T=3, seed=2)
    y_ref, _ = causal_conv3d_ref(_fp64(x), _fp64(w), _fp64(b), _fp64(cache))
    lp = [t.to(dtype) for t in (x, w, b, cache)]
    y, _ = causal_conv3d(*lp)
    if dtype == torch.float16 and not GPU:
        # CPU F.conv3d has no fp16 kernel: the eager baseline is fp16 data, fp32 compute, fp16 out
        eager = causal_conv3d_ref(*[t.float() for t in lp])[0].to(dtype)
    else:
        eager = causal_conv3d_ref(*lp)[0]
    k_ratio = 2.0 if dtype == torch.float16 else K_BF16
    assert y.dtype == dtype
    assert rel_err(y, y_ref) <= k_ratio * rel_err(eager, y_ref)


def test_causal_conv3d_rejects_bad_cache():
    x, w, b, cache = _make("flat-3x3x3", T=3)
    with pytest.raises(AssertionError, match="cache"):
        causal_conv3d(x, w, b, cache[:, :, :1])


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,H,W", [(384, 384, 60, 104), (96, 96, 240, 416), (16, 384, 60, 104)])
def test_causal_conv3d_real_shapes_bf16_ratio_rule(c_in, c_out, H, W):
    """Wan2.1 VAE decoder convs at 480p (latent 60×104): a steady-state 4-frame chunk with cache."""
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference must be fp32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, 4, H, W, generator=g).cuda()
    w = (torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5).cuda()
    b = torch.randn(c_out, generator=g).cuda()
    cache = torch.randn(1, c_in, 2, H, W, generator=g).cuda()
    y_ref, _ = causal_conv3d_ref(x, w, b, cache)
    lp = [t.bfloat16() for t in (x, w, b, cache)]
    y, new_cache = causal_conv3d(*lp)
    eager, _ = causal_conv3d_ref(*lp)
    assert (y.float() - y_ref).abs().max() <= 2 * (eager.float() - y_ref).abs().max()
    assert torch.equal(new_cache, lp[0][:, :, -2:])
