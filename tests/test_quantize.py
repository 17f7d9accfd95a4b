"""FP8 / INT8 quantization: the high-precision table, calibration statistics, Q/DQ placement on a
synthetic graph and on the tiny DiT, errors in ONNX Runtime, and `wan-rt build --precision
fp8|int8` + `wan-rt parity` end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from wan_rt.export.calibrate import (ActivationRecorder, CalibrationStats, LinearStats,  # noqa: E402
                                     calibrate_experts, calibrate_module, record_trajectory)
from wan_rt.export.quantize import (QDQ_OPSET, QuantConfig, QuantizeError, QuantPlan, quantize_model,  # noqa: E402
                                    quantize_onnx_file, smooth_factors)
from wan_rt.metrics import relative_error  # noqa: E402
from wan_rt.precision import keep_blocks, keep_reason  # noqa: E402

SPEC = "tiny-t2v-A14B"


def _session(model_or_path):
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------------------------ the table
def test_first_and_last_blocks_kept_scale_with_depth():
    assert keep_blocks(40) == {0, 1, 2, 37, 38, 39}  # NVIDIA's recipe for the A14B experts
    assert keep_blocks(30) == {0, 1, 28, 29}          # TI2V-5B
    assert keep_blocks(8) == {0, 7}
    assert keep_blocks(2) == set() and keep_blocks(1) == set()  # tiny presets: every block quantized


@pytest.mark.parametrize("path,layers,why", [
    ("patch_embedding", 40, "embedding (patch)"),
    ("condition_embedder.text_embedder.linear_1", 2, "embedding (text)"),
    ("condition_embedder.time_embedder.linear_2", 2, "embedding (time)"),
    ("condition_embedder.time_proj", 2, "modulation"),
    ("proj_out", 2, "head"),
    ("blocks.5.attn1.norm_q", 40, "norm"),
    ("blocks.2.ffn.net.0.proj", 40, "block 2"),
    ("blocks.37.attn1.to_q", 40, "block 37"),
    ("blocks.3.attn1.to_q", 40, None),
    ("blocks.36.ffn.net.2", 40, None),
    ("blocks.0.attn2.to_k", 2, None),
    ("blocks.1.ffn.net.0.proj", 2, None),
])
def test_keep_reason(path, layers, why):
    reason = keep_reason(path, layers)
    assert (reason is None) if why is None else (reason is not None and why in reason), reason


def test_quant_config_is_validated():
    with pytest.raises(ValueError, match="fp8_attention needs precision fp8"):
        QuantConfig("int8", fp8_attention=True)
    with pytest.raises(ValueError, match="one of"):
        QuantConfig("int4")


# ------------------------------------------------------------------------------------ calibration
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_recorded_amax_is_the_max_abs_activation_seen():
    torch.manual_seed(0)
    toy = _Toy()
    batches = [torch.randn(4, 7, 6) * s for s in (0.5, 3.0, 1.0)]
    with ActivationRecorder(toy) as rec, torch.no_grad():
        for x in batches:
            toy(x)
    stats = rec.stats()
    seen_a = torch.cat([x.reshape(-1, 6) for x in batches])
    with torch.no_grad():
        seen_b = torch.cat([torch.relu(toy.a(x)).reshape(-1, 5) for x in batches])
    assert stats.calls == 3
    assert stats.linear["a"].amax == pytest.approx(float(seen_a.abs().max()), rel=0, abs=0)
    assert stats.linear["a"].channel_amax == pytest.approx(seen_a.abs().amax(0).tolist(), rel=1e-7)
    assert stats.linear["b"].amax == pytest.approx(float(seen_b.abs().max()), rel=1e-7)
    assert CalibrationStats.from_json(stats.to_json()) == stats
    toy(batches[0])  # hooks are gone after the with-block
    assert rec.stats().calls == 3


def test_attention_is_recorded_through_the_ops_and_numerics_are_untouched():
    from wan_rt.config import get_spec
    from wan_rt.models.dit import WanDiT

    torch.manual_seed(0)
    dit = WanDiT(get_spec(SPEC).dit).eval()
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        want = dit(x, t, ctx)
        with ActivationRecorder(dit) as rec:
            got = dit(x, t, ctx)
    assert torch.equal(got, want)
    att = rec.stats().attention
    assert set(att) == {f"blocks.{i}.attn{j}" for i in (0, 1) for j in (1, 2)}
    assert all(v["q"] > 0 and v["k"] > 0 and v["v"] > 0 for v in att.values())
    assert all(m.ops.attention.__module__ == "wan_rt.models.ops" for m in dit.modules() if hasattr(m, "ops"))


def test_smooth_factors():
    s = smooth_factors(np.array([4.0, 0.0, 9.0]), np.array([1.0, 2.0, 0.25]), 0.5)
    assert s == pytest.approx([2.0, 1.0, 6.0])


# ------------------------------------------------------------------------------------ synthetic graph
def _synthetic(opset: int = QDQ_OPSET, elem: int = TensorProto.FLOAT):
    """x [2, 3, 8] -> to_q, to_k (sharing x) of block 1; proj_out on to_q; a Gemm (transB=1) of
    block 1's FFN on a 2-D view; block 0's to_v (kept: 8 layers keep blocks 0 and 7)."""
    rng = np.random.default_rng(0)

    def w(name, shape):
        values = rng.standard_normal(shape).astype(np.float32) * 0.3
        return helper.make_tensor(name, elem, shape, values.flatten().tolist())

    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="/dit/blocks.1/attn1/to_q/MatMul"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="/dit/blocks.1/attn1/to_k/MatMul"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="/dit/blocks.0/attn1/to_v/MatMul"),
        helper.make_node("MatMul", ["q", "wo"], ["o"], name="/dit/proj_out/MatMul"),
        helper.make_node("Reshape", ["k", "shape"], ["k2"], name="/dit/blocks.1/Reshape"),
        helper.make_node("Gemm", ["k2", "wf"], ["f"], name="/dit/blocks.1/ffn/net.2/Gemm", transB=1),
    ]
    inits = [w("wq", (8, 8)), w("wk", (8, 8)), w("wv", (8, 8)), w("wo", (8, 4)), w("wf", (5, 8)),
             numpy_helper.from_array(np.array([6, 8], np.int64), "shape")]
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", elem, [2, 3, 8])],
                              [helper.make_tensor_value_info(n, elem, shape)
                               for n, shape in (("o", [2, 3, 4]), ("v", [2, 3, 8]), ("f", [6, 5]))],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _synthetic_stats(x: np.ndarray, model) -> CalibrationStats:
    """Exact statistics of the synthetic graph's linear inputs for input x."""
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xs = x.reshape(-1, 8)
    k2 = (x @ w["wk"]).reshape(6, 8)
    qv = (x @ w["wq"]).reshape(-1, 8)

    def lin(a):
        return LinearStats(float(np.abs(a).max()), np.abs(a).max(0).tolist())

    return CalibrationStats({"blocks.1.attn1.to_q": lin(xs), "blocks.1.attn1.to_k": lin(xs),
                             "blocks.0.attn1.to_v": lin(xs), "proj_out": lin(qv), "blocks.1.ffn.net.2": lin(k2)})


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_qdq_placement_on_a_synthetic_graph(precision):
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    model = _synthetic()
    want = _session(model).run(None, {"x": x})
    report = quantize_model(model, QuantPlan(QuantConfig(precision), _synthetic_stats(x, model), 8, 32))
    onnx.checker.check_model(model, full_check=True)

    assert report.quantized == {p: f"linear {precision}" for p in
                                ("blocks.1.attn1.to_q", "blocks.1.attn1.to_k", "blocks.1.ffn.net.2")}
    assert "head" in report.kept["proj_out"] and "block 0" in report.kept["blocks.0.attn1.to_v"]
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["/dit/proj_out/MatMul"].input[1] == "wo" and nodes["/dit/blocks.0/attn1/to_v/MatMul"].input[1] == "wv"
    # One activation Q/DQ for the two linears sharing x (+ one for the Gemm's input), three weight DQs.
    assert _ops(model).count("QuantizeLinear") == 2 and _ops(model).count("DequantizeLinear") == 5
    q_in = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if precision == "int8":  # SmoothQuant: x / s feeds the quantizer, s is folded into the weights
        smooth = [n for n in model.graph.node if n.op_type == "Mul"]
        assert len(smooth) == 2 and {n.output[0] for n in smooth} == set(q_in) and smooth[0].input[0] == "x"
    else:
        assert "x" in q_in
    qtype = TensorProto.FLOAT8E4M3FN if precision == "fp8" else TensorProto.INT8
    weights = {t.name: t for t in model.graph.initializer}
    dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    assert {weights[k].data_type for k in dq} == {qtype}
    axes = sorted(next(a.i for a in n.attribute if a.name == "axis") for n in dq.values())
    assert axes == [0, 1, 1], "per output channel: axis 1 of a MatMul's [in, out], axis 0 of Gemm transB=1"
    assert not {"wq", "wk", "wf"} & set(weights), "the float weights are gone"

    got = dict(zip(("o", "v", "f"), _session(model).run(None, {"x": x})))
    assert np.array_equal(got["v"], want[1]), "block 0's linear is untouched"
    for name, w in (("o", want[0]), ("f", want[2])):
        err = relative_error(torch.from_numpy(got[name]), torch.from_numpy(w))
        assert 1e-5 < err < 0.1, (name, err)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_qdq_graph_in_bf16_is_type_consistent(precision):
    """TensorRT gets bf16 graphs (ONNX Runtime cannot run them): every inserted scale, smoothing
    constant and dequantized tensor must be bf16, or its strongly typed build would fail."""
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    stats = _synthetic_stats(x, _synthetic())
    model = _synthetic(elem=TensorProto.BFLOAT16)
    quantize_model(model, QuantPlan(QuantConfig(precision), stats, 8, 32))
    onnx.checker.check_model(model, full_check=True)  # strict type inference included
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    dq_outputs = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq_outputs) == 5 and {types[o] for o in dq_outputs} == {TensorProto.BFLOAT16}
    consts = [n for n in inits if n.endswith(("_scale", "_smooth"))]
    assert consts and {inits[n] for n in consts} == {TensorProto.BFLOAT16}


