"""AOTInductor packages (wan_rt.export.aoti_export, runtime.backends.aoti) against the eager models.

Compiling is what costs here (10-45 s of CPU per tiny graph with `fast`, twice that without), so
the module fixture compiles every graph once, in two worker processes, with `fast=True` (scalar
kernels, -O0 wrapper: the same ops) and the package cache on: graphs of one architecture compile
once (the two A14B experts; umT5 and the DiT text graph of all three presets), which is itself
under test. Compiled: every graph of tiny T2V; the DiT step graphs of I2V (36 input channels) and
TI2V (per-token timestep: L its own dim); umT5 and DiT text graphs of all three. I2V's VAE is
T2V's: same architecture and, in the tiny presets, the same weights (checked), so its packages
are T2V's. TI2V's Wan 2.2 VAE (4 graphs, ~4 min of CPU) is left out to keep this file under
5 minutes on 2 cores: TI2V's pipeline test runs its VAE eagerly unless WAN_RT_AOTI_TEST_ALL=1.
WAN_RT_AOTI_TEST_FAST=0 compiles with the default (vectorised, optimised) options instead.
"""

from __future__ import annotations

import copy
import json
import os
import time
import types

import pytest
import torch

if not torch.cuda.is_available():  # before any wan_rt.kernels kernel module is imported (the fast package test)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from wan_rt.config import get_spec  # noqa: E402
from wan_rt.metrics import relative_error  # noqa: E402
from wan_rt.runtime.backends import get_backend  # noqa: E402
from wan_rt.runtime.engine_component import module_runner  # noqa: E402
from wan_rt.runtime.graphs import (DIT_STEP_GRAPHS, components_of, graph_module, graph_names,  # noqa: E402
                                   graph_spec, sample_inputs, shape_profile)

aoti = get_backend("aoti")
pytestmark = pytest.mark.skipif(not aoti.is_available(), reason=f"AOTInductor unavailable: {aoti.unavailable_reason()}")

T2V, I2V, TI2V = "tiny-t2v-A14B", "tiny-i2v-A14B", "tiny-ti2v-5B"
ALL = os.environ.get("WAN_RT_AOTI_TEST_ALL") == "1"
FAST = os.environ.get("WAN_RT_AOTI_TEST_FAST", "1") != "0"
T2V_GRAPHS = [(c, g) for c in components_of(get_spec(T2V)) for g in graph_names(c)]
VAE_GRAPHS = [(c, g) for c in ("vae_encoder", "vae_decoder") for g in ("first", "step")]
# Compile order: the slow graphs first; graphs whose package an earlier one makes last.
# T2V's experts also get the split step (wan-rt build --step-cache) a step cache drives.
TASKS = ([(T2V, c, g) for c, g in VAE_GRAPHS] + ([(TI2V, c, g) for c, g in VAE_GRAPHS] if ALL else [])
         + [(T2V, "dit_high_noise", "main"), (I2V, "dit_high_noise", "main"), (TI2V, "dit", "main"),
            (T2V, "text_encoder", "main"), (T2V, "dit_high_noise", "text")]
         + [(T2V, "dit_high_noise", g) for g in DIT_STEP_GRAPHS]
         + [(T2V, "dit_low_noise", g) for g in ("text", "main", *DIT_STEP_GRAPHS)]
         + [(I2V, "text_encoder", "main"), (I2V, "dit_high_noise", "text")]
         + [(I2V, "dit_low_noise", g) for g in ("text", "main")]
         + [(TI2V, "text_encoder", "main"), (TI2V, "dit", "text")])
VAE_SPECS = [T2V, TI2V] if ALL else [T2V]
TOL = 1e-4
CPU = torch.device("cpu")


