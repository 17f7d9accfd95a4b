"""ONNX export (wan_rt.export.onnx_export) and the ONNX Runtime backend against the eager models.

Every graph of every tiny preset is exported once per module (fixture `built`), then checked for
the contract (names, dynamic dims, TensorRT-parsable ops and dtypes), run by onnxruntime on the
CPU against the eager graph module, at other sizes than the trace's, through the streaming VAE
component, and inside the whole pipeline.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from wan_rt.config import get_spec  # noqa: E402
from wan_rt.export.onnx_export import (OnnxExportError, check_trt_compatible, check_with_linked_data,  # noqa: E402
                                      export_onnx)
from wan_rt.metrics import relative_error  # noqa: E402
from wan_rt.export import ort_build  # noqa: E402
from wan_rt.runtime.backends import get_backend  # noqa: E402
from wan_rt.runtime.graphs import (components_of, example_sizes, graph_module, graph_names, graph_spec,  # noqa: E402
                                   sample_inputs, shape_profile)

ort_backend = get_backend("ort")
SPEC_NAMES = ("tiny-t2v-A14B", "tiny-i2v-A14B", "tiny-ti2v-5B")
GRAPHS = [(s, c, g) for s in SPEC_NAMES for c in components_of(get_spec(s)) for g in graph_names(c)]
TOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory, engine_checks):
    """built(spec name) -> namespace(resolved, spec, profile, models, dirs, files, runners), every
    graph exported with the ORT backend into a temporary engines folder (once per module)."""
    from wan_rt.resolve import resolve_checkpoint

    cache: dict[str, types.SimpleNamespace] = {}

    def make(name: str) -> types.SimpleNamespace:
        if name in cache:
            return cache[name]
        resolved = resolve_checkpoint(name)
        spec = resolved.spec
        # 9 frames: traced at T=3 latent frames, so the 5-frame pipeline (T=2) and the size tests
        # run at T the trace never saw (a frozen T > 1 hides at T=1 behind broadcasting).
        profile = shape_profile(spec, height=spec.height, width=spec.width, frames=9)
        models = engine_checks.load_models(resolved)
        root = tmp_path_factory.mktemp(name)
        dirs, files, runners = {}, {}, {}
        for comp in components_of(spec):
            for g in graph_names(comp):
                gspec = graph_spec(spec, comp, g)
                out_dir = root / comp / g
                out_dir.mkdir(parents=True)
                files[comp, g] = ort_build.build_graph(graph_module(comp, g, models[comp]), gspec, profile, out_dir,
                                                         compute_dtype=torch.float32, device=CPU)
                dirs[comp, g] = out_dir
                runners[comp, g] = ort_backend.load_graph(out_dir, gspec, files[comp, g],
                                                          compute_dtype=torch.float32, device=CPU)
        cache[name] = types.SimpleNamespace(resolved=resolved, spec=spec, profile=profile, models=models,
                                            dirs=dirs, files=files, runners=runners)
        return cache[name]

    return make


def _unsupported(model) -> list[str]:
    """Written independently of check_trt_compatible: ops and dtypes TensorRT cannot parse."""
    from onnx import TensorProto

    bad = {TensorProto.DOUBLE, TensorProto.COMPLEX64, TensorProto.COMPLEX128}
    found = [n.op_type for n in model.graph.node
             if n.op_type in ("Loop", "If", "Scan") or "Sequence" in n.op_type or n.domain not in ("", "ai.onnx")]
    found += [f"cast to {a.i}" for n in model.graph.node for a in n.attribute if a.name == "to" and a.i in bad]
    found += [t.name for t in model.graph.initializer if t.data_type in bad]
    values = (*model.graph.input, *model.graph.output, *model.graph.value_info)
    found += [v.name for v in values if v.type.tensor_type.elem_type in bad]
    return found


# ------------------------------------------------------------------------------ every graph
@pytest.mark.parametrize("spec_name,comp,g", GRAPHS, ids=[f"{s}-{c}-{g}" for s, c, g in GRAPHS])
def test_graph_exports_and_matches_eager(built, spec_name, comp, g, engine_checks):
    b = built(spec_name)
    gspec = graph_spec(b.spec, comp, g)
    # fp32 files, fp32 engine: the weights are the checkpoint's bytes, read through hard links
    # (onnx.checker refuses hard-linked data: export_onnx checks such a graph its own way).
    links = [f for f in b.files[comp, g] if f.startswith("weights/")]
    assert links and b.files[comp, g] == ["model.onnx", *links, "weights_map.json"]
    path = b.dirs[comp, g] / "model.onnx"
    check_with_linked_data(path)
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == gspec.input_names
    assert [o.name for o in model.graph.output] == gspec.output_names
    assert model.opset_import[0].version in (17, 18, 19)
    assert _unsupported(model) == []
    assert len(model.graph.value_info) > 0, "shape inference ran"
    # Every symbolic dim of the contract is a named (dynamic) dim in the file.
    for t, v in zip((*gspec.inputs, *gspec.outputs), (*model.graph.input, *model.graph.output)):
        dims = v.type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == [d.removeprefix("1*") if isinstance(d, str) else d
                                                             for d in t.dims]
    err = engine_checks.compare_graph(b, comp, g, b.profile.opt)
    assert err < TOL, f"{spec_name} {comp}/{g}: ORT vs eager relative error {err:.2e}"


# ------------------------------------------------------------------------------ dynamic shapes
@pytest.mark.parametrize("spec_name,comp", [("tiny-t2v-A14B", "dit_high_noise"), ("tiny-ti2v-5B", "dit")])
def test_dit_graph_serves_two_sizes(built, spec_name, comp, engine_checks):
    """Traced at B=2, T=3, 4x4 latents; run at two other grids in the profile, batch 1 and 2
    (TI2V's per-token timestep makes L a product of T, h and w: the hardest dynamic case)."""
    b = built(spec_name)
    lo, hi = b.profile.min, b.profile.max
    for batch, t, h, w in ((1, lo["T"], lo["h"], hi["w"]), (2, 2, hi["h"], lo["w"])):
        err = engine_checks.compare_graph(b, comp, "main", engine_checks.grid_sizes(b, batch, t, h, w), seed=1)
        assert err < TOL, f"{comp} at B={batch} T={t} {h}x{w}: relative error {err:.2e}"


@pytest.mark.parametrize("spec_name", ["tiny-t2v-A14B", "tiny-ti2v-5B"])
def test_vae_step_graphs_serve_two_sizes(built, spec_name, engine_checks):
    b = built(spec_name)
    for comp in ("vae_decoder", "vae_encoder"):
        for batch, h, w in ((1, 2, 3), (2, 3, 1)):
            err = engine_checks.compare_graph(b, comp, "step", engine_checks.grid_sizes(b, batch, 1, h, w), seed=2)
            assert err < TOL, f"{comp}/step at B={batch} {h}x{w}: relative error {err:.2e}"


def test_text_encoder_graph_has_dynamic_text_length(built, engine_checks):
    """The profile pins S (the pipeline pads to one length), but the umT5 graph itself is dynamic
    in S: relative-position buckets and the padding mask are computed from the runtime length."""
    b = built("tiny-t2v-A14B")
    for batch, s in ((1, 7), (2, 23)):
        err = engine_checks.compare_graph(b, "text_encoder", "main", {"B": batch, "S": s}, seed=4)
        assert err < TOL, f"text_encoder at B={batch} S={s}: relative error {err:.2e}"


def test_runner_rejects_shapes_that_fit_no_sizes(built, engine_checks):
    b = built("tiny-t2v-A14B")
    gspec = graph_spec(b.spec, "vae_decoder", "step")
    inputs = sample_inputs(gspec, engine_checks.grid_sizes(b, 1, 1, 2, 2), torch.float32)
    inputs["cache_in_3"] = inputs["cache_in_3"][..., :1]  # width no longer the latent's
    with pytest.raises(ValueError, match="cache_in_3"):
        b.runners["vae_decoder", "step"](inputs)


# ------------------------------------------------------------------------------ trace size
def test_example_sizes_are_the_smallest_general_ones():
    """What every export traces at: batch 2, every dynamic symbol >= 2 (DiT h, w: two patches),
    distinct where the range leaves room, inside the profile; L consistent with T, h, w."""
    spec = get_spec("t2v-A14B")
    full = shape_profile(spec, height=720, width=1280, frames=81)
    assert full.max == {"B": 2, "S": 512, "T": 21, "h": 90, "w": 160, "L": 75600}
    assert example_sizes(full, {"h": 2, "w": 2}) == {"B": 2, "S": 512, "T": 3, "h": 8, "w": 10, "L": 3 * 4 * 5}
    assert {k: v for k, v in example_sizes(full).items() if k != "L"} == {"B": 2, "S": 512, "T": 3, "h": 4, "w": 5}
    # Ranges too narrow for distinct values (the tiny default: T <= 2, h, w <= 4) or for 2 (one frame).
    tiny = get_spec("tiny-t2v-A14B")
    narrow = shape_profile(tiny, height=32, width=32, frames=5)
    assert example_sizes(narrow, {"h": 2, "w": 2}) == {"B": 2, "S": 16, "T": 2, "h": 4, "w": 4, "L": 8}
    one_frame = shape_profile(spec, height=720, width=1280, frames=1)
    assert example_sizes(one_frame, {"h": 2, "w": 2})["T"] == 1
    for profile in (full, narrow, one_frame, shape_profile(tiny, height=48, width=64, frames=9)):
        for multiples in ({}, {"h": 2, "w": 2}):
            sizes = example_sizes(profile, multiples)
            assert all(profile.min[k] <= v <= profile.max[k] for k, v in sizes.items() if k != "L" or multiples)
            assert all(v >= 2 for k, v in sizes.items() if profile.max[k] >= 2 * multiples.get(k, 1))


def test_export_traces_small_whatever_the_profile(built, tmp_path, engine_checks):
    """A DiT graph built for 1280x720x81 (75,600 tokens a sample) is traced with one forward at
    graphs.example_sizes, never at the profile's size; the engine then serves the profile."""
    b = built("tiny-t2v-A14B")
    full = shape_profile(b.spec, height=720, width=1280, frames=81)
    module = graph_module("dit_high_noise", "main", b.models["dit_high_noise"])
    traced = []

    def spy(_module, args):
        shape = tuple(int(n) for n in args[0].shape)  # (the tracer hands sizes over as tensors)
        traced.append(shape)
        assert np.prod(shape) < 10_000, f"the export ran a forward at latents {shape}"

    handle = module.register_forward_pre_hook(spy)
    try:
        files = ort_build.build_graph(module, graph_spec(b.spec, "dit_high_noise", "main"), full, tmp_path,
                                      compute_dtype=torch.float32, device=CPU)
    finally:
        handle.remove()
    assert traced and set(traced) == {(2, 16, 3, 8, 10)}
    runner = ort_backend.load_graph(tmp_path, graph_spec(b.spec, "dit_high_noise", "main"), files,
                                    compute_dtype=torch.float32, device=CPU)
    for batch, t, h, w in ((1, 2, 4, 4), (2, 5, 6, 12)):
        err = engine_checks.compare_graph(b, "dit_high_noise", "main", engine_checks.grid_sizes(b, batch, t, h, w),
                                          runner=runner)
        assert err < TOL, f"B={batch} T={t} {h}x{w}: relative error {err:.2e}"


def test_text_encoder_with_a_vocabulary_under_64_exports(tmp_path, engine_checks):
    """sample_inputs draws ids below the graph's vocabulary (a 40-token umT5 used to fail export
    with an IndexError inside torch)."""
    import dataclasses

    from wan_rt.models import hf_config
    from wan_rt.models.text_encoder import TextEncoder, build_umt5_encoder

    base = get_spec("tiny-t2v-A14B")
    spec = dataclasses.replace(base, text_encoder=dataclasses.replace(base.text_encoder, vocab_size=40))
    gspec = graph_spec(spec, "text_encoder")
    assert gspec.vocab_size == 40
    ids = sample_inputs(gspec, {"B": 2, "S": 64}, torch.float32)["input_ids"]
    assert int(ids.min()) >= 0 and int(ids.max()) < 40 and len(ids.unique()) > 20
    torch.manual_seed(0)
    model = TextEncoder(build_umt5_encoder(hf_config.text_encoder_to_hf(spec.text_encoder)))
    module = graph_module("text_encoder", "main", model)
    profile = shape_profile(spec, height=spec.height, width=spec.width, frames=5)
    files = ort_build.build_graph(module, gspec, profile, tmp_path, compute_dtype=torch.float32, device=CPU)
    runner = ort_backend.load_graph(tmp_path, gspec, files, compute_dtype=torch.float32, device=CPU)
    b = types.SimpleNamespace(spec=spec, models={"text_encoder": model}, runners={("text_encoder", "main"): runner})
    assert engine_checks.compare_graph(b, "text_encoder", "main", {"B": 2, "S": 16}) < TOL


# ------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("comp,g", [("dit", "main"), ("vae_decoder", "step"), ("text_encoder", "main")])
def test_weights_written_by_us_equal_the_exporters_folded_ones(built, tmp_path, comp, g):
    """export_onnx traces without weights and writes them itself, folding transposes, casts and
    small constant subgraphs (so the exporter never holds them): the file must carry the same
    initializers, by content, as torch's own export with parameters and constant folding, and
    give the same outputs in ONNX Runtime."""
    import warnings

    import onnxruntime
    from onnx import numpy_helper

    from wan_rt.export.onnx_export import _dynamic_axes

    b = built("tiny-ti2v-5B")
    gspec = graph_spec(b.spec, comp, g)
    module = graph_module(comp, g, b.models[comp])
    reference = tmp_path / "folded_by_torch.onnx"
    inputs = sample_inputs(gspec, example_sizes(b.profile), torch.float32, seed=5)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs[n] for n in gspec.input_names), str(reference), dynamo=False,
                          opset_version=18, input_names=gspec.input_names, output_names=gspec.output_names,
                          dynamic_axes=_dynamic_axes(gspec), do_constant_folding=True)
    written = tmp_path / "written" / "model.onnx"  # no refs: every weight written, folded
    export_onnx(module, gspec, b.profile, written, compute_dtype=torch.float32, opset=18)
    ours, theirs = onnx.load(str(written)), onnx.load(str(reference))

    def contents(model) -> list:
        return sorted((tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer)

    assert contents(ours) == contents(theirs)
    assert len(ours.graph.node) <= len(theirs.graph.node)  # nothing left unfolded that torch folds
    # The engine built from these fp32 files points at the checkpoint instead (its transposes
    # left for ONNX Runtime to fold): the same outputs, bit for bit.
    linked = b.dirs[comp, g] / "model.onnx"
    assert any(f.startswith("weights/") for f in b.files[comp, g])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    sessions = [onnxruntime.InferenceSession(str(path)) for path in (written, reference, linked)]
    got, want, from_checkpoint = (s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}) for s in sessions)
    for a, c, d in zip(got, want, from_checkpoint):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(d, c)


