"""The fast DiT path (wan_rt.runtime.fast), the FLOP count and the two GPU benchmarks' smoke runs.

Tolerances (style.md §5.7): the Triton kernels at fp32 match eager within 1e-4 relative L2
(the interpreter computes in fp32, as the kernel tests); int8 attention follows the ratio rule
(error vs the fp32 model <= 2x a bf16 eager model's); FP8 linears are a real quantization, so
their error vs fp32 must be visible (> 1e-4) and bounded (< 0.1, wan_rt.precision's per-step
noise-prediction budget). CPU runs use Triton's interpreter and the EMULATED FP8 linear; the
GPU-only checks are skipped with "needs a CUDA GPU".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

GPU = torch.cuda.is_available()
if not GPU:  # before any wan_rt.kernels kernel module is imported (tests/kernels/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from wan_rt.config import T2V_A14B, TI2V_5B, get_spec, seq_len  # noqa: E402
from wan_rt.flops import dit_flops  # noqa: E402
from wan_rt.metrics import relative_error  # noqa: E402
from wan_rt.models.dit import WanDiT, cast_dit  # noqa: E402
from wan_rt.models.ops import EAGER_OPS, set_ops  # noqa: E402
from wan_rt.precision import keep_reason  # noqa: E402
from wan_rt.runtime.fast import (EmulatedFP8Linear, FP8Linear, optimize_dit, quantize_weight_fp8)  # noqa: E402


def needs_gpu(test):
    """Skipped without a CUDA GPU, and marked `gpu` so `pytest -m gpu` (bench/gpu_check.sh) runs it."""
    return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")(test))


BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = ["tiny-t2v-A14B", "tiny-ti2v-5B"]
OFF = dict(kernels=False, fp8_linear=False, attention_quant=None, compile=None, cuda_graphs=False)


def _model(cfg, seed: int = 0) -> WanDiT:
    """fp32 WanDiT with O(1) activations: weights N(0, 1/fan_in), 1-d parameters ± 0.2."""
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.2))
    return model


def _inputs(cfg, seed: int = 1):
    """Batch 2 (CFG), latent 3x6x10 -> tokens (3, 3, 5); TI2V: per-token timestep, frame 0 clean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 3, 6, 10, generator=g)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    t = torch.tensor([700.0, 300.0])
    if cfg.per_token_timestep:
        t = t[:, None].repeat(1, 45)
        t[:, :15] = 0
    return x, t, context


# ------------------------------------------------------------------------------------- FLOPs
def test_flop_formula_reproduces_the_perf_anchors():
    """docs/perf-anchors.md: per layer at A14B 720p q/k/v/o 15.9, cross q/o 7.9, FFN 21.4,
    self-attention 117 TFLOP; per forward 6,523 / 1,678 / 517 TFLOP, with the linear and
    self-attention shares of the table."""
    a720 = dit_flops(T2V_A14B.dit, seq_len(T2V_A14B, 720, 1280, 81))
    assert seq_len(T2V_A14B, 720, 1280, 81) == 75_600
    assert [round(v / 1e12, 1) for v in (a720.layer_qkvo, a720.layer_cross_qo, a720.layer_ffn)] == [15.9, 7.9, 21.4]
    assert round(a720.layer_self_attention / 1e12) == 117
    table = {  # (linear, self-attention, total) in TFLOP
        (T2V_A14B, 720, 1280, 81): (1810, 4682, 6523),
        (T2V_A14B, 480, 832, 81): (785, 879, 1678),
        (TI2V_5B, 704, 1280, 121): (237, 274, 517),
    }
    for (spec, h, w, f), expected in table.items():
        fl = dit_flops(spec.dit, seq_len(spec, h, w, f))
        got = (fl.linear / 1e12, fl.self_attention / 1e12, fl.total / 1e12)
        assert all(abs(g - e) <= 1.0 for g, e in zip(got, expected, strict=True)), (spec.name, got, expected)
    # Batch and text length scale as the closed form says.
    assert dit_flops(TI2V_5B.dit, 1000, batch=2).total == 2 * dit_flops(TI2V_5B.dit, 1000).total


