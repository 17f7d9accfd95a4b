"""Checks every engine backend's tests share (tests/test_onnx_export.py, tests/test_aoti.py),
reached through the `engine_checks` fixture (tests/conftest.py): this file is not on sys.path.

`b` is a backend test's namespace of one tiny preset: resolved, spec, models (the eager modules
by component), runners ({(component, graph): GraphRunner}).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from wan_rt.config import latent_shape
from wan_rt.metrics import max_abs_error, relative_error
from wan_rt.runtime.engine_component import DiTComponent, GraphComponent, StreamingVAEComponent, module_runner
from wan_rt.runtime.graphs import graph_module, graph_spec, sample_inputs

TOL = 1e-4
CPU = torch.device("cpu")


def load_models(resolved) -> dict[str, torch.nn.Module]:
    """The eager fp32 modules of a checkpoint, by component (both VAE components share one)."""
    from wan_rt.models import load_dit, load_text_encoder, load_vae

    models = {"text_encoder": load_text_encoder(resolved.files, dtype=torch.float32)}
    for name in resolved.spec.dit_components:
        models[name] = load_dit(resolved.files, name, dtype=torch.float32)
    models["vae_encoder"] = models["vae_decoder"] = load_vae(resolved.files)
    return models


def eager_runner(b, comp: str, g: str):
    return module_runner(graph_module(comp, g, b.models[comp]), graph_spec(b.spec, comp, g))


def compare_graph(b, comp: str, g: str, sizes: dict[str, int], seed: int = 0, runner=None) -> float:
    """Worst relative error of the engine graph (`runner`, default b.runners[comp, g]) against
    eager on random inputs of `sizes`; asserts names, shapes and a non-trivial main output."""
    gspec = graph_spec(b.spec, comp, g)
    inputs = sample_inputs(gspec, sizes, torch.float32, seed=seed)
    if comp == "text_encoder":  # padded prompts: a mask that ends in zeros, as the tokenizer gives
        inputs["attention_mask"][:, sizes["S"] // 2:] = 0
    got, want = (runner or b.runners[comp, g])(inputs), eager_runner(b, comp, g)(inputs)
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


def grid_sizes(b, batch: int, t: int, h: int, w: int) -> dict[str, int]:
    _, ph, pw = b.spec.dit.patch_size
    return {"B": batch, "S": b.spec.dit.text_len, "T": t, "h": h, "w": w, "L": t * (h // ph) * (w // pw)}


def vae_components(b) -> dict[str, StreamingVAEComponent]:
    out = {}
    for comp in ("vae_encoder", "vae_decoder"):
        first, step = graph_spec(b.spec, comp, "first"), graph_spec(b.spec, comp, "step")
        out[comp] = StreamingVAEComponent(comp, b.spec, b.runners[comp, "first"], b.runners[comp, "step"],
                                          first, step, CPU)
    return out


def check_streaming_vae(b) -> None:
    """Encode then decode a 9-frame video through the streaming engine VAE, against eager."""
    vae = b.models["vae_decoder"]
    comps = vae_components(b)
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


def random_image(seed: int = 0, size=(40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def engine_components(b) -> dict:
    """The text encoder and DiTs on b's engine runners (the VAE is the caller's choice)."""
    spec = b.spec
    components = {"text_encoder": GraphComponent("text_encoder", b.runners["text_encoder", "main"],
                                                 graph_spec(spec, "text_encoder"), torch.float32, CPU)}
    for comp in spec.dit_components:
        graphs = [g for c, g in b.runners if c == comp]
        components[comp] = DiTComponent(comp, {g: b.runners[comp, g] for g in graphs},
                                        {g: graph_spec(spec, comp, g) for g in graphs}, torch.float32, CPU)
    return components


def tokenizer(b):
    from wan_rt.models.text_encoder import load_tokenizer

    return load_tokenizer(b.resolved.files.tokenizer)


def pipeline_call(b, steps: int = 4):
    """-> a function giving the pipeline keywords of one generation (CFG, fixed latents, image
    for i2v / ti2v), fresh latents each time."""
    spec, frames = b.spec, 5
    latents = torch.randn((1, *latent_shape(spec, spec.height, spec.width, frames)),
                          generator=torch.Generator().manual_seed(7))
    kwargs = dict(prompt="a fox running in the snow", negative_prompt="a dark misty night in rain",
                  height=spec.height, width=spec.width, num_frames=frames, num_inference_steps=steps, guidance_scale=4.0,
                  guidance_scale_2=3.0, output_type="np")
    if spec.task != "t2v":
        kwargs["image"] = random_image()
    return lambda: {**kwargs, "latents": latents.clone()}


def check_pipeline(b, components: dict, label: str) -> None:
    """4 steps with CFG on `components` against the eager pipeline, from the same latents."""
    from wan_rt.eager import build_eager_components
    from wan_rt.loader import WanPipeline
    from wan_rt.models.text_encoder import tokenize

    spec, resolved, tok = b.spec, b.resolved, tokenizer(b)
    ours = WanPipeline(spec, components, tok, resolved.defaults, "cpu")
    eager = WanPipeline(spec, build_eager_components(resolved, CPU, torch.float32), tok, resolved.defaults, "cpu")
    call = pipeline_call(b)
    # One word count, different words: only a working tokenizer (the tiny preset's, checked against
    # sentencepiece in test_text_encoder) gives cond and uncond different ids.
    ids, _ = tokenize(tok, [call()["prompt"], call()["negative_prompt"]], spec.dit.text_len)
    assert not torch.equal(ids[0], ids[1]), f"prompt and negative prompt share ids {ids[0].tolist()}"
    results = []
    for pipe in (ours, eager):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(**call()))
    got, want = results
    assert got.steps_per_stage == want.steps_per_stage
    assert len(want.steps_per_stage) == len(spec.stages), "every expert ran"
    assert float(want.frames.std()) > 1e-3, "degenerate video would make the comparison meaningless"
    err = max_abs_error(torch.from_numpy(got.frames), torch.from_numpy(want.frames))
    assert err < TOL, f"{spec.name}: max |{label} - eager| = {err:.2e}"


def check_cached_runs_match(on_engines, eager, call: dict) -> None:
    """Two pipelines (DiTs on step-graph engines; eager) make the same video uncached and under
    First Block Cache, with the same skip decisions, and the cache skips some step."""
    assert max_abs_error(torch.from_numpy(on_engines(**call).frames), torch.from_numpy(eager(**call).frames)) < TOL
    for pipe in (on_engines, eager):
        pipe.enable_step_cache("fbcache", 0.2)
    got, want = on_engines(**call), eager(**call)
    assert max_abs_error(torch.from_numpy(got.frames), torch.from_numpy(want.frames)) < TOL
    assert {k: v for k, v in got.timings.items() if ".steps_" in k} == \
           {k: v for k, v in want.timings.items() if ".steps_" in k}
    assert got.timings["dit_high_noise.steps_reused"] > 0