def test_qdq_pass_refuses_what_it_cannot_do():
    x = np.ones((2, 3, 8), np.float32)
    stats = _synthetic_stats(x, _synthetic())
    del stats.linear["blocks.1.ffn.net.2"]
    with pytest.raises(QuantizeError, match="no calibration statistics for 'blocks.1.ffn.net.2'"):
        quantize_model(_synthetic(), QuantPlan(QuantConfig("fp8"), stats, 8, 32))
    with pytest.raises(QuantizeError, match="needs opset 19"):
        quantize_model(_synthetic(opset=18), QuantPlan(QuantConfig("fp8"), stats, 8, 32))


def test_onnxruntime_fp8_rounding_is_torch_e4m3():
    """Weights are quantized with torch, activations by ONNX Runtime's QuantizeLinear: both must
    round (and saturate) the same E4M3 way, or FP8 here would not be what TensorRT computes."""
    values = np.concatenate([np.linspace(-500, 500, 2001), np.geomspace(1e-4, 460, 500)]).astype(np.float32)
    node_q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    node_dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    graph = helper.make_graph([node_q, node_dq], "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                               helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", QDQ_OPSET)])
    model.ir_version = 9
    got = _session(model).run(None, {"x": values})[0]
    want = torch.from_numpy(values).clamp(-448, 448).to(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(got, want) and got.max() == 448 and got.min() == -448


# ------------------------------------------------------------------------------------ the tiny DiT
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny DiT's fp32 graphs (opset 19), its calibration on a 1-prompt, 4-step trajectory."""
    from wan_rt.export.onnx_export import export_onnx
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.models import load_dit
    from wan_rt.runtime.graphs import graph_module, graph_spec, shape_profile

    resolved = resolve_checkpoint(SPEC)
    spec, name = resolved.spec, "dit_high_noise"
    trajectory = record_trajectory(SPEC, prompts=["a red fox running through snow"], steps=4,
                                   height=32, width=32, frames=9)
    stats = calibrate_experts(resolved, trajectory, [name])[name]
    dit = load_dit(resolved.files, name, dtype=torch.float32, device="cpu")
    profile = shape_profile(spec, height=32, width=32, frames=9)
    folder = tmp_path_factory.mktemp("tiny_dit")
    paths, modules = {}, {}
    for g in ("text", "main"):
        modules[g] = graph_module(name, g, dit)
        paths[g] = folder / g / "model.onnx"
        export_onnx(modules[g], graph_spec(spec, name, g), profile, paths[g], compute_dtype=torch.float32,
                    opset=QDQ_OPSET)
    return SimpleTiny(spec, dit, stats, trajectory.calls_for(name), paths, modules)


@dataclasses.dataclass
class SimpleTiny:
    spec: object
    dit: nn.Module
    stats: CalibrationStats
    calls: list
    paths: dict
    modules: dict

    def quantized(self, tmp_path, config: QuantConfig):
        """Quantized copies of both graphs -> ({graph: path}, {graph: report})."""
        plan = QuantPlan(config, self.stats, self.spec.dit.num_layers, self.spec.dit.head_dim)
        out, reports = {}, {}
        for g, path in self.paths.items():
            out[g] = tmp_path / f"{g}.onnx"
            shutil.copy(path, out[g])
            _, reports[g] = quantize_onnx_file(out[g], plan, self.modules[g])
        return out, reports


def test_qdq_placement_on_the_tiny_dit(tiny, tmp_path):
    _, reports = tiny.quantized(tmp_path, QuantConfig("fp8"))
    blocks = [f"blocks.{i}" for i in (0, 1)]
    main_linears = [f"{b}.{m}" for b in blocks for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                         "attn2.to_q", "attn2.to_out.0", "ffn.net.0.proj",
                                                         "ffn.net.2")]
    assert reports["main"].quantized == {p: "linear fp8" for p in main_linears}
    assert set(reports["main"].kept) == {"condition_embedder.time_embedder.linear_1",
                                         "condition_embedder.time_embedder.linear_2",
                                         "condition_embedder.time_proj", "proj_out"}
    # The text graph: cross-attention K/V projections quantized, the text embedder not (found by
    # weight content: the exporter names these nodes "/to_k_1/MatMul").
    assert reports["text"].quantized == {f"{b}.attn2.{m}": "linear fp8" for b in blocks for m in ("to_k", "to_v")}
    assert set(reports["text"].kept) == {"condition_embedder.text_embedder.linear_1",
                                         "condition_embedder.text_embedder.linear_2"}

    _, with_attention = tiny.quantized(tmp_path, QuantConfig("fp8", fp8_attention=True))
    assert {k: v for k, v in with_attention["main"].quantized.items() if "@" in k} == {
        f"{b}.{a}:{m}": "attention fp8" for b in blocks for a in ("attn1", "attn2") for m in ("q@k", "p@v")}


