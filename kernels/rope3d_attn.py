"""Fused flash-attention forward with Wan's 3D RoPE applied to q and k as they are loaded.

Mirrors the eager `wan_rt.models.ops.rope_attention` (= Wan2.2 `wan/modules/model.py:rope_apply`
followed by `flash_attention`): q and k arrive RMS-normed but not rotated; each q tile is rotated
once when the program loads it, each k tile every time it is streamed through the inner loop (a
few CUDA-core FMAs per k element per q tile, next to a BLOCK_M-deep tensor-core dot; if the GPU
profile shows it matters, rotate k once in `rmsnorm_rope` and call with ROPE_K off). Pairs are interleaved,
(x[2i], x[2i+1]), never rotate-half.

Two score paths, picked by the `quant` argument (a constexpr in the kernel):

* `None`: q·kᵀ in the input dtype (bf16/fp16 tensor cores; fp32 inputs use IEEE fp32 dots, not
  tf32, so an fp32 call is an accuracy reference), fp32 online softmax, P·V in the input dtype.
* `"int8"` (SageAttention-style): k is rotated, smoothed by subtracting its per-head mean over L
  (softmax is invariant to a per-row constant, so this only shrinks the range to quantize) and
  quantized per block of `KQ_BLOCK` rows in a prepass kernel; each q tile is rotated, pre-scaled by
  softmax_scale·log2(e) and quantized to int8 with one scale per tile inside the main kernel;
  the dot is int8×int8→int32, dequantized by q_scale·k_scale; P·V stays in the input dtype.
  Measured (CPU interpreter, B=1, H=2, L=105 on the (3,5,7) Wan tables, q/k RMS-normed over
  H·D with a +0.5 offset on k before the norm; relative L2 error vs an fp64 reference):

  | head_dim | fp32 kernel | bf16 kernel* | int8, fp32 in | int8, bf16 in* |
  |---|---|---|---|---|
  | 32  | 2.1e-7 | 9.6e-3 | 9.6e-3 | 1.4e-2 |
  | 64  | 2.2e-7 | 9.3e-3 | 9.5e-3 | 1.4e-2 |
  | 128 | 2.9e-7 | 9.8e-3 | 1.1e-2 | 1.4e-2 |

  so int8 costs about 1.0–1.5× the bf16 kernel's error here. *The interpreter rounds fp32→bf16
  toward zero (the GPU rounds to nearest), which roughly doubles the bf16 numbers above; an
  estimate, not a measurement, for a GPU is the bf16 kernel near 5e-3 and int8 at 2–3× that.

fp8 (e4m3) q/k would be the Hopper-native variant; it is not implemented because the interpreter
cannot check it here.

With ROPE_Q = ROPE_K = False the same kernel is plain attention (`attention()`, the text cross-attention,
where Lq ≠ Lk).

Shape glossary: B batch, L tokens (Lq queries, Lk keys), H heads, D head_dim.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit import dot_f32, dot_precision, mma
from .targets import Variant, element_size, pruner, runtime_signature
from ._util import check_device, interpreting, next_pow2, on_device

_LOG2E = 1.4426950408889634
QUANT_MODES = ("none", "int8")


# ---------------------------------------------------------------------------------------------
# 1. Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_cos_sin(
    Cos,  # pointer to the float32 cos table [L, D/2]
    Sin,  # pointer to the float32 sin table [L, D/2]
    offs_l,  # [BLOCK_R] token positions of the tile's rows
    L,  # number of rows in the tables
    stride_cl,  # row stride of cos/sin (elements)
    HALF_D: tl.constexpr,  # D / 2, the number of rotated pairs
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
):
    offs_j = tl.arange(0, BLOCK_D // 2)
    mask = (offs_l[:, None] < L) & (offs_j[None, :] < HALF_D)
    ptrs = offs_l[:, None] * stride_cl + offs_j[None, :]
    cos = tl.load(Cos + ptrs, mask=mask, other=1.0)
    sin = tl.load(Sin + ptrs, mask=mask, other=0.0)
    return cos, sin


@triton.jit
def _rotate_pairs(
    x,  # [BLOCK_R, BLOCK_D] float32 tile, pairs interleaved along the last axis
    cos,  # [BLOCK_R, BLOCK_D // 2] float32
    sin,  # [BLOCK_R, BLOCK_D // 2] float32
    BLOCK_R: tl.constexpr,  # rows in the tile
    BLOCK_D: tl.constexpr,  # columns in the tile (even)
):
    # (x[2i], x[2i+1]) -> (x[2i]·c - x[2i+1]·s, x[2i]·s + x[2i+1]·c)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    return tl.reshape(tl.join(out_even, out_odd), (BLOCK_R, BLOCK_D))


@triton.jit
def _round_to_int8(x):
    # round half away from zero, then clamp to the symmetric int8 range [-127, 127]
    r = tl.where(x >= 0, x + 0.5, x - 0.5)
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return r.to(tl.int8)


@triton.jit
def _rope_smooth_quant_k_kernel(
    K,  # pointer to k [B, L, H, D] (bf16/fp16/fp32), not rotated
    Cos,  # pointer to the float32 cos table [L, D/2]
    Sin,  # pointer to the float32 sin table [L, D/2]
    Mean,  # pointer to the float32 per-head mean of rotated k [B, H, D] (read when not SUM_PASS)
    KSum,  # pointer to float32 per-block column sums [B, H, NBLK, D] (written when SUM_PASS)
    KOut,  # pointer to the int8 output [B, L, H, D] (written when not SUM_PASS)
    KScale,  # pointer to the float32 per-block dequant scales [B, H, NBLK] (written when not SUM_PASS)
    stride_kb, stride_kl, stride_kh,  # strides of k (elements); the last dim is contiguous
    stride_ob, stride_ol, stride_oh,  # strides of KOut
    stride_cl,  # row stride of cos/sin
    stride_mb, stride_mh,  # strides of Mean over B, H
    stride_ssb, stride_ssh, stride_ssn,  # strides of KSum over B, H, NBLK
    stride_sb, stride_sh,  # strides of KScale over B, H
    H,  # number of heads
    L,  # number of tokens
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    KQ_BLOCK: tl.constexpr,  # rows per quantization block (one scale each)
    ROPE: tl.constexpr,  # rotate k before smoothing
    SUM_PASS: tl.constexpr,  # True: write column sums (for the mean); False: smooth + quantize
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * KQ_BLOCK + tl.arange(0, KQ_BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n[:, None] < L) & (offs_d[None, :] < HEAD_DIM)

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :]
    k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        cos, sin = _load_cos_sin(Cos, Sin, offs_n, L, stride_cl, HEAD_DIM // 2, BLOCK_D)
        # round to the input dtype as the unquantized path does, then go on in fp32
        k = _rotate_pairs(k, cos, sin, KQ_BLOCK, BLOCK_D).to(K.dtype.element_ty).to(tl.float32)

    if SUM_PASS:
        col_sum = tl.sum(k, 0)  # masked rows loaded as 0 and rotate to 0
        s_ptrs = KSum + off_b * stride_ssb + off_h * stride_ssh + pid_n * stride_ssn + offs_d
        tl.store(s_ptrs, col_sum, mask=offs_d < HEAD_DIM)
    else:
        mean = tl.load(Mean + off_b * stride_mb + off_h * stride_mh + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        k = tl.where(mask, k - mean[None, :], 0.0)
        scale = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-30) / 127.0
        k_i8 = _round_to_int8(k / scale)
        o_ptrs = KOut + off_b * stride_ob + off_h * stride_oh + offs_n[:, None] * stride_ol + offs_d[None, :]
        tl.store(o_ptrs, k_i8, mask=mask)
        tl.store(KScale + off_b * stride_sb + off_h * stride_sh + pid_n, scale)


@triton.jit
def _rope3d_attn_fwd_kernel(
    Q,  # pointer to q [B, Lq, H, D]
    K,  # pointer to k [B, Lk, H, D]; int8 (rotated, smoothed) when QUANT_INT8
    V,  # pointer to v [B, Lk, H, D]
    Cos,  # pointer to the float32 cos table [L, D/2] (read only when ROPE_Q / ROPE_K)
    Sin,  # pointer to the float32 sin table [L, D/2]
    KScale,  # pointer to the float32 k dequant scales [B, H, cdiv(Lk, KQ_BLOCK)] (QUANT_INT8 only)
    Out,  # pointer to the output [B, Lq, H, D], dtype of q (or v when q is int8)
    Lse,  # pointer to the float32 log-sum-exp of the scaled scores [B, H, Lq] (STORE_LSE only)
    stride_qb, stride_ql, stride_qh,  # strides of q (elements); the last dim is contiguous
    stride_kb, stride_kl, stride_kh,  # strides of k
    stride_vb, stride_vl, stride_vh,  # strides of v
    stride_ob, stride_ol, stride_oh,  # strides of out
    stride_cl,  # row stride of cos/sin
    stride_sb, stride_sh,  # strides of KScale over B, H
    stride_lb, stride_lh,  # strides of Lse over B, H (its last dim is contiguous)
    H,  # number of heads
    Lq,  # number of queries
    Lk,  # number of keys
    sm_scale,  # softmax scale (D^-1/2 by default)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (padding columns are masked)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop step
    KQ_BLOCK: tl.constexpr,  # rows per k quantization block (QUANT_INT8 only)
    ROPE_Q: tl.constexpr,  # rotate q tiles on load
    ROPE_K: tl.constexpr,  # rotate k tiles on load
    QUANT_INT8: tl.constexpr,  # int8 q·kᵀ with per-block scales (k pre-quantized by the prepass)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32" otherwise (ignored)
    DOT_F32: tl.constexpr,  # widen bf16 tiles to fp32 for the dots (interpreter only, _jit.dot_f32)
    STORE_LSE: tl.constexpr,  # also write each query's log-sum-exp (ring attention merges blocks by it)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < Lq

    # 1. Load the q tile once; rotate it (and quantize it) in registers.
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if ROPE_Q:
        cos_q, sin_q = _load_cos_sin(Cos, Sin, offs_m, Lq, stride_cl, HEAD_DIM // 2, BLOCK_D)
        q = _rotate_pairs(q.to(tl.float32), cos_q, sin_q, BLOCK_M, BLOCK_D).to(Q.dtype.element_ty)
    if QUANT_INT8:
        # fold softmax scale and log2(e) into q before quantizing (scores come out in log2 units)
        q_f = q.to(tl.float32) * (sm_scale * 1.4426950408889634)
        q_scale = tl.maximum(tl.max(tl.max(tl.abs(q_f), 1), 0), 1e-30) / 127.0
        q = _round_to_int8(q_f / q_scale)
        score_scale = q_scale
    else:
        score_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 softmax

    # 2. Stream k/v tiles with an online (base-2) softmax.
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < Lk
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_kn[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        if ROPE_K:
            cos_k, sin_k = _load_cos_sin(Cos, Sin, offs_kn, Lk, stride_cl, HEAD_DIM // 2, BLOCK_D)
            k = _rotate_pairs(k.to(tl.float32), cos_k, sin_k, BLOCK_N, BLOCK_D).to(K.dtype.element_ty)
        if QUANT_INT8:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
            k_scale = tl.load(KScale + off_b * stride_sb + off_h * stride_sh + offs_kn // KQ_BLOCK,
                              mask=mask_n, other=0.0)
            s = s * (score_scale * k_scale[None, :])
        else:
            s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_F32, DOT_PRECISION) * score_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_kn[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32, DOT_PRECISION)
        m_i = m_new

    # 3. Normalize and store.
    out = acc / l_i[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if STORE_LSE:
        # scores are in log2 units (scale·log2 e folded in): ln Σ e^s = (m + log2 l) · ln 2
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=mask_m)


# ---------------------------------------------------------------------------------------------
# 2. Launchers (what the custom ops run)
# ---------------------------------------------------------------------------------------------


# The GPU configs autotuning chooses among, the Triton fused-attention tutorial's Hopper choice
# first; kernels/targets.py prunes those that do not fit the launch's GPU (shared memory, spills as
# measured ahead of time for every claimed target: kernels/aot_targets.json).
GPU_CONFIGS = [((128, 64), 8, 3), ((128, 32), 8, 2), ((64, 64), 4, 3), ((64, 32), 4, 2)]
# fp32 inputs (IEEE dots, no tensor cores): Triton's FMA dot holds each thread's operand rows whole
# along the head dim in registers, so at head dim 128 every tile above spills kilobytes, and 16x32
# or 32x16 still spill 300-450 B on every target; 16x16 over 8 warps spills none on any (measured,
# kernels/aot_targets.json). Slow, but fp32 is the accuracy reference, not the fast path.
FP32_CONFIGS = [((16, 16), 8, 2), ((16, 16), 8, 1)]
KQ_BLOCK = 64  # rows per k quantization block on the GPU (the prepass and the int8 scores)


def _attn_config(head_dim: int, quant: str) -> dict[str, int]:
    """The interpreter's tiles: small, unequal, so the CPU tests cross several q and k tiles
    and their tails. On the GPU the tiles are autotuned (GPU_CONFIGS, FP32_CONFIGS) and only
    KQ_BLOCK is fixed."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, KQ_BLOCK=16, num_warps=4, num_stages=1)
    return dict(KQ_BLOCK=KQ_BLOCK)


