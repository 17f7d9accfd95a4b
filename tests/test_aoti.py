"""AOTInductor packages (wan_rt.export.aoti_export, runtime.backends.aoti) against the eager models.

Compiling is what costs here (~15-80 s of CPU per tiny graph), so the module fixture compiles
every graph once, in two worker processes, with `fast=True` (scalar kernels, -O0 wrapper; the
same ops) and the package cache on: graphs of one architecture compile once (the two A14B
experts; T2V's and I2V's umT5, VAE and DiT text graphs; TI2V's umT5 and text graph too), which
is itself under test. Graphs: all of tiny T2V; I2V's and TI2V's DiT step graphs (the TI2V one
has the per-token timestep, L its own dim). The Wan 2.2 VAE of TI2V (4 more graphs, ~5 min of
CPU) is left out to keep this file near 5 minutes on 2 cores: TI2V's pipeline test runs its
VAE eagerly.
"""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from wan_rt.config import get_spec, latent_shape
from wan_rt.metrics import max_abs_error, relative_error
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engine_component import DiTComponent, GraphComponent, StreamingVAEComponent, module_runner
from wan_rt.runtime.graphs import components_of, graph_module, graph_names, graph_spec, sample_inputs, shape_profile

aoti = get_backend("aoti")
pytestmark = pytest.mark.skipif(not aoti.is_available(), reason=f"AOTInductor unavailable: {aoti.unavailable_reason()}")

T2V, I2V, TI2V = "tiny-t2v-A14B", "tiny-i2v-A14B", "tiny-ti2v-5B"
T2V_GRAPHS = [(c, g) for c in components_of(get_spec(T2V)) for g in graph_names(c)]
# Compile order: the slow graphs first, graphs whose package another one already made last.
TASKS = ([(T2V, c, g) for c, g in T2V_GRAPHS if c.startswith("vae")]
         + [(T2V, "dit_high_noise", "main"), (I2V, "dit_high_noise", "main"), (TI2V, "dit", "main"),
            (T2V, "text_encoder", "main"), (T2V, "dit_high_noise", "text")]
         + [(T2V, "dit_low_noise", g) for g in ("text", "main")]
         + [(I2V, c, g) for c in components_of(get_spec(I2V)) for g in graph_names(c)
            if (c, g) != ("dit_high_noise", "main")]
         + [(TI2V, "text_encoder", "main"), (TI2V, "dit", "text")])
TOL = 1e-4
CPU = torch.device("cpu")


