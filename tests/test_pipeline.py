"""End-to-end: wan_rt's pipeline reproduces diffusers' video on the same tiny weights, and the
denoise loop drives the experts through the component contract as the spec says."""

import numpy as np
import pytest
import torch
from PIL import Image

from wan_rt.config import get_spec, latent_shape
from wan_rt.metrics import max_abs_error
from wan_rt.loader import WanPipeline
from wan_rt.pipeline import _group_by_stage
from wan_rt.scheduler import SamplingDefaults


def _image(seed: int = 0, size=(52, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


CASES = {
    # name: (spec, pipeline class in diffusers, image?, expected steps per stage with 4 steps)
    "t2v": ("tiny-t2v-A14B", "WanPipeline", False, {"dit_high_noise": 3, "dit_low_noise": 1}),
    "i2v": ("tiny-i2v-A14B", "WanImageToVideoPipeline", True, {"dit_high_noise": 2, "dit_low_noise": 2}),
    "ti2v-t2v": ("tiny-ti2v-5B", "WanPipeline", False, {"dit": 4}),
    "ti2v-i2v": ("tiny-ti2v-5B", "WanImageToVideoPipeline", True, {"dit": 4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(case, diffusers_checkpoint, prompt_ids_check):
    import diffusers

    spec_name, ref_class, with_image, expected_steps = CASES[case]
    folder = diffusers_checkpoint(spec_name)
    spec = get_spec(spec_name)
    ref_base = diffusers.WanPipeline if spec.task != "i2v" else diffusers.WanImageToVideoPipeline
    ref = ref_base.from_pretrained(folder)
    if ref_class == "WanImageToVideoPipeline" and spec.task == "ti2v":
        ref = diffusers.WanImageToVideoPipeline(**ref.components, image_encoder=None, image_processor=None,
                                                boundary_ratio=None, expand_timesteps=True)
    ref.set_progress_bar_config(disable=True)
    ours = WanPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)

    frames = 5
    shape = (1, *latent_shape(spec, spec.height, spec.width, frames))
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    # Prompt and negative prompt of one word count: only a working tokenizer tells them apart.
    kwargs = dict(prompt="a fox running in the snow", negative_prompt="a dark misty night in rain", height=spec.height,
                  width=spec.width, num_frames=frames, num_inference_steps=4, guidance_scale=4.0,
                  max_sequence_length=16, output_type="np")
    # Both sides share the checkpoint's tokenizer: hold it to its sentencepiece source.
    prompt_ids_check(ours.tokenizer, folder.parent / "_tok" / "spiece.model",
                     [kwargs["prompt"], kwargs["negative_prompt"]], 16)
    if len(spec.stages) > 1:
        kwargs["guidance_scale_2"] = 3.0
    if with_image:
        kwargs["image"] = _image()
    with torch.no_grad():
        expected = ref(latents=latents.clone(), **kwargs).frames
    result = ours(latents=latents.clone(), **kwargs)
    assert result.frames.shape == expected.shape == (1, frames, spec.height, spec.width, 3)
    assert result.frames.dtype == np.float32
    assert result.steps_per_stage == expected_steps
    err = max_abs_error(torch.from_numpy(result.frames), torch.from_numpy(expected))
    assert err < 1e-4, f"{case}: max |ours - diffusers| = {err:.2e}"
    assert float(expected.std()) > 1e-3, "degenerate video would make the comparison meaningless"


def test_group_by_stage_switches_once_at_the_boundary():
    spec = get_spec("t2v-A14B")
    official = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941,
                936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631,
                571, 492, 386, 235]
    groups = _group_by_stage(spec, torch.tensor(official))
    assert [(s.component, len(i)) for s, i in groups] == [("dit_high_noise", 26), ("dit_low_noise", 14)]


class _RecordingDiT:
    """A fake expert: v = scale * latents + mean(context) per sample. Records every call."""

    def __init__(self, name: str, scale: float, calls: list):
        self.name, self.scale, self.calls = name, scale, calls

    def __call__(self, *, latents, timestep, context):
        self.calls.append((self.name, float(timestep.flatten()[0]), float(context[-1].mean())))
        return {"noise_pred": self.scale * latents + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)}


class _FakeText:
    name = "text_encoder"

    def __call__(self, *, input_ids, attention_mask):
        return {"context": (input_ids.float() * attention_mask)[..., None].expand(-1, -1, 4)}


class _FakeVAE:
    name = "vae_decoder"

    def __call__(self, *, latents):
        return {"video": latents[:, :3].clamp(-1, 1)}


def _fake_pipeline(calls):
    from transformers import AutoTokenizer  # noqa: F401  (tokenizer comes from the tiny preset)

    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.tiny import ensure_tiny_checkpoint

    spec = get_spec("tiny-t2v-A14B")
    tokenizer = load_tokenizer(ensure_tiny_checkpoint(spec.name) / "tokenizer")
    components = {"text_encoder": _FakeText(), "vae_decoder": _FakeVAE(),
                  "dit_high_noise": _RecordingDiT("dit_high_noise", 0.1, calls),
                  "dit_low_noise": _RecordingDiT("dit_low_noise", 0.2, calls)}
    defaults = SamplingDefaults(solver="unipc", grid="official", shift=12.0, negative_prompt="neg")
    return WanPipeline(spec, components, tokenizer, defaults)


def test_loop_uses_each_expert_with_its_own_guidance():
    calls: list = []
    pipe = _fake_pipeline(calls)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=8, output_type="latent", max_sequence_length=8,
               generator=torch.Generator().manual_seed(0))
    names = [c[0] for c in calls]
    # CFG as a batch of two: one call per step, high-noise expert first, one switch.
    assert len(calls) == 8 and names == sorted(names, key=lambda n: n != "dit_high_noise")
    assert out.steps_per_stage["dit_high_noise"] + out.steps_per_stage["dit_low_noise"] == 8
    assert all(t >= 875 for n, t, _ in calls if n == "dit_high_noise")
    assert all(t < 875 for n, t, _ in calls if n == "dit_low_noise")
    # Sequential CFG: two calls per step that differ by context only.
    calls.clear()
    pipe.cfg_batch = False
    pipe("a cat", num_inference_steps=8, output_type="latent", max_sequence_length=8,
         generator=torch.Generator().manual_seed(0))
    assert len(calls) == 16 and calls[0][1] == calls[1][1] and calls[0][2] != calls[1][2]


def test_guidance_mapping_and_no_cfg_at_scale_one():
    pipe = _fake_pipeline([])
    assert pipe._guide_scales(None, None) == {"dit_high_noise": 4.0, "dit_low_noise": 3.0}
    assert pipe._guide_scales(5.0, None) == {"dit_high_noise": 5.0, "dit_low_noise": 5.0}
    assert pipe._guide_scales(5.0, 2.0) == {"dit_high_noise": 5.0, "dit_low_noise": 2.0}
    calls: list = []
    pipe = _fake_pipeline(calls)
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", num_inference_steps=3, guidance_scale=1.0, guidance_scale_2=1.0, output_type="latent",
         max_sequence_length=8)
    assert len(calls) == 3  # no unconditional pass when guidance is off