def _measured_variant(args: dict) -> tuple[str, float]:
    """The variant in kernels/aot_targets.json a launch stands for (its scores and the dtype of
    its P·V dot, at head dim 128) and its tiles' size relative to it (head dim 64: x0.5). fp32
    launches are pruned by their own measurements: their spills are not a scaled bf16 figure."""
    wide = element_size(args["V"].dtype) == 4
    name = {(False, False): "bf16", (True, False): "int8", (False, True): "fp32", (True, True): "int8,fp32"}
    return f"rope3d_attention[{name[args['QUANT_INT8'], wide]}]", args["BLOCK_D"] / 128


def _triton_configs(configs: list) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for (m, n), w, st in configs]


# One config list for every dtype: the pruning keeps, per launch, only the configs measured for its
# variant (bf16 launches never see FP32_CONFIGS, fp32 launches only see them).
_rope3d_attn_fwd_tuned = triton.autotune(
    configs=_triton_configs(GPU_CONFIGS + FP32_CONFIGS),
    key=["Lq", "Lk", "HEAD_DIM", "QUANT_INT8", "ROPE_K", "STORE_LSE"],
    prune_configs_by={"early_config_prune": pruner(_measured_variant)},
)(_rope3d_attn_fwd_kernel)


def aot_variants() -> list[Variant]:
    """What tests/kernels/test_aot_targets.py and bench/aot_targets.py compile for every target:
    Wan's head dim 128 with bf16 scores, with int8 scores (bf16 and fp32 v) and with fp32 inputs
    (IEEE dots), and the int8 prepass."""
    def attention(name: str, q: str, k: str, quant: bool, configs: list) -> Variant:
        sig = runtime_signature(_rope3d_attn_fwd_kernel, Q=f"*{q}", K=f"*{k}", V=f"*{q}", Out=f"*{q}", Cos="*fp32",
                                Sin="*fp32", KScale="*fp32", Lse="*fp32", sm_scale="fp32")
        consts = dict(HEAD_DIM=128, BLOCK_D=128, KQ_BLOCK=KQ_BLOCK, ROPE_Q=True, ROPE_K=not quant, QUANT_INT8=quant,
                      DOT_PRECISION="ieee" if q == "fp32" else "tf32", DOT_F32=False, STORE_LSE=False)
        return Variant(name, _rope3d_attn_fwd_kernel, sig, consts,
                       [({"BLOCK_M": m, "BLOCK_N": n}, w, st) for (m, n), w, st in configs])

    def prepass(name: str, k: str) -> Variant:
        sig = runtime_signature(_rope_smooth_quant_k_kernel, K=f"*{k}", Cos="*fp32", Sin="*fp32", Mean="*fp32",
                                KSum="*fp32", KOut="*i8", KScale="*fp32")
        return Variant(name, _rope_smooth_quant_k_kernel, sig,
                       dict(HEAD_DIM=128, BLOCK_D=128, KQ_BLOCK=KQ_BLOCK, ROPE=True, SUM_PASS=False), [({}, 4, 3)])

    return [attention("rope3d_attention[bf16]", "bf16", "bf16", False, GPU_CONFIGS),
            attention("rope3d_attention[int8]", "bf16", "i8", True, GPU_CONFIGS),
            attention("rope3d_attention[fp32]", "fp32", "fp32", False, FP32_CONFIGS),
            attention("rope3d_attention[int8,fp32]", "fp32", "i8", True, GPU_CONFIGS + FP32_CONFIGS),
            prepass("rope_smooth_quant_k", "bf16"), prepass("rope_smooth_quant_k[fp32]", "fp32")]