def test_first_and_last_blocks_stay_high_precision_in_an_8_layer_dit(tmp_path):
    from wan_rt.config import get_spec
    from wan_rt.export.onnx_export import export_onnx
    from wan_rt.models.dit import WanDiT
    from wan_rt.runtime.graphs import graph_module, graph_spec, sample_inputs, shape_profile

    spec = get_spec(SPEC)
    spec = dataclasses.replace(spec, dit=dataclasses.replace(spec.dit, num_layers=8))
    torch.manual_seed(0)
    dit = WanDiT(spec.dit).eval()
    name = spec.dit_components[0]
    gspec, profile = graph_spec(spec, name, "main"), shape_profile(spec, height=16, width=16, frames=5)
    module = graph_module(name, "main", dit)
    path = tmp_path / "model.onnx"
    export_onnx(module, gspec, profile, path, compute_dtype=torch.float32, opset=QDQ_OPSET)
    x = sample_inputs(gspec, profile.opt, torch.float32)
    with ActivationRecorder(dit) as rec, torch.no_grad():
        module(*(x[n] for n in gspec.input_names))
    _, report = quantize_onnx_file(path, QuantPlan(QuantConfig("int8"), rec.stats(), 8, spec.dit.head_dim), module)
    blocks = {int(p.split(".")[1]) for p in report.quantized}
    kept_blocks = {int(p.split(".")[1]) for p in report.kept if p.startswith("blocks.")}
    assert blocks == {1, 2, 3, 4, 5, 6} and kept_blocks == {0, 7}


