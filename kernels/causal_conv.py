"""Causal 3D convolution with an explicit time cache, as a direct (implicit-GEMM) Triton kernel.

Mirrors Wan2.2 `wan/modules/vae2_1.py:CausalConv3d` + the `feat_cache` protocol (spec §4.1, §4.4),
with the cache made explicit: time is padded causally with `cache` (the previous chunk's last
kt−1 *input* frames; zeros on the first chunk), space with same-padding (kh//2, kw//2), and the
call returns the cache for the next chunk. Chunked calls (1 frame, then chunks of 4) therefore
equal one call over the whole video. Stride 1 only (the VAE's strided `time_conv` is not covered).

The GEMM view: M = output positions of one (b, t) frame, N = C_out, K = C_in·kt·kh·kw. Each
program owns a [BLOCK_M positions × BLOCK_N out-channels] tile of one frame and walks the taps
(unrolled) and C_in (in BLOCK_K chunks); for small C_in (the RGB / latent input convs) it walks
one flattened (tap, channel) K axis instead (constexpr FLAT_K). A tap whose input frame lies before the chunk reads the
cache instead of x (a pointer select), so neither cat(cache, x) nor a padded copy is built.

Shape glossary: B batch, C channels, T frames, H, W height, width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._jit import dot_f32, dot_precision, mma
from .targets import Variant, element_size, pruner, runtime_signature
from ._util import check_device, interpreting, on_device

# ---------------------------------------------------------------------------------------------
# 1. Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _causal_conv3d_kernel(
    X,  # pointer to the input chunk x [B, C_in, T, H, W]
    Cache,  # pointer to the previous chunk's last KT-1 input frames [B, C_in, KT-1, H, W] (HAS_CACHE)
    Wt,  # pointer to the weight, permuted to [KT, KH, KW, C_in, C_out] and contiguous
    Bias,  # pointer to the bias [C_out] (HAS_BIAS)
    Y,  # pointer to the output [B, C_out, T, H, W]
    stride_xb, stride_xc, stride_xt, stride_xh,  # strides of x (elements); W is contiguous
    stride_cb, stride_cc, stride_ct, stride_ch,  # strides of the cache; W is contiguous
    stride_yb, stride_yc, stride_yt, stride_yh,  # strides of y; W is contiguous
    C_in,  # input channels
    C_out,  # output channels
    T,  # frames in this chunk (= output frames)
    H,  # height
    W,  # width
    KT: tl.constexpr,  # kernel size in time (causal)
    KH: tl.constexpr,  # kernel size in height (odd, same-padded)
    KW: tl.constexpr,  # kernel size in width (odd, same-padded)
    HAS_CACHE: tl.constexpr,  # False: frames before the chunk are zeros (first chunk)
    HAS_BIAS: tl.constexpr,  # add Bias
    FLAT_K: tl.constexpr,  # flatten (taps × C_in) into one K axis (small C_in) instead of unrolling taps
    BLOCK_M: tl.constexpr,  # output positions (h·W + w) per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels (FLAT_K: flattened tap·channel entries) per dot
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32" otherwise (ignored)
    DOT_F32: tl.constexpr,  # widen bf16 tiles to fp32 for the dots (interpreter only, _jit.dot_f32)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bt = tl.program_id(2)
    b = (pid_bt // T).to(tl.int64)
    t = pid_bt % T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < H * W
    mask_n = offs_n < C_out
    oh = offs_m // W
    ow = offs_m % W

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_batch = X + b * stride_xb
    c_batch = Cache + b * stride_cb
    if FLAT_K:
        # 1a. Small C_in (the RGB/latent input convs): one flattened K = (dt, dh, dw, c) axis, so
        #     a BLOCK_K chunk spans several taps instead of padding C_in up to BLOCK_K per tap.
        K_total = KT * KH * KW * C_in
        for k0 in range(0, K_total, BLOCK_K):
            offs_kk = k0 + offs_k
            mask_k = offs_kk < K_total
            c = offs_kk % C_in
            tap = offs_kk // C_in
            dw = tap % KW
            dh = (tap // KW) % KH
            t_in = t + tap // (KW * KH) - (KT - 1)  # [BLOCK_K]
            ih = oh[:, None] + (dh - KH // 2)[None, :]
            iw = ow[:, None] + (dw - KW // 2)[None, :]
            mask = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_ptrs = x_batch + (c * stride_xc + tl.maximum(t_in, 0) * stride_xt)[None, :] + ih * stride_xh + iw
            if HAS_CACHE:
                c_ptrs = c_batch + (c * stride_cc + tl.maximum(KT - 1 + t_in, 0) * stride_ct)[None, :] \
                    + ih * stride_ch + iw
                a_ptrs = tl.where((t_in >= 0)[None, :], x_ptrs, c_ptrs)
            else:
                mask = mask & (t_in >= 0)[None, :]  # zero time padding
                a_ptrs = x_ptrs
            a = tl.load(a_ptrs, mask=mask, other=0.0)
            w = tl.load(Wt + offs_kk[:, None] * C_out + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = mma(a, w, acc, DOT_F32, DOT_PRECISION)
    else:
        # 1b. Taps unrolled, C_in in BLOCK_K chunks: no index math in the inner loop.
        for dt in tl.static_range(KT):
            # which frame this tap reads: x[t_in] if t_in >= 0, else cache[KT-1 + t_in]
            t_in = t + dt - (KT - 1)
            # a per-row vector rather than a scalar: the interpreter mis-types bool-block & bool-scalar
            from_x = (t_in + tl.zeros([BLOCK_M], dtype=tl.int32)) >= 0
            x_frame = x_batch + tl.maximum(t_in, 0).to(tl.int64) * stride_xt
            if HAS_CACHE:
                c_frame = c_batch + tl.maximum(KT - 1 + t_in, 0).to(tl.int64) * stride_ct
            for dh in tl.static_range(KH):
                ih = oh + (dh - KH // 2)
                for dw in tl.static_range(KW):
                    iw = ow + (dw - KW // 2)
                    mask_sp = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    if not HAS_CACHE:
                        mask_sp = mask_sp & from_x  # zero time padding: the tap adds nothing
                    x_ptrs = x_frame + (ih * stride_xh + iw)[:, None] + offs_k[None, :] * stride_xc
                    if HAS_CACHE:
                        c_ptrs = c_frame + (ih * stride_ch + iw)[:, None] + offs_k[None, :] * stride_cc
                    w_ptrs = Wt + ((dt * KH + dh) * KW + dw) * C_in * C_out \
                        + offs_k[:, None] * C_out + offs_n[None, :]
                    for c0 in range(0, C_in, BLOCK_K):
                        mask_k = (c0 + offs_k) < C_in
                        if HAS_CACHE:
                            a_ptrs = tl.where(from_x[:, None], x_ptrs, c_ptrs)
                        else:
                            a_ptrs = x_ptrs
                        a = tl.load(a_ptrs, mask=mask_sp[:, None] & mask_k[None, :], other=0.0)
                        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                        acc = mma(a, w, acc, DOT_F32, DOT_PRECISION)
                        x_ptrs += BLOCK_K * stride_xc
                        if HAS_CACHE:
                            c_ptrs += BLOCK_K * stride_cc
                        w_ptrs += BLOCK_K * C_out

    # 3. Bias and store.
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + b * stride_yb + t.to(tl.int64) * stride_yt \
        + (oh * stride_yh + ow)[:, None] + offs_n[None, :].to(tl.int64) * stride_yc
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# 2. Launcher
# ---------------------------------------------------------------------------------------------


# The GPU configs autotuning chooses among ((BLOCK_M, BLOCK_N, BLOCK_K), num_warps, num_stages): a
# standard implicit-GEMM starting point, and smaller tiles for the GPUs where those spill
# (kernels/aot_targets.json: sm86 / sm89 spill kilobytes on the bigger ones). kernels/targets.py
# drops the configs that do not fit the launch's GPU; of the rest, those whose N / K tiles suit
# its channels (_suits) are preferred.
GPU_CONFIGS = [((128, 64, 32), 4, 3), ((128, 32, 16), 4, 3), ((64, 64, 32), 4, 2), ((64, 32, 16), 4, 2),
               ((32, 64, 32), 4, 2), ((32, 32, 16), 4, 2)]
# fp32 inputs (IEEE dots on CUDA cores, operand tiles in registers): of GPU_CONFIGS only 32x32x16
# (4 warps, 2 stages) fits, and on sm120 alone (it spills 128-256 B on the other targets, the
# bigger tiles kilobytes); these spill nothing on any target, the 8-warp one by spreading the
# tile over more threads, the 1-stage one by not prefetching (measured, kernels/aot_targets.json).
FP32_CONFIGS = [((32, 32, 16), 8, 2), ((32, 32, 16), 4, 1), ((16, 32, 16), 4, 2)]


def _conv_config(c_in: int, c_out: int) -> dict[str, int]:
    """K layout, and the interpreter's tiles. C_in below 16 takes the flattened-K path (on the
    GPU it would pad 3 or 12 channels to a 16-wide dot per tap otherwise). The interpreter uses
    small tiles so CPU tests cross tile and channel tails, and a wide flattened-K chunk (few
    interpreted steps); the GPU's tiles are autotuned (GPU_CONFIGS)."""
    flat = c_in < 16
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64 if flat else 16, FLAT_K=flat, num_warps=4, num_stages=1)
    return dict(FLAT_K=flat)