# -------------------------------------------------------------------------- Ops routing
@torch.no_grad()
def test_block_norm_modulation_goes_through_ops():
    """Each block calls ops.layernorm_modulate twice; the eager default is bit-identical to the
    model's own _modulate(LayerNorm32(x)) composition."""
    from wan_rt.models.dit import LayerNorm32, _modulate

    cfg = get_spec("tiny-ti2v-5B").dit
    model = _model(cfg)
    x, t, context = _inputs(cfg)
    expected = model(x, t, context)
    calls = []

    def spy(x, shift, scale, norm):
        calls.append(shift.shape[1])
        return EAGER_OPS.layernorm_modulate(x, shift, scale, norm)

    set_ops(model, dataclasses.replace(EAGER_OPS, layernorm_modulate=spy))
    assert torch.equal(model(x, t, context), expected)
    assert calls == [3] * (2 * cfg.num_layers)  # per latent frame (TI2V): n = 3 rows of modulation
    h = torch.randn(2, 45, cfg.dim).bfloat16()
    shift, scale = torch.randn(2, 3, cfg.dim), torch.randn(2, 3, cfg.dim)
    norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
    assert torch.equal(EAGER_OPS.layernorm_modulate(h, shift, scale, norm),
                       _modulate(norm(h), shift, scale).to(h.dtype))


# ------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_kernels_match_eager_fp32(name, spy_launches):
    """Triton attention + fused LayerNorm-modulate (interpreter on a CPU) == eager at fp32."""
    from wan_rt.kernels import fused_norms, rope3d_attn

    cfg = get_spec(name).dit
    model = _model(cfg)
    x, t, context = _inputs(cfg)
    expected = model(x, t, context)
    report = optimize_dit(model, **dict(OFF, kernels=True))
    assert report.kernels and report.quantized == ()
    spy_launches(fused_norms, "_layernorm_modulate_kernel")
    launches = spy_launches(rope3d_attn, "_rope3d_attn_fwd_kernel")
    got = model(x, t, context)
    assert launches["_layernorm_modulate_kernel"] == 2 * cfg.num_layers
    assert launches["_rope3d_attn_fwd_kernel"] == 2 * cfg.num_layers
    assert relative_error(got, expected) <= 1e-4


@torch.no_grad()
def test_int8_attention_ratio_rule(spy_launches):
    """int8 self-attention: error vs the fp32 model <= 2x a bf16 eager model's, and > 0."""
    from wan_rt.kernels import rope3d_attn

    cfg = get_spec("tiny-t2v-A14B").dit
    model = _model(cfg)
    x, t, context = _inputs(cfg)
    reference = model(x, t, context)
    bf16 = cast_dit(copy.deepcopy(model), torch.bfloat16)
    bf16_err = relative_error(bf16(x.bfloat16(), t, context.bfloat16()), reference)
    optimize_dit(model, **dict(OFF, kernels=True, attention_quant="int8"))
    launches = spy_launches(rope3d_attn, "_rope_smooth_quant_k_kernel")
    err = relative_error(model(x, t, context), reference)
    assert launches["_rope_smooth_quant_k_kernel"] > 0, "self-attention must take the int8 path"
    assert 0 < err <= 2 * bf16_err, (err, bf16_err)