def test_attention_amax_is_taken_where_the_graph_quantizes(tiny):
    """The recorded q/k (after RoPE) times head_dim^-1/4 is the max |.| of the exported Q.K^T
    matmul's inputs: torch's SDPA export scales each side by sqrt(1/sqrt(d))."""
    call = tiny.calls[0]
    stats = calibrate_module(tiny.dit, [call])
    model = onnx.load(str(tiny.paths["main"]))
    qk = next(n for n in model.graph.node if n.op_type == "MatMul" and n.name == "/dit/blocks.0/attn1/MatMul")
    model.graph.output.extend([helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in qk.input])
    kv = _session(tiny.paths["text"]).run(None, {"context": call.inputs["context"].numpy()})[0]
    q, k = _session(model).run(list(qk.input), {"latents": call.inputs["latents"].numpy(),
                                               "timestep": call.inputs["timestep"].numpy(), "text_kv": kv})
    c = tiny.spec.dit.head_dim ** -0.25
    assert np.abs(q).max() == pytest.approx(stats.attention["blocks.0.attn1"]["q"] * c, rel=1e-5)
    assert np.abs(k).max() == pytest.approx(stats.attention["blocks.0.attn1"]["k"] * c, rel=1e-5)


@pytest.mark.parametrize("precision,attention", [("fp8", False), ("fp8", True), ("int8", False)])
def test_quantized_tiny_dit_runs_in_onnxruntime_with_small_real_error(tiny, tmp_path, precision, attention):
    """Same trajectory inputs through the fp32 and the Q/DQ graphs: quantization must show
    (error > 1e-4, so it really happened) and stay small (< 0.1)."""
    paths, _ = tiny.quantized(tmp_path, QuantConfig(precision, fp8_attention=attention))
    sessions = {g: (_session(paths[g]), _session(tiny.paths[g])) for g in paths}
    errors = []
    for call in tiny.calls:
        x = {k: v.numpy() for k, v in call.inputs.items()}
        kv, kv_ref = (s.run(None, {"context": x["context"]})[0] for s in sessions["text"])
        out = sessions["main"][0].run(None, {"latents": x["latents"], "timestep": x["timestep"], "text_kv": kv})[0]
        ref = sessions["main"][1].run(None, {"latents": x["latents"], "timestep": x["timestep"], "text_kv": kv_ref})[0]
        assert relative_error(torch.from_numpy(ref), call.noise_pred) < 1e-5  # the fp32 graph is the oracle
        errors.append(relative_error(torch.from_numpy(out), torch.from_numpy(ref)))
        errors.append(relative_error(torch.from_numpy(kv), torch.from_numpy(kv_ref)))
    assert 1e-4 < min(errors) and max(errors) < 0.1, errors


