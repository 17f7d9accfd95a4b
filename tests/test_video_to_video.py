"""Video in: video-to-video and extension reproduce diffusers on the same tiny weights
(WanVideoToVideoPipeline from the T2V-A14B low-noise expert, WanImageToVideoPipeline from the
source's last frame), the source video is decoded to its own frames, and bad sources are one line."""

import numpy as np
import pytest
import torch

from wan_rt.cli import main
from wan_rt.config import get_spec, latent_shape
from wan_rt.loader import WanPipeline
from wan_rt.metrics import max_abs_error
from wan_rt.pipeline import ExtensionUnsupported
from wan_rt.video import VideoInputError, export_to_video, load_video

PROMPTS = dict(prompt="a fox running in the snow", negative_prompt="a dark misty night in rain")
SOURCE_SIZE = (40, 52)  # H, W: not the tiny models' size, so both sides resize


def _source_frames(count: int = 5) -> np.ndarray:
    """Smooth colour fields moving frame to frame (H.264 keeps them nearly intact), all distinct."""
    h, w = SOURCE_SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [np.stack([128 + 100 * np.sin((x + 3 * i) / 7), 128 + 100 * np.cos((y - 2 * i) / 5),
                        128 + 90 * np.sin((x + y + 5 * i) / 11)], axis=-1) for i in range(count)]
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(mp4 path, the frames written into it)."""
    frames = _source_frames()
    path = tmp_path_factory.mktemp("source") / "source.mp4"
    export_to_video(frames, path, fps=16)
    return path, frames


def test_source_video_decodes_to_its_frames(source):
    """The input both sides of the oracle tests share is the written clip itself: decoded (path or
    bytes) it is those frames up to H.264's loss, and diffusers' own loader reads the same pixels."""
    from diffusers.utils import load_video as diffusers_load_video

    path, written = source
    frames = load_video(path)
    assert frames.shape == written.shape and frames.dtype == np.uint8
    assert np.array_equal(load_video(path.read_bytes()), frames)
    assert np.array_equal(np.stack([np.asarray(f) for f in diffusers_load_video(str(path))]), frames)
    err = np.abs(frames.astype(np.int16) - written.astype(np.int16))
    # yuv420 halves the colour resolution: a few levels on average, frames differ by ~25.
    assert err.mean() < 6 and err.max() < 40, f"H.264 round trip off by {err.mean():.2f} on average"
    # Frame i is frame i (order kept, none dropped or repeated): nearest written frame by error.
    nearest = [int(np.argmin([np.abs(f.astype(np.int16) - w).mean() for w in written])) for f in frames]
    assert nearest == list(range(len(written)))


@pytest.mark.parametrize("video,kwargs,match", [
    (b"not a video at all", {}, "cannot decode the uploaded video"),
    (b"", {}, "empty"),
    ("SOURCE", dict(max_frames=4), "more than 4 frames"),
    ("SOURCE", dict(max_bytes=100), "the limit is 100"),
    ("SOURCE", dict(max_pixels=1000), "pixels per frame"),
    (np.zeros((2, 8, 8)), {}, r"\[F, H, W, 3\]"),
])
def test_bad_source_video_is_one_clear_error(source, video, kwargs, match):
    if isinstance(video, str):
        video = source[0]
    with pytest.raises(VideoInputError, match=match) as info:
        load_video(video, **kwargs)
    assert "\n" not in str(info.value)


def _t2v_pipes(folder):
    """wan_rt on the tiny T2V-A14B checkpoint, and diffusers' WanVideoToVideoPipeline on its
    low-noise expert and VAE (one transformer: the only A14B expert it can run)."""
    import diffusers

    t2v = diffusers.WanPipeline.from_pretrained(folder)
    # shift 3: 4 of 6 steps fall below the 0.875 boundary (timesteps 857, 750, 600, 376), so the
    # low-noise expert runs UniPC's second order and corrector from a mid-grid start.
    scheduler = diffusers.UniPCMultistepScheduler.from_config(t2v.scheduler.config, flow_shift=3.0)
    ref = diffusers.WanVideoToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder,
                                            transformer=t2v.transformer_2, vae=t2v.vae, scheduler=scheduler)
    ours = WanPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


def test_video_to_video_matches_diffusers_below_the_boundary(source, diffusers_checkpoint, prompt_ids_check):
    from diffusers.utils import load_video as diffusers_load_video

    path, _ = source
    folder = diffusers_checkpoint("tiny-t2v-A14B")
    spec = get_spec("tiny-t2v-A14B")
    ours, ref = _t2v_pipes(folder)
    prompt_ids_check(ours.tokenizer, folder.parent / "_tok" / "spiece.model", list(PROMPTS.values()), 16)
    kwargs = dict(**PROMPTS, height=spec.height, width=spec.width, num_inference_steps=6, guidance_scale=4.0,
                  strength=0.67, max_sequence_length=16, output_type="np")
    with torch.no_grad():
        expected = ref(video=diffusers_load_video(str(path)), generator=torch.Generator().manual_seed(7),
                       **kwargs).frames
    result = ours(video=path, shift=3.0, generator=torch.Generator().manual_seed(7), **kwargs)
    assert result.frames.shape == expected.shape == (1, 5, spec.height, spec.width, 3)
    assert result.steps_per_stage == {"dit_low_noise": 4} and ours.num_timesteps == 4
    err = max_abs_error(torch.from_numpy(result.frames), torch.from_numpy(expected))
    assert err < 1e-4, f"max |ours - diffusers| = {err:.2e}"
    assert float(expected.std()) > 1e-3, "degenerate video would make the comparison meaningless"
    # The source is in the result: another source (the clip reversed) gives other frames.
    reversed_source = ours(video=load_video(path)[::-1].copy(), shift=3.0,
                           generator=torch.Generator().manual_seed(7), **kwargs).frames
    assert max_abs_error(torch.from_numpy(reversed_source), torch.from_numpy(expected)) > 1e-2


def test_strength_one_is_text_to_video_from_the_same_noise(source):
    pipe = WanPipeline.from_pretrained("tiny-t2v-A14B", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", num_frames=5, num_inference_steps=3, output_type="latent")
    t2v = pipe(generator=torch.Generator().manual_seed(3), **kwargs).frames
    v2v = pipe(video=source[0], strength=1.0, generator=torch.Generator().manual_seed(3), **kwargs).frames
    assert torch.equal(v2v, t2v) and pipe.num_timesteps == 3


def test_extension_new_frames_match_diffusers_image_to_video(source, diffusers_checkpoint):
    """extend(): the source (resized as diffusers' VideoProcessor resizes it), then the frames of
    diffusers' WanImageToVideoPipeline run from the source's last frame, seam frame once."""
    import diffusers
    from diffusers.utils import load_video as diffusers_load_video

    path, _ = source
    folder = diffusers_checkpoint("tiny-i2v-A14B")
    spec = get_spec("tiny-i2v-A14B")
    ref = diffusers.WanImageToVideoPipeline.from_pretrained(folder)
    ours = WanPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, *latent_shape(spec, spec.height, spec.width, 5)), generator=torch.Generator().manual_seed(5))
    kwargs = dict(**PROMPTS, height=spec.height, width=spec.width, num_frames=5, num_inference_steps=4,
                  guidance_scale=4.0, guidance_scale_2=3.0, max_sequence_length=16, output_type="np")
    clip = diffusers_load_video(str(path))
    with torch.no_grad():
        expected = ref(image=clip[-1], latents=noise.clone(), **kwargs).frames[0]
    result = ours.extend(path, latents=noise.clone(), **kwargs).frames[0]
    assert result.shape == (len(clip) + 4, spec.height, spec.width, 3)
    head = ref.video_processor.preprocess_video(clip, height=spec.height, width=spec.width)[0]  # [3, F, H, W]
    assert max_abs_error(torch.from_numpy(result[:len(clip)]), (head / 2 + 0.5).permute(1, 2, 3, 0)) < 1e-6
    err = max_abs_error(torch.from_numpy(result[len(clip):]), torch.from_numpy(expected[1:]))
    assert err < 1e-4, f"max |ours - diffusers| = {err:.2e}"
    assert float(expected.std()) > 1e-3


class _Fake:
    """A fake component: records its calls; DiTs return a multiple of their input, the VAE
    encoder the mean colour per latent position, the decoder the first three channels."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __call__(self, **inputs):
        self.calls.append((self.name, float(inputs["timestep"].flatten()[0]) if "timestep" in inputs else None))
        if self.name == "text_encoder":
            return {"context": inputs["input_ids"].float()[..., None].expand(-1, -1, 4)}
        if self.name == "vae_encoder":
            video = inputs["video"]
            pooled = torch.nn.functional.avg_pool3d(torch.cat([video[:, :, :1]] * 4 + [video[:, :, 1:]], 2), (4, 8, 8))
            return {"latents": pooled.repeat(1, 6, 1, 1, 1)[:, :16]}
        if self.name == "vae_decoder":
            return {"video": inputs["latents"][:, :3].clamp(-1, 1)}
        return {"noise_pred": 0.1 * inputs["latents"]}


def test_strength_picks_the_start_step_and_its_expert():
    """strength 0.5 of 8 steps runs steps 4..7 (timesteps 922 and 877 above the 875 boundary, 799
    and 631 below; official grid at shift 12), each on the expert its timestep belongs to;
    callbacks count from the first step that runs."""
    from wan_rt.scheduler import SamplingDefaults
    from wan_rt.tiny import ensure_tiny_checkpoint
    from wan_rt.models.text_encoder import load_tokenizer

    spec = get_spec("tiny-t2v-A14B")
    calls: list = []
    components = {n: _Fake(n, calls) for n in ("text_encoder", "vae_encoder", "vae_decoder", *spec.dit_components)}
    pipe = WanPipeline(spec, components, load_tokenizer(ensure_tiny_checkpoint(spec.name) / "tokenizer"),
                       SamplingDefaults(solver="unipc", grid="official", shift=12.0, negative_prompt="neg"))
    pipe.set_progress_bar_config(disable=True)
    seen: list = []
    pipe("a cat", video=np.zeros((5, 32, 32, 3), np.uint8), strength=0.5, num_inference_steps=8,
         output_type="latent", max_sequence_length=8, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=lambda p, i, t, _: seen.append(i))
    dits = [(n, t) for n, t in calls if n.startswith("dit")]
    assert dits == [("dit_high_noise", 922), ("dit_high_noise", 877), ("dit_low_noise", 799), ("dit_low_noise", 631)]
    assert seen == [0, 1, 2, 3] and pipe.num_timesteps == 4
    assert [n for n, _ in calls].count("vae_encoder") == 1


def test_text_to_video_model_cannot_extend(source):
    pipe = WanPipeline.from_pretrained("tiny-t2v-A14B", dtype=torch.float32)
    with pytest.raises(ExtensionUnsupported, match="text-to-video model and cannot extend"):
        pipe.extend(source[0], "a cat")


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_video_to_video_and_extension(source, tmp_path):
    from safetensors.torch import load_file

    path, written = source
    out, frames_out = tmp_path / "v2v.mp4", tmp_path / "v2v.safetensors"
    assert main(["run", "--model", "tiny-t2v-A14B", "--video", str(path), "--strength", "0.5", "--steps", "2",
                 "--output", str(out), "--frames-out", str(frames_out)]) == 0
    assert out.stat().st_size > 0 and load_file(frames_out)["frames"].shape == (len(written), 32, 32, 3)
    out, frames_out = tmp_path / "ext.mp4", tmp_path / "ext.safetensors"
    assert main(["run", "--model", "tiny-ti2v-5B", "--extend", str(path), "--frames", "5", "--steps", "2",
                 "--output", str(out), "--frames-out", str(frames_out)]) == 0
    assert load_file(frames_out)["frames"].shape == (len(written) + 4, 64, 64, 3)


@pytest.mark.parametrize("args,message", [
    (["--model", "tiny-t2v-A14B", "--extend", "SOURCE"], "cannot extend a video"),
    (["--video", "GARBAGE"], "cannot decode"),
    (["--video", "SOURCE", "--strength", "0"], "strength must be in (0, 1]"),
    (["--video", "SOURCE", "--strength", "0.2", "--steps", "4"], "runs no step"),
    (["--video", "SOURCE", "--frames", "9"], "video has 5 frames"),
    (["--strength", "0.5"], "--strength applies to --video"),
    (["--model", "tiny-ti2v-5B", "--extend", "SOURCE", "--image", "SOURCE"], "drop --image"),
])
def test_cli_bad_video_input_is_one_line_exit_2_and_no_file(source, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 64)
    args = [{"SOURCE": str(source[0]), "GARBAGE": str(garbage)}.get(a, a) for a in args]
    out = tmp_path / "out.mp4"
    assert main(["run", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.mp4"]


# ---- engines ---------------------------------------------------------------------------------------
def test_video_to_video_on_engines_encodes_with_the_encoder_engine(source, tmp_path):
    """ONNX Runtime engines of the low-noise expert and the VAE encoder (a T2V build has one)
    give eager's frames; the source goes through the encoder engine."""
    pytest.importorskip("onnxruntime")
    from wan_rt.build import build_engines
    from wan_rt.runtime.engine_component import StreamingVAEComponent
    from wan_rt.tiny import ensure_tiny_checkpoint

    checkpoint = str(ensure_tiny_checkpoint("tiny-t2v-A14B"))
    build_engines(checkpoint, "ort", tmp_path, height=32, width=32, frames=5,
                  components=["vae_encoder", "dit_low_noise"], log=lambda s: None)
    eager = {"text_encoder": "eager", "dit_high_noise": "eager", "vae_decoder": "eager"}
    engines = WanPipeline.from_pretrained(checkpoint, engines_dir=str(tmp_path), backend_for=eager)
    reference = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    encoded = []
    encoder = engines.components["vae_encoder"]
    assert isinstance(encoder, StreamingVAEComponent), "the encoder must be the engine, not eager"
    engines.components["vae_encoder"] = lambda **kw: encoded.append(1) or encoder(**kw)
    kwargs = dict(prompt="a cat", video=source[0], strength=0.5, num_inference_steps=4, shift=3.0,
                  output_type="np")
    got, want = (p(generator=torch.Generator().manual_seed(2), **kwargs) for p in (engines, reference))
    assert encoded == [1] and got.steps_per_stage == {"dit_low_noise": 2}
    assert max_abs_error(torch.from_numpy(got.frames), torch.from_numpy(want.frames)) < 1e-4
