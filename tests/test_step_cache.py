"""Step caches (wan_rt.caching): the split step graphs equal the one-graph step, threshold 0 is
the uncached video, First Block Cache makes diffusers' decisions on the same weights, TeaCache and
MagCache follow their references' formulas, and the same caches drive ONNX Runtime engines built
with --step-cache (AOTInductor: tests/test_aoti.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_rt.caching import StepCache, calibrate_magcache, fit_teacache
from wan_rt.caching.base import StepInfo, Stream
from wan_rt.caching.magcache import MagCache, ratio_curves
from wan_rt.caching.teacache import TeaCache
from wan_rt.config import get_spec, latent_shape
from wan_rt.metrics import max_abs_error
from wan_rt.runtime.graphs import DIT_STEP_GRAPHS, graph_spec, sample_inputs

T2V, TI2V = "tiny-t2v-A14B", "tiny-ti2v-5B"


def _pipe(model=T2V, **kwargs):
    from wan_rt.loader import WanPipeline

    pipe = WanPipeline.from_pretrained(model, device="cpu", dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(spec, steps=8, seed=3, negative_prompt="blurry"):
    latents = torch.randn((1, *latent_shape(spec, spec.height, spec.width, 5)), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(prompt="a fox in the snow", negative_prompt=negative_prompt, height=spec.height, width=spec.width,
                  num_frames=5, num_inference_steps=steps, guidance_scale=4.0, max_sequence_length=16,
                  output_type="np", latents=latents)
    if len(spec.stages) > 1:
        kwargs["guidance_scale_2"] = 3.0
    return kwargs


@pytest.mark.parametrize("model", [T2V, TI2V])
def test_split_step_graphs_are_the_one_graph_step(model):
    """embed -> first_block -> rest_blocks -> head gives main's noise_pred bit for bit (eager)."""
    pipe = _pipe(model)
    spec = pipe.spec
    dit = pipe.components[spec.dit_components[0]]
    inputs = sample_inputs(graph_spec(spec, dit.name, "main"), {"B": 2, "S": 16, "T": 2, "h": 4, "w": 6, "L": 12},
                           torch.float32, seed=1)
    want = dit.run_graph("main", **inputs)["noise_pred"]
    e = dit.run_graph("embed", latents=inputs["latents"], timestep=inputs["timestep"])
    assert e["hidden"].shape == (2, 2, 2, 3, spec.dit.dim) and e["temb"].shape[:3] == (2, 2 if model == TI2V else 1, 6)
    h = dit.run_graph("first_block", hidden=e["hidden"], temb=e["temb"], text_kv=inputs["text_kv"])["hidden_out"]
    h = dit.run_graph("rest_blocks", hidden=h, temb=e["temb"], text_kv=inputs["text_kv"])["hidden_out"]
    got = dit.run_graph("head", hidden=h, tproj=e["tproj"])["noise_pred"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["teacache", "magcache", "fbcache"])
def test_threshold_zero_is_the_uncached_video(method):
    pipe = _pipe()
    spec = pipe.spec
    want = pipe(**_call(spec)).frames
    pipe.enable_step_cache(method, 0.0, ratios=[1.0] * 14)
    assert all(isinstance(pipe.components[c], StepCache) for c in spec.dit_components)
    out = pipe(**_call(spec))
    pipe.disable_step_cache()
    assert np.array_equal(out.frames, want)
    for comp, steps in out.steps_per_stage.items():
        assert out.timings[f"{comp}.steps_computed"] == steps and out.timings[f"{comp}.steps_reused"] == 0


# A negative prompt whose branch parts from the prompt's at threshold 0.2 on the tiny weights
# (with "blurry" the two branches decide alike at every step).
NEGATIVE = "a dark misty night in rain"