def _profile(spec):
    """Twice the default size, 9 frames: T in [1, 3], latent h, w in [2, 8] (the DiT: [4, 8],
    two tokens per axis at least); the pipeline (default size, 5 frames) and the size tests
    run at sizes other than the export's example (graphs.example_sizes: B=2, T=3, DiT 8x4
    latents, VAE 4x5)."""
    return shape_profile(spec, height=2 * spec.height, width=2 * spec.width, frames=9)


@pytest.fixture(scope="module")
def built(tmp_path_factory, engine_checks):
    """name -> namespace(resolved, spec, profile, models, dirs, files, runners, stats)."""
    from wan_rt.export.aoti_export import compile_graphs

    from wan_rt.resolve import resolve_checkpoint

    names = (T2V, I2V, TI2V)
    resolved = {n: resolve_checkpoint(n) for n in names}  # writes the tiny checkpoints, here, once
    profiles = {n: _profile(r.spec) for n, r in resolved.items()}
    start = time.perf_counter()
    results = compile_graphs(TASKS, tmp_path_factory.mktemp("aoti"), profiles, fast=FAST, workers=2)
    wall = time.perf_counter() - start
    out = {}
    for name, r in resolved.items():
        models = engine_checks.load_models(r)
        mine = {(c, g): v for (m, c, g), v in results.items() if m == name}
        if name == I2V:  # T2V's VAE packages, if the weights are T2V's too
            t2v_vae = out[T2V].models["vae_decoder"].state_dict()
            assert all(torch.equal(v, t2v_vae[k]) for k, v in models["vae_decoder"].state_dict().items())
            mine.update({(c, g): results[T2V, c, g] for c, g in VAE_GRAPHS})
        runners = {key: aoti.load_graph(v["dir"], graph_spec(r.spec, *key), v["files"], compute_dtype=torch.float32,
                                        device=CPU) for key, v in mine.items()}
        out[name] = types.SimpleNamespace(resolved=r, spec=r.spec, profile=profiles[name], models=models,
                                          dirs={k: v["dir"] for k, v in mine.items()},
                                          files={k: v["files"] for k, v in mine.items()},
                                          stats={k: v["stats"] for k, v in mine.items()}, runners=runners)
    print(f"\nAOTI compile of {len(TASKS)} graphs (fast={FAST}), 2 workers: {wall:.0f} s wall")
    for (m, c, g), v in results.items():
        s = v["stats"]
        print(f"  {m:<14} {c + '/' + g:<22} export {s['export_s']:5.1f} s  compile {s['compile_s']:6.1f} s "
              f"(cpu {s['compile_cpu_s']:6.1f} s){'  cached' if s['cached'] else ''}")
    return out


# ------------------------------------------------------------------------------ every graph
@pytest.mark.parametrize("comp,g", T2V_GRAPHS, ids=[f"{c}-{g}" for c, g in T2V_GRAPHS])
def test_t2v_graph_matches_eager(built, comp, g, engine_checks):
    """At batch 1, T = 2 latent frames, 4x4 latents: not the export's example sizes."""
    b = built[T2V]
    # The tiny checkpoints are fp32 files built in fp32: every weight is pointed at (hard-linked),
    # the weights file keeps what the checkpoint has not (RoPE tables made by the forward).
    assert b.files[comp, g][:3] == ["model.pt2", "weights.safetensors", "weights.json"]
    assert all(f.startswith("weights/") for f in b.files[comp, g][3:])
    err = engine_checks.compare_graph(b, comp, g, engine_checks.grid_sizes(b, 1, 2, 4, 4))
    assert err < TOL, f"{comp}/{g}: AOTI vs eager relative error {err:.2e}"


@pytest.mark.parametrize("spec_name", [I2V, TI2V])
def test_dit_step_graph_matches_eager(built, spec_name, engine_checks):
    b = built[spec_name]
    comp = b.spec.dit_components[0]
    err = engine_checks.compare_graph(b, comp, "main", engine_checks.grid_sizes(b, 1, 2, 4, 6))
    assert err < TOL, f"{spec_name} {comp}/main: relative error {err:.2e}"


