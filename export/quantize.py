"""Q/DQ quantization of a DiT graph's ONNX: FP8 E4M3 or INT8 SmoothQuant on the linear layers,
optionally FP8 on the attention matmuls. The result is a plain ONNX (opset 19) that TensorRT
builds strongly typed and that ONNX Runtime's CPU provider executes.

    plan = QuantPlan(QuantConfig("fp8"), stats, num_layers=40, head_dim=128)
    files = plan.apply(Path(".../model.onnx"), graph_module)   # rewrites the file in place

Placement rules (what `quantize_model` does, and what tests/test_quantize.py checks):
* candidates are MatMul/Gemm nodes whose weight is an initializer. Each is matched to its
  nn.Linear by the Parameter it is made from, or else by content (`match_linears`: node names
  are unreliable, the exporter scopes them by forward calls), and
  `wan_rt.precision.keep_reason` decides on the module path:
  embeddings, modulation, norms, the head and the first/last blocks stay in the graph's
  precision, untouched; so does a MatMul that matches no linear layer;
* activations: one per-tensor QuantizeLinear -> DequantizeLinear per distinct input tensor,
  shared by the linears reading it (to_q/to_k/to_v), scale = amax / qmax from calibration;
* weights: stored quantized (int8 or float8e4m3fn initializers, 1 byte each) with a per-output-
  channel DequantizeLinear; scales are rounded to the graph's float type first, so TensorRT's
  bf16 graph and ONNX Runtime's fp32 one dequantize to exactly the values quantized here;
* INT8 SmoothQuant (alpha 0.5): per input channel s_j = amax_x[j]^a / amax_w[j]^(1-a), folded
  into the weights (W[j, :] * s_j) and a constant Mul(x, 1/s) before the activation's Q, which
  TensorRT fuses into the preceding pointwise ops. The norms before these linears cannot absorb
  1/s: the modulation (1 + scale) between them is per sample. Linears sharing an input share s;
* FP8 attention (flag, head_dim % 16 == 0 as Model Optimizer's recipe requires): per-tensor Q/DQ
  on both inputs of Q.K^T and of P.V in the blocks that are not kept. torch's SDPA export scales
  q and k^T each by head_dim^-1/4 before the matmul, so their amax is the recorded one times that;
  the softmax output P is in [0, 1] and gets amax 1.

ONNX Runtime 1.32's CPU provider runs QuantizeLinear/DequantizeLinear with float8e4m3fn (opset
19, saturating) natively: FP8 here is real E4M3 rounding, not an emulation. Its matmuls then run
in float32 on the dequantized values; INT8 Q/DQ around MatMul may be fused by ONNX Runtime into
integer kernels. Both are checked against float32 in tests/test_quantize.py.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from wan_rt.export.calibrate import DEFAULT_PROMPTS, CalibrationStats
from wan_rt.export.onnx_export import INLINE_BYTES, ModuleWeights, append_external, is_deferred
from wan_rt.precision import QUANTIZED_PRECISIONS, keep_reason

QDQ_OPSET = 19                  # float8 Q/DQ needs opset 19 (TensorRT 10 parses it)
QMAX = {"fp8": 448.0, "int8": 127.0}
# Tensors below this stay inline in a model with external data (as onnx.save_model's default).
REPORT_FILE = "qdq_report.json"


class QuantizeError(RuntimeError):
    """The graph cannot be quantized as asked (missing statistics, unexpected pattern)."""


@dataclass(frozen=True)
class QuantConfig:
    precision: str                        # "fp8" | "int8"
    fp8_attention: bool = False
    smooth_alpha: float = 0.5             # SmoothQuant migration strength (int8)
    calib_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    calib_steps: int = 8                  # capped at the model's default steps

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZED_PRECISIONS:
            raise ValueError(f"quantized precision must be one of {QUANTIZED_PRECISIONS}, not {self.precision!r}")
        if self.fp8_attention and self.precision != "fp8":
            raise ValueError("fp8_attention needs precision fp8")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")

    def manifest_args(self) -> dict[str, Any]:
        return {"quant": {**asdict(self), "calib_prompts": list(self.calib_prompts)}}


def attention_fp8_supported(head_dim: int) -> bool:
    """Model Optimizer quantizes attention in FP8 only for head sizes TensorRT's fused FP8
    attention handles (multiples of 16; the Wan experts have 128)."""
    return head_dim % 16 == 0


@dataclass
class QuantReport:
    # module path ("blocks.3.ffn.net.2", "blocks.3.attn1:q@k") -> "linear fp8", "attention fp8", ...
    quantized: dict[str, str] = field(default_factory=dict)
    # module path (node name if it matches no module) -> why it stays high precision
    kept: dict[str, str] = field(default_factory=dict)
    # weight initializer of every matched linear, as named in the written graph (the stored
    # int8/fp8 tensor where quantized) -> module path: ties a backend's layers to wan_rt.precision
    weights: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.quantized)} matmuls quantized, {len(self.kept)} kept high precision"


@dataclass(frozen=True)
class QuantPlan:
    """Everything a backend's build_graph needs to quantize one DiT graph's ONNX."""

    config: QuantConfig
    stats: CalibrationStats
    num_layers: int
    head_dim: int
    # fp8: per-tensor weight scales a checkpoint already quantized with (module path -> scale:
    # ComfyUI's fp8_scaled `scale_weight`); those weights keep the file's fp8 values and scale.
    weight_scales: Mapping[str, float] = field(default_factory=dict)

    def apply(self, onnx_path: Path, module: torch.nn.Module | None = None,
              weights: "ModuleWeights | None" = None) -> list[str]:
        """Quantize the file in place; returns the files (relative names) now in its folder.
        `module`: the graph module it was exported from, to find the linears by weight content.
        `weights`: for a graph from onnx_export.export_graph, its weights not yet written."""
        files, report = quantize_onnx_file(Path(onnx_path), self, module, weights)
        (Path(onnx_path).parent / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1, sort_keys=True))
        return [*files, REPORT_FILE]


# ------------------------------------------------------------------------------------ names
def module_path(node_name: str, prefix: str = "dit") -> str:
    """Module path of an exported node: "/dit/blocks.0/attn1/to_q/MatMul" -> "blocks.0.attn1.to_q"
    (the scope, minus the graph module's attribute holding the DiT)."""
    scope = [p for p in node_name.split("/") if p][:-1]
    if scope and scope[0] == prefix:
        scope = scope[1:]
    return ".".join(scope)


# ------------------------------------------------------------------------------------ tensors
_TORCH_OF: dict[int, torch.dtype] = {}  # onnx elem type -> torch dtype, filled lazily (onnx imported inside functions)


def _torch_dtype(elem_type: int) -> torch.dtype:
    from onnx import TensorProto

    if not _TORCH_OF:
        _TORCH_OF.update({TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                          TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8,
                          TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn})
    return _TORCH_OF[elem_type]


def _make_tensor(name: str, value: torch.Tensor, elem_type: int) -> tuple[Any, np.ndarray]:
    """(a TensorProto of `value` cast to `elem_type` without its bytes, those bytes): float8 and
    bf16 via torch, as numpy has neither; little-endian, as ONNX stores them."""
    from onnx import TensorProto

    t = value.detach().cpu().to(_torch_dtype(elem_type)).contiguous()
    return TensorProto(name=name, data_type=elem_type, dims=list(t.shape)), t.reshape(-1).view(torch.uint8).numpy()


def _as_float(proto) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(proto).astype(np.float32)


def _round_to(x: np.ndarray, elem_type: int) -> np.ndarray:
    """x as the graph's float type would hold it (scales must dequantize to what we quantized)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(_torch_dtype(elem_type)).float().numpy()


def smooth_factors(act_channel_amax: np.ndarray, weight_channel_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = amax_x[j]^alpha / amax_w[j]^(1 - alpha); 1 where a channel is all zero."""
    a = np.asarray(act_channel_amax, np.float64)
    w = np.asarray(weight_channel_amax, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = np.clip(a[ok] ** alpha / w[ok] ** (1 - alpha), 1e-4, 1e4)
    return s.astype(np.float32)


def quantize_weight(w: np.ndarray, precision: str, out_axis: int, elem_type: int,
                    given_scale: float | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Per-output-channel symmetric quantization -> (quantized values as float32, scales).
    `given_scale`: the one scale the weights were quantized with already (fp8 checkpoints):
    dividing by it gives back their fp8 values, so nothing is requantized."""
    reduce = 1 - out_axis
    amax = np.abs(w).max(axis=reduce)
    scale = _round_to(np.where(amax > 0, amax / QMAX[precision], 1.0), elem_type)
    if given_scale is not None:
        scale = _round_to(np.full_like(amax, given_scale, dtype=np.float32), elem_type)
    shape = [1, 1]
    shape[out_axis] = -1
    scaled = torch.from_numpy(w / scale.reshape(shape))
    if precision == "int8":
        q = scaled.round().clamp(-127, 127)
    else:
        q = scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return q, scale


# ------------------------------------------------------------------------------------ the pass
class _Graph:
    """Index of a graph being rewritten: producers, initializers, and nodes to insert."""

    def __init__(self, model, tensors: "_TensorFiles | None" = None):
        self.model, self.graph = model, model.graph
        self.tensors = tensors or _TensorFiles(None)  # reads initializers (and writes new ones) by file
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.uses: dict[str, int] = defaultdict(int)
        for n in self.graph.node:
            for i in n.input:
                self.uses[i] += 1
        self.order = {id(n): k for k, n in enumerate(self.graph.node)}
        self.before: dict[int, list] = defaultdict(list)
        self.new_inits: list = []
        self.dropped: set[str] = set()
        self._names: set[str] = set(self.inits) | set(self.producer)
        self.float_type = self._compute_type()

    def _compute_type(self) -> int:
        """The graph's compute type: that of most 2-D float weights (a bf16 DiT keeps its
        time embedder in float32, diffusers' policy, so take the majority, not the first)."""
        from onnx import TensorProto

        floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
        counts: dict[int, int] = defaultdict(int)
        for t in self.inits.values():
            if t.data_type in floats and len(t.dims) == 2:
                counts[t.data_type] += 1
        return max(counts, key=counts.__getitem__) if counts else TensorProto.FLOAT

    def name(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def constant(self, base: str, value: torch.Tensor, elem_type: int) -> str:
        name = self.name(base)
        self.new_inits.append(self.tensors.store(*_make_tensor(name, value, elem_type)))
        return name

    def value(self, name: str) -> np.ndarray:
        """An initializer as float32, read from wherever it is stored."""
        return self.tensors.as_float(self.inits[name])

    def insert(self, before_node, node) -> None:
        self.before[id(before_node)].append(node)

    def finish(self) -> None:
        nodes = []
        for n in self.graph.node:
            nodes.extend(self.before.get(id(n), []))
            nodes.append(n)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        kept = [t for t in self.graph.initializer if t.name not in self.dropped]
        del self.graph.initializer[:]
        self.graph.initializer.extend([*kept, *self.new_inits])


def _qdq(g: _Graph, x: str, amax: float, precision: str, float_type: int, first_consumer, tag: str) -> str:
    """x -> QuantizeLinear -> DequantizeLinear (per tensor); returns the dequantized name."""
    from onnx import TensorProto, helper

    zp_type = TensorProto.FLOAT8E4M3FN if precision == "fp8" else TensorProto.INT8
    scale = g.constant(f"{tag}_scale", torch.tensor(max(amax, 1e-12) / QMAX[precision]), float_type)
    zero = g.constant(f"{tag}_zero", torch.tensor(0.0), zp_type)
    q, dq = g.name(f"{tag}_q"), g.name(f"{tag}_dq")
    g.insert(first_consumer, helper.make_node("QuantizeLinear", [x, scale, zero], [q], name=q))
    g.insert(first_consumer, helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=dq))
    return dq


def quantize_model(model, plan: QuantPlan, linear_paths: Mapping[str, str] | None = None,
                   tensors: "_TensorFiles | None" = None) -> QuantReport:
    """Insert Q/DQ into `model` (an onnx.ModelProto) in place; see module doc. Its weights are
    loaded, or `tensors` reads them from their external data files (and writes the new ones).

    `linear_paths` maps weight initializer names to WanDiT module paths: from `match_linears`
    (by weight content, robust to how the exporter named things) or, by default, from node names
    (`linear_paths_from_names`; fine for graphs whose every module ran through its forward)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_OPSET:
        raise QuantizeError(f"Q/DQ with float8 needs opset {QDQ_OPSET}; the graph is opset {opset} "
                            f"(export it with opset={QDQ_OPSET})")
    if plan.config.fp8_attention and not attention_fp8_supported(plan.head_dim):
        raise QuantizeError(f"FP8 attention needs head_dim % 16 == 0, not {plan.head_dim}")
    g = _Graph(model, tensors)
    paths = dict(linear_paths) if linear_paths is not None else linear_paths_from_names(model)
    report = QuantReport()
    # Find the attention matmuls first: the linear pass rewires the to_out inputs they are named by.
    attention = _find_attention(g, paths) if plan.config.fp8_attention else []
    _quantize_linears(g, plan, paths, report)
    _quantize_attention(g, plan, attention, report)
    g.finish()
    return report


def linear_paths_from_names(model) -> dict[str, str]:
    """{weight initializer: module path} from the exporter's node scopes."""
    inits = {t.name for t in model.graph.initializer}
    return {n.input[1]: module_path(n.name) for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits}


def _weight_key(w: np.ndarray) -> tuple:
    w = np.ascontiguousarray(w, dtype=np.float32)
    return w.shape, hashlib.sha1(w.tobytes()).hexdigest()


def match_linears(model, module: torch.nn.Module, tensors: "_TensorFiles | None" = None) -> dict[str, str]:
    """{weight initializer: module path}. Paths are relative to the WanDiT (the graph module's
    `dit.` prefix is dropped). Node names cannot be trusted: the TorchScript exporter scopes by
    forward calls, so `dit.encode_text`'s calls to `block.attn2.to_k` come out as
    "/to_k_1/MatMul". So a weight export_graph left deferred is matched by what it is made of
    (the nn.Linear's own Parameter, as is or transposed: no bytes read), and any other by
    content: a linear's ONNX weight is its nn.Linear's weight transposed (MatMul) or as is (Gemm
    transB=1), bit for bit, hashed one at a time (`tensors` reads those stored as external data),
    so no second copy of the model is ever held."""
    tensors = tensors or _TensorFiles(None)
    linears = [(name[4:] if name.startswith("dit.") else name, sub) for name, sub in module.named_modules()
               if isinstance(sub, torch.nn.Linear)]
    by_parameter: dict[int, list[str]] = defaultdict(list)
    for path, sub in linears:
        by_parameter[id(sub.weight)].append(path)
    index: dict[tuple, list[str]] | None = None  # content hashes, made only if some weight needs them

    def by_content(init) -> list[str]:
        nonlocal index
        if index is None:
            index = defaultdict(list)
            for path, sub in linears:
                w = sub.weight.detach().float().cpu().numpy()
                index[_weight_key(w.T)].append(path)
                index[_weight_key(w)].append(path)
        return index.get(_weight_key(tensors.as_float(init)), [])

    def by_source(name: str) -> list[str]:
        source, fold = tensors.deferred.source(name)
        if fold is not None and fold != ("transpose", (1, 0)):
            return []  # cast or another permutation: not a linear's weight bit for bit
        return by_parameter.get(id(source), [])

    out = {}
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        init = inits.get(n.input[1])
        if init is None or len(init.dims) != 2:
            continue
        deferred = is_deferred(init) and tensors.deferred is not None and init.name in tensors.deferred
        found = sorted(set(by_source(init.name) if deferred else by_content(init)))
        if len(found) > 1:
            raise QuantizeError(f"weight {init.name} matches several linear layers {found}; cannot tell them apart")
        if found:
            out[init.name] = found[0]
    return out


def _quantize_linears(g: _Graph, plan: QuantPlan, paths: Mapping[str, str], report: QuantReport) -> None:
    from onnx import TensorProto, helper

    cfg, stats = plan.config, plan.stats
    groups: dict[str, list] = defaultdict(list)  # activation tensor -> the linears reading it
    path_of: dict[int, str] = {}
    for node in g.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in g.inits:
            continue
        path = paths.get(node.input[1])
        if path is None:
            report.kept[node.name] = "matches no nn.Linear of the model"
            continue
        reason = keep_reason(path, plan.num_layers)
        if reason is None and any(a.name == "transA" and a.i for a in node.attribute):
            reason = "Gemm with transA (not a linear layer)"
        if reason is not None:
            report.kept[path] = reason
            report.weights[node.input[1]] = path
            continue
        if path not in stats.linear:
            raise QuantizeError(f"no calibration statistics for {path!r} (node {node.name}); "
                                "calibrate the same model this graph was exported from")
        if g.uses[node.input[1]] != 1:
            raise QuantizeError(f"weight {node.input[1]} of {node.name} is shared by several nodes")
        groups[node.input[0]].append(node)
        path_of[id(node)] = path

    def weight(n) -> np.ndarray:
        """n's weight as float32 [in, out], read when needed: a group can be every block's
        cross-attention K/V (80 weights of a 14B expert's text graph), never all held at once."""
        w = g.value(n.input[1])
        return w.T if out_axis(n) == 0 else w

    def out_axis(n) -> int:
        return 0 if next((a.i for a in n.attribute if a.name == "transB"), 0) else 1

    for x, nodes in groups.items():
        first = min(nodes, key=lambda n: g.order[id(n)])
        node_paths = [path_of[id(n)] for n in nodes]
        float_type = g.inits[nodes[0].input[1]].data_type
        channel = np.max([np.asarray(stats.linear[p].channel_amax, np.float32) for p in node_paths], axis=0)
        dims = list(g.inits[nodes[0].input[1]].dims)
        in_features = dims[1] if out_axis(nodes[0]) == 0 else dims[0]
        if channel.shape[0] != in_features:
            raise QuantizeError(f"{node_paths[0]}: calibration saw {channel.shape[0]} input channels, "
                                f"the graph's weight has {in_features}")
        tag = node_paths[0].replace(".", "/") + ("/shared_in" if len(nodes) > 1 else "/in")
        src = x
        inv = None
        if cfg.precision == "int8":
            w_channel = np.max([np.abs(weight(n)).max(axis=1) for n in nodes], axis=0)
            # The graph multiplies by 1/s as its float type holds it; the weights are divided by
            # exactly that value, so smoothing itself changes nothing but the quantization grid.
            inv = _round_to(1.0 / smooth_factors(channel, w_channel, cfg.smooth_alpha), float_type)
            inv_name = g.constant(f"{tag}_smooth", torch.from_numpy(inv), float_type)
            src = g.name(f"{tag}_smoothed")
            g.insert(first, helper.make_node("Mul", [x, inv_name], [src], name=src))
            amax = float((channel * inv).max())
        else:
            amax = float(max(stats.linear[p].amax for p in node_paths))
        dq = _qdq(g, src, amax, cfg.precision, float_type, first, tag)
        qtype = TensorProto.FLOAT8E4M3FN if cfg.precision == "fp8" else TensorProto.INT8
        for n, path in zip(nodes, node_paths):
            w = weight(n) if inv is None else weight(n) / inv[:, None]
            q, scale = quantize_weight(w, cfg.precision, 1, float_type, plan.weight_scales.get(path))  # out: axis 1
            del w
            axis = out_axis(n)
            tag_w = path.replace(".", "/") + "/weight"
            w_q = g.constant(f"{tag_w}_q", q.T if axis == 0 else q, qtype)  # back in the node's layout
            w_scale = g.constant(f"{tag_w}_scale", torch.from_numpy(scale), float_type)
            w_dq = g.name(f"{tag_w}_dq")
            g.insert(n, helper.make_node("DequantizeLinear", [w_q, w_scale], [w_dq], name=w_dq, axis=axis))
            g.dropped.add(n.input[1])
            n.input[0], n.input[1] = dq, w_dq
            report.quantized[path] = f"linear {cfg.precision}"
            report.weights[w_q] = path


_POINTWISE = {"Mul", "Div", "Add", "Sub", "Cast", "Where", "Identity"}
_LAYOUT = {"Transpose", "Reshape", "Flatten", "Cast", "Identity", "Squeeze", "Unsqueeze"}


def _find_attention(g: _Graph, paths: Mapping[str, str]) -> list[tuple[str, Any, Any]]:
    """(attention module path, Q.K^T node, P.V node) per attention: P.V is the matmul fed by a
    Softmax, Q.K^T the matmul the Softmax's input comes from (through pointwise scaling), and
    the module is that of the linear the P.V output flows into (`....attn1.to_out.0`)."""
    consumers: dict[str, list] = defaultdict(list)
    for n in g.graph.node:
        for i in n.input:
            consumers[i].append(n)
    found = []
    for pv in g.graph.node:
        softmax = g.producer.get(pv.input[0]) if pv.op_type == "MatMul" else None
        if softmax is None or softmax.op_type != "Softmax":
            continue
        qk = g.producer.get(softmax.input[0])
        while qk is not None and qk.op_type in _POINTWISE:
            qk = g.producer.get(qk.input[0])
        if qk is None or qk.op_type != "MatMul" or any(i in g.inits for i in qk.input):
            raise QuantizeError(f"{pv.name}: no Q.K^T matmul before its softmax")
        path = _attention_path(pv, consumers, paths) or module_path(pv.name)
        found.append((path, qk, pv))
    return found


def _attention_path(pv, consumers: Mapping[str, list], paths: Mapping[str, str]) -> str | None:
    frontier = [pv.output[0]]
    for _ in range(8):  # a few layout ops (transpose back, merge heads) lie in between
        nxt = []
        for t in frontier:
            for n in consumers.get(t, []):
                if n.op_type in ("MatMul", "Gemm") and n.input[0] == t and n.input[1] in paths:
                    out = paths[n.input[1]]
                    return out[: -len(".to_out.0")] if out.endswith(".to_out.0") else None
                if n.op_type in _LAYOUT:
                    nxt.append(n.output[0])
        frontier = nxt
    return None


def _quantize_attention(g: _Graph, plan: QuantPlan, attention: list, report: QuantReport) -> None:
    c = plan.head_dim ** -0.25  # torch's SDPA export computes (q * d^-1/4) @ (k^T * d^-1/4)
    for path, qk, pv in attention:
        reason = keep_reason(path, plan.num_layers)
        if reason is not None:
            report.kept[f"{path}:q@k"] = report.kept[f"{path}:p@v"] = reason
            continue
        if path not in plan.stats.attention:
            raise QuantizeError(f"no attention calibration statistics for {path!r}")
        amax, ft, tag = plan.stats.attention[path], g.float_type, path.replace(".", "/")
        qk.input[0] = _qdq(g, qk.input[0], amax["q"] * c, "fp8", ft, qk, f"{tag}/q")
        qk.input[1] = _qdq(g, qk.input[1], amax["k"] * c, "fp8", ft, qk, f"{tag}/k")
        pv.input[0] = _qdq(g, pv.input[0], 1.0, "fp8", ft, pv, f"{tag}/p")  # softmax output is in [0, 1]
        pv.input[1] = _qdq(g, pv.input[1], amax["v"], "fp8", ft, pv, f"{tag}/v")
        report.quantized[f"{path}:q@k"] = report.quantized[f"{path}:p@v"] = "attention fp8"


# ------------------------------------------------------------------------------------ files
def quantize_onnx_file(path: Path, plan: QuantPlan, module: torch.nn.Module | None = None,
                       weights: "ModuleWeights | None" = None) -> tuple[list[str], QuantReport]:
    """Quantize `path` in place and check it; returns (files, report). A graph whose weights are
    external data (the exporter's choice over 2 GB) is streamed: read tensor by tensor from its
    data file (memory-mapped), each quantized weight written to a new data file as it is made
    (1 byte per fp8/int8 weight), the weights kept copied after; the model is never held whole,
    and stays external data however small quantizing made it. The result is what loading it
    whole and quantizing it in memory gives: the same graph and initializer bytes
    (tests/test_quantize.py checks it). A graph without external data is quantized in memory,
    saved with external data only if it still exceeds onnx_export's threshold.

    `weights`: the graph came from onnx_export.export_graph and its weights are still in the
    module; they are read from there as the streamed rewrite needs them, so the graph's weights
    in its export dtype are never written: only the quantized ones and those kept."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from wan_rt.export.onnx_export import DATA_SUFFIX, EXTERNAL_DATA_THRESHOLD

    path = Path(path)
    data = path.with_name(path.name + DATA_SUFFIX)
    model = onnx.load(str(path), load_external_data=False)
    if any(uses_external_data(t) for t in _all_tensors(model)):
        report, external = _quantize_streamed(model, path, data, plan, module, weights), True
    else:
        report = quantize_model(model, plan, match_linears(model, module) if module is not None else None)
        data.unlink(missing_ok=True)
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
        if external:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    del model
    _check(path)
    return ([path.name, data.name] if external else [path.name]), report


def _quantize_streamed(model, path: Path, data: Path, plan: QuantPlan, module: torch.nn.Module | None,
                       weights: "ModuleWeights | None") -> QuantReport:
    """quantize_onnx_file for a graph with external data: `data` is rewritten tensor by tensor."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    staging = path.with_name(f".{data.name}.quantizing")  # the input's data file is read until the end
    tensors = _TensorFiles(path.parent, staging, data.name, weights)
    try:
        report = quantize_model(model, plan, match_linears(model, module, tensors) if module is not None else None,
                                tensors)
        for t in model.graph.initializer:  # the weights kept as they were, copied after the new ones
            if uses_external_data(t) and t.name not in tensors.written:
                tensors.move(t)
        for t in _all_tensors(model, initializers=False):  # Constant nodes: inline, as onnx.load leaves them
            if uses_external_data(t):
                t.CopyFrom(tensors.inline(t))
        tensors.finish_writing()
        os.replace(staging, data)
        onnx.save_model(model, str(path))
        return report
    finally:
        tensors.close()
        staging.unlink(missing_ok=True)


def _check(path: Path) -> None:
    """ONNX shape inference and checker (path-based: external data is not loaded), TensorRT's ops."""
    import onnx

    from wan_rt.export.onnx_export import check_trt_compatible

    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    onnx.checker.check_model(str(path))
    check_trt_compatible(onnx.load(str(path), load_external_data=False))


def _all_tensors(model, initializers: bool = True):
    """The initializers, then the tensors of Constant nodes (the graphs here have no subgraphs)."""
    if initializers:
        yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


class _TensorFiles:
    """Tensor bytes by file. Reads tensors stored as external data (relative to `folder`) one at
    a time through memory maps (file pages, not memory the process owns), or from `deferred`
    (onnx_export.ModuleWeights) for those export_graph left in the module; with `out`, `store`
    writes each new tensor of INLINE_BYTES or more to that file as soon as it is made, page-
    aligned, recorded under the data file name `location` it will be renamed to. folder None:
    every tensor is in its proto (a model loaded whole) and nothing is written."""

    def __init__(self, folder: Path | None, out: Path | None = None, location: str = "",
                 deferred: "ModuleWeights | None" = None):
        self.folder, self.out, self.location, self.deferred = folder, out, location, deferred
        self.written: set[str] = set()  # initializers now in `out` (their entries name `location`)
        self._maps: dict[Path, mmap.mmap] = {}
        self._file = open(out, "wb") if out is not None else None

    def _bytes(self, t) -> bytes:
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        if not uses_external_data(t):
            return t.raw_data
        if is_deferred(t):
            if self.deferred is None or t.name not in self.deferred:
                raise QuantizeError(f"initializer {t.name} was exported without its weights and none were given")
            return self.deferred.raw(t.name).tobytes()
        info = ExternalDataInfo(t)
        where = Path(self.folder) / info.location
        if where not in self._maps:
            with open(where, "rb") as f:
                self._maps[where] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = self._maps[where]
        start = info.offset or 0
        return view[start:start + info.length] if info.length else view[start:]

    def inline(self, t):
        """A copy of `t` holding its bytes."""
        from onnx import TensorProto

        copy = TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = self._bytes(t)
        return copy

    def as_float(self, t) -> np.ndarray:
        from onnx.external_data_helper import uses_external_data

        return _as_float(self.inline(t) if uses_external_data(t) else t)

    def store(self, t, data: np.ndarray):
        """A new tensor `t` with its bytes `data`: to the data file if big enough, else into its
        raw_data; returns the proto. (Bytes once set in a proto stay in its protobuf arena even
        when the field is cleared: a quantized expert's would all be held until the end.)"""
        if self._file is not None and data.nbytes >= INLINE_BYTES:
            self._write(t, memoryview(data))
        else:
            t.raw_data = data.tobytes()
        return t

    def move(self, t) -> None:
        """An initializer of the input's data file, copied into the new one."""
        self._write(t, self._bytes(t))

    def _write(self, t, data: bytes) -> None:
        append_external(self._file, t, data, self.location)
        self.written.add(t.name)

    def finish_writing(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self.finish_writing()
        for view in self._maps.values():
            view.close()
        self._maps.clear()