def _same_content(a, b) -> None:
    """The same graph and the same initializers (name, type, shape, bytes), wherever they are stored."""
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ia, ib = list(ma.graph.initializer), list(mb.graph.initializer)
    assert [(t.name, t.data_type, list(t.dims)) for t in ia] == [(t.name, t.data_type, list(t.dims)) for t in ib]
    assert all(numpy_helper.to_array(x).tobytes() == numpy_helper.to_array(y).tobytes() for x, y in zip(ia, ib))
    for m in (ma, mb):
        del m.graph.initializer[:]
    assert ma.SerializeToString() == mb.SerializeToString()


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_graph_with_external_data_is_quantized_tensor_by_tensor_to_the_same_model(tiny, tmp_path, precision):
    """The streamed path (weights read from the data file one at a time, the new ones written as
    they are made) writes what loading the model whole and quantizing it in memory writes."""
    from wan_rt.export.onnx_export import export_graph, export_onnx
    from wan_rt.runtime.graphs import graph_spec, shape_profile

    gspec = graph_spec(tiny.spec, "dit_high_noise", "main")
    profile = shape_profile(tiny.spec, height=32, width=32, frames=9)
    plan = QuantPlan(QuantConfig(precision, fp8_attention=precision == "fp8"), tiny.stats,
                     tiny.spec.dit.num_layers, tiny.spec.dit.head_dim)
    module = tiny.modules["main"]
    streamed = tmp_path / "streamed" / "model.onnx"
    export_onnx(module, gspec, profile, streamed, compute_dtype=torch.float32, opset=QDQ_OPSET,
                external_data_threshold=0)  # every weight forced into model.onnx.data
    assert (streamed.parent / "model.onnx.data").is_file()
    whole = tmp_path / "whole" / "model.onnx"
    whole.parent.mkdir()
    onnx.save_model(onnx.load(str(streamed)), str(whole))  # the same model, weights inline
    files, report = quantize_onnx_file(whole, plan, module)
    assert files == ["model.onnx"]

    files, streamed_report = quantize_onnx_file(streamed, plan, module)
    assert files == ["model.onnx", "model.onnx.data"] and streamed_report == report
    assert sorted(p.name for p in streamed.parent.iterdir()) == files  # no staging file left
    _same_content(whole, streamed)
    call = tiny.calls[0].inputs
    kv = _session(tiny.paths["text"]).run(None, {"context": call["context"].numpy()})[0]
    feed = {"latents": call["latents"].numpy(), "timestep": call["timestep"].numpy(), "text_kv": kv}
    np.testing.assert_array_equal(_session(streamed).run(None, feed)[0], _session(whole).run(None, feed)[0])

    # A graph exported without its weights (what TensorRT builds quantize: the weights are read
    # from the module as the pass writes them, never staged in the export dtype): the same files,
    # byte for byte.
    deferred = tmp_path / "deferred" / "model.onnx"
    weights = export_graph(module, gspec, profile, deferred, compute_dtype=torch.float32, opset=QDQ_OPSET)
    assert sorted(p.name for p in deferred.parent.iterdir()) == ["model.onnx"]  # no weights written yet
    with pytest.raises(QuantizeError, match="exported without its weights"):
        quantize_onnx_file(deferred, plan, module)
    files, deferred_report = quantize_onnx_file(deferred, plan, module, weights)
    assert files == ["model.onnx", "model.onnx.data"] and deferred_report == report
    assert sorted(p.name for p in deferred.parent.iterdir()) == files
    for name in files:
        assert (deferred.parent / name).read_bytes() == (streamed.parent / name).read_bytes(), name