# ------------------------------------------------------------------------------ one package, many
def test_experts_share_one_package_and_weights_decide(built, engine_checks):
    """The two A14B experts (same architecture) get the same compiled package from the cache;
    the weights file alone makes them differ: the low-noise package run with the high-noise
    weights gives the high-noise expert's numbers (nothing of the compile-time weights is left
    in the code, e.g. small biases inlined as literals)."""
    b = built[T2V]
    hi, lo = b.dirs["dit_high_noise", "main"], b.dirs["dit_low_noise", "main"]
    assert (hi / "model.pt2").read_bytes() == (lo / "model.pt2").read_bytes()
    hi_w, lo_w = _constants(hi), _constants(lo)
    assert hi_w.keys() == lo_w.keys() and any(not torch.equal(hi_w[k], lo_w[k]) for k in hi_w)
    assert b.stats["dit_low_noise", "main"]["cached"] and not b.stats["dit_high_noise", "main"]["cached"]
    # umT5 and the DiT text graph: one architecture in all three presets (the text graph of the
    # 36- and 48-channel DiTs differs only by patch weights it does not read): compiled once.
    assert all(built[n].stats["text_encoder", "main"]["cached"] for n in (I2V, TI2V))
    assert built[I2V].stats["dit_high_noise", "text"]["cached"] and built[TI2V].stats["dit", "text"]["cached"]
    gspec = graph_spec(b.spec, "dit_low_noise", "main")
    swapped = aoti.load_graph(lo, gspec, ["model.pt2", str(hi / "weights.safetensors")], compute_dtype=torch.float32,
                              device=CPU)
    inputs = sample_inputs(gspec, engine_checks.grid_sizes(b, 1, 2, 4, 4), torch.float32, seed=3)
    got = swapped(inputs)["noise_pred"]
    want_hi = engine_checks.eager_runner(b, "dit_high_noise", "main")(inputs)["noise_pred"]
    want_lo = engine_checks.eager_runner(b, "dit_low_noise", "main")(inputs)["noise_pred"]
    assert relative_error(want_lo, want_hi) > 1e-2, "the experts must differ for this to mean anything"
    assert relative_error(got, want_hi) < TOL


def test_package_holds_no_weights(built):
    """The package is code only (no weights file in the archive, and the .so's constants are
    not packaged); every constant it names is in the weights file, and nothing else is."""
    import zipfile

    b = built[T2V]
    folder = b.dirs["dit_high_noise", "main"]
    with zipfile.ZipFile(folder / "model.pt2") as z:
        names = z.namelist()
    assert not any("weights" in n or n.endswith((".bin", ".blob")) for n in names), names
    fqns = set(aoti.load_package(folder / "model.pt2", CPU).get_constant_fqns())
    from safetensors import safe_open

    with safe_open(str(folder / "weights.safetensors"), "pt") as f:
        stored = set(f.keys())
    referenced = set(json.loads((folder / "weights.json").read_text())["tensors"])
    assert fqns == stored | referenced and not stored & referenced
    assert "dit.patch_embedding.weight" in referenced


def _constants(folder) -> dict[str, torch.Tensor]:
    """A graph folder's constants: its weights file and what its weights.json points at."""
    from safetensors.torch import load_file

    return {**load_file(str(folder / "weights.safetensors")), **aoti.read_weight_refs(folder / "weights.json", CPU)}


