"""The engine life cycle around any backend (exercised with ONNX Runtime, the fastest to build):
idempotent builds, stale-engine refusal, interrupted builds, profiles, the main-job commands."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from wan_rt.build import build_engines  # noqa: E402
from wan_rt.cli import main  # noqa: E402
from wan_rt.metrics import max_abs_error  # noqa: E402
from wan_rt.loader import WanPipeline  # noqa: E402
from wan_rt.runtime.engines_dir import EngineManifest, StaleEngineError  # noqa: E402
from wan_rt.tiny import ensure_tiny_checkpoint  # noqa: E402

SPEC = "tiny-t2v-A14B"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A private copy of the tiny checkpoint, so tests can edit its weights."""
    folder = tmp_path_factory.mktemp("ckpt") / SPEC
    shutil.copytree(ensure_tiny_checkpoint(SPEC), folder)
    return folder


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    build_engines(str(checkpoint), "ort", out, height=32, width=32, frames=9, log=lambda s: None)
    return out


def test_build_writes_manifests_and_is_idempotent(checkpoint, engines):
    index = json.loads((engines / "engines.json").read_text())
    assert index["backend"] == "ort" and index["components"] == [
        "text_encoder", "dit_high_noise", "dit_low_noise", "vae_encoder", "vae_decoder"]
    m = EngineManifest.read(engines / "dit_low_noise")
    assert (m.component, m.backend, m.precision) == ("dit_low_noise", "ort", "fp32")
    assert m.profile["max"]["T"] == 3 and m.profile["min"]["T"] == 1 and m.tool_versions["onnxruntime"]
    assert m.graphs["main"]["inputs"][0]["name"] == "latents" and len(m.weights_fingerprint) == 64
    before = {p: p.stat().st_mtime_ns for p in engines.rglob("*") if p.is_file() and p.name != "engines.json"}
    logs = []
    build_engines(str(checkpoint), "ort", engines, height=32, width=32, frames=9, log=logs.append)
    assert all("up to date" in line for line in logs) and len(logs) == 5
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_one_build_serves_two_sizes_and_matches_eager(checkpoint, engines):
    engine_pipe = WanPipeline.from_pretrained(str(checkpoint), backend="ort", engines_dir=str(engines))
    eager_pipe = WanPipeline.from_pretrained(str(checkpoint), backend="eager", dtype=torch.float32)
    for pipe in (engine_pipe, eager_pipe):
        pipe.set_progress_bar_config(disable=True)
    for height, width, frames in ((32, 32, 9), (16, 32, 5)):
        kwargs = dict(prompt="a cat", negative_prompt="dog", height=height, width=width, num_frames=frames,
                      num_inference_steps=3, generator=None)
        latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
        got = engine_pipe(latents=latents.clone(), **kwargs).frames
        want = eager_pipe(latents=latents.clone(), **kwargs).frames
        assert got.shape == (1, frames, height, width, 3)
        assert max_abs_error(torch.from_numpy(got), torch.from_numpy(want)) < 1e-4


def test_engines_dir_alone_means_its_engines_and_its_model(checkpoint, engines):
    """from_pretrained(engines_dir=...) runs the engines on their own backend (no backend needed),
    and with no path it loads the model the engines were built from."""
    from wan_rt.runtime.engine_component import DiTComponent, EagerDiTComponent

    for pipe in (WanPipeline.from_pretrained(engines_dir=str(engines)),
                 WanPipeline.from_pretrained(str(checkpoint), engines_dir=str(engines))):
        dit = pipe.components["dit_high_noise"]
        assert isinstance(dit, DiTComponent) and not isinstance(dit, EagerDiTComponent)
        assert pipe.spec.name == SPEC
    eager = WanPipeline.from_pretrained(engines_dir=str(engines), backend="eager")
    assert isinstance(eager.components["dit_high_noise"], EagerDiTComponent)
    with pytest.raises(ValueError, match="holds ort engines, not aoti"):
        WanPipeline.from_pretrained(engines_dir=str(engines), backend="aoti")
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        WanPipeline.from_pretrained()