# ------------------------------------------------------------------------------ external data
def test_external_data_when_over_threshold(built, tmp_path, engine_checks, monkeypatch):
    """Where the checkpoint cannot be linked (another disk: os.link fails), the weights are
    written into the graph's own data file, folded as torch would, and nothing is left of the
    attempt."""
    import os

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    b = built("tiny-ti2v-5B")
    gspec = graph_spec(b.spec, "dit", "main")
    module = graph_module("dit", "main", b.models["dit"])
    monkeypatch.setattr(os, "link", no_links)
    files = ort_build.build_graph(module, gspec, b.profile, tmp_path, compute_dtype=torch.float32, device=CPU,
                                    external_data_threshold=0)
    monkeypatch.undo()
    assert files == ["model.onnx", "model.onnx.data", "weights_map.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert ort_build.weights_source(tmp_path) is None
    # The main graph holds every weight but the text side's (text embedder, cross-attention K/V),
    # which lives in the DiT's "text" graph.
    text_side = ("text_embedder", "attn2.to_k", "attn2.to_v", "attn2.norm_k")
    weights = sum(p.numel() * 4 for n, p in b.models["dit"].named_parameters()
                  if not any(part in n for part in text_side))
    assert (tmp_path / "model.onnx.data").stat().st_size >= weights * 0.9
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    graph_only = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    inline = [t for t in graph_only.graph.initializer if len(t.raw_data) >= 1024]
    assert inline == [], "every sizeable weight lives in the data file"
    # Loads from its folder by relative location, after the folder moves (as `wan-rt build` does).
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    runner = ort_backend.load_graph(moved, gspec, files, compute_dtype=torch.float32, device=CPU)
    inputs = sample_inputs(gspec, b.profile.opt, torch.float32, seed=3)
    want = engine_checks.eager_runner(b, "dit", "main")(inputs)["noise_pred"]
    err = relative_error(runner(inputs)["noise_pred"], want)
    assert err < TOL, err


def test_new_weights_rewrite_the_external_data_without_an_export(built, tmp_path):
    """LoRAs on ORT engines (export/ort_weights.py): the graph built from one set of weights,
    copied with another written into its initializers (in place in the external data file here),
    computes what the new weights compute; every initializer was accounted for by the map."""
    import copy
    import json

    from wan_rt.runtime.engine_component import module_runner

    b = built("tiny-ti2v-5B")
    gspec = graph_spec(b.spec, "dit", "main")
    model = copy.deepcopy(b.models["dit"])
    files = ort_build.build_graph(graph_module("dit", "main", model), gspec, b.profile, tmp_path / "a",
                                  compute_dtype=torch.float32, device=CPU, external_data_threshold=0)
    weights_map = json.loads((tmp_path / "a" / "weights_map.json").read_text())
    assert weights_map["unmatched"] == [] and any(layout == "T" for _, layout in weights_map["initializers"].values())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    (tmp_path / "b").mkdir()
    new = ort_build.reweight_graph(graph_module("dit", "main", model), gspec, b.profile, tmp_path / "a", tmp_path / "b",
                                   files, compute_dtype=torch.float32, device=CPU)
    assert new == files and (tmp_path / "b" / "model.onnx.data").read_bytes() != (tmp_path / "a" / "model.onnx.data").read_bytes()
    runner = ort_backend.load_graph(tmp_path / "b", gspec, new, compute_dtype=torch.float32, device=CPU)
    inputs = sample_inputs(gspec, b.profile.opt, torch.float32, seed=5)
    want = module_runner(graph_module("dit", "main", model), gspec)(inputs)["noise_pred"]
    old = module_runner(graph_module("dit", "main", b.models["dit"]), gspec)(inputs)["noise_pred"]
    assert relative_error(runner(inputs)["noise_pred"], want) < TOL < relative_error(old, want)


def test_new_weights_never_write_into_the_linked_checkpoint(built, tmp_path):
    """An engine whose external data is a hard link of the checkpoint gets a LoRA's weights in a
    copy of that file: the checkpoint keeps its bytes, and a file the new weights leave as it
    was is linked again, not copied."""
    import copy
    import hashlib

    from wan_rt.runtime.engine_component import module_runner

    b = built("tiny-ti2v-5B")
    gspec = graph_spec(b.spec, "dit", "main")
    files = ort_build.build_graph(graph_module("dit", "main", b.models["dit"]), gspec, b.profile, tmp_path / "a",
                                  compute_dtype=torch.float32, device=CPU)
    (link,) = [f for f in files if f.startswith("weights/")]
    checkpoint = tmp_path / "a" / link
    assert checkpoint.stat().st_nlink >= 2  # the checkpoint's own file
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    same = ort_build.reweight_graph(graph_module("dit", "main", b.models["dit"]), gspec, b.profile, tmp_path / "a",
                                    tmp_path / "same", files, compute_dtype=torch.float32, device=CPU)
    assert same == files and (tmp_path / "same" / link).stat().st_ino == checkpoint.stat().st_ino

    model = copy.deepcopy(b.models["dit"])
    with torch.no_grad():
        model.blocks[0].attn1.to_q.weight.mul_(1.5)
    new = ort_build.reweight_graph(graph_module("dit", "main", model), gspec, b.profile, tmp_path / "a",
                                   tmp_path / "b", files, compute_dtype=torch.float32, device=CPU)
    assert new == files and (tmp_path / "b" / link).stat().st_ino != checkpoint.stat().st_ino
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    runner = ort_backend.load_graph(tmp_path / "b", gspec, new, compute_dtype=torch.float32, device=CPU)
    inputs = sample_inputs(gspec, b.profile.opt, torch.float32, seed=5)
    want = module_runner(graph_module("dit", "main", model), gspec)(inputs)["noise_pred"]
    old = module_runner(graph_module("dit", "main", b.models["dit"]), gspec)(inputs)["noise_pred"]
    assert relative_error(runner(inputs)["noise_pred"], want) < TOL < relative_error(old, want)


# ------------------------------------------------------------------------------ contract checks
def _tiny_model(node, elem_type=None):
    from onnx import TensorProto, helper

    elem = elem_type or TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B"])],
                              [helper.make_tensor_value_info("y", elem, ["B"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_trt_check_rejects_double_sequences_and_foreign_ops():
    from onnx import TensorProto, helper

    check_trt_compatible(_tiny_model(helper.make_node("Relu", ["x"], ["y"])))  # precondition: clean passes
    bad = {
        "float64": _tiny_model(helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE), TensorProto.DOUBLE),
        "Sequence": _tiny_model(helper.make_node("SequenceConstruct", ["x"], ["y"])),
        "com.microsoft": _tiny_model(helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")),
    }
    for what, model in bad.items():
        with pytest.raises(OnnxExportError, match=what.replace(".", r"\.")):
            check_trt_compatible(model)


def test_export_refuses_module_that_breaks_the_contract(built, tmp_path):
    """A module whose output shape is not the GraphSpec's fails at export, not at run time."""
    b = built("tiny-t2v-A14B")
    gspec = graph_spec(b.spec, "dit_high_noise", "main")

    class Truncated(torch.nn.Module):
        def forward(self, latents, timestep, context):
            return latents[:, :, :1] * timestep[:, None, None, None, None]

    with pytest.raises(OnnxExportError, match="noise_pred"):
        export_onnx(Truncated(), gspec, b.profile, tmp_path / "model.onnx", compute_dtype=torch.float32)


def test_backend_interface_and_precision_policy(tmp_path):
    assert ort_backend.NAME == "ort" and ort_backend.FILE_SUFFIX == ".onnx"
    assert ort_backend.is_available()
    assert set(ort_backend.versions()) == {"onnx", "onnxruntime", "torch"}
    gspec = graph_spec(get_spec("tiny-t2v-A14B"), "dit_high_noise")
    for dtype, device in ((torch.bfloat16, "cpu"), (torch.float16, "cpu")):
        with pytest.raises(ValueError, match="fp16|bf16"):
            ort_build.build_graph(torch.nn.Identity(), gspec, None, tmp_path, compute_dtype=dtype, device=device)


# ------------------------------------------------------------------------------ streaming VAE
@pytest.mark.parametrize("spec_name", ["tiny-t2v-A14B", "tiny-ti2v-5B"])
def test_streaming_vae_through_ort_equals_eager(built, spec_name, engine_checks):
    engine_checks.check_streaming_vae(built(spec_name))


# ------------------------------------------------------------------------------ full pipeline
@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_pipeline_on_ort_matches_eager(built, spec_name, engine_checks):
    b = built(spec_name)
    components = engine_checks.engine_components(b)
    components.update(engine_checks.vae_components(b))
    engine_checks.check_pipeline(b, components, "ORT")


def test_bf16_dit_graphs_export_for_tensorrt(tmp_path):
    """TensorRT builds bf16 engines from these graphs: they must export in bf16 (ONNX Conv has
    no bf16 before opset 22, so the patch embedding must not be a Conv) and pass the checker."""
    from wan_rt.models.dit import WanDiT, cast_dit

    spec = get_spec("tiny-t2v-A14B")
    dit = cast_dit(WanDiT(spec.dit).eval(), torch.bfloat16)
    profile = shape_profile(spec, height=32, width=32, frames=9)
    for graph in ("text", "main"):
        path = tmp_path / f"{graph}.onnx"
        export_onnx(graph_module("dit_high_noise", graph, dit), graph_spec(spec, "dit_high_noise", graph), profile,
                    path, compute_dtype=torch.bfloat16)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert "Conv" not in {n.op_type for n in model.graph.node}
        first_input = model.graph.input[0].type.tensor_type.elem_type
        assert first_input == onnx.TensorProto.BFLOAT16
