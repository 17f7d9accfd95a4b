"""Few-step distilled sampling: an explicit timestep list, the expert switch by step index, and
guidance 1 as one pass. The step math is checked against numpy written from LightX2V's published
formulation (`WanStepDistillScheduler`: sigmas from the 1000-step training grid, shifted; Euler
through x0), not against wan_rt's own code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_rt.config import get_spec
from wan_rt.scheduler import SamplingDefaults, scheduler_from_timesteps, timestep_list_sigmas

LIST = [1000, 750, 500, 250]


def reference_sigmas(timesteps, shift):
    """LightX2V: sigma_k = 1 - k/1000 (k = 0..999), shifted; timestep t reads entry 1000 - t."""
    sigma = np.array(timesteps, dtype=np.float64) / 1000.0
    return shift * sigma / (1 + (shift - 1) * sigma)


@pytest.mark.parametrize("shift", [5.0, 1.0, 12.0])
def test_timestep_list_grid_matches_the_published_formula(shift):
    sigmas, timesteps = timestep_list_sigmas(LIST, shift)
    want = reference_sigmas(LIST, shift)
    assert sigmas.dtype == torch.float32 and timesteps.dtype == torch.float32
    np.testing.assert_allclose(sigmas[:-1].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(timesteps.numpy(), want * 1000, rtol=1e-6)
    assert sigmas[-1] == 0


def test_shift_5_gives_the_lightx2v_timesteps():
    """The values a 4-step Wan 2.2 distill sees at shift 5 (LightX2V configs/distill/wan22)."""
    _, timesteps = timestep_list_sigmas(LIST, 5.0)
    np.testing.assert_allclose(timesteps.numpy(), [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)


def test_euler_steps_match_numpy_reference():
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i, the last step landing on x0 = x - sigma*v."""
    gen = np.random.default_rng(0)
    x = gen.standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
    velocities = [gen.standard_normal(x.shape).astype(np.float32) for _ in LIST]
    sigma = np.append(reference_sigmas(LIST, 5.0), 0.0)
    want = x.astype(np.float64)
    for i, v in enumerate(velocities):
        want = want + (sigma[i + 1] - sigma[i]) * v
    sched = scheduler_from_timesteps(LIST, 5.0)
    got = torch.from_numpy(x)
    for i, v in enumerate(velocities):
        got = sched.step(torch.from_numpy(v), i, got)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [([1000, 750, 750], "decrease"), ([1001, 500], "1..1000"),
                                       ([750.5, 250], "integers"), ([], "at least one")])
def test_bad_timestep_lists_are_one_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        timestep_list_sigmas(bad, 5.0)


# ---------------------------------------------------------------------------------- the loop
class _Expert:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, *, latents, timestep, context):
        self.calls.append((self.name, float(timestep.flatten()[0]), latents.shape[0]))
        return {"noise_pred": 0.5 * latents + 0.1}


class _Text:
    name = "text_encoder"

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, *, input_ids, attention_mask):
        self.calls.append(("text_encoder", input_ids.shape[0]))
        return {"context": input_ids.float()[..., None].expand(-1, -1, 4)}


def _pipeline(spec_name, calls):
    from wan_rt.loader import WanPipeline
    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.tiny import ensure_tiny_checkpoint

    spec = get_spec(spec_name)
    experts = {name: _Expert(name, calls) for name in spec.dit_components}
    defaults = SamplingDefaults(solver="unipc", grid="official", shift=12.0, negative_prompt="neg")
    pipe = WanPipeline(spec, {"text_encoder": _Text(calls), **experts},
                       load_tokenizer(ensure_tiny_checkpoint(spec_name) / "tokenizer"), defaults)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_four_step_list_switches_experts_by_step_index_with_one_pass_per_step():
    """LightX2V's T2V 4-step distill: [1000, 750, 500, 250], shift 5, boundary_step_index 2,
    CFG off. Timestep 833 is below the 875 boundary, so only the step index puts it on the
    high-noise expert; guidance 1 means no negative prompt and batch-1 calls."""
    calls: list = []
    pipe = _pipeline("tiny-t2v-A14B", calls)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = pipe("a cat", latents=latents.clone(), timesteps=LIST, switch_step=2, shift=5.0, guidance_scale=1.0,
               guidance_scale_2=1.0, output_type="latent", max_sequence_length=8)
    assert calls[0] == ("text_encoder", 1) and len(calls) == 5, calls  # the prompt only
    np.testing.assert_allclose([c[1] for c in calls[1:]], [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)
    assert [c[0] for c in calls[1:]] == ["dit_high_noise"] * 2 + ["dit_low_noise"] * 2
    assert all(c[2] == 1 for c in calls[1:])
    assert out.steps_per_stage == {"dit_high_noise": 2, "dit_low_noise": 2} and pipe.num_timesteps == 4
    sigma = np.append(reference_sigmas(LIST, 5.0), 0.0)
    want = latents.double().numpy()
    for i in range(4):
        want = want + (sigma[i + 1] - sigma[i]) * (0.5 * want + 0.1)
    np.testing.assert_allclose(out.frames.numpy(), want, rtol=1e-5, atol=1e-5)


def test_without_switch_step_the_boundary_timestep_decides():
    calls: list = []
    _pipeline("tiny-t2v-A14B", calls)("a cat", timesteps=LIST, shift=5.0, guidance_scale=1.0, guidance_scale_2=1.0,
                                      output_type="latent", max_sequence_length=8)
    assert [c[0] for c in calls[1:]] == ["dit_high_noise"] * 2 + ["dit_low_noise"] * 2  # 937.5 >= 875 > 833


@pytest.mark.parametrize("kwargs,match", [
    (dict(timesteps=LIST, solver="euler"), "leave solver out"),
    (dict(timesteps=LIST, num_inference_steps=3), "4 timesteps"),
    (dict(timesteps=LIST, switch_step=5), "0..4"),
])
def test_bad_few_step_requests_fail_before_any_work(kwargs, match):
    calls: list = []
    with pytest.raises(ValueError, match=match):
        _pipeline("tiny-t2v-A14B", calls)("a cat", output_type="latent", **kwargs)
    assert calls == []


def test_switch_step_needs_two_experts():
    with pytest.raises(ValueError, match="one DiT"):
        _pipeline("tiny-ti2v-5B", [])("a cat", timesteps=LIST, switch_step=2, output_type="latent")


def test_cli_runs_the_four_step_list(tmp_path, capsys):
    import imageio.v3 as iio

    from wan_rt.cli import main

    out = tmp_path / "fast.mp4"
    assert main(["run", "--model", "tiny-t2v-A14B", "--timesteps", "1000,750,500,250", "--switch-step", "2",
                 "--shift", "5", "--guidance", "1", "--guidance-2", "1", "--output", str(out)]) == 0
    assert iio.imread(out, plugin="pyav").shape[0] == 5
    err = capsys.readouterr().err
    assert "dit_high_noise (2 steps)" in err and "dit_low_noise (2 steps)" in err
    assert main(["run", "--model", "tiny-t2v-A14B", "--timesteps", "1000,x", "--output", str(tmp_path / "b.mp4")]) == 2
    assert "--timesteps" in capsys.readouterr().err and not (tmp_path / "b.mp4").exists()