def _profile(spec):
    """Twice the default size, 9 frames: T in [1, 3], latent h, w in [2, 8] (the DiT: [4, 8],
    two tokens per axis at least); the pipeline (default size, 5 frames) and the size tests
    run at sizes other than the export's example (the max)."""
    return shape_profile(spec, height=2 * spec.height, width=2 * spec.width, frames=9)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> namespace(resolved, spec, profile, models, dirs, files, runners, stats)."""
    from wan_rt.export.aoti_export import compile_graphs
    from wan_rt.loader import resolve_checkpoint
    from wan_rt.models import load_dit, load_text_encoder, load_vae

    names = (T2V, I2V, TI2V)
    resolved = {n: resolve_checkpoint(n) for n in names}  # writes the tiny checkpoints, here, once
    profiles = {n: _profile(r.spec) for n, r in resolved.items()}
    start = time.perf_counter()
    results = compile_graphs(TASKS, tmp_path_factory.mktemp("aoti"), profiles, fast=True, workers=2)
    wall = time.perf_counter() - start
    out = {}
    for name, r in resolved.items():
        models = {"text_encoder": load_text_encoder(r.files, dtype=torch.float32)}
        for comp in r.spec.dit_components:
            models[comp] = load_dit(r.files, comp, dtype=torch.float32)
        models["vae_encoder"] = models["vae_decoder"] = load_vae(r.files)
        mine = {(c, g): v for (m, c, g), v in results.items() if m == name}
        runners = {key: aoti.load_graph(v["dir"], graph_spec(r.spec, *key), v["files"], compute_dtype=torch.float32,
                                        device=CPU) for key, v in mine.items()}
        out[name] = types.SimpleNamespace(resolved=r, spec=r.spec, profile=profiles[name], models=models,
                                          dirs={k: v["dir"] for k, v in mine.items()},
                                          files={k: v["files"] for k, v in mine.items()},
                                          stats={k: v["stats"] for k, v in mine.items()}, runners=runners)
    print(f"\nAOTI compile of {len(TASKS)} graphs, 2 workers: {wall:.0f} s wall")
    for (m, c, g), v in results.items():
        s = v["stats"]
        print(f"  {m:<14} {c + '/' + g:<22} export {s['export_s']:5.1f} s  compile {s['compile_s']:6.1f} s "
              f"(cpu {s['compile_cpu_s']:6.1f} s){'  cached' if s['cached'] else ''}")
    return out


def _eager(b, comp: str, g: str):
    return module_runner(graph_module(comp, g, b.models[comp]), graph_spec(b.spec, comp, g))


def _compare(b, comp: str, g: str, sizes: dict[str, int], seed: int = 0, runner=None) -> float:
    gspec = graph_spec(b.spec, comp, g)
    inputs = sample_inputs(gspec, sizes, torch.float32, seed=seed)
    if comp == "text_encoder":  # padded prompts: a mask that ends in zeros, as the tokenizer gives
        inputs["attention_mask"][:, sizes["S"] // 2:] = 0
    got, want = (runner or b.runners[comp, g])(inputs), _eager(b, comp, g)(inputs)
    assert list(got) == gspec.output_names
    errors = []
    for name in gspec.output_names:
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        if want[name].count_nonzero() == 0:  # a cache slot the first chunk leaves empty
            assert got[name].count_nonzero() == 0, name
        else:
            errors.append(relative_error(got[name], want[name]))
    assert want[gspec.output_names[0]].count_nonzero() > 0, "an all-zero main output proves nothing"
    return max(errors)


def _sizes(b, batch: int, t: int, h: int, w: int) -> dict[str, int]:
    _, ph, pw = b.spec.dit.patch_size
    return {"B": batch, "S": b.spec.dit.text_len, "T": t, "h": h, "w": w, "L": t * (h // ph) * (w // pw)}


# ------------------------------------------------------------------------------ every graph
@pytest.mark.parametrize("comp,g", T2V_GRAPHS, ids=[f"{c}-{g}" for c, g in T2V_GRAPHS])
def test_t2v_graph_matches_eager(built, comp, g):
    """At batch 1, T = 2 latent frames, 4x4 latents: none of them the export's example sizes."""
    b = built[T2V]
    assert b.files[comp, g] == ["model.pt2", "weights.safetensors"]
    err = _compare(b, comp, g, _sizes(b, 1, 2, 4, 4))
    assert err < TOL, f"{comp}/{g}: AOTI vs eager relative error {err:.2e}"


@pytest.mark.parametrize("spec_name", [I2V, TI2V])
def test_dit_step_graph_matches_eager(built, spec_name):
    b = built[spec_name]
    comp = b.spec.dit_components[0]
    err = _compare(b, comp, "main", _sizes(b, 1, 2, 4, 6))
    assert err < TOL, f"{spec_name} {comp}/main: relative error {err:.2e}"


