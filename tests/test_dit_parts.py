"""A DiT built in parts (`wan-rt build --dit-parts N`, layout "split:N"): the blocks after the
first split into N graphs that together are the one-graph step, in eager modules and in ONNX
Runtime engines (fp32 and int8 Q/DQ), driven by the pipeline and by a step cache; and the build
choosing parts by itself when the whole expert's TensorRT build would not fit the RAM."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from wan_rt.config import get_spec, latent_shape
from wan_rt.metrics import max_abs_error
from wan_rt.runtime.graphs import (block_range, dit_layout_name, graph_module, graph_names, graph_spec, layout_parts,
                                   rest_block_graphs, sample_inputs)

T2V = "tiny-t2v-A14B"
LAYERS = 5


@pytest.mark.parametrize("num_layers", [2, 3, 5, 30, 40])
def test_parts_cover_the_blocks_after_the_first_once_in_order(num_layers):
    for parts in range(1, num_layers):
        ranges = [block_range(g, num_layers) for g in ("first_block", *rest_block_graphs(parts))]
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]]  # contiguous, in order
        assert ranges[0] == (0, 1) and ranges[-1][1] == num_layers
        sizes = [stop - start for start, stop in ranges[1:]]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="cannot be"):
        block_range(f"rest_blocks_1of{num_layers}", num_layers)


def test_layout_names_round_trip_and_bad_ones_are_refused():
    assert dit_layout_name() == "whole" and dit_layout_name(step_cache=True) == "split"
    assert dit_layout_name(parts=3) == dit_layout_name(step_cache=True, parts=3) == "split:3"
    assert [layout_parts(x) for x in ("whole", "split", "split:3")] == [1, 1, 3]
    assert graph_names("dit", "split:2") == ("text", "embed", "first_block", "rest_blocks_1of2", "rest_blocks_2of2",
                                             "head")
    for bad in ("split:1", "split:x", "parts:2", "split:"):
        with pytest.raises(ValueError, match="unknown DiT graph layout"):
            layout_parts(bad)
    with pytest.raises(ValueError):
        dit_layout_name(parts=0)


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_eager_parts_are_the_one_graph_step_bit_for_bit(parts):
    from wan_rt.models.dit import WanDiT
    from wan_rt.runtime.engine_component import DiTComponent, module_runner

    tiny = get_spec(T2V)
    spec = dataclasses.replace(tiny, dit=dataclasses.replace(tiny.dit, num_layers=LAYERS))
    torch.manual_seed(0)
    dit = WanDiT(spec.dit).eval()

    def component(layout: str) -> DiTComponent:
        specs = {g: graph_spec(spec, "dit_high_noise", g) for g in graph_names("dit_high_noise", layout)}
        runners = {g: module_runner(graph_module("dit_high_noise", g, dit), specs[g]) for g in specs}
        return DiTComponent("dit_high_noise", runners, specs, torch.float32, torch.device("cpu"))

    split, whole = component(f"split:{parts}"), component("whole")
    assert split.has_step_graphs and split.rest_graphs == rest_block_graphs(parts)
    x = sample_inputs(whole.specs["main"], {"B": 2, "S": 16, "T": 2, "h": 4, "w": 4, "L": 8}, torch.float32)
    context = torch.randn(2, 16, spec.dit.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = split(latents=x["latents"], timestep=x["timestep"], context=context)["noise_pred"]
        want = whole(latents=x["latents"], timestep=x["timestep"], context=context)["noise_pred"]
    assert torch.equal(got, want)


# ------------------------------------------------------------------ engines of a 5-layer DiT
@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """The tiny T2V with two 5-layer experts (diffusers' own class, perturbed random weights):
    the tiny presets' 2 layers leave one block after the first, nothing to split."""
    from diffusers import WanTransformer3DModel

    from wan_rt.models import hf_config
    from wan_rt.resolve import resolve_checkpoint

    tiny = resolve_checkpoint(T2V)
    folder = tmp_path_factory.mktemp("deep") / "tiny-t2v-5-layers"
    shutil.copytree(tiny.files.root, folder)
    config = hf_config.dit_to_diffusers(dataclasses.replace(tiny.spec.dit, num_layers=LAYERS))
    for seed, sub in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(10 + seed)
        expert = WanTransformer3DModel.from_config(config)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        shutil.rmtree(folder / sub)
        expert.save_pretrained(folder / sub)
    return str(folder)


def _build(model, out, **kwargs):
    from wan_rt.build import build_engines

    pytest.importorskip("onnxruntime")
    build_engines(model, "ort", out, height=32, width=32, frames=5, log=lambda s: None, **kwargs)
    return out


def _pipe(model, **kwargs):
    from wan_rt.loader import WanPipeline

    pipe = WanPipeline.from_pretrained(model, device="cpu", dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(spec):
    latents = torch.randn((1, *latent_shape(spec, 32, 32, 5)), generator=torch.Generator().manual_seed(3))
    return dict(prompt="a fox in the snow", negative_prompt="blurry", height=32, width=32, num_frames=5,
                num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=3.0, max_sequence_length=16,
                output_type="np", latents=latents)


def test_ort_parts_run_the_pipeline_and_a_step_cache_like_eager(deep_checkpoint, tmp_path, engine_checks):
    """Each expert in 3 parts (5 graphs after `text`): the video against the eager pipeline's,
    uncached and under First Block Cache with the same skip decisions."""
    import numpy as np

    engines = _build(deep_checkpoint, tmp_path / "parts", dit_parts=3, components=["dit_high_noise", "dit_low_noise"])
    manifest = json.loads((engines / "dit_low_noise" / "manifest.json").read_text())
    assert manifest["build_args"]["dit_graphs"] == "split:3"
    assert set(manifest["graphs"]) == {"text", "embed", "first_block", *rest_block_graphs(3), "head"}
    on_engines = _pipe(deep_checkpoint, engines_dir=str(engines),
                       backend_for={c: "eager" for c in ("text_encoder", "vae_encoder", "vae_decoder")})
    eager = _pipe(deep_checkpoint)
    assert eager.spec.dit.num_layers == LAYERS
    assert float(np.abs(eager(**_call(eager.spec)).frames).mean()) > 0.05  # a video, not a blank
    engine_checks.check_cached_runs_match(on_engines, eager, _call(eager.spec))


def test_stale_parts_are_rebuilt_as_parts(deep_checkpoint, tmp_path):
    """`rebuild=True` on engines built in parts whose weights changed rebuilds them in as many parts."""
    from safetensors.torch import load_file, save_file

    from wan_rt.runtime.engines_dir import EngineManifest

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(deep_checkpoint, checkpoint)
    engines = _build(str(checkpoint), tmp_path / "engines", dit_parts=2, components=["dit_high_noise", "dit_low_noise"])
    old = EngineManifest.read(engines / "dit_low_noise").weights_fingerprint
    weights = checkpoint / "transformer_2" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out.bias"] = state["proj_out.bias"] + 1.0
    save_file(state, weights)
    _pipe(str(checkpoint), engines_dir=str(engines), rebuild=True,
          backend_for={c: "eager" for c in ("text_encoder", "vae_encoder", "vae_decoder")})
    rebuilt = EngineManifest.read(engines / "dit_low_noise")
    assert rebuilt.weights_fingerprint != old and rebuilt.build_args["dit_graphs"] == "split:2"
    assert set(rebuilt.graphs) >= set(rest_block_graphs(2))


def test_int8_parts_quantize_what_the_whole_graph_does(deep_checkpoint, tmp_path):
    """The Q/DQ pass on each part: together the same linears quantized and kept as in the
    one-graph build, with the same scales (identical outputs)."""
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.engines import load_engine_components

    resolved = resolve_checkpoint(deep_checkpoint)
    outputs, reports = [], []
    for name, parts in (("whole", None), ("parts", 2)):
        engines = _build(deep_checkpoint, tmp_path / name, precision="int8", dit_parts=parts,
                         components=["dit_high_noise"])
        report: dict = {"quantized": {}, "kept": {}}
        for f in (engines / "dit_high_noise").glob("*/qdq_report.json"):
            for key in report:
                report[key].update(json.loads(f.read_text())[key])
        reports.append(report)
        dit = load_engine_components(engines, resolved, torch.device("cpu"), ["dit_high_noise"])["dit_high_noise"]
        x = sample_inputs(graph_spec(resolved.spec, "dit_high_noise", "main"),
                          {"B": 2, "S": 16, "T": 2, "h": 4, "w": 4, "L": 8}, torch.float32)
        context = torch.randn(2, 16, resolved.spec.dit.text_dim, generator=torch.Generator().manual_seed(1))
        outputs.append(dit(latents=x["latents"], timestep=x["timestep"], context=context)["noise_pred"])
    assert len(reports[0]["quantized"]) >= 8 * (LAYERS - 1) and reports[0] == reports[1]
    assert max_abs_error(outputs[0], outputs[1]) < 1e-5


# ------------------------------------------------------------------ choosing parts to fit
def test_a_trt_build_too_big_whole_is_built_in_the_fewest_parts_that_fit(deep_checkpoint, monkeypatch, tmp_path):
    """_fit_build weighs build_need with 1, 2, ... parts against the RAM: with RAM between what
    2 parts and the whole expert need, a build that left the parts open gets 2 (said in the log);
    one that asked for 1 is refused, naming --dit-parts 2; too many parts is one clear error."""
    from wan_rt import build, host_memory
    from wan_rt.resolve import resolve_checkpoint

    resolved = resolve_checkpoint(deep_checkpoint)
    spec = resolved.spec
    dtypes = {"dit_high_noise": torch.bfloat16}
    whole = host_memory.build_need(spec, resolved.files, dtypes, "trt").owned
    halves = host_memory.build_need(spec, resolved.files, dtypes, "trt", dit_parts=2).owned
    quarters = host_memory.build_need(spec, resolved.files, dtypes, "trt", dit_parts=4).owned
    assert quarters < halves < whole
    monkeypatch.setattr(build, "available_bytes", lambda: (whole + halves) // 2)
    said: list[str] = []
    args = (resolved, ["dit_high_noise"], "trt", "bf16", torch.device("cpu"), tmp_path, True)
    assert build._fit_build(*args, None, said.append) == ("bf16", 2)
    assert len(said) == 1 and "2 parts" in said[0] and "--dit-parts" in said[0]
    assert build._fit_build(*args, 3, said.append) == ("bf16", 3)
    with pytest.raises(host_memory.HostMemoryError, match="--dit-parts 2 needs"):
        build._fit_build(*args, 1, said.append)
    with pytest.raises(ValueError, match="--dit-parts must be 1 to 4"):
        build.build_engines(deep_checkpoint, "ort", tmp_path / "e", dit_parts=5, components=["dit_high_noise"])
    assert not (tmp_path / "e").exists()
