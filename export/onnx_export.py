"""Export one component graph (runtime.graphs) to ONNX that ONNX Runtime and TensorRT both load.

    export_onnx(module, gspec, profile, path, compute_dtype=...) -> ["model.onnx"(, "model.onnx.data")]
    export_graph(module, gspec, profile, path, compute_dtype=...) -> ModuleWeights  # weights written later

What the file promises (the contract in runtime/graphs.py, checked here, not hoped for):
* input and output names, order and dtypes are the GraphSpec's. Inputs the traced graph does not
  read (the encoder's first chunk never reads the temporal-downsample caches) are added back as
  dangling inputs, so every graph of a component takes the same names;
* every symbolic dim is dynamic and named after its symbol ("B", "S", "T", "h", "w", "L"). A
  multiple of a symbol gets its own name, "8*h" ("1*h" is just "h"): ONNX cannot relate it to
  "h", but equal names are equal sizes, which TensorRT's parser may rely on;
* opset 18 (TensorRT 10 parses 9..20), only ONNX-domain ops, no control flow (If/Loop/Scan), no
  Sequence/Optional ops, no float64/complex tensors anywhere: `check_trt_compatible` fails
  loudly otherwise;
* the weights are written by this module, not the exporter: the graph is traced without them
  and they are written from the module one tensor at a time (a 14B expert is never held in
  memory), the transposes and casts the exporter would fold applied as they are written, small
  constant subgraphs folded (tests/test_onnx_export.py checks the initializers and outputs equal
  torch's own folded export). Over `external_data_threshold` bytes (2 GiB less headroom by
  default: protobuf cannot serialise more) they go to one `model.onnx.data` beside `model.onnx`;
* `onnx.checker` (path-based, so external data is fine) and ONNX shape inference pass.

Exporter choice: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`), because
* it exports every graph here with correct dynamic shapes on torch 2.13 (tested at sizes other
  than the trace's), and the same call exists on torch 2.11 (the GPU image). With `dynamo=True`
  (torch.export) the VAE graphs fail to convert `dynamic_axes` and would need hand-written
  `dynamic_shapes` for the *cache varargs with derived dims (`8*h`); TI2V's L = T*(h/2)*(w/2) is
  not a linear derived dim torch.export can state; and size-1 example dims get specialised;
* it takes ~1 s per tiny graph against 10-30 s measured for dynamo (20 graphs in the tests; a
  14B expert is traced once either way).
Its costs, handled in the models (numerics unchanged): it has no symbolic for
`upsample_nearest_exact2d` (the VAE uses "nearest", equal at an exact x2), and it gives
`Tensor.unflatten`'s output a static shape, so the DiT reshapes instead where a dynamic dim is
split. The value_info it writes carries trace-time static shapes; it is dropped and re-inferred.
The TorchScript exporter is deprecated in torch >= 2.9; if it goes, `dynamo=True` is the path
and the points above are its to-do list.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from wan_rt.runtime.graphs import (GraphSpec, ShapeProfile, TensorSpec, example_sizes, patch_multiples, resolve_dim,
                                   sample_inputs)

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = (17, 18, 19)
# Protobuf serialises at most 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
DATA_SUFFIX = ".data"
# Tensors below this stay inline even in an external-data model (shape constants and the like).
INLINE_BYTES = 1024
PAGE_BYTES = 4096  # external data is page-aligned, as onnx.save_model writes it
# The external-data location of weights export_graph left in the module (no file has this name).
DEFERRED = "<module>"

# ONNX ops TensorRT's parser rejects, or that mean the trace went wrong for an inference graph.
FORBIDDEN_OPS = frozenset({
    "If", "Loop", "Scan",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
    "Optional", "OptionalGetElement", "OptionalHasElement",
    "DFT", "STFT", "BlackmanWindow", "HannWindow", "HammingWindow", "MelWeightMatrix",
    "Bernoulli", "Multinomial", "BitShift", "Compress", "Det", "Unique", "StringNormalizer",
    "TfIdfVectorizer", "ConvInteger", "MatMulInteger", "ATen",
})


class OnnxExportError(RuntimeError):
    """The exported graph breaks the contract (names, dtypes, ops); the message says where."""


def export_onnx(module: nn.Module, gspec: GraphSpec, profile: ShapeProfile, path: str | os.PathLike, *,
                compute_dtype: torch.dtype, opset: int = DEFAULT_OPSET, device: torch.device | str | None = None,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                refs: Mapping[str, tuple[str, int]] | None = None) -> list[str]:
    """Trace `module` (graphs.graph_module) at graphs.example_sizes (the smallest general sizes
    in the profile, batch 2: one cheap forward) and write `path`; every symbolic dim is dynamic,
    and the profile's min / opt / max are for the engine builders (TensorRT's profile).

    `refs`: {weight name: (file relative to `path`'s folder, byte offset)} for weights whose
    module tensor is that file's bytes (a checkpoint linked in, export/checkpoint_links.py):
    their initializers point there as external data instead of being written, stored as the
    module holds them, so a Transpose or Cast reading one stays in the graph for the runtime to
    fold when it loads (ONNX Runtime's constant folding; the values are the same).

    Returns the files written, as names relative to `path`'s folder. `device` is where the
    example inputs go (default: the module's parameters' device)."""
    import onnx

    path = Path(path)
    data_path = path.with_name(path.name + DATA_SUFFIX)
    refs = dict(refs or {})
    model, weights = _trace(module, gspec, profile, path, compute_dtype=compute_dtype, opset=opset, device=device,
                            unfolded=frozenset(refs))
    external = weights.write(model, data_path, external_data_threshold, refs)
    onnx.save_model(model, str(path))
    del model

    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    if refs:
        check_with_linked_data(path)
    else:
        onnx.checker.check_model(str(path))
    check_trt_compatible(onnx.load(str(path), load_external_data=False))
    return [path.name, data_path.name] if external else [path.name]


def check_with_linked_data(path: Path) -> None:
    """onnx.checker for a model whose external data includes hard links of checkpoint files,
    which the checker refuses outright (a hard link could expose any file on the machine to
    whoever hands out the model; here the build made them). The graph is checked with its
    external initializers as inputs, and every external tensor's bytes against its file's size."""
    import onnx
    from onnx import helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    for t in external:
        info = ExternalDataInfo(t)
        where = path.parent / info.location
        end = (info.offset or 0) + (info.length or 0)
        if Path(info.location).is_absolute() or ".." in Path(info.location).parts or not where.is_file() \
                or end > where.stat().st_size:
            raise OnnxExportError(f"{path}: initializer {t.name}'s external data ({info.location}, bytes to {end}) "
                                  "is not inside the model's folder")
    names = {t.name for t in external}
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    onnx.checker.check_model(model)


def export_graph(module: nn.Module, gspec: GraphSpec, profile: ShapeProfile, path: str | os.PathLike, *,
                 compute_dtype: torch.dtype, opset: int = DEFAULT_OPSET,
                 device: torch.device | str | None = None) -> "ModuleWeights":
    """export_onnx without writing the weights: `path` holds the graph, its weights of
    INLINE_BYTES or more marked as external data at DEFERRED (no such file), and the returned
    ModuleWeights gives each of them from the module. For a pass that rewrites the weights as it
    writes them (export/quantize.py's streamed Q/DQ): a real-size expert's bf16 weights are then
    never staged on disk beside their fp8 rewrite. The file is not valid ONNX until that pass has
    written them; it checks the result."""
    import onnx

    path = Path(path)
    model, weights = _trace(module, gspec, profile, path, compute_dtype=compute_dtype, opset=opset, device=device)
    # What export_onnx's checks do to its file (the initializers' shapes are in their protos).
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    check_trt_compatible(model)
    onnx.save_model(model, str(path))
    return weights


def _trace(module: nn.Module, gspec: GraphSpec, profile: ShapeProfile, path: Path, *, compute_dtype: torch.dtype,
           opset: int, device: torch.device | str | None, unfolded: frozenset[str] = frozenset()):
    """(the traced graph as an onnx.ModelProto with its weights deferred, their ModuleWeights)."""
    import onnx

    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} is outside what wan_rt targets ({SUPPORTED_OPSETS}: TensorRT 10 parses 9-20)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    sizes = example_sizes(profile, patch_multiples(module))
    inputs = sample_inputs(gspec, sizes, compute_dtype, device=device)
    args = tuple(inputs[n] for n in gspec.input_names)
    shapes: list[tuple[int, ...]] = []
    hook = _record_output_shapes(module, shapes)

    # The trace exports the graph without its weights (export_params=False: they become inputs
    # named after the parameters) and without constant folding (which would compute folded
    # copies of them): the TorchScript exporter otherwise holds every weight two or three times
    # over in memory (2.6x measured for a 1.25 GB DiT). The weights are then written from the
    # module tensor by tensor (ModuleWeights.write), folding the transposes and casts the
    # exporter would have folded, so the file holds the same initializers as a folded export.
    raw = path.with_name(f".{path.name}.{os.getpid()}.graph")
    try:
        with warnings.catch_warnings():
            # Expected: the TorchScript exporter's deprecation notice, and tracer warnings about
            # Python-level shape checks (static by design: chunk lengths, first_chunk).
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                                  input_names=gspec.input_names, output_names=gspec.output_names,
                                  dynamic_axes=_dynamic_axes(gspec), export_params=False, do_constant_folding=False)
        _check_traced_shapes(gspec, sizes, shapes)
        model = onnx.load(str(raw))
        for stale in (path, path.with_name(path.name + DATA_SUFFIX)):
            stale.unlink(missing_ok=True)
        weights = _attach_weights(model, module, gspec, unfolded)
        _fold_constants(model.graph)
        _conform_io(model, gspec, compute_dtype)
        return model, weights
    finally:
        hook.remove()
        raw.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- trace helpers
def _record_output_shapes(module: nn.Module, shapes: list[tuple[int, ...]]):
    """A forward hook filling `shapes` with the output shapes (the trace runs forward once). A
    hook, not a wrapper module: a wrapper would prefix every weight name in the file."""

    def hook(_module, _args, out):
        shapes[:] = [tuple(int(d) for d in o.shape) for o in (out if isinstance(out, tuple) else (out,))]

    return module.register_forward_hook(hook)


def onnx_dim(dim: int | str) -> int | str:
    """A contract dim as named in the ONNX file: ints stay, "1*h" is "h", "8*h" stays "8*h"."""
    return dim[2:] if isinstance(dim, str) and dim.startswith("1*") else dim


def _dynamic_axes(gspec: GraphSpec) -> dict[str, dict[int, str]]:
    return {t.name: {i: str(onnx_dim(d)) for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in (*gspec.inputs, *gspec.outputs)}


def _check_traced_shapes(gspec: GraphSpec, sizes: dict[str, int], shapes: list[tuple[int, ...]]) -> None:
    """The module's outputs at the example sizes must be what the contract says they are."""
    if len(shapes) != len(gspec.outputs):
        raise OnnxExportError(f"{gspec.component}/{gspec.graph}: module returned {len(shapes)} outputs, "
                              f"the contract has {len(gspec.outputs)}")
    for t, got in zip(gspec.outputs, shapes):
        want = tuple(resolve_dim(d, sizes) for d in t.dims)
        if got != want:
            raise OnnxExportError(f"{gspec.component}/{gspec.graph}: output {t.name} has shape {got} at sizes "
                                  f"{sizes}, the contract says {t.dims} = {want}")


# ------------------------------------------------------------------------------- graph fix-ups
def _onnx_type(t: TensorSpec, compute_dtype: torch.dtype) -> int:
    from onnx import TensorProto

    torch_to_onnx = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                     torch.bfloat16: TensorProto.BFLOAT16}
    return {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}.get(t.dtype) or torch_to_onnx[compute_dtype]


def _conform_io(model, gspec: GraphSpec, compute_dtype: torch.dtype) -> None:
    """Inputs and outputs exactly as the contract: names, order, dtypes, dims; unused inputs put
    back; trace-time value_info (static shapes where the graph is dynamic) dropped for re-inference."""
    from onnx import helper

    graph = model.graph
    where = f"{gspec.component}/{gspec.graph}"
    graph.name = f"{gspec.component}_{gspec.graph}"
    initializers = {i.name for i in graph.initializer}
    traced_inputs = {i.name: i for i in graph.input if i.name not in initializers}
    traced_outputs = {o.name: o for o in graph.output}
    extra = [n for n in traced_inputs if n not in gspec.input_names]
    if extra:
        raise OnnxExportError(f"{where}: unexpected graph inputs {extra}")
    if list(traced_outputs) != gspec.output_names:
        raise OnnxExportError(f"{where}: graph outputs {list(traced_outputs)} != contract {gspec.output_names}")

    def value_info(t: TensorSpec, traced):
        elem = _onnx_type(t, compute_dtype)
        if traced is not None and traced.type.tensor_type.elem_type != elem:
            raise OnnxExportError(f"{where}: {t.name} traced as ONNX type {traced.type.tensor_type.elem_type}, "
                                  f"the contract wants {t.dtype} (ONNX type {elem})")
        return helper.make_tensor_value_info(t.name, elem, [onnx_dim(d) for d in t.dims])

    new_inputs = [value_info(t, traced_inputs.get(t.name)) for t in gspec.inputs]
    new_outputs = [value_info(t, traced_outputs[t.name]) for t in gspec.outputs]
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.output[:]
    graph.output.extend(new_outputs)
    del graph.value_info[:]


# ------------------------------------------------------------------------------- weights
_ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 7: torch.int64, 6: torch.int32,
                  9: torch.bool, 3: torch.int8, 2: torch.uint8}
_TORCH_TO_ONNX = {t: k for k, t in _ONNX_TO_TORCH.items()}


def _attach_weights(model, module: nn.Module, gspec: GraphSpec,
                    unfolded: frozenset[str] = frozenset()) -> "ModuleWeights":
    """Turn the weight inputs of a graph exported with export_params=False into initializers
    holding `module`'s tensors: those under INLINE_BYTES inline, the others deferred (external
    data at DEFERRED, written by ModuleWeights.write or a pass like the streamed Q/DQ). A weight
    read only by a Transpose or a Cast is stored transposed / cast and that node dropped, as
    constant folding would have done; except the `unfolded` ones of INLINE_BYTES or more
    (weights the file will point at in a checkpoint: stored as they are there)."""
    from onnx import TensorProto, helper

    graph = model.graph
    tensors = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    weights = [i.name for i in graph.input if i.name not in gspec.input_names]
    missing = [w for w in weights if w not in tensors]
    if missing:
        raise OnnxExportError(f"{gspec.component}/{gspec.graph}: graph inputs {missing[:5]} are neither contract "
                              "inputs nor module weights")
    consumers: dict[str, list[int]] = {}  # node indices (protobuf hands out a new wrapper per access)
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)

    folded, plan = set(), {}  # plan: initializer name -> (module tensor, how to fold it)
    for w in weights:
        t = tensors[w]
        if w in unfolded and t.numel() * t.element_size() >= INLINE_BYTES:
            plan[w] = (t, None)
            continue
        users = consumers.get(w, [])
        node = graph.node[users[0]] if len(users) == 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if node is not None else {}
        if node is not None and node.op_type == "Transpose" and "perm" in attrs:
            fold = ("transpose", tuple(attrs["perm"]))
        elif node is not None and node.op_type == "Cast" and attrs.get("to") in _ONNX_TO_TORCH:
            fold = ("cast", _ONNX_TO_TORCH[attrs["to"]])
        else:
            plan[w] = (tensors[w], None)
            continue
        folded.add(users[0])
        out = node.output[0]
        for user in consumers.get(out, []):  # read the weight's name where the node's output was read
            reader = graph.node[user]
            reader.input[:] = [w if x == out else x for x in reader.input]
        plan[w] = (tensors[w], fold)

    kept_nodes = [n for k, n in enumerate(graph.node) if k not in folded]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    contract_inputs = [i for i in graph.input if i.name in gspec.input_names]
    del graph.input[:]
    graph.input.extend(contract_inputs)
    weights_out = ModuleWeights(plan)
    for name in plan:
        shape, dtype, nbytes = weights_out.layout(name)
        proto = TensorProto(name=name, data_type=_TORCH_TO_ONNX[dtype], dims=list(shape))
        if nbytes < INLINE_BYTES:
            proto.raw_data = weights_out.raw(name).tobytes()
        else:
            _mark_external(proto, DEFERRED, 0, nbytes)
        graph.initializer.append(proto)
    return weights_out


class ModuleWeights:
    """The weights of a traced graph, taken from the module when they are written: initializer
    name -> its module tensor, transposed or cast as the graph reads it. One tensor is made at a
    time (a transposed bf16 weight is a copy; the module's own weights stay memory-mapped)."""

    def __init__(self, plan: dict[str, tuple[torch.Tensor, tuple | None]]):
        self._plan = plan

    def __contains__(self, name: str) -> bool:
        return name in self._plan

    def source(self, name: str) -> tuple[torch.Tensor, tuple | None]:
        """The module tensor the initializer is made from, and how: None (as is),
        ("transpose", perm) or ("cast", dtype)."""
        return self._plan[name]

    def layout(self, name: str) -> tuple[tuple[int, ...], torch.dtype, int]:
        """(shape, dtype, bytes) of the initializer, without making it."""
        t, fold = self._plan[name]
        shape = tuple(t.shape[d] for d in fold[1]) if fold and fold[0] == "transpose" else tuple(t.shape)
        dtype = fold[1] if fold and fold[0] == "cast" else t.dtype
        return shape, dtype, math.prod(shape) * dtype.itemsize

    def tensor(self, name: str) -> torch.Tensor:
        t, fold = self._plan[name]
        t = t.detach()
        if fold is not None and fold[0] == "transpose":
            t = t.permute(*fold[1])
        elif fold is not None:
            t = t.to(fold[1])
        return t.contiguous()

    def raw(self, name: str) -> np.ndarray:
        """The initializer's raw little-endian bytes (uint8, no copy of the made tensor)."""
        return self.tensor(name).reshape(-1).view(torch.uint8).numpy()

    def write(self, model, data_path: Path, threshold: int,
              refs: Mapping[str, tuple[str, int]] | None = None) -> bool:
        """Write the deferred initializers of `model`: into `data_path` (page-aligned, as
        onnx.save_model would) when the weights total over `threshold` bytes, else inline; those
        in `refs` ({name: (file relative to the model's folder, offset)}) point there instead.
        Returns whether `data_path` was written."""
        from onnx import TensorProto

        refs = refs or {}
        for proto in model.graph.initializer:
            if is_deferred(proto) and proto.name in refs:
                location, offset = refs[proto.name]
                _mark_external(proto, location, offset, self.layout(proto.name)[2])
        total = sum(self.layout(name)[2] for name in self._plan if name not in refs)
        external = total > threshold
        with open(data_path, "wb") if external else contextlib.nullcontext() as out:
            for proto in model.graph.initializer:
                if not is_deferred(proto):
                    continue
                data = self.raw(proto.name)
                if external:
                    append_external(out, proto, memoryview(data), data_path.name)
                else:
                    del proto.external_data[:]
                    proto.data_location = TensorProto.DEFAULT
                    proto.raw_data = data.tobytes()
                del data
        return external


def is_deferred(t) -> bool:
    """A tensor proto whose bytes are still in the module (export_graph)."""
    return any(e.key == "location" and e.value == DEFERRED for e in t.external_data)


# Ops whose value is not a function of their inputs alone, or that are never worth folding.
_NOT_FOLDED = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "If", "Loop", "Scan"})
_FOLD_LIMIT = 1 << 20  # bytes: small constants only (the weights were folded by _attach_weights)