# ----------------------------------------------------------------------------------- FP8
@torch.no_grad()
def test_fp8_quantizes_exactly_what_the_precision_table_allows():
    """8 layers: wan_rt.precision keeps blocks 0 and 7, the embeddings, time_proj and the head."""
    cfg = dataclasses.replace(get_spec("tiny-t2v-A14B").dit, num_layers=8)
    model = _model(cfg)
    x, t, context = _inputs(cfg)
    reference = model(x, t, context)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    allowed = {n for n in linears if keep_reason(n, cfg.num_layers) is None}
    report = optimize_dit(model, **dict(OFF, fp8_linear="emulated"))
    modules = dict(model.named_modules())
    assert set(report.quantized) == allowed and set(report.kept) == set(linears) - allowed
    assert len(allowed) == 6 * 10  # blocks 1-6, 10 linears each (q/k/v/o twice, FFN in/out)
    assert all(isinstance(modules[n], EmulatedFP8Linear) for n in allowed)
    assert all(type(modules[n]) is nn.Linear for n in report.kept)
    for must_keep in ("proj_out", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
                      "blocks.0.attn1.to_q", "blocks.7.ffn.net.2"):
        assert must_keep in report.kept, must_keep
    assert modules["blocks.3.attn1.to_q"].weight.dtype == torch.float8_e4m3fn
    err = relative_error(model(x, t, context), reference)
    assert 1e-4 < err < 0.1, err  # a real quantization, inside the per-step budget