def test_request_outside_profile_is_refused(engines, capsys):
    assert main(["run", "--engines-dir", str(engines), "--height", "64", "--output", str(engines / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "outside the shapes" in err and "wan-rt build --height 64" in err


def test_stale_weights_are_refused_then_rebuilt(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    engines = tmp_path / "engines"
    build_engines(str(checkpoint), "ort", engines, components=None, log=lambda s: None)
    weights = checkpoint / "transformer_2" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    try:
        sd = load_file(weights)
        sd["proj_out.bias"] = sd["proj_out.bias"] + 1.0
        save_file(sd, weights)
        with pytest.raises(StaleEngineError, match=r"engine for dit_low_noise is stale: the weights changed.*"
                                                   r"re-run `wan-rt build"):
            WanPipeline.from_pretrained(str(checkpoint), backend="ort", engines_dir=str(engines))
        old = EngineManifest.read(engines / "dit_low_noise").weights_fingerprint
        WanPipeline.from_pretrained(str(checkpoint), backend="ort", engines_dir=str(engines), rebuild=True)
        assert EngineManifest.read(engines / "dit_low_noise").weights_fingerprint != old
    finally:
        weights.write_bytes(original)


def test_text_len_flag_sets_the_text_length_engines_serve(checkpoint, tmp_path, capsys):
    engines = tmp_path / "engines"
    build = ["build", "--model", str(checkpoint), "--backend", "ort", "--components", "text_encoder",
             "--engines-dir", str(engines)]
    assert main([*build, "--text-len", "8"]) == 0
    profile = EngineManifest.read(engines / "text_encoder").profile
    assert profile["min"]["S"] == profile["max"]["S"] == 8
    # Loading those engines pads prompts to the 8 tokens they were built for.
    pipe = WanPipeline.from_pretrained(str(checkpoint), engines_dir=str(engines), backend_for={
        c: "eager" for c in ("dit_high_noise", "dit_low_noise", "vae_encoder", "vae_decoder")})
    assert pipe.text_len == 8 and pipe.encode_prompt("a cat").shape[1] == 8
    capsys.readouterr()
    assert main([*build, "--text-len", "8"]) == 0 and "up to date" in capsys.readouterr().out
    assert main(build) == 0 and "building" in capsys.readouterr().out  # the model's 16 is another engine
    assert EngineManifest.read(engines / "text_encoder").profile["max"]["S"] == 16
    assert main([*build, "--text-len", "0"]) == 2
    assert capsys.readouterr().err.strip() == "wan-rt build: error: the text length must be >= 1 token; got 0"


def test_outside_profile_hint_names_what_to_do():
    from wan_rt.runtime.graphs import outside_profile_hint

    hint = outside_profile_hint("S", 32, 512, 512)
    assert "max_sequence_length=512" in hint and "wan-rt build --text-len 32" in hint
    assert "--frames" in outside_profile_hint("T", 30, 1, 21) and "--width" in outside_profile_hint("w", 2, 4, 8)


def test_interrupted_build_leaves_nothing_that_loads(checkpoint, tmp_path, monkeypatch):
    from wan_rt.export import ort_build

    engines = tmp_path / "engines"
    real = ort_build.build_graph
    calls = []

    def failing(module, gspec, *args, **kwargs):
        calls.append(gspec.component)
        if gspec.component == "vae_decoder" and gspec.graph == "step":
            raise KeyboardInterrupt  # the user pressed Ctrl-C halfway through the VAE
        return real(module, gspec, *args, **kwargs)

    monkeypatch.setattr(ort_build, "build_graph", failing)
    with pytest.raises(KeyboardInterrupt):
        build_engines(str(checkpoint), "ort", engines, log=lambda s: None)
    assert not (engines / "vae_decoder").exists()
    assert not list(engines.glob(".tmp-*")), "the half-built folder must be removed"
    assert not (engines / "engines.json").exists()
    with pytest.raises(FileNotFoundError, match="run `wan-rt build` first"):
        WanPipeline.from_pretrained(str(checkpoint), backend="ort", engines_dir=str(engines))
    monkeypatch.setattr(ort_build, "build_graph", real)
    logs = []
    build_engines(str(checkpoint), "ort", engines, log=logs.append)
    assert sum("up to date" in line for line in logs) == 4  # only the VAE decoder is built again


def test_parity_command_passes_and_catches_a_wrong_engine(checkpoint, tmp_path, capsys):
    engines = tmp_path / "engines"
    build_engines(str(checkpoint), "ort", engines, log=lambda s: None)
    assert main(["parity", "--engines-dir", str(engines), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "dit_low_noise" in out and "pipeline" in out and "0 failed" in out
    # The right manifest over the wrong graph (the other expert's weights): parity must fail.
    shutil.copy(engines / "dit_high_noise" / "main" / "model.onnx", engines / "dit_low_noise" / "main" / "model.onnx")
    assert main(["parity", "--engines-dir", str(engines), "--steps", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_backend_for_pins_a_component_to_eager(checkpoint, engines):
    from wan_rt.runtime.component import EagerComponent
    from wan_rt.runtime.engine_component import StreamingVAEComponent

    pipe = WanPipeline.from_pretrained(str(checkpoint), backend="ort", engines_dir=str(engines),
                                       backend_for={"vae_decoder": "eager"})
    assert isinstance(pipe.components["vae_decoder"], EagerComponent)
    assert isinstance(pipe.components["vae_encoder"], StreamingVAEComponent)


@pytest.mark.skipif(shutil.which("wan-rt") is None, reason="the wan-rt console script is not installed")
def test_readme_main_job_on_a_fresh_engines_dir(tmp_path):
    """`wan-rt build` then `wan-rt run` in an empty folder: ./engines is made, then used."""
    build = subprocess.run(["wan-rt", "build"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "engines" / "engines.json").is_file()
    # Built at the model's full size (the export traced a small example: graphs.example_sizes).
    from wan_rt.config import get_spec
    from wan_rt.runtime.graphs import shape_profile

    spec = get_spec(SPEC)
    full = shape_profile(spec, height=spec.height, width=spec.width, frames=spec.num_frames).max
    assert EngineManifest.read(tmp_path / "engines" / "dit_high_noise").profile["max"] == full
    run = subprocess.run(["wan-rt", "run", "--steps", "2", "--output", "out.mp4"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert "engines in engines" in run.stdout
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "out.mp4", plugin="pyav")
    assert frames.shape == (5, 32, 32, 3) and np.std(frames) > 0