def _quantize_k(k: Tensor, cos: Tensor, sin: Tensor, rope: bool, cfg: dict[str, int]) -> tuple[Tensor, Tensor]:
    """Prepass of the int8 path: rotate, smooth (subtract per-head mean over L), quantize per block.

    Returns k_int8 [B, L, H, D] and k_scale float32 [B, H, cdiv(L, KQ_BLOCK)].
    """
    B, L, H, D = k.shape
    kq = cfg["KQ_BLOCK"]
    nblk = triton.cdiv(L, kq)
    k_sum = torch.empty(B, H, nblk, D, device=k.device, dtype=torch.float32)
    k_i8 = torch.empty(B, L, H, D, device=k.device, dtype=torch.int8)
    k_scale = torch.empty(B, H, nblk, device=k.device, dtype=torch.float32)
    grid = (nblk, B * H)

    def launch(mean: Tensor, sum_pass: bool) -> None:
        _rope_smooth_quant_k_kernel[grid](
            k, cos, sin, mean, k_sum, k_i8, k_scale,
            k.stride(0), k.stride(1), k.stride(2),
            k_i8.stride(0), k_i8.stride(1), k_i8.stride(2),
            cos.stride(0),
            mean.stride(0), mean.stride(1),
            k_sum.stride(0), k_sum.stride(1), k_sum.stride(2),
            k_scale.stride(0), k_scale.stride(1),
            H, L,
            HEAD_DIM=D, BLOCK_D=next_pow2(D), KQ_BLOCK=kq, ROPE=rope, SUM_PASS=sum_pass,
        )

    dummy_mean = torch.zeros(B, H, D, device=k.device, dtype=torch.float32)
    launch(dummy_mean, sum_pass=True)
    mean = k_sum.sum(dim=2) / L  # [B, H, D], tiny
    launch(mean, sum_pass=False)
    return k_i8, k_scale