def test_weights_are_the_checkpoints_own_files_hard_linked(built):
    """No second copy of a weight the checkpoint holds as the engine wants it: the engine's
    weights.json points at hard links of the checkpoint's shards, each constant equal to its
    parameter, and the manifest note says so (wan_rt.build writes weights_source's)."""
    from wan_rt.export.aoti_export import weights_source
    from wan_rt.models.checkpoint import find_weights

    b = built[T2V]
    folder = b.dirs["dit_high_noise", "main"]
    refs = json.loads((folder / "weights.json").read_text())
    shard = find_weights(b.resolved.files.dits["dit_high_noise"])
    assert [f["linked"] for f in refs["files"]] == [True]
    assert os.path.samefile(folder / refs["files"][0]["path"], shard)
    params = dict(graph_module("dit_high_noise", "main", b.models["dit_high_noise"]).named_parameters())
    got = aoti.read_weight_refs(folder / "weights.json", CPU)
    fqns = set(aoti.load_package(folder / "model.pt2", CPU).get_constant_fqns())
    assert set(got) == fqns & set(params) and all(torch.equal(got[k], params[k]) for k in got)
    assert weights_source(folder) == {"from_checkpoint": "linked", "tensors": len(got),
                                      "files": [refs["files"][0]["path"]]}


# ------------------------------------------------------------------------------ dynamic shapes
@pytest.mark.parametrize("spec_name,comp", [(T2V, "dit_high_noise"), (TI2V, "dit")])
def test_dit_graph_serves_two_sizes(built, spec_name, comp, engine_checks):
    """Exported at B=2, T=3, 8x4 latents; run at two other grids in the profile, batch 1 and 2
    (TI2V's per-token timestep: L is its own dim, the hardest dynamic case)."""
    b = built[spec_name]
    for batch, t, h, w in ((1, 1, 4, 8), (2, 3, 6, 4)):
        err = engine_checks.compare_graph(b, comp, "main", engine_checks.grid_sizes(b, batch, t, h, w), seed=1)
        assert err < TOL, f"{comp} at B={batch} T={t} {h}x{w}: relative error {err:.2e}"


@pytest.mark.parametrize("spec_name", VAE_SPECS)
def test_vae_step_graphs_serve_two_sizes(built, spec_name, engine_checks):
    b = built[spec_name]
    for comp in ("vae_decoder", "vae_encoder"):
        for batch, h, w in ((1, 2, 7), (2, 5, 3)):
            err = engine_checks.compare_graph(b, comp, "step", engine_checks.grid_sizes(b, batch, 1, h, w), seed=2)
            assert err < TOL, f"{comp}/step at B={batch} {h}x{w}: relative error {err:.2e}"


def test_runner_rejects_shapes_outside_the_package(built, engine_checks):
    """AOTInductor does not check its inputs; the runner does, before the .so reads them."""
    b = built[T2V]
    gspec = graph_spec(b.spec, "dit_high_noise", "main")
    runner = b.runners["dit_high_noise", "main"]
    with pytest.raises(ValueError, match=r"h = 2 is outside .*\[4, 8\]"):  # one token per axis
        runner(sample_inputs(gspec, engine_checks.grid_sizes(b, 1, 1, 2, 4), torch.float32))
    with pytest.raises(ValueError, match=r"B = 3 is outside"):
        runner(sample_inputs(gspec, engine_checks.grid_sizes(b, 3, 1, 4, 4), torch.float32))
    vae = graph_spec(b.spec, "vae_decoder", "step")
    inputs = sample_inputs(vae, engine_checks.grid_sizes(b, 1, 1, 2, 2), torch.float32)
    inputs["cache_in_3"] = inputs["cache_in_3"][..., :1]  # width no longer the latent's
    with pytest.raises(ValueError, match="cache_in_3"):
        b.runners["vae_decoder", "step"](inputs)
    # The text length is fixed at build time: the refusal says which flag sets it.
    text = graph_spec(b.spec, "text_encoder")
    with pytest.raises(ValueError, match=r"S = 8 is outside .*\[16, 16\].*max_sequence_length=16.*--text-len 8"):
        b.runners["text_encoder", "main"](sample_inputs(text, {"B": 1, "S": 8}, torch.float32))
    inputs = sample_inputs(gspec, engine_checks.grid_sizes(b, 1, 1, 4, 4), torch.float32)
    with pytest.raises(TypeError, match="float64"):
        runner({k: v.double() for k, v in inputs.items()})