def test_deferred_weights_are_matched_to_their_linears_without_reading_them(tiny, tmp_path):
    """A weight export_graph left in the module is matched by the Parameter it is made from (an
    expert's weights are not read a second time just to be told apart): the same paths content
    matching finds, and not one deferred weight's bytes read."""
    from wan_rt.export import quantize
    from wan_rt.export.onnx_export import export_graph, is_deferred
    from wan_rt.runtime.graphs import graph_spec, shape_profile

    gspec = graph_spec(tiny.spec, "dit_high_noise", "main")
    profile = shape_profile(tiny.spec, height=32, width=32, frames=9)
    path = tmp_path / "deferred" / "model.onnx"
    weights = export_graph(tiny.modules["main"], gspec, profile, path, compute_dtype=torch.float32, opset=QDQ_OPSET)
    model = onnx.load(str(path), load_external_data=False)
    deferred = {t.name for t in model.graph.initializer if is_deferred(t)}

    class Spy(quantize._TensorFiles):
        read: list[str] = []

        def as_float(self, t):
            Spy.read.append(t.name)
            return super().as_float(t)

    by_source = quantize.match_linears(model, tiny.modules["main"], Spy(path.parent, deferred=weights))
    assert not deferred & set(Spy.read)
    assert len(by_source) >= 6 * tiny.spec.dit.num_layers  # every block's self/cross-attention q,k,v,o... found
    assert set(by_source) <= deferred | set(Spy.read)
    whole = onnx.load(str(tiny.paths["main"]))  # the same graph exported with its weights
    assert by_source == quantize.match_linears(whole, tiny.modules["main"])


