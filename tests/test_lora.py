"""LoRA per expert: every key format to one canonical map, fused or at run time, unload, and
diffusers' `load_lora_weights` (+ `load_into_transformer_2`) as the oracle on the same tiny weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from wan_rt.config import get_spec, latent_shape
from wan_rt.lora import LoraError, expert_component, lora_deltas, parse_lora_arg
from wan_rt.metrics import max_abs_error

SPEC = "tiny-t2v-A14B"


def _files_module():
    spec = importlib.util.spec_from_file_location("wan_rt_tests_lora_files", Path(__file__).with_name("lora_files.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lora_files = _files_module()


@pytest.fixture(scope="module")
def checkpoint(diffusers_checkpoint):
    return diffusers_checkpoint(SPEC)


@pytest.fixture(scope="module")
def loras(checkpoint, tmp_path_factory):
    """Per expert, the same deltas in three formats: {expert: {format: path}}, plus the deltas."""
    from wan_rt.models import load_dit

    folder = tmp_path_factory.mktemp("loras")
    out = {}
    for seed, expert in enumerate(("dit_high_noise", "dit_low_noise")):
        deltas = lora_files.draw_deltas(load_dit(checkpoint, expert), seed=10 + seed)
        out[expert] = {fmt: lora_files.write(deltas, fmt, folder / f"{expert}-{fmt}.safetensors")
                       for fmt in ("diffusers", "original", "kohya")}
        out[expert]["deltas"] = deltas
    return out


def test_every_format_gives_the_same_canonical_deltas(checkpoint, loras):
    from wan_rt.models import load_dit

    model = load_dit(checkpoint, "dit_high_noise")
    drawn = loras["dit_high_noise"]["deltas"]
    parsed = {fmt: lora_deltas(model, loras["dit_high_noise"][fmt]) for fmt in ("diffusers", "original", "kohya")}
    # The files' own content is what is checked first: each names every drawn module.
    assert len(parsed["kohya"]) == len(drawn)
    for module, (down, up, alpha, diff_b) in drawn.items():
        weight = f"{module}.weight"
        want = up @ down * (alpha / down.shape[0])
        for fmt, deltas in parsed.items():
            got = deltas[weight].weight_delta(want.shape)
            assert torch.allclose(got, want, atol=1e-6), (fmt, module)
            if diff_b is not None and fmt != "kohya":
                assert torch.allclose(deltas[weight].diff_b, diff_b), (fmt, module)
            assert deltas[weight].bias == f"{module}.bias"
    norm = parsed["original"]["blocks.0.norm2.weight"]  # official norm3 is our cross-attention norm2
    assert norm.diff is not None and not norm.diff.any()


def test_keys_matching_no_layer_are_one_error_listing_them(checkpoint, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    from wan_rt.models import load_dit

    tensors = load_file(str(loras["dit_high_noise"]["original"]))
    tensors["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, 64)  # no block 7
    tensors["diffusion_model.blocks.0.self_attn.q.lora_mid.weight"] = torch.zeros(4, 4)  # LoCon: not a format here
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError, match=r"2 keys match no layer") as err:
        lora_deltas(load_dit(checkpoint, "dit_high_noise"), tmp_path / "bad.safetensors")
    assert "blocks.7.self_attn.q.lora_down" in str(err.value) and "lora_mid" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(LoraError, match="not found"):
        lora_deltas(load_dit(checkpoint, "dit_high_noise"), tmp_path / "missing.safetensors")


def test_parse_lora_arg_and_expert_names():
    assert parse_lora_arg("a/b.safetensors:0.5").scale == 0.5
    assert parse_lora_arg("a/b.safetensors").scale == 1.0 and parse_lora_arg("c:d").path == Path("c:d")
    assert expert_component(get_spec(SPEC), None) == "dit_high_noise"
    assert expert_component(get_spec(SPEC), "low_noise") == "dit_low_noise"
    with pytest.raises(ValueError, match="one DiT"):
        expert_component(get_spec("tiny-ti2v-5B"), "high_noise")


def _call(spec, seed=3):
    latents = torch.randn((1, *latent_shape(spec, spec.height, spec.width, 5)), generator=torch.Generator().manual_seed(seed))
    return dict(prompt="a fox in the snow", negative_prompt="blurry", height=spec.height, width=spec.width,
                num_frames=5, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0,
                max_sequence_length=16, output_type="np", latents=latents)


@pytest.fixture(scope="module")
def ours(checkpoint):
    from wan_rt.loader import WanPipeline

    pipe = WanPipeline.from_pretrained(str(checkpoint), device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fmt", ["original", "kohya", "diffusers"])
def test_two_experts_with_their_own_lora_match_diffusers(checkpoint, loras, ours, fmt):
    """diffusers WanPipeline.load_lora_weights(high) + load_lora_weights(low, load_into_transformer_2=True),
    against pipe.load_lora(high, expert="high_noise") + load_lora(low, expert="low_noise"); the
    high-noise LoRA at scale 0.7 (diffusers: set_adapters on its transformer)."""
    import diffusers

    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    spec = get_spec(SPEC)
    ref = diffusers.WanPipeline.from_pretrained(checkpoint)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(loras["dit_high_noise"][fmt]), adapter_name="hi")
    ref.load_lora_weights(str(loras["dit_low_noise"][fmt]), adapter_name="lo", load_into_transformer_2=True)
    ref.transformer.set_adapters(["hi"], weights=[0.7])
    with torch.no_grad():
        want = ref(**_call(spec)).frames
    base = ours(**_call(spec)).frames
    ours.load_lora(loras["dit_high_noise"][fmt], scale=0.7, expert="high_noise")
    ours.load_lora(loras["dit_low_noise"][fmt], expert="low_noise")
    try:
        got = ours(**_call(spec)).frames
        ours.fuse_lora()
        fused = ours(**_call(spec)).frames
    finally:
        ours.unload_lora()
    assert max_abs_error(torch.from_numpy(base), torch.from_numpy(want)) > 1e-2, "the LoRAs must change the video"
    assert max_abs_error(torch.from_numpy(got), torch.from_numpy(want)) < 1e-4, fmt
    assert max_abs_error(torch.from_numpy(fused), torch.from_numpy(want)) < 1e-4, fmt
    restored = ours(**_call(spec)).frames
    assert max_abs_error(torch.from_numpy(restored), torch.from_numpy(base)) < 1e-5


def test_run_time_loras_stack_touch_no_weight_and_unload_exactly(checkpoint, loras, ours):
    """At run time the Linear weights stay as loaded (hooks add the deltas); two LoRAs stack
    (their effects add up, as fused); removing them gives the very same output as before."""
    from wan_rt.lora import load_lora

    model = ours.components["dit_high_noise"].module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.tensor([500.0]), torch.randn(1, 16, 32, generator=gen)
    with torch.no_grad():
        base = model(x, t, ctx)
        first = load_lora(model, loras["dit_high_noise"]["original"], scale=0.5, mode="runtime")
        second = load_lora(model, loras["dit_low_noise"]["kohya"], scale=0.25, mode="runtime")
        both = model(x, t, ctx)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        second.remove()
        first.remove()
        after = model(x, t, ctx)
        # Fused, the same two LoRAs give the same output; unfusing subtracts (rounding only).
        fused = [load_lora(model, loras["dit_high_noise"]["original"], scale=0.5, mode="fuse"),
                 load_lora(model, loras["dit_low_noise"]["kohya"], scale=0.25, mode="fuse")]
        both_fused = model(x, t, ctx)
        for applied in fused:
            applied.remove()
        unfused = model(x, t, ctx)
    assert not torch.allclose(both, base, atol=1e-3)
    assert torch.equal(after, base)
    assert torch.allclose(both_fused, both, atol=1e-5) and torch.allclose(unfused, base, atol=1e-5)


def test_engine_components_take_loras_at_build_time(tmp_path):
    """An engines pipeline cannot change its compiled weights in place; it says how instead."""
    from wan_rt.loader import WanPipeline
    from wan_rt.runtime.engine_component import DiTComponent

    pipe = WanPipeline.from_pretrained(SPEC, device="cpu")
    pipe.components["dit_high_noise"] = DiTComponent("dit_high_noise", None, {}, torch.float32, "cpu", factory=dict)
    with pytest.raises(ValueError, match="wan-rt build --lora"):
        pipe.load_lora(tmp_path / "x.safetensors")


def test_cli_run_with_a_lora_per_expert(loras, checkpoint, tmp_path, capsys):
    from wan_rt.cli import main

    out = tmp_path / "lora.mp4"
    args = ["run", "--model", str(checkpoint), "--steps", "2", "--output", str(out)]
    assert main(args + ["--lora", f"{loras['dit_high_noise']['original']}:0.8",
                        "--lora-2", str(loras["dit_low_noise"]["kohya"])]) == 0
    assert out.is_file()
    capsys.readouterr()
    bad = tmp_path / "bad.mp4"
    assert main(["run", "--model", str(checkpoint), "--steps", "2", "--output", str(bad),
                 "--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors" in err[0] and not bad.exists()


# -------------------------------------------------------------------- engines
def test_lora_on_ort_engines_swaps_weights_without_a_reexport(checkpoint, loras, tmp_path, capsys):
    """`wan-rt build --lora`: an ORT expert that differs only in its weights is re-weighted (the
    ONNX graph copied, its initializers rewritten through the export-time weights map), not
    exported again; it then runs like the eager expert with the same LoRA. The manifest's
    fingerprint covers the LoRA files and scales: running without them, or after a LoRA file
    changed, is refused in one line."""
    import shutil

    import onnx
    from safetensors.torch import load_file, save_file

    from wan_rt.build import build_engines
    from wan_rt.cli import main
    from wan_rt.export.onnx_export import initializer_bytes
    from wan_rt.loader import WanPipeline
    from wan_rt.runtime.engines_dir import EngineManifest, StaleEngineError

    pytest.importorskip("onnxruntime")
    engines, hi = tmp_path / "engines", tmp_path / "hi.safetensors"
    shutil.copy(loras["dit_high_noise"]["original"], hi)
    dits = ["dit_high_noise", "dit_low_noise"]
    size = dict(height=32, width=32, frames=5, components=dits)
    build_engines(str(checkpoint), "ort", engines, log=lambda s: None, **size)
    graph_dir = engines / "dit_high_noise" / "main"

    def graph_and_weights() -> tuple:  # (onnx.load refuses the hard-linked checkpoint as external data)
        model = onnx.load(str(graph_dir / "model.onnx"), load_external_data=False)
        return model, {t.name: initializer_bytes(t, graph_dir) for t in model.graph.initializer}

    before, before_bytes = graph_and_weights()
    logs: list[str] = []
    build_engines(str(checkpoint), "ort", engines, log=logs.append, **size,
                  loras={"dit_high_noise": [(hi, 0.7)], "dit_low_noise": [(loras["dit_low_noise"]["kohya"], 1.0)]})
    assert sum("re-weighted (no re-export)" in line for line in logs) == 2, logs
    after, after_bytes = graph_and_weights()
    assert [n.SerializeToString() for n in after.graph.node] == [n.SerializeToString() for n in before.graph.node]
    assert after_bytes.keys() == before_bytes.keys()
    changed = [name for name in after_bytes if after_bytes[name] != before_bytes[name]]
    # transposed Linear weights too (export_onnx names them after their parameter)
    transposed = {i.name: list(i.dims) for i in before.graph.initializer if i.name.endswith("attn1.to_q.weight")}
    assert transposed and set(transposed) <= set(changed), (transposed, changed)
    manifest = EngineManifest.read(engines / "dit_high_noise")
    assert manifest.build_args["loras"] == [[str(hi), 0.7]] and manifest.build_args["reweighted"]

    pinned = {c: "eager" for c in ("text_encoder", "vae_encoder", "vae_decoder")}
    spec = get_spec(SPEC)
    on_engines = WanPipeline.from_pretrained(str(checkpoint), engines_dir=str(engines), backend_for=pinned,
                                             lora=[(hi, 0.7)], lora_2=[loras["dit_low_noise"]["kohya"]])
    eager = WanPipeline.from_pretrained(str(checkpoint), device="cpu", dtype=torch.float32,
                                        lora=[(hi, 0.7)], lora_2=[loras["dit_low_noise"]["kohya"]])
    got, want = on_engines(**_call(spec)).frames, eager(**_call(spec)).frames
    assert max_abs_error(torch.from_numpy(got), torch.from_numpy(want)) < 1e-4

    with pytest.raises(StaleEngineError, match="LoRAs"):
        WanPipeline.from_pretrained(str(checkpoint), engines_dir=str(engines), backend_for=pinned)
    tensors = load_file(str(hi))
    save_file({k: v * 1.5 for k, v in tensors.items()}, str(hi))  # the LoRA file changed since the build
    args = ["run", "--engines-dir", str(engines), "--steps", "2", "--lora", f"{hi}:0.7", "--lora-2",
            str(loras["dit_low_noise"]["kohya"]), "--output", str(tmp_path / "x.mp4")]
    for name in pinned:
        args += ["--backend-for", f"{name}=eager"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dit_high_noise is stale" in err[0] and "--lora" in err[0]
    assert main(args + ["--rebuild"]) == 0  # re-weighted again, then runs