def test_first_block_cache_makes_diffusers_decisions(diffusers_checkpoint):
    """diffusers.hooks.apply_first_block_cache on both experts of the same tiny checkpoint, 10
    steps with CFG: every cond/uncond decision equal, including a step where the two branches
    disagree (so rows run on their own), and the frames within 1e-4."""
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    folder = diffusers_checkpoint(T2V)
    spec = get_spec(T2V)
    ref = diffusers.WanPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    for transformer in (ref.transformer, ref.transformer_2):
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=0.2))
    theirs: list[bool] = []
    original = FBCHeadBlockHook._should_compute_remaining_blocks

    def record(self, residual):
        theirs.append(original(self, residual))
        return theirs[-1]

    FBCHeadBlockHook._should_compute_remaining_blocks = record
    try:
        with torch.no_grad():
            want = ref(**_call(spec, steps=10, negative_prompt=NEGATIVE)).frames
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = original
    ours = _pipe(str(folder))
    ours.enable_step_cache("fbcache", 0.2)
    got = ours(**_call(spec, steps=10, negative_prompt=NEGATIVE))
    # Each expert's log holds its stage: (step, stream, computed), cond then uncond per step.
    decisions = [c for comp in spec.dit_components for _, _, c in ours.components[comp].decisions]
    assert decisions == theirs, (decisions, theirs)
    assert any(a != b for a, b in zip(theirs[::2], theirs[1::2])), "want a step where cond and uncond disagree"
    assert 0 < sum(theirs) < len(theirs)
    assert max_abs_error(torch.from_numpy(got.frames), torch.from_numpy(want)) < 1e-4


# -------------------------------------------------------------------- the policies' formulas
def _reference_teacache(distances, coefficients, threshold, steps, ret_steps, cutoff):
    """TeaCache4Wan2.1's loop (teacache_generate.py), one branch: the distances are given."""
    decisions, acc = [], 0.0
    for cnt in range(steps):
        if cnt < ret_steps or cnt >= cutoff:
            calc, acc = True, 0.0
        else:
            acc += np.poly1d(coefficients)(distances[cnt])
            calc = acc >= threshold
            if calc:
                acc = 0.0
        decisions.append(calc)
    return decisions


@pytest.mark.parametrize("signal", ["temb", "tproj"])
def test_teacache_follows_the_reference_loop(signal):
    gen = torch.Generator().manual_seed(0)
    signals = [torch.randn(1, 1, 6, 8, generator=gen) * (1 + 0.05 * i) for i in range(12)]
    distances = [None] + [float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(signals[1:], signals)]
    coefficients = (0.5, 0.2, 0.1)
    policy, stream = TeaCache(0.9, coefficients, signal), Stream(0)
    got = []
    for i, s in enumerate(signals):
        got.append(policy.decide(stream, StepInfo(i, 12, i, 12), s))
        stream.residual = torch.zeros(1)  # what a computed step leaves behind
    ret, cutoff = (5, 12) if signal == "temb" else (1, 11)
    assert got == _reference_teacache(distances, coefficients, 0.9, 12, ret, cutoff)
    assert not all(got) and any(got[ret:cutoff])


def test_magcache_follows_the_reference_loop():
    """MagCache4Wan2.2's loop, one branch, after the retained steps: accumulate the ratio product's
    error, skip while under the threshold and at most K in a row."""
    ratios = [0.99, 0.98, 0.97, 0.99, 0.9, 0.99, 0.99, 0.995, 0.99, 0.97, 0.96]  # cond = uncond, 12 steps
    interleaved = [r for r in ratios for _ in range(2)]
    curve = ratio_curves(interleaved, 12)[0]
    policy, stream = MagCache(0.05, interleaved, max_skips=2, retention=0.25), Stream(0)
    got = []
    for i in range(12):
        got.append(policy.decide(stream, StepInfo(i, 12, i, 12), None))
        stream.residual = torch.zeros(1)
    want, ratio, err, skips = [], 1.0, 0.0, 0
    for i in range(12):
        if i < 3:  # int(0.25 * 12 + 0.5)
            want.append(True)
            continue
        ratio *= curve[i]
        skips += 1
        err += abs(1 - ratio)
        if err < 0.05 and skips <= 2:
            want.append(False)
        else:
            want.append(True)
            ratio, err, skips = 1.0, 0.0, 0
    assert got == want and not all(got)