def _launch_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None,
                      scale: float, quant: str, out: Tensor | None = None, lse: Tensor | None = None) -> Tensor:
    """Launch into `out` (a fresh contiguous [B, Lq, H, D] when None; the TRT plugin passes its
    output buffer); with `lse` (float32 [B, H, Lq]) also write each query's log-sum-exp."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    rope = cos is not None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if rope:
        assert cos is not None and sin is not None
        cos, sin = cos.contiguous(), sin.contiguous()
    else:  # the kernel never reads the tables; any float32 pointer does
        cos = sin = torch.empty(1, device=q.device, dtype=torch.float32)
    cfg = _attn_config(D, quant)
    if out is None:
        out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    quant_int8 = quant == "int8"
    store_lse = lse is not None
    if lse is None:  # the kernel never writes it; any float32 pointer does
        lse = torch.empty(1, 1, device=q.device, dtype=torch.float32)
    else:
        assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32 and lse.stride(-1) == 1
    with on_device(q):
        if quant_int8:
            k, k_scale = _quantize_k(k, cos, sin, rope, cfg)
        else:
            k_scale = torch.empty(1, 1, device=q.device, dtype=torch.float32)
        if interpreting():
            kernel, tiles = _rope3d_attn_fwd_kernel, dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        else:
            kernel, tiles = _rope3d_attn_fwd_tuned, {}
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        kernel[grid](
            q, k, v, cos, sin, k_scale, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            cos.stride(0),
            k_scale.stride(0), k_scale.stride(1),
            lse.stride(0), lse.stride(1),
            H, Lq, Lk, scale,
            HEAD_DIM=D, BLOCK_D=next_pow2(D), KQ_BLOCK=cfg["KQ_BLOCK"],
            ROPE_Q=rope, ROPE_K=rope and not quant_int8, QUANT_INT8=quant_int8,
            DOT_PRECISION=dot_precision(q.dtype), DOT_F32=dot_f32(q.dtype), STORE_LSE=store_lse, **tiles,
        )
    return out


# ---------------------------------------------------------------------------------------------
# 3. Custom ops (torch.compile / torch.export / AOTInductor see one opaque node)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("wan_rt::rope3d_attention", mutates_args=())
def _rope3d_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                         scale: float, quant: str) -> Tensor:
    return _launch_attention(q, k, v, cos, sin, scale, quant)


@_rope3d_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, scale: float, quant: str) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("wan_rt::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return _launch_attention(q, k, v, None, None, scale, "none")


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("wan_rt::attention_lse", mutates_args=())
def _attention_lse_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, Lq, H, _ = q.shape
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    return _launch_attention(q, k, v, None, None, scale, "none", lse=lse), lse


@_attention_lse_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, Lq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, Lq, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# 4. Public wrappers
# ---------------------------------------------------------------------------------------------


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be [B, L, H, D]"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v must share one dtype"
    B, _, H, D = q.shape
    assert k.shape[0] == B and k.shape[2] == H and k.shape[3] == D, f"k {tuple(k.shape)} vs q {tuple(q.shape)}"
    assert v.shape == k.shape, f"v {tuple(v.shape)} must match k {tuple(k.shape)}"
    assert D % 2 == 0 and 16 <= D <= 256, f"head_dim must be even and in [16, 256], got {D}"
    assert k.shape[1] >= 1, "at least one key"
    check_device(q, k, v)


def rope3d_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, *,
                     scale: float | None = None, quant: str | None = None) -> Tensor:
    """softmax(rope(q)·rope(k)ᵀ·scale)·v with Wan's interleaved 3D RoPE fused into the loads.

    q, k, v: [B, L, H, D], one dtype (bf16 / fp16 / fp32); q and k RMS-normed, not rotated.
    cos, sin: float32 [L, D/2], rotating pairs (x[2i], x[2i+1]).
    scale: softmax scale, default D^-1/2.
    quant: None (q·kᵀ in the input dtype) or "int8" (SageAttention-style int8 q·kᵀ, see the
        module docstring for its error).
    Returns [B, L, H, D] in q's dtype.
    """
    _check_qkv(q, k, v)
    B, L, H, D = q.shape
    assert k.shape[1] == L, f"self-attention: k has {k.shape[1]} tokens, q has {L}"
    assert cos.shape == (L, D // 2) and sin.shape == (L, D // 2), \
        f"cos/sin must be [L, D/2] = [{L}, {D // 2}], got {tuple(cos.shape)} / {tuple(sin.shape)}"
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos/sin must be float32"
    mode = "none" if quant is None else quant
    assert mode in QUANT_MODES, f"quant must be None or 'int8', got {quant!r}"
    assert mode != "int8" or D >= 32, "int8 needs head_dim >= 32 (int8 MMA K-width)"
    check_device(q, cos, sin)
    return torch.ops.wan_rt.rope3d_attention(q, k, v, cos, sin, float(scale if scale is not None else D ** -0.5), mode)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, return_lse: bool = False):
    """Unmasked multi-head attention (no RoPE), e.g. the text cross-attention.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; one dtype (bf16 / fp16 / fp32). Returns [B, Lq, H, D],
    and with `return_lse` also the float32 natural-log log-sum-exp of each query's scaled scores,
    [B, H, Lq] (ring attention merges key blocks by it: wan_rt.parallel.ring).
    """
    _check_qkv(q, k, v)
    D = q.shape[-1]
    sm_scale = float(scale if scale is not None else D ** -0.5)
    if return_lse:
        return torch.ops.wan_rt.attention_lse(q, k, v, sm_scale)
    return torch.ops.wan_rt.attention(q, k, v, sm_scale)


# ---------------------------------------------------------------------------------------------
# 5. Pure-torch references
# ---------------------------------------------------------------------------------------------


def apply_rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved-pair rotation in x's dtype (pass float64 for an oracle). x: [B, L, H, D]."""
    c = cos.to(x.dtype)[None, :, None, :]
    s = sin.to(x.dtype)[None, :, None, :]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1).flatten(-2)