# ------------------------------------------------------------------------------ one package, many
def test_experts_share_one_package_and_weights_decide(built):
    """The two A14B experts (same architecture) get the same compiled package from the cache;
    the weights file alone makes them differ: the low-noise package run with the high-noise
    weights gives the high-noise expert's numbers (nothing of the compile-time weights is left
    in the code, e.g. small biases inlined as literals)."""
    b = built[T2V]
    hi, lo = b.dirs["dit_high_noise", "main"], b.dirs["dit_low_noise", "main"]
    assert (hi / "model.pt2").read_bytes() == (lo / "model.pt2").read_bytes()
    assert (hi / "weights.safetensors").read_bytes() != (lo / "weights.safetensors").read_bytes()
    assert b.stats["dit_low_noise", "main"]["cached"] and not b.stats["dit_high_noise", "main"]["cached"]
    # I2V's umT5 and VAE are T2V's architecture at the same profile: compiled once.
    assert all(built[I2V].stats[c, g]["cached"] for c, g in T2V_GRAPHS if c in ("text_encoder", "vae_decoder"))
    gspec = graph_spec(b.spec, "dit_low_noise", "main")
    swapped = aoti.load_graph(lo, gspec, ["model.pt2", str(hi / "weights.safetensors")], compute_dtype=torch.float32,
                              device=CPU)
    inputs = sample_inputs(gspec, _sizes(b, 1, 2, 4, 4), torch.float32, seed=3)
    got = swapped(inputs)["noise_pred"]
    want_hi = _eager(b, "dit_high_noise", "main")(inputs)["noise_pred"]
    want_lo = _eager(b, "dit_low_noise", "main")(inputs)["noise_pred"]
    assert relative_error(want_lo, want_hi) > 1e-2, "the experts must differ for this to mean anything"
    assert relative_error(got, want_hi) < TOL


def test_package_holds_no_weights(built):
    """Every constant the package names is in the weights file, and the package is code only: its
    size does not grow with the weights (the 36-channel I2V DiT has more patch weights)."""
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
    assert fqns == stored
    assert "dit.patch_embedding.weight" in fqns


# ------------------------------------------------------------------------------ dynamic shapes
@pytest.mark.parametrize("spec_name,comp", [(T2V, "dit_high_noise"), (TI2V, "dit")])
def test_dit_graph_serves_two_sizes(built, spec_name, comp):
    """Exported at B=2, T=3, 8x8 latents; run at two other grids in the profile, batch 1 and 2
    (TI2V's per-token timestep: L is its own dim, the hardest dynamic case)."""
    b = built[spec_name]
    for batch, t, h, w in ((1, 1, 4, 8), (2, 3, 6, 4)):
        err = _compare(b, comp, "main", _sizes(b, batch, t, h, w), seed=1)
        assert err < TOL, f"{comp} at B={batch} T={t} {h}x{w}: relative error {err:.2e}"


def test_vae_step_graphs_serve_two_sizes(built):
    b = built[T2V]
    for comp in ("vae_decoder", "vae_encoder"):
        for batch, h, w in ((1, 2, 7), (2, 5, 3)):
            err = _compare(b, comp, "step", _sizes(b, batch, 1, h, w), seed=2)
            assert err < TOL, f"{comp}/step at B={batch} {h}x{w}: relative error {err:.2e}"


def test_runner_rejects_shapes_outside_the_package(built):
    """AOTInductor does not check its inputs; the runner does, before the .so reads them."""
    b = built[T2V]
    gspec = graph_spec(b.spec, "dit_high_noise", "main")
    runner = b.runners["dit_high_noise", "main"]
    with pytest.raises(ValueError, match=r"h = 2 is outside .*\[4, 8\]"):  # one token per axis
        runner(sample_inputs(gspec, _sizes(b, 1, 1, 2, 4), torch.float32))
    with pytest.raises(ValueError, match=r"B = 3 is outside"):
        runner(sample_inputs(gspec, _sizes(b, 3, 1, 4, 4), torch.float32))
    vae = graph_spec(b.spec, "vae_decoder", "step")
    inputs = sample_inputs(vae, _sizes(b, 1, 1, 2, 2), torch.float32)
    inputs["cache_in_3"] = inputs["cache_in_3"][..., :1]  # width no longer the latent's
    with pytest.raises(ValueError, match="cache_in_3"):
        b.runners["vae_decoder", "step"](inputs)
    with pytest.raises(TypeError, match="float64"):
        runner({k: v.double() for k, v in sample_inputs(gspec, _sizes(b, 1, 1, 4, 4), torch.float32).items()})


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
def _vae_components(b) -> dict[str, StreamingVAEComponent]:
    out = {}
    for comp in ("vae_encoder", "vae_decoder"):
        first, step = graph_spec(b.spec, comp, "first"), graph_spec(b.spec, comp, "step")
        out[comp] = StreamingVAEComponent(comp, b.spec, b.runners[comp, "first"], b.runners[comp, "step"],
                                          first, step, CPU)
    return out