def test_magcache_without_published_ratios_calibrates_first():
    pipe = _pipe()
    with pytest.raises(ValueError, match="calibrate"):
        pipe.enable_step_cache("magcache")
    ratios = calibrate_magcache(pipe, **_call(pipe.spec))
    assert len(ratios) == 2 * (8 - 1) and all(np.isfinite(ratios)) and len(set(ratios)) > 2
    pipe.enable_step_cache("magcache", 0.5, ratios=ratios, retention=0.0)
    out = pipe(**_call(pipe.spec))
    assert out.timings["dit_high_noise.steps_reused"] > 0


def test_teacache_fit_per_expert_and_a_cached_run_skips():
    pipe = _pipe()
    coefficients = fit_teacache(pipe, degree=2, **_call(pipe.spec, steps=12))
    assert set(coefficients) == set(pipe.spec.dit_components) and all(len(c) == 3 for c in coefficients.values())
    want = pipe(**_call(pipe.spec)).frames
    pipe.enable_step_cache("teacache", 2.0, signal="tproj")  # the identity polynomial, first/last step forced
    out = pipe(**_call(pipe.spec))
    reused = sum(out.timings[f"{c}.steps_reused"] for c in pipe.spec.dit_components)
    assert reused > 0 and not np.array_equal(out.frames, want)
    assert sum(out.timings[f"{c}.steps_computed"] for c in pipe.spec.dit_components) + reused == 8


# -------------------------------------------------------------------- on ONNX Runtime engines
@pytest.fixture(scope="module")
def split_engines(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from wan_rt.build import build_engines

    out = tmp_path_factory.mktemp("engines-split")
    build_engines(T2V, "ort", out, height=32, width=32, frames=5, step_cache=True, log=lambda s: None,
                  components=["dit_high_noise", "dit_low_noise"])
    return out


def test_ort_engines_with_step_graphs_drive_the_caches(split_engines, engine_checks):
    """Built with --step-cache, each expert's step is four ONNX graphs; the DiTs run on them (the
    rest eager), uncached and with First Block Cache, against the eager pipeline."""
    import json

    manifest = json.loads((split_engines / "dit_low_noise" / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"text", *DIT_STEP_GRAPHS} and manifest["build_args"]["dit_graphs"] == "split"
    engines = _pipe(engines_dir=str(split_engines), backend_for={"text_encoder": "eager", "vae_encoder": "eager",
                                                                 "vae_decoder": "eager"})
    eager = _pipe()
    engine_checks.check_cached_runs_match(engines, eager, _call(eager.spec))


def test_cache_on_one_graph_engines_says_how_to_rebuild(tmp_path, capsys):
    from wan_rt.build import build_engines
    from wan_rt.cli import main

    pytest.importorskip("onnxruntime")
    build_engines(T2V, "ort", tmp_path / "e", height=32, width=32, frames=5, components=["dit_high_noise"],
                  log=lambda s: None)
    code = main(["run", "--engines-dir", str(tmp_path / "e"), "--backend-for", "text_encoder=eager",
                 "--backend-for", "dit_low_noise=eager", "--backend-for", "vae_encoder=eager",
                 "--backend-for", "vae_decoder=eager", "--cache", "teacache", "--steps", "2",
                 "--output", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--step-cache" in err[0] and not (tmp_path / "x.mp4").exists()


def test_cli_reports_steps_computed_and_reused(tmp_path, capsys):
    from wan_rt.cli import main

    assert main(["run", "--model", T2V, "--steps", "8", "--cache", "fbcache", "--cache-threshold", "0.3",
                 "--output", str(tmp_path / "c.mp4")]) == 0
    err = capsys.readouterr().err
    assert "computed /" in err and "reused" in err
    assert main(["run", "--model", T2V, "--cache-threshold", "0.3", "--output", str(tmp_path / "d.mp4")]) == 2
    assert "--cache-threshold needs --cache" in capsys.readouterr().err