# ------------------------------------------------------------------------------------ a build's calibration
def test_bf16_calibration_costs_no_fp8_accuracy(tiny, tmp_path):
    """A bf16 checkpoint calibrates in bf16 (no fp32 copy of its weights). Its statistics differ
    from the fp32 oracle's, but the fp8 graph they give must stay within 25% of the error the
    fp32 statistics give (measured: within 2-6% either way on the tiny and 6-layer models)."""
    from wan_rt.export.calibrate import calibrate_checkpoint

    name = "dit_high_noise"
    bf16 = calibrate_checkpoint(SPEC, [name], prompts=["a red fox running through snow"], steps=4, height=32,
                                width=32, frames=9, dtypes=dict.fromkeys(["text_encoder", *tiny.spec.dit_components],
                                                                         torch.bfloat16))[name]
    assert bf16.calls == len(tiny.calls) and set(bf16.linear) == set(tiny.stats.linear)
    assert any(bf16.linear[k].amax != tiny.stats.linear[k].amax for k in bf16.linear)  # really bf16
    errors = {}
    for label, stats in (("fp32", tiny.stats), ("bf16", bf16)):
        (tmp_path / label).mkdir()
        out, _ = dataclasses.replace(tiny, stats=stats).quantized(tmp_path / label, QuantConfig("fp8"))
        text, main = _session(out["text"]), _session(out["main"])
        errs = []
        for call in tiny.calls:
            x = {k: v.numpy() for k, v in call.inputs.items()}
            kv = text.run(None, {"context": x["context"]})[0]
            got = main.run(None, {"latents": x["latents"], "timestep": x["timestep"], "text_kv": kv})[0]
            errs.append(relative_error(torch.from_numpy(got), call.noise_pred))
        errors[label] = float(np.mean(errs))
    assert 1e-4 < errors["bf16"] <= 1.25 * errors["fp32"], errors


def test_calibration_loads_one_component_at_a_time_in_its_stored_dtype(monkeypatch, tmp_path):
    """Text encoder, then the experts in stage order, each released before the next loads; no
    VAE (nothing is decoded); the run stops once the experts to calibrate had their stages. A
    bf16 DiT file calibrates in bf16; fp32 files in fp32 when they fit, else bf16."""
    import weakref

    import wan_rt.eager as eager
    from safetensors.torch import load_file, save_file

    from wan_rt.export import calibrate
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.tiny import ensure_tiny_checkpoint

    folder = tmp_path / "bf16"
    shutil.copytree(ensure_tiny_checkpoint(SPEC), folder)
    for sub in ("transformer", "transformer_2"):
        weights = folder / sub / "diffusion_pytorch_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    resolved = resolve_checkpoint(str(folder))
    names = ["text_encoder", "dit_high_noise", "dit_low_noise"]
    bf16, f32 = torch.bfloat16, torch.float32
    assert calibrate.calibration_dtypes(resolved, names, (32, 32, 9)) == {"text_encoder": f32, "dit_high_noise": bf16,
                                                                          "dit_low_noise": bf16}
    assert calibrate.calibration_dtypes(resolved, names, (32, 32, 9), budget=0)["text_encoder"] == bf16

    loads, alive = [], []
    build = eager.build_eager_components

    def counted(resolved, device, dtype, names, **kwargs):
        out = build(resolved, device, dtype, names, **kwargs)
        alive[:] = [ref for ref in alive if ref() is not None]
        loads.append((names[0], dtype, len(alive)))
        alive.extend(weakref.ref(c.module) for c in out.values())
        return out

    monkeypatch.setattr(eager, "build_eager_components", counted)
    for experts, want in ((["dit_high_noise"], names[:2]), (["dit_low_noise"], names)):
        loads.clear()
        stats = calibrate.calibrate_checkpoint(str(folder), experts, prompts=["a fox", "a city"], steps=4,
                                               height=32, width=32, frames=9)
        assert [name for name, _, _ in loads] == want
        assert [dtype for _, dtype, _ in loads] == [f32, bf16, bf16][:len(want)]
        assert all(others == 0 for _, _, others in loads), "a component loaded while another was alive"
        assert stats[experts[0]].calls > 0 and stats[experts[0]].linear