def _quantize_blocks_ref(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per block of `block` rows along dim 1 and per (b, h). x: [B, L, H, D]."""
    B, L, H, D = x.shape
    pad = (-L) % block
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B, -1, block, H, D)
    amax = xp.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-30)
    scale = amax / 127.0
    r = xp / scale
    xi = torch.where(r >= 0, r + 0.5, r - 0.5).trunc().clamp(-127, 127)
    return (xi.reshape(B, -1, H, D)[:, :L]), (scale.expand_as(xp).reshape(B, -1, H, D)[:, :L])


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Explicit softmax attention in the inputs' dtype. q: [B, Lq, H, D], k/v: [B, Lk, H, D]."""
    sm_scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.einsum("blhd,bshd->bhls", q, k) * sm_scale
    return torch.einsum("bhls,bshd->blhd", torch.softmax(s, dim=-1), v)


def rope3d_attention_ref(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, *,
                         scale: float | None = None, quant: str | None = None,
                         q_block: int = 128, k_block: int = 64) -> Tensor:
    """Reference for `rope3d_attention`, computed in q's dtype (pass float64 for an oracle).

    quant="int8" emulates the kernel's quantization (q tiles of `q_block` rows, k blocks of
    `k_block` rows, k smoothed by its per-head mean) with exact integer products.
    """
    qr, kr = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    if quant is None:
        return attention_ref(qr, kr, v, scale=scale)
    assert quant == "int8", quant
    sm_scale = scale if scale is not None else q.shape[-1] ** -0.5
    qi, qs = _quantize_blocks_ref(qr * (sm_scale * _LOG2E), q_block)
    ki, ks = _quantize_blocks_ref(kr - kr.mean(dim=1, keepdim=True), k_block)
    # per-block scales are constant over D, so take column 0 after the exact integer dot
    s = torch.einsum("blhd,bshd->bhls", qi, ki) * qs[..., 0].permute(0, 2, 1)[..., :, None] \
        * ks[..., 0].permute(0, 2, 1)[..., None, :]
    p = torch.softmax(s * math.log(2.0), dim=-1)
    return torch.einsum("bhls,bshd->blhd", p, v)