def test_streaming_vae_through_aoti_equals_eager(built):
    b = built[T2V]
    vae = b.models["vae_decoder"]
    comps = _vae_components(b)
    gen = torch.Generator().manual_seed(5)
    video = torch.rand(1, 3, 9, b.spec.height, b.spec.width, generator=gen) * 2 - 1
    with torch.inference_mode():
        want_z = vae.encode(video)
    got_z = comps["vae_encoder"](video=video)["latents"]
    assert got_z.shape == want_z.shape and got_z.shape[2] == 3
    assert relative_error(got_z, want_z) < TOL
    with torch.inference_mode():
        want_v = vae.decode(want_z)
    got_v = comps["vae_decoder"](latents=want_z)["video"]
    assert got_v.shape == want_v.shape == video.shape
    assert max_abs_error(got_v, want_v) < TOL


# ------------------------------------------------------------------------------ full pipeline
def _image(seed: int = 0, size=(40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("spec_name", [T2V, I2V, TI2V])
def test_pipeline_on_aoti_matches_eager(built, spec_name):
    """Every component on AOTI packages (TI2V: its VAE eager, see the module docstring)."""
    from wan_rt.loader import build_eager_components
    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.pipeline import WanPipeline

    b = built[spec_name]
    spec, resolved = b.spec, b.resolved
    eager = build_eager_components(resolved, CPU, torch.float32)
    components = {"text_encoder": GraphComponent("text_encoder", b.runners["text_encoder", "main"],
                                                 graph_spec(spec, "text_encoder"), torch.float32, CPU)}
    for comp in spec.dit_components:
        components[comp] = DiTComponent(comp, b.runners[comp, "text"], b.runners[comp, "main"],
                                        graph_spec(spec, comp, "text"), graph_spec(spec, comp, "main"),
                                        torch.float32, CPU)
    vae_on_aoti = ("vae_decoder", "first") in b.runners
    components.update(_vae_components(b) if vae_on_aoti else {c: eager[c] for c in ("vae_encoder", "vae_decoder")})
    tokenizer = load_tokenizer(resolved.files.tokenizer)
    ours = WanPipeline(spec, components, tokenizer, resolved.defaults, "cpu")
    reference = WanPipeline(spec, eager, tokenizer, resolved.defaults, "cpu")
    frames = 5
    latents = torch.randn((1, *latent_shape(spec, spec.height, spec.width, frames)),
                          generator=torch.Generator().manual_seed(7))
    kwargs = dict(prompt="a fox running in the snow", negative_prompt="blurry dark", height=spec.height,
                  width=spec.width, num_frames=frames, num_inference_steps=4, guidance_scale=4.0,
                  guidance_scale_2=3.0, output_type="np")
    if spec.task != "t2v":
        kwargs["image"] = _image()
    results = []
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(latents=latents.clone(), **kwargs))
    got, want = results
    assert got.steps_per_stage == want.steps_per_stage
    assert len(want.steps_per_stage) == len(spec.stages), "every expert ran"
    assert float(want.frames.std()) > 1e-3, "degenerate video would make the comparison meaningless"
    err = max_abs_error(torch.from_numpy(got.frames), torch.from_numpy(want.frames))
    assert err < TOL, f"{spec_name}: max |AOTI - eager| = {err:.2e}"