# ------------------------------------------------------------------------------------ calibration size
def test_calibration_size_is_small_and_valid():
    from wan_rt.config import get_spec
    from wan_rt.export.calibrate import calibration_size
    from wan_rt.config import check_request

    cases = {("t2v-A14B", 720, 1280, 81): (144, 256, 17), ("ti2v-5B", 704, 1280, 121): (128, 256, 17),
             ("t2v-A14B", 1280, 720, 5): (256, 144, 5), (SPEC, 32, 32, 5): (32, 32, 5)}  # tiny: unchanged
    for (name, height, width, frames), want in cases.items():
        spec = get_spec(name)
        assert calibration_size(spec, height, width, frames) == want
        check_request(spec, *want, 1)


def test_a_quantized_build_calibrates_at_the_small_size(monkeypatch, tmp_path):
    """`wan-rt build --precision fp8` at 1280x720x81 records its trajectory at 256x144x17."""
    import wan_rt.export.calibrate as calibrate
    from wan_rt.build import build_engines

    class Recorded(Exception):
        pass

    seen = {}

    def record(model, experts, **kwargs):
        seen.update(kwargs)
        raise Recorded  # what follows is the tested fp8 build

    monkeypatch.setattr(calibrate, "calibrate_checkpoint", record)
    with pytest.raises(Recorded):
        build_engines(SPEC, "ort", tmp_path / "engines", precision="fp8", height=720, width=1280, frames=81,
                      components=["dit_high_noise"], log=lambda s: None)
    assert (seen["height"], seen["width"], seen["frames"]) == (144, 256, 17)


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_build_then_parity_reports_quality(precision, tmp_path, capsys):
    from wan_rt.cli import main
    from wan_rt.runtime.engines_dir import EngineManifest

    engines = tmp_path / "engines"
    assert main(["build", "--backend", "ort", "--precision", precision, "--engines-dir", str(engines)]) == 0
    built = capsys.readouterr().out
    assert "calibrating dit_high_noise, dit_low_noise" in built
    m = EngineManifest.read(engines / "dit_low_noise")
    assert m.precision == precision and m.build_args["tolerances"]["noise_pred_rel_l2"] > 0
    assert m.build_args["quant"]["precision"] == precision and len(m.build_args["calibration_sha256"]) == 64
    report = json.loads((engines / "dit_low_noise" / "main" / "qdq_report.json").read_text())
    assert len(report["quantized"]) == 16 and "proj_out" in report["kept"]
    assert EngineManifest.read(engines / "vae_decoder").build_args.get("quant") is None

    assert main(["parity", "--engines-dir", str(engines)]) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if " traj " in line]
    assert len(steps) == 4 and all(" ok " in line for line in steps), out
    assert {line.split()[0] for line in steps} == {"dit_high_noise", "dit_low_noise"}
    assert any(line.startswith("pipeline") and " psnr " in line and " ok " in line for line in out.splitlines())
    graphs = [line for line in out.splitlines() if line.startswith(("text_encoder", "vae_"))]
    assert len(graphs) == 10 and all(" 1e-04 " in line for line in graphs), "fp32 components: fp32 tolerance"
    assert "0 failed" in out

    assert main(["build", "--backend", "ort", "--precision", precision, "--engines-dir", str(engines)]) == 0
    again = capsys.readouterr().out
    assert "calibrating" not in again and again.count("up to date") == 5


def test_a_psnr_row_fails_below_its_bound():
    from wan_rt.parity import ParityRow, format_rows

    low, high = (ParityRow("pipeline", "video", "psnr", db, 25.0, higher_is_better=True) for db in (20.0, 30.0))
    assert not low.ok and high.ok
    assert "20.0 dB" in format_rows([low]) and "FAIL" in format_rows([low])