# ------------------------------------------------------------------------------ contract, interface
def test_export_refuses_module_that_breaks_the_contract(built, tmp_path):
    """A module whose outputs are not the GraphSpec's fails at export, before compiling."""
    from wan_rt.export.aoti_export import AotiExportError, compile_aoti

    b = built[T2V]
    gspec = graph_spec(b.spec, "dit_high_noise", "main")

    class Int(torch.nn.Module):
        def forward(self, latents, timestep, text_kv):
            return latents.long()

    with pytest.raises(AotiExportError, match="noise_pred"):
        compile_aoti(Int(), gspec, b.profile, tmp_path / "model.pt2", compute_dtype=torch.float32, device=CPU)
    assert not (tmp_path / "model.pt2").exists()


def test_backend_interface():
    assert aoti.NAME == "aoti" and aoti.FILE_SUFFIX == ".pt2"
    assert aoti.is_available() and aoti.unavailable_reason() == ""
    v = aoti.versions()
    assert v["torch"] == torch.__version__ and v["device"].startswith("cpu-")
    assert set(aoti.STRICT_VERSIONS) <= set(v)


# ------------------------------------------------------------------------------ streaming VAE
@pytest.mark.parametrize("spec_name", VAE_SPECS)
def test_streaming_vae_through_aoti_equals_eager(built, spec_name, engine_checks):
    engine_checks.check_streaming_vae(built[spec_name])


# ------------------------------------------------------------------------------ full pipeline
@pytest.mark.parametrize("spec_name", [T2V, I2V, TI2V])
def test_pipeline_on_aoti_matches_eager(built, spec_name, engine_checks):
    """Every component on AOTI packages (TI2V's VAE eager unless WAN_RT_AOTI_TEST_ALL=1), 4 steps
    with CFG, against the eager pipeline from the same latents."""
    from wan_rt.eager import build_eager_components

    b = built[spec_name]
    components = engine_checks.engine_components(b)
    vae_on_aoti = ("vae_decoder", "first") in b.runners
    assert vae_on_aoti == (spec_name in VAE_SPECS or spec_name == I2V)
    components.update(engine_checks.vae_components(b) if vae_on_aoti else
                      build_eager_components(b.resolved, CPU, torch.float32, ["vae_encoder", "vae_decoder"]))
    engine_checks.check_pipeline(b, components, "AOTI")


# ------------------------------------------------------------------------------ levers on packages
def test_step_caches_on_aoti_packages(built, engine_checks):
    """The experts' split step as AOTI packages (what `wan-rt build --backend aoti --step-cache`
    makes; the low-noise expert's from the cache): threshold 0 gives the packages' uncached video,
    First Block Cache the eager cache's decisions and frames (1e-4)."""
    from wan_rt.caching import apply_step_cache
    from wan_rt.eager import build_eager_components
    from wan_rt.loader import WanPipeline

    b = built[T2V]
    assert all(b.stats["dit_low_noise", g]["cached"] for g in DIT_STEP_GRAPHS)
    assert all(not b.stats["dit_high_noise", g]["cached"] for g in DIT_STEP_GRAPHS)
    components = engine_checks.engine_components(b)
    components.update(engine_checks.vae_components(b))
    eager = build_eager_components(b.resolved, CPU, torch.float32)
    pipes = {}
    for label, comps in (("aoti", components), ("eager", eager)):
        pipe = WanPipeline(b.spec, comps, engine_checks.tokenizer(b), b.resolved.defaults, CPU)
        pipe.set_progress_bar_config(disable=True)
        pipes[label] = pipe
    call = engine_checks.pipeline_call(b, steps=8)
    uncached = pipes["aoti"](**call()).frames
    outs = {}
    for label, pipe in pipes.items():
        pipe.components.update(apply_step_cache(pipe.components, b.spec, "fbcache", 0.2))
        outs[label] = pipe(**call())
    # The uncached AOTI run used the `main` packages; threshold 0 runs the split ones, every step.
    pipes["aoti"].components.update(apply_step_cache(pipes["aoti"].components, b.spec, "teacache", 0.0))
    assert relative_error(torch.from_numpy(pipes["aoti"](**call()).frames), torch.from_numpy(uncached)) < TOL
    stats = {label: {k: v for k, v in o.timings.items() if ".steps_" in k} for label, o in outs.items()}
    assert stats["aoti"] == stats["eager"] and stats["aoti"]["dit_high_noise.steps_reused"] > 0, stats
    assert relative_error(torch.from_numpy(outs["aoti"].frames), torch.from_numpy(outs["eager"].frames)) < TOL