def _scaled_mm_on_cpu() -> bool:
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _scaled_mm_on_cpu(), reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fp8_linear_scaled_mm_equals_its_emulation(dtype):
    """The real `_scaled_mm` layer (where this torch runs it on a CPU) computes what the
    emulation computes: same scales, same E4M3 values, only the summation order differs."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * torch.linspace(0.01, 3, 48)[:, None])
    x = (torch.randn(2, 7, 64, generator=g) * 4).to(dtype)
    real, emulated = FP8Linear.from_linear(linear), EmulatedFP8Linear.from_linear(linear)
    got, want = real(x), emulated(x)
    assert got.dtype == want.dtype == dtype and got.shape == (2, 7, 48)
    assert relative_error(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert 1e-4 < relative_error(got, linear(x)) < 0.1


def test_weight_quantization_is_per_output_channel():
    w = torch.randn(32, 64) * torch.logspace(-3, 2, 32)[:, None]  # rows 5 decades apart
    q, scale = quantize_weight_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (32,)
    assert torch.equal(q.float().abs().amax(1), torch.full((32,), 448.0))  # each row's max -> 448
    per_row = ((q.float() * scale[:, None] - w).norm(dim=1) / w.norm(dim=1))
    assert per_row.max() < 2 ** -4  # e4m3 keeps 3 mantissa bits in every row


def test_optimize_dit_refuses_what_cannot_work():
    model = _model(get_spec("tiny-t2v-A14B").dit)
    with pytest.raises(ValueError, match="cuda_graphs"):
        optimize_dit(model, **dict(OFF, cuda_graphs=True))
    with pytest.raises(ValueError, match="kernels"):
        optimize_dit(model, **dict(OFF, attention_quant="int8"))
    with pytest.raises(ValueError, match="compile"):
        optimize_dit(model, **dict(OFF, compile="fastest"))


@torch.no_grad()
def test_optimized_block_compiles_as_one_graph():
    """What optimize_dit compiles (one block with kernels, int8 attention and FP8 linears)
    traces with fullgraph=True: no graph break (aot_eager: the trace, without codegen)."""
    cfg = get_spec("tiny-t2v-A14B").dit
    model = _model(cfg)
    x, t, context = _inputs(cfg)
    optimize_dit(model, **dict(OFF, kernels=True, attention_quant="int8",
                               fp8_linear="scaled_mm" if _scaled_mm_on_cpu() else "emulated"))
    text_kv = model.encode_text(context)
    expected = model(x, t, text_kv=text_kv)
    torch._dynamo.reset()
    model.blocks[1].compile(backend="aot_eager", fullgraph=True)
    try:
        assert relative_error(model(x, t, text_kv=text_kv), expected) <= 1e-6
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------- GPU only
@needs_gpu
@torch.no_grad()
def test_fast_path_on_gpu():
    """optimize_dit's defaults (compile "default" to keep the test short) on a CUDA bf16 model:
    close to eager bf16; CUDA-graph replays give the same output."""
    cfg = get_spec("tiny-t2v-A14B").dit
    model = cast_dit(_model(cfg), torch.bfloat16).cuda()
    x, t, context = (v.cuda() for v in _inputs(cfg))
    x, context = x.bfloat16(), context.bfloat16()
    text_kv = model.encode_text(context)
    expected = model(x, t, text_kv=text_kv)
    report = optimize_dit(model, compile="default")
    assert report.fp8 == "scaled_mm" and report.cuda_graphs
    text_kv = model.encode_text(context)
    outs = [model(x, t, text_kv=text_kv).clone() for _ in range(3)]  # warm-up, record, replay
    assert torch.equal(outs[1], outs[2])
    assert relative_error(outs[2], expected) < 0.1
    torch._dynamo.reset()


@needs_gpu
@torch.no_grad()
def test_fp8_linear_on_gpu_equals_its_emulation():
    linear = nn.Linear(256, 512).cuda().bfloat16()
    x = torch.randn(3, 100, 256, device="cuda", dtype=torch.bfloat16)
    got = FP8Linear.from_linear(linear, use_fast_accum=False)(x)
    want = EmulatedFP8Linear.from_linear(linear)(x)
    assert relative_error(got, want) <= 1e-2


# ---------------------------------------------------------------------------- benchmarks
def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--tiny", *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_dit_step_bench_tiny_writes_json(tmp_path):
    """The TI2V scenario only (the per-frame modulation path; the A14B one differs in sizes)."""
    data = _run("dit_step.py", tmp_path, "--models", "tiny-ti2v-5B")
    assert [s["name"] for s in data["scenarios"]] == ["tiny-ti2v-5B"]
    for scenario in data["scenarios"]:
        rows = {r["variant"]: r for r in scenario["rows"]}
        assert list(rows) == ["diffusers", "eager", "kernels", "kernels+int8", "fast", "aoti"]
        assert rows["eager"]["block_rel_l2_vs_eager"] == 0.0
        assert rows["diffusers"]["forward_rel_l2_vs_eager"] < 1e-5  # same weights, same numbers
        assert rows["kernels"]["block_rel_l2_vs_eager"] < 1e-4
        assert 1e-4 < rows["fast"]["block_rel_l2_vs_eager"] < 0.1  # FP8 (emulated) is a real quantization
        assert all(r["est_forward_ms"] > 0 and r["est_tflops"] > 0 for r in rows.values())
        assert "full_forward_ms" in rows["fast"] and scenario["flops"]["total"] > 0
        # The same fast path as AOTInductor packages (FP8 through torch._scaled_mm, not emulated):
        # the same quantization, so the same error up to summation order; blocks share one package.
        aoti = rows["aoti"]
        assert abs(aoti["block_rel_l2_vs_eager"] - rows["fast"]["block_rel_l2_vs_eager"]) < 1e-3
        assert aoti["full_rel_l2_vs_eager"] < 0.1 and "AOTInductor packages" in aoti["description"]
        assert "block1 cached" in aoti["description"] and "block0 cached" in aoti["full_description"]


def test_e2e_bench_tiny_writes_json(tmp_path):
    data = _run("e2e.py", tmp_path)
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["eager", "fast"]
    req = data["request"]
    assert min(req["steps_per_stage_measured"].values()) >= 1
    for row in rows.values():
        assert set(row["stages_ms"]) >= {"text_encoder", "dit_high_noise", "dit_low_noise", "swap_stall",
                                         "vae_decoder"}
        assert row["extrapolated_ms"]["total"] > 0 and row["frames_finite"]
        assert row["steps_per_stage"] == req["steps_per_stage_measured"]
    assert "EMULATED" in rows["fast"]["description"]