def _suits(configs: list, args: dict) -> list:
    """64-wide output-channel tiles for 64+ channels, 32-wide K chunks for 32+ input channels
    (a preference: when none of those fits the GPU, the others run)."""
    n, k = (64 if args["C_out"] >= 64 else 32), (32 if args["C_in"] >= 32 else 16)
    return [c for c in configs if c.kwargs["BLOCK_N"] == n and c.kwargs["BLOCK_K"] == k]


def _measured_variant(args: dict) -> tuple[str, float]:
    """The variant in kernels/aot_targets.json a launch stands for (3x3x3 taps, its dtype's width
    and K layout); each is measured in its own configs, so the scale is 1."""
    return _variant_name("fp32" if element_size(args["X"].dtype) == 4 else "bf16", args["FLAT_K"]), 1.0


def _variant_name(dtype: str, flat: bool) -> str:
    return f"causal_conv3d[{dtype}{',flat' if flat else ''}]"


def _configs(configs: list, flat: bool) -> list[tuple[dict, int, int]]:
    """(constexprs, warps, stages) of `configs`; the flattened-K walk takes 16-wide K chunks
    only (its inputs have under 16 channels)."""
    return [({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, w, st) for (m, n, k), w, st in configs
            if not flat or k == 16]


# One config list for every dtype: the pruning keeps, per launch, only the configs measured for its
# variant (bf16 launches never see FP32_CONFIGS, fp32 launches only see them).
_causal_conv3d_tuned = triton.autotune(
    configs=[triton.Config(kw, num_warps=w, num_stages=st) for kw, w, st in _configs(GPU_CONFIGS + FP32_CONFIGS, False)],
    key=["C_in", "C_out", "H", "W", "KT", "KH", "KW", "FLAT_K"],
    prune_configs_by={"early_config_prune": pruner(_measured_variant, _suits)},
)(_causal_conv3d_kernel)


def aot_variants() -> list[Variant]:
    """What tests/kernels/test_aot_targets.py and bench/aot_targets.py compile for every target:
    the VAE's 3x3x3 conv with a cache and a bias, bf16 and fp32, taps unrolled and K flattened
    (the RGB / latent input convs)."""
    def conv(dtype: str, flat: bool) -> Variant:
        sig = runtime_signature(_causal_conv3d_kernel, X=f"*{dtype}", Cache=f"*{dtype}", Wt=f"*{dtype}",
                                Bias=f"*{dtype}", Y=f"*{dtype}")
        consts = dict(KT=3, KH=3, KW=3, HAS_CACHE=True, HAS_BIAS=True, FLAT_K=flat,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_F32=False)
        return Variant(_variant_name(dtype, flat), _causal_conv3d_kernel, sig, consts,
                       _configs(FP32_CONFIGS if dtype == "fp32" else GPU_CONFIGS, flat))

    return [conv(dtype, flat) for dtype in ("bf16", "fp32") for flat in (False, True)]


def _new_cache(x: Tensor, cache: Tensor | None, n: int) -> Tensor:
    """Last n frames of cat(cache or zeros, x) along time, as a fresh contiguous tensor."""
    B, C, T, H, W = x.shape
    if n == 0:
        return x.new_empty(B, C, 0, H, W)
    if T >= n:
        return x[:, :, T - n:].clone(memory_format=torch.contiguous_format)
    prev = cache if cache is not None else x.new_zeros(B, C, n, H, W)
    return torch.cat([prev[:, :, T:], x], dim=2)


def _launch_causal_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor | None,
                          y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Launch into `y` (a fresh contiguous [B, C_out, T, H, W] when None; the TRT plugin passes
    its output buffer). Returns (y, new_cache)."""
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = weight.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    if cache is not None:
        cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    w_t = weight.permute(2, 3, 4, 1, 0).contiguous()  # [KT, KH, KW, C_in, C_out]
    if y is None:
        y = torch.empty(B, C_out, T, H, W, device=x.device, dtype=x.dtype)
    assert y.shape == (B, C_out, T, H, W) and y.dtype == x.dtype and y.stride(-1) == 1
    cfg = _conv_config(C_in, C_out)
    c = cache if cache is not None else x  # never read when HAS_CACHE is False
    bias_arg = bias if bias is not None else w_t
    if interpreting():
        kernel, tiles = _causal_conv3d_kernel, {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps",
                                                                       "num_stages")}
    else:
        kernel, tiles = _causal_conv3d_tuned, {}
    grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]), B * T)  # noqa: E731
    with on_device(x):
        kernel[grid](
            x, c, w_t, bias_arg, y,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            c.stride(0), c.stride(1), c.stride(2), c.stride(3),
            y.stride(0), y.stride(1), y.stride(2), y.stride(3),
            C_in, C_out, T, H, W,
            KT=KT, KH=KH, KW=KW, HAS_CACHE=cache is not None, HAS_BIAS=bias is not None,
            FLAT_K=cfg["FLAT_K"],
            DOT_PRECISION=dot_precision(x.dtype), DOT_F32=dot_f32(x.dtype), **tiles,
        )
    return y, _new_cache(x, cache, KT - 1)


# ---------------------------------------------------------------------------------------------
# 3. Custom op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("wan_rt::causal_conv3d", mutates_args=())
def _causal_conv3d_op(x: Tensor, weight: Tensor, bias: Tensor | None,
                      cache: Tensor | None) -> tuple[Tensor, Tensor]:
    return _launch_causal_conv3d(x, weight, bias, cache)


@_causal_conv3d_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor | None) -> tuple[Tensor, Tensor]:
    B, C_in, T, H, W = x.shape
    C_out, _, KT, _, _ = weight.shape
    return x.new_empty(B, C_out, T, H, W), x.new_empty(B, C_in, KT - 1, H, W)


# ---------------------------------------------------------------------------------------------
# 4. Public wrapper
# ---------------------------------------------------------------------------------------------


def causal_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal-in-time, same-padded-in-space 3D convolution (stride 1) with an explicit cache.

    x: [B, C_in, T, H, W] (bf16 / fp16 / fp32); weight: [C_out, C_in, kt, kh, kw] with kh, kw odd;
    bias: [C_out] or None; cache: [B, C_in, kt−1, H, W] (the previous chunk's last kt−1 input
    frames) or None for zeros. Returns (y [B, C_out, T, H, W] in x's dtype,
    new_cache [B, C_in, kt−1, H, W] = last kt−1 frames of cat(cache, x)).
    """
    assert x.dim() == 5 and weight.dim() == 5, "x must be [B, C, T, H, W], weight [C_out, C_in, kt, kh, kw]"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}"
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    B, C_in, T, H, W = x.shape
    C_out, w_cin, KT, KH, KW = weight.shape
    assert w_cin == C_in, f"weight expects {w_cin} input channels, x has {C_in}"
    assert KH % 2 == 1 and KW % 2 == 1, f"spatial kernel must be odd (same padding), got {KH}x{KW}"
    assert T >= 1, "at least one frame"
    tensors = [x, weight]
    if bias is not None:
        assert bias.shape == (C_out,), f"bias must be [{C_out}], got {tuple(bias.shape)}"
        tensors.append(bias)
    if cache is not None:
        assert cache.shape == (B, C_in, KT - 1, H, W), \
            f"cache must be [B, C_in, kt-1, H, W] = {(B, C_in, KT - 1, H, W)}, got {tuple(cache.shape)}"
        assert cache.dtype == x.dtype, "cache dtype must match x"
        tensors.append(cache)
    check_device(*tensors)
    if KT == 1:
        cache = None  # 1-frame kernels never read the past (Wan: kernel-1 convs use no slot)
    return torch.ops.wan_rt.causal_conv3d(x, weight, bias, cache)


# ---------------------------------------------------------------------------------------------
# 5. Pure-torch reference
# ---------------------------------------------------------------------------------------------


def causal_conv3d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                      cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """F.conv3d over cat(cache or zeros, x), in x's dtype (pass float64 for an oracle)."""
    KT, KH, KW = weight.shape[2:]
    B, C, T, H, W = x.shape
    prev = cache if cache is not None else x.new_zeros(B, C, KT - 1, H, W)
    padded = torch.cat([prev, x], dim=2)
    y = F.conv3d(padded, weight, bias, padding=(0, KH // 2, KW // 2))
    return y, padded[:, :, padded.shape[2] - (KT - 1):]