def test_lora_build_reuses_the_compiled_packages(built, tmp_path, engine_checks):
    """`wan-rt build --lora/--lora-2` on AOTInductor: new weights.safetensors per expert, the
    compiled packages copied from the cache (no compile: the cache gains no entry, the packages
    are the LoRA-less build's bytes); the experts then run like eager experts with the LoRAs."""
    import importlib.util
    from pathlib import Path

    from wan_rt.build import build_engines
    from wan_rt.export.aoti_export import default_cache_dir
    from wan_rt.loader import WanPipeline

    spec_ = importlib.util.spec_from_file_location("wan_rt_tests_lora_files", Path(__file__).with_name("lora_files.py"))
    lora_files = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(lora_files)
    b = built[T2V]
    dits = list(b.spec.dit_components)
    files = {c: lora_files.write(lora_files.draw_deltas(b.models[c], seed=20 + i), "original", tmp_path / f"{c}.safetensors")
             for i, c in enumerate(dits)}
    size = dict(height=2 * b.spec.height, width=2 * b.spec.width, frames=9, device="cpu", quick_compile=FAST,
                components=dits, log=lambda s: None)
    plain, with_lora = tmp_path / "plain", tmp_path / "lora"
    build_engines(T2V, "aoti", plain, **size)
    entries = sorted(p.name for p in default_cache_dir().iterdir())
    logs: list[str] = []
    build_engines(T2V, "aoti", with_lora, **{**size, "log": logs.append},
                  loras={dits[0]: [(files[dits[0]], 0.8)], dits[1]: [(files[dits[1]], 1.0)]})
    assert sorted(p.name for p in default_cache_dir().iterdir()) == entries, "a LoRA build must not compile"
    for comp in dits:
        for g in ("text", "main"):
            assert (with_lora / comp / g / "model.pt2").read_bytes() == (plain / comp / g / "model.pt2").read_bytes()
        assert (with_lora / comp / "main" / "weights.safetensors").read_bytes() != \
            (plain / comp / "main" / "weights.safetensors").read_bytes()
    pinned = {c: "eager" for c in ("text_encoder", "vae_encoder", "vae_decoder")}
    by_expert = dict(lora=[(files[dits[0]], 0.8)], lora_2=[files[dits[1]]])
    on_aoti = WanPipeline.from_pretrained(T2V, engines_dir=str(with_lora), backend_for=pinned, device="cpu", **by_expert)
    eager = WanPipeline.from_pretrained(T2V, device="cpu", dtype=torch.float32, **by_expert)
    call = engine_checks.pipeline_call(b, steps=4)
    for pipe in (on_aoti, eager):
        pipe.set_progress_bar_config(disable=True)
    got, want = on_aoti(**call()).frames, eager(**call()).frames
    assert relative_error(torch.from_numpy(got), torch.from_numpy(want)) < TOL