def test_batched_cfg_equals_sequential_cfg(diffusers_checkpoint, prompt_ids_check):
    folder = diffusers_checkpoint("tiny-t2v-A14B")
    pipe = WanPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt="a fox", negative_prompt="dark blur", num_frames=5, num_inference_steps=3,
                  output_type="latent")
    # cond and uncond must differ for the batch order to matter: different ids at one word count.
    prompt_ids_check(pipe.tokenizer, folder.parent / "_tok" / "spiece.model", ["a fox", "dark blur"], 16)
    batched = pipe(latents=latents.clone(), **kwargs).frames
    pipe.cfg_batch = False
    sequential = pipe(latents=latents.clone(), **kwargs).frames
    assert max_abs_error(batched, sequential) < 1e-5


@pytest.mark.parametrize("bad,match", [
    (dict(height=40), "multiples of 16"),
    (dict(num_frames=6), "4k\\+1"),
    (dict(num_inference_steps=0), ">= 1"),
    (dict(output_type="gif"), "output_type"),
])
def test_bad_requests_raise_one_clear_error(bad, match):
    pipe = _fake_pipeline([])
    with pytest.raises(ValueError, match=match):
        pipe("a cat", **bad)


def test_step_callback_sees_every_step_and_can_replace_latents():
    calls: list = []
    pipe = _fake_pipeline(calls)
    pipe.set_progress_bar_config(disable=True)
    seen: list = []

    def on_step(p, i, t, tensors):
        assert p is pipe and set(tensors) == {"latents"}
        seen.append((i, float(t), p.num_timesteps))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 5 else None

    out = pipe("a cat", num_inference_steps=6, output_type="latent", max_sequence_length=8,
               generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step)
    assert [s[0] for s in seen] == list(range(6)) and all(s[2] == 6 for s in seen)
    assert seen[0][1] > seen[-1][1]  # timesteps decrease
    assert torch.count_nonzero(out.frames) == 0  # the last step's replacement is what came out
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a cat", callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["noise"])


def test_interrupt_stops_at_the_next_step_and_the_pipeline_runs_again():
    from wan_rt.pipeline import GenerationInterrupted

    calls: list = []
    pipe = _fake_pipeline(calls)
    pipe.set_progress_bar_config(disable=True)

    def stop_after_two(p, i, t, tensors):
        if i == 1:
            p.interrupt = True

    with pytest.raises(GenerationInterrupted, match="after step 2 of 8"):
        pipe("a cat", num_inference_steps=8, output_type="latent", max_sequence_length=8,
             callback_on_step_end=stop_after_two)
    assert len(calls) == 2  # no DiT call after the interrupt
    calls.clear()
    out = pipe("a cat", num_inference_steps=8, output_type="latent", max_sequence_length=8)
    assert len(calls) == 8 and out.frames.shape[0] == 1  # interrupt is cleared by the next call


def test_prompts_are_padded_to_the_text_length_the_components_serve():
    """Engines built with `wan-rt build --text-len N` serve only N tokens: the pipeline pads to N."""
    seen = []

    class _FixedText(_FakeText):
        text_len = 6

        def __call__(self, *, input_ids, attention_mask):
            seen.append(input_ids.shape[1])
            return super().__call__(input_ids=input_ids, attention_mask=attention_mask)

    pipe = _fake_pipeline([])
    assert pipe.text_len == pipe.spec.dit.text_len
    pipe.components["text_encoder"] = _FixedText()
    pipe = type(pipe)(pipe.spec, pipe.components, pipe.tokenizer, pipe.defaults)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_len == 6
    pipe("a cat", num_inference_steps=2, output_type="latent")
    pipe("a cat", num_inference_steps=2, output_type="latent", max_sequence_length=9)
    assert seen == [6, 6, 9, 9]  # prompt + negative prompt per call; a call's own length wins