def _fold_constants(graph) -> None:
    """Evaluate the nodes whose inputs are all constants (Constant nodes, or outputs folded
    before them) with ONNX's reference evaluator, and put one Constant in place of each folded
    value still read: what the exporter's own constant folding does for everything but the
    weights (a float64 epsilon cast to float32, shape arithmetic on static dims)."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    known: dict = {}
    folded: set[int] = set()  # node indices (protobuf hands out a new wrapper per access: no id())
    for index, node in enumerate(graph.node):
        if node.op_type in _NOT_FOLDED or node.domain not in ("", "ai.onnx") or \
                any(a.g.node or a.graphs for a in node.attribute):
            continue
        if node.op_type != "Constant" and not (node.input and all(i == "" or i in known for i in node.input)):
            continue
        try:
            values = ReferenceEvaluator(node).run(None, {i: known[i] for i in node.input if i})
        except Exception:  # an op the reference evaluator lacks: leave it to the runtime
            continue
        if len(values) != len(node.output) or any(np.asarray(v).nbytes > _FOLD_LIMIT for v in values):
            continue
        known.update(zip(node.output, values))
        folded.add(index)
    read = {i for k, n in enumerate(graph.node) if k not in folded for i in n.input} | {o.name for o in graph.output}
    nodes = []
    for index, node in enumerate(graph.node):
        if index not in folded:
            nodes.append(node)
            continue
        for out in node.output:
            if out in read:  # (numpy scalars from the evaluator become 0-d arrays)
                nodes.append(helper.make_node("Constant", [], [out], name=f"{node.name or out}/folded",
                                              value=numpy_helper.from_array(np.asarray(known[out]), out)))
    del graph.node[:]
    graph.node.extend(nodes)


def append_external(out, t, data, location: str) -> None:
    """Write `data` page-aligned at the end of the open data file `out` and make the tensor
    proto `t` point at it (`location` is the data file's name beside the model)."""
    offset = out.tell()
    if offset % PAGE_BYTES:
        out.write(b"\0" * (PAGE_BYTES - offset % PAGE_BYTES))
        offset = out.tell()
    out.write(data)
    _mark_external(t, location, offset, memoryview(data).nbytes)


def _mark_external(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    t.ClearField("raw_data")
    del t.external_data[:]
    # (onnx's set_external_data insists on raw_data being present; write the entries directly)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = TensorProto.EXTERNAL


def initializer_bytes(t, folder: Path) -> bytes | None:
    """Raw little-endian bytes of `t` (read from its external file if it has one), or None for
    tensors kept in typed fields (tiny attribute constants)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if uses_external_data(t):
        info = ExternalDataInfo(t)
        with open(folder / info.location, "rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length) if info.length else f.read()
    return t.raw_data if t.HasField("raw_data") else None


# ------------------------------------------------------------------------------- checks
def check_trt_compatible(model) -> None:
    """Raise OnnxExportError if the graph has an op or a dtype TensorRT's parser would reject
    (control flow, sequences, non-ONNX domains, float64, complex). Run it on graph-only loads."""
    from onnx import TensorProto

    bad_types = {TensorProto.DOUBLE: "float64", TensorProto.COMPLEX64: "complex64",
                 TensorProto.COMPLEX128: "complex128"}
    problems = []
    graph = model.graph
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) not in SUPPORTED_OPSETS:
        problems.append(f"opset {opsets} (want one of {SUPPORTED_OPSETS})")
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: op {node.domain}::{node.op_type} is not an ONNX op")
        elif node.op_type in FORBIDDEN_OPS:
            problems.append(f"node {node.name}: op {node.op_type}")
        for attr in node.attribute:
            if attr.g.node or attr.graphs:
                problems.append(f"node {node.name}: has a subgraph ({attr.name})")
            if attr.name == "to" and attr.i in bad_types:
                problems.append(f"node {node.name}: {node.op_type} to {bad_types[attr.i]}")
            if attr.HasField("t") and attr.t.data_type in bad_types:
                problems.append(f"node {node.name}: {bad_types[attr.t.data_type]} constant")
    for t in graph.initializer:
        if t.data_type in bad_types:
            problems.append(f"initializer {t.name}: {bad_types[t.data_type]}")
    for v in (*graph.input, *graph.output, *graph.value_info):
        tt = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if tt is None:
            problems.append(f"value {v.name}: not a tensor ({v.type.WhichOneof('value')})")
        elif tt.elem_type in bad_types:
            problems.append(f"value {v.name}: {bad_types[tt.elem_type]}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise OnnxExportError(f"graph {graph.name!r} is not TensorRT-compatible:\n  {shown}")


def op_types(model) -> dict[str, int]:
    """{op type: count} of a graph (reports, tests)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