# ------------------------------------------------------------------------------ the commands
def test_build_run_parity_commands_on_aoti(built, tmp_path, capsys):
    """`wan-rt build --backend aoti` at the fixture's profile: every package comes from the cache
    the fixture filled (same graphs, options, torch), so this checks the cache end to end and
    costs exports only. Then `wan-rt parity` and `wan-rt run` on the engines dir, and a manifest
    from another torch is refused in one line naming the component."""
    import imageio.v3 as iio

    from wan_rt.cli import main

    b = built[T2V]
    spec, engines = b.spec, tmp_path / "engines"
    args = ["build", "--model", T2V, "--backend", "aoti", "--height", str(2 * spec.height), "--width",
            str(2 * spec.width), "--frames", "9", "--engines-dir", str(engines), "--device", "cpu"]
    assert main(args + (["--quick-compile"] if FAST else [])) == 0
    for comp in components_of(spec):
        manifest = json.loads((engines / comp / "manifest.json").read_text())
        assert manifest["backend"] == "aoti" and manifest["build_args"]["quick_compile"] == FAST
        for g in graph_names(comp):
            assert manifest["graphs"][g]["files"][:3] == [f"{g}/model.pt2", f"{g}/weights.safetensors",
                                                         f"{g}/weights.json"]
            assert manifest["graphs"][g]["weights"]["from_checkpoint"] == "linked"
            assert ((engines / comp / g / "model.pt2").read_bytes()
                    == (b.dirs[comp, g] / "model.pt2").read_bytes()), f"{comp}/{g} was not the cached package"
    capsys.readouterr()
    assert main(["parity", "--engines-dir", str(engines)]) == 0
    report = capsys.readouterr().out
    assert all(comp in report for comp in components_of(spec))

    out = tmp_path / "aoti.mp4"
    assert main(["run", "--engines-dir", str(engines), "--steps", "2", "--frames", "9", "--output", str(out)]) == 0
    frames = iio.imread(out, plugin="pyav")
    assert frames.shape == (9, spec.height, spec.width, 3) and frames.std() > 0

    path = engines / "vae_decoder" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tool_versions"]["torch"] = "2.0.0"
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["run", "--engines-dir", str(engines), "--steps", "2", "--output", str(tmp_path / "stale.mp4")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vae_decoder" in err[0] and "torch" in err[0] and "wan-rt build" in err[0], err
    assert not (tmp_path / "stale.mp4").exists()


def test_quick_compile_is_an_aoti_option(tmp_path, capsys):
    from wan_rt.cli import main

    assert main(["build", "--backend", "ort", "--quick-compile", "--engines-dir", str(tmp_path / "e")]) != 0
    assert "--quick-compile is an AOTInductor option" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the fast path as a package
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds CPU packages with the Triton kernels interpreted; on a "
                    "GPU machine the kernels compile for CUDA instead (bench/dit_step.py's aoti variant covers that)")
def test_fast_dit_package_fp8_int8_attention_triton(built, tmp_path, monkeypatch, engine_checks):
    """`wan-rt build --backend aoti --precision fp8 --kernels triton --attention int8`: each expert
    is one package holding the fast path (FP8 GEMMs through torch._scaled_mm, wan_rt's Triton
    attention with int8 q·kᵀ and fused LayerNorm-modulate, called as custom ops). On this CPU the
    Triton kernels run in the interpreter, so the package's calls are spied on. The package
    must compute what the same variant computes eagerly (1e-4), and its FP8 error against the
    fp32 oracle must be visible and bounded (the quantization budget, 0.1)."""
    from wan_rt.build import build_engines
    from wan_rt.runtime.fast import DiTVariant

    import wan_rt.kernels.rope3d_attn as attn_mod

    b = built[T2V]
    spec, engines = b.spec, tmp_path / "fast"
    dits = list(spec.dit_components)
    build_engines(T2V, "aoti", engines, precision="fp8", kernels="triton", attention="int8", components=dits,
                  height=2 * spec.height, width=2 * spec.width, frames=9, device="cpu", quick_compile=FAST,
                  log=lambda s: None)
    variant = DiTVariant(kernels=True, attention_quant="int8", fp8_linear=True)
    for comp in dits:
        manifest = json.loads((engines / comp / "manifest.json").read_text())
        assert manifest["precision"] == "fp8"
        assert {k: manifest["build_args"][k] for k in variant.manifest_args()} == variant.manifest_args()
        assert "tolerances" in manifest["build_args"]  # wan-rt parity's quality report reads them
        ops = aoti.package_metadata(engines / comp / "main" / "model.pt2")["wan_rt.custom_ops"].split(",")
        assert {"rope3d_attention", "attention", "layernorm_modulate"} <= set(ops), ops
    assert (engines / dits[0] / "main" / "model.pt2").read_bytes() == (engines / dits[1] / "main" / "model.pt2").read_bytes()

    launches: list[str] = []
    real_launch = attn_mod._launch_attention
    monkeypatch.setattr(attn_mod, "_launch_attention", lambda *a: (launches.append(a[-1]), real_launch(*a))[1])
    for comp in dits:
        gspec = graph_spec(spec, comp, "main")
        runner = aoti.load_graph(engines / comp, gspec, ["main/model.pt2", "main/weights.safetensors"],
                                 compute_dtype=torch.float32, device=CPU)
        fast_model = copy.deepcopy(b.models[comp])
        variant.apply(fast_model)
        inputs = sample_inputs(gspec, engine_checks.grid_sizes(b, 1, 2, 4, 6), torch.float32, seed=4)
        launches.clear()
        got = runner(inputs)["noise_pred"]
        assert launches.count("int8") == spec.dit.num_layers, launches  # self-attention, int8, every block
        assert launches.count("none") == spec.dit.num_layers, launches  # cross-attention, same kernel
        want_fast = module_runner(graph_module(comp, "main", fast_model), gspec)(inputs)["noise_pred"]
        want_fp32 = engine_checks.eager_runner(b, comp, "main")(inputs)["noise_pred"]
        assert relative_error(got, want_fast) < TOL, comp
        assert 1e-4 < relative_error(got, want_fp32) < 0.1, (comp, relative_error(got, want_fp32))


def test_fast_options_are_refused_where_they_cannot_run(tmp_path):
    from wan_rt.build import build_engines

    with pytest.raises(ValueError, match="--attention int8 needs the Triton kernels"):
        build_engines(T2V, "aoti", tmp_path, attention="int8", kernels="torch", device="cpu")
    with pytest.raises(ValueError, match="aoti takes fp8"):
        build_engines(T2V, "aoti", tmp_path, precision="int8", device="cpu")
    with pytest.raises(ValueError, match="--kernels is an AOTInductor option"):
        build_engines(T2V, "ort", tmp_path, kernels="triton", device="cpu")
    assert not any(tmp_path.iterdir()), "a refused build leaves nothing behind"


# ------------------------------------------------------------------------------ C++ services
def test_cpp_service_runs_a_package_like_python(built, tmp_path, engine_checks, cpp_build):
    """wan_rt/cpp: the run_graph example, built with the C++ library against the installed torch's
    libtorch, loads an engine graph folder (package + weights.safetensors) and reproduces the
    Python runner's output bit for bit; bad input is one line and exit 2."""
    import subprocess

    from safetensors.torch import load_file, save_file

    exe = cpp_build / "run_graph"
    b = built[T2V]
    gspec = graph_spec(b.spec, "dit_high_noise", "main")
    inputs = sample_inputs(gspec, engine_checks.grid_sizes(b, 2, 2, 4, 6), torch.float32, seed=6)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    folder = b.dirs["dit_high_noise", "main"]
    proc = subprocess.run([str(exe), str(folder), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    want = b.runners["dit_high_noise", "main"](inputs)
    assert list(got) == ["noise_pred"] and torch.equal(got["noise_pred"], want["noise_pred"])

    proc = subprocess.run([str(exe), str(tmp_path / "nowhere"), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "bad.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("run_graph: error:") and not (tmp_path / "bad.safetensors").exists()
