"""The C++ runtime (wan_rt/cpp: a libtorch library and `wan-rt-cpp`) against the Python runtime on
the same AOTInductor engines: the same video from the same seed, the same token ids, the same noise
and scheduler numbers, the same one-line refusals.

Engines: tiny T2V (two experts), I2V and TI2V built with `--backend aoti --kernels torch
--quick-compile` at tests/test_aoti.py's profile (twice the default size, 9 frames), so their
packages come from the session's package cache that test_aoti.py fills; TI2V's Wan 2.2 VAE, which
test_aoti.py leaves out, is compiled here in two worker processes first. The C++ project is built
once per session (the `cpp_build` fixture), cached by its sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from wan_rt.cli import main as wan_rt_main
from wan_rt.runtime.backends import get_backend

aoti = get_backend("aoti")
pytestmark = pytest.mark.skipif(not aoti.is_available(), reason=f"AOTInductor unavailable: {aoti.unavailable_reason()}")

T2V, I2V, TI2V = "tiny-t2v-A14B", "tiny-i2v-A14B", "tiny-ti2v-5B"
FAST = os.environ.get("WAN_RT_AOTI_TEST_FAST", "1") != "0"
PROMPT = "a red fox running through fresh snow at sunrise, cinematic, detailed"
TOL = 1e-4
# Prompts where cleaning matters: whitespace, HTML references (named, numeric, invalid, legacy
# without ';'), curly quotes, ligatures, full width, control characters, CJK, emoji, invalid UTF-8
# stays out (Python's argv would not carry it either).
PROMPTS = [
    PROMPT, "", "  a   cat\tand\na dog  ", "一只狐狸在雪中奔跑，电影感。", "“quoted” ‘text’ and ﬁne ﬂuﬀy ligatures",
    "Fish &amp; chips &lt;b&gt; &#39;x&#x27; &eacute; &nbsp;ok &amp;amp; &notit; &#0; &#128; &#xD800;",
    "ＬＯＵＤ　ＮＯＩＳＥＳ！ｶﾀｶﾅ", "ctrl\u0007chars\u000bhere\u001fend\ufeff", "emoji 🦊 fox, 火狐 and 여우!",
    "&amp", "&ampfoo &copy2024", "&#99999999999999999999; big", "tab\u3000ideographic\u00a0nbsp\u2028sep",
    "日本語のテキスト、句読点。「引用」と！？", "x" * 80,
]
MOJIBAKE = "mojibake âœ” here"  # ftfy repairs this to "mojibake ✔ here"; the C++ cleaning does not


def _profile_args(spec) -> list[str]:
    return ["--height", str(2 * spec.height), "--width", str(2 * spec.width), "--frames", "9"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """{preset: engines dir}: AOTI engines of the three tiny presets."""
    from wan_rt.config import get_spec
    from wan_rt.export.aoti_export import compile_graphs
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.graphs import shape_profile

    root = tmp_path_factory.mktemp("cpp_engines")
    spec = resolve_checkpoint(TI2V).spec
    profile = shape_profile(spec, height=2 * spec.height, width=2 * spec.width, frames=9)
    vae = [(TI2V, c, g) for c in ("vae_encoder", "vae_decoder") for g in ("first", "step")]
    compile_graphs(vae, root / "prefill", {TI2V: profile}, fast=FAST, workers=2)  # into the package cache
    out = {}
    for name in (T2V, I2V, TI2V):
        args = ["build", "--model", name, "--backend", "aoti", "--kernels", "torch", "--device", "cpu",
                "--engines-dir", str(root / name), *_profile_args(get_spec(name))]
        assert wan_rt_main(args + (["--quick-compile"] if FAST else [])) == 0
        out[name] = root / name
    return out


def _cpp(cpp_build, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(cpp_build / "wan-rt-cpp"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _probe(cpp_build, *args, stdin=None) -> str:
    proc = subprocess.run([str(cpp_build / "wan-rt-cpp-probe"), *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _python_run(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = wan_rt_main(["run", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def _mp4_timing(path) -> tuple:
    """(average frame rate, frames, duration in frames) of an mp4's video stream, as its container
    says (muxers round the duration to their time base: compared in whole frames)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.average_rate, stream.frames, round(stream.duration * stream.time_base * stream.average_rate)


def _image(path, width: int, height: int, seed: int) -> str:
    """A smooth random RGB picture (PNG: lossless, so both sides decode the same bytes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path)
    return str(path)


def _lossless_video(path, frames: np.ndarray) -> str:
    """An mp4 of `frames` in H.264 RGB at qp 0 (lossless), so both runtimes decode the same bytes."""
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), frames.shape[2:0:-1], fps=16, codec="libx264rgb",
                                         pix_fmt_out="rgb24", macro_block_size=1, output_params=["-qp", "0"],
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return str(path)


def _source_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in small])


# ------------------------------------------------------------------------------ build
def test_build_command_prints_the_executable_and_reuses_the_build(cpp_build):
    """`python -m wan_rt.cpp build`: the last line is wan-rt-cpp's path; a second call finds the
    build of these sources and this torch (cache key) and returns at once."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "wan_rt.cpp", "build"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    exe = proc.stdout.strip().splitlines()[-1]
    assert exe == str(cpp_build / "wan-rt-cpp") and os.access(exe, os.X_OK)
    assert "building" not in proc.stderr  # reused, not rebuilt
    help_ = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--engines-dir" in help_.stdout and "--frames-out" in help_.stdout


def test_text_tables_are_generated_from_their_sources():
    """src/text_tables.inc is what `python -m wan_rt.cpp tables` makes from Python's html module,
    str.isspace and the installed ftfy: a changed table is seen here."""
    from wan_rt.cpp.text_tables import TABLES_FILE, source

    assert TABLES_FILE.read_text() == source(), "run `python -m wan_rt.cpp tables` and commit the result"


# ------------------------------------------------------------------------------ the pieces
def test_noise_equals_torchs_cpu_generator(cpp_build, tmp_path):
    """at::make_generator<CPUGeneratorImpl>(seed) + at::randn is torch.Generator("cpu").manual_seed
    + torch.randn: below 16 elements (scalar path) and above (the vectorised normal fill)."""
    for seed, shape in ((0, (7,)), (42, (1, 16, 2, 4, 4)), (2**40 + 3, (1, 48, 3, 5, 7))):
        _probe(cpp_build, "randn", seed, tmp_path / "n.safetensors", *shape)
        want = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        assert torch.equal(load_file(str(tmp_path / "n.safetensors"))["noise"], want), (seed, shape)


@pytest.mark.parametrize("solver,grid,steps,shift,corrector", [
    ("unipc", "official", 9, 12.0, ()), ("unipc", "diffusers", 7, 5.0, (2, 4)), ("unipc", "diffusers", 1, 3.0, ()),
    ("dpm++", "official", 6, 5.0, ()), ("dpm++", "diffusers", 5, 1.0, ()),
    ("euler", "official", 4, 12.0, ()), ("euler", "diffusers", 8, 3.0, ()),
])
def test_schedulers_equal_python(cpp_build, tmp_path, solver, grid, steps, shift, corrector):
    """Grids and every step bit for bit: the C++ schedulers repeat scheduler.py's float64 grids and
    its float32 tensor ops in the same order."""
    from wan_rt.scheduler import make_scheduler

    gen = torch.Generator().manual_seed(steps)
    x, v = torch.randn(1, 4, 2, 3, 3, generator=gen), torch.randn(steps, 1, 4, 2, 3, 3, generator=gen)
    save_file({"x": x, "v": v}, str(tmp_path / "in.safetensors"))
    _probe(cpp_build, "schedule", solver, grid, steps, shift, tmp_path / "in.safetensors", tmp_path / "out.safetensors",
           *corrector)
    got = load_file(str(tmp_path / "out.safetensors"))
    sched = make_scheduler(solver, steps, shift, grid)
    if corrector:
        sched.disable_corrector = frozenset(corrector)
    xs = [x]
    for i in range(steps):
        xs.append(sched.step(v[i], i, xs[-1]))
    assert torch.equal(got["sigmas"], sched.sigmas) and torch.equal(got["timesteps"], sched.timesteps)
    assert torch.equal(got["x"], torch.stack(xs)), (got["x"] - torch.stack(xs)).abs().max()


def _spm_ids(sp, prompt: str, max_len: int) -> tuple[list[int], list[int]]:
    from wan_rt.models.text_encoder import clean_prompt

    ids = sp.encode(clean_prompt(prompt))[: max_len - 1] + [sp.eos_id()]
    return ids + [0] * (max_len - len(ids)), [1] * len(ids) + [0] * (max_len - len(ids))


@pytest.fixture(scope="module")
def rich_spiece(tmp_path_factory) -> str:
    """A SentencePiece model that knows CJK, kana, hangul and punctuation (the tiny presets' 256
    pieces map them all to <unk>), with byte fallback, trained here in a second."""
    import io

    import sentencepiece as spm

    corpus = [p for p in PROMPTS if p.strip()] * 3 + [
        "一只狐狸在雪地里奔跑。", "电影感，细节丰富！", "カタカナとひらがな、漢字。", "여우가 눈 속을 달린다.",
        "quotes \"here\" and 'there'; commas, periods. colons: dashes - and (parens) [brackets]!?"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
                                   hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_token_ids_equal_sentencepiece_and_cleaning_equals_python(cpp_build, engines, rich_spiece):
    """C++ ids (cleaning, SentencePiece pieces, EOS, zero padding, truncation) equal Python's
    sentencepiece on wan_rt's clean_prompt, for the engines dir's own spiece.model (checked against
    the checkpoint's file) and a model that covers CJK and punctuation; the cleaned text equals
    wan_rt's clean_prompt except where ftfy repairs mojibake (documented)."""
    import sentencepiece as spm

    from wan_rt.models.text_encoder import clean_prompt
    from wan_rt.resolve import resolve_checkpoint

    own = engines[T2V] / "tokenizer" / "spiece.model"
    assert own.read_bytes() == (resolve_checkpoint(T2V).files.tokenizer / "spiece.model").read_bytes()
    for model, max_len in ((str(own), 16), (rich_spiece, 24)):
        sp = spm.SentencePieceProcessor(model_file=model)
        got = json.loads(_probe(cpp_build, "tokenize", model, max_len, stdin=json.dumps(PROMPTS + [MOJIBAKE])))
        for prompt, g in zip(PROMPTS, got):
            assert g["clean"] == clean_prompt(prompt), prompt
            assert (g["ids"], g["mask"]) == _spm_ids(sp, prompt, max_len), (model, prompt)
        assert any(i >= 3 for g in got for i in g["ids"]) and len({tuple(g["ids"]) for g in got}) > len(got) // 2
    assert got[-1]["clean"] == "mojibake âœ\" here" and clean_prompt(MOJIBAKE) == "mojibake ✔ here"


def test_token_ids_equal_wan_rts_python_tokenizer(cpp_build, engines):
    """The C++ ids equal what the Python pipeline feeds its text encoder (transformers' tokenizer)."""
    from wan_rt.models.text_encoder import load_tokenizer, tokenize
    from wan_rt.resolve import resolve_checkpoint

    prompts = PROMPTS
    got = json.loads(_probe(cpp_build, "tokenize", engines[T2V] / "tokenizer" / "spiece.model", 16,
                            stdin=json.dumps(prompts)))
    ids, mask = tokenize(load_tokenizer(resolve_checkpoint(T2V).files.tokenizer), prompts, 16)
    for i, prompt in enumerate(prompts):
        assert (got[i]["ids"], got[i]["mask"]) == (ids[i].tolist(), mask[i].tolist()), prompt


def test_lanczos_resize_equals_pillow(cpp_build, tmp_path):
    """The first frame's resize repeats Pillow's LANCZOS bit for bit: down, up, one axis, both, and
    the cases Pillow runs its vertical pass first (the height shrinking much more than the width)."""
    rng = np.random.default_rng(2)
    for (w0, h0), sizes in (((50, 37), ((32, 32), (96, 64), (50, 20), (20, 37), (128, 16), (47, 9))),
                            ((16, 84), ((8, 46), (32, 32), (16, 20))), ((58, 27), ((47, 9), (20, 80)))):
        path = tmp_path / f"{w0}x{h0}.png"  # noise: high frequencies, where the filters' lobes show
        Image.fromarray(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)).save(path)
        for w, h in sizes:
            _probe(cpp_build, "resize", path, w, h, tmp_path / "r.safetensors")
            want = np.asarray(Image.open(path).convert("RGB").resize((w, h), resample=Image.LANCZOS))
            got = load_file(str(tmp_path / "r.safetensors"))["pixels"].numpy()
            assert got.shape == want.shape and np.array_equal(got, want), (w0, h0, w, h)


def test_device_and_torch_identity_equal_the_python_runtimes(cpp_build):
    """What the manifests' tool_versions are checked against, computed in C++ as the AOTI backend
    computes it in Python (torch.__version__, inductor's CPU vector ISA)."""
    got = json.loads(_probe(cpp_build, "device"))
    assert got == {"torch": aoti.versions()["torch"], "device": aoti.versions()["device"]}


def test_pipeline_json_is_read_off_the_checkpoint(engines):
    """pipeline.json says what the resolved checkpoint and the spec say (the C++ side's only source)."""
    from wan_rt.config import spec_hash
    from wan_rt.resolve import resolve_checkpoint

    for name, folder in engines.items():
        resolved = resolve_checkpoint(name)
        spec, defaults = resolved.spec, resolved.defaults
        cfg = json.loads((folder / "pipeline.json").read_text())
        assert cfg["spec_hash"] == spec_hash(spec) == json.loads((folder / "engines.json").read_text())["spec_hash"]
        assert [(s["component"], s["min_timestep"], s["guide_scale"]) for s in cfg["stages"]] == \
            [(s.component, s.min_timestep, s.guide_scale) for s in spec.stages]
        assert cfg["dit"] == {"patch_size": list(spec.dit.patch_size), "text_len": spec.dit.text_len,
                              "per_token_timestep": spec.dit.per_token_timestep}
        assert cfg["vae"] == {"stride": list(spec.vae.stride), "z_dim": spec.vae.z_dim}
        assert cfg["sampling"]["scheduler_config"] == dict(defaults.scheduler_config)
        assert cfg["sampling"]["from_scheduler_config"] == {"solver": "unipc", "shift": spec.sample_shift,
                                                            "disable_corrector": []}
        assert set(cfg["compute_dtypes"].values()) == {"float32"}


# ------------------------------------------------------------------------------ the video
CASES = {
    "t2v": (T2V, [], None),
    # A solver override leaves the checkpoint's scheduler config for make_scheduler on its grid;
    # guidance 1 on the low-noise expert: no CFG there (one batch of one).
    "t2v-dpm++-shift-guidance": (T2V, ["--solver", "dpm++", "--shift", "3", "--guidance", "2.5", "--guidance-2", "1",
                                       "--negative-prompt", "blurry, static", "--seed", "7"], None),
    "i2v": (I2V, ["--frames", "9", "--seed", "3"], (50, 37)),       # the image is resized
    "ti2v": (TI2V, ["--width", "128", "--steps", "3"], (128, 64)),  # non-square, image at size
}


@pytest.mark.parametrize("case", list(CASES))
def test_video_equals_python(cpp_build, engines, tmp_path, capsys, case):
    """`wan-rt-cpp` and `wan-rt run` on the same engines, prompt and seed: frames within 1e-4
    before uint8 (`--frames-out`), and both mp4 files decode to that video."""
    import imageio.v3 as iio

    name, extra, image_size = CASES[case]
    args = ["--engines-dir", engines[name], "--prompt", PROMPT, *extra]
    if image_size is not None:
        args += ["--image", _image(tmp_path / "first.png", *image_size, seed=5)]
    code, err = _python_run(capsys, *args, "--output", tmp_path / "py.mp4", "--frames-out", tmp_path / "py.safetensors")
    assert code == 0, err
    proc = _cpp(cpp_build, *args, "--output", tmp_path / "cpp.mp4", "--frames-out", tmp_path / "cpp.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "(aoti engines in" in proc.stdout
    want = load_file(str(tmp_path / "py.safetensors"))["frames"]
    got = load_file(str(tmp_path / "cpp.safetensors"))["frames"]
    assert got.shape == want.shape and want.std() > 0.05
    assert (got - want).abs().max() < TOL, (got - want).abs().max()
    # The same frame rate and duration as Python's file (each frame shown for 1/fps: a last frame
    # without a duration once made the file say 20 fps and readers garble that frame).
    assert _mp4_timing(tmp_path / "cpp.mp4") == _mp4_timing(tmp_path / "py.mp4")
    py_mp4, cpp_mp4 = (iio.imread(tmp_path / f, plugin="pyav").astype(np.float32) / 255 for f in ("py.mp4", "cpp.mp4"))
    assert cpp_mp4.shape == py_mp4.shape == tuple(want.shape)
    # Two H.264 encodes (ffmpeg's program, FFmpeg's libraries): the C++ file is as faithful as Python's.
    py_err, cpp_err = np.abs(py_mp4 - want.numpy()).mean(), np.abs(cpp_mp4 - want.numpy()).mean()
    assert cpp_err <= 1.5 * py_err + 1e-3, (cpp_err, py_err)
    assert not list(tmp_path.glob(".*partial*"))


def test_video_to_video_equals_python(cpp_build, engines, tmp_path, capsys):
    """`--video --strength` on both runtimes: the source (lossless, so decoded alike, checked
    against its frames) resized, encoded, noised to the start step, denoised from there across the
    expert switch: frames within 1e-4."""
    from wan_rt.video import load_video

    frames = _source_frames(9, 37, 50, seed=8)
    source = _lossless_video(tmp_path / "source.mp4", frames)
    assert np.array_equal(load_video(source), frames)
    # 5 steps at strength 0.6: steps 2..4 run (timesteps 947, 889 on the high-noise expert, 750 on the low).
    args = ["--engines-dir", engines[T2V], "--prompt", PROMPT, "--video", source, "--strength", "0.6", "--steps", "5",
            "--seed", "4"]
    code, err = _python_run(capsys, *args, "--output", tmp_path / "py.mp4", "--frames-out", tmp_path / "py.safetensors")
    assert code == 0, err
    assert {"dit_high_noise (2 steps)", "dit_low_noise (1 steps)"} <= {line.strip().split(":")[0] for line in err}, err
    proc = _cpp(cpp_build, *args, "--output", tmp_path / "cpp.mp4", "--frames-out", tmp_path / "cpp.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "dit_high_noise (2 steps)" in proc.stderr and "dit_low_noise (1 steps)" in proc.stderr
    want = load_file(str(tmp_path / "py.safetensors"))["frames"]
    got = load_file(str(tmp_path / "cpp.safetensors"))["frames"]
    assert got.shape == want.shape == (9, 32, 32, 3) and want.std() > 0.05
    assert (got - want).abs().max() < TOL, (got - want).abs().max()


def test_generation_stops_at_a_step_boundary(cpp_build, engines):
    """The step callback returning false stops the generation there (GenerationInterrupted)."""
    out = _probe(cpp_build, "interrupt", engines[T2V], 2)
    assert out.strip() == "interrupted after step 2 of 4"


# ------------------------------------------------------------------------------ refusals
def _bad_cases(engines, tmp_path):
    """(name, arguments, what Python says is the same words) for the one-line refusals."""
    t2v, i2v = engines[T2V], engines[I2V]
    junk = tmp_path / "junk.png"
    junk.write_text("not a picture")
    (tmp_path / "src").mkdir()  # the refusals check that no mp4 appears in tmp_path itself
    source = _lossless_video(tmp_path / "src" / "source.mp4", _source_frames(9, 32, 32, seed=1))
    return [
        ("height", ["--engines-dir", t2v, "--height", "33"], True),
        ("frames", ["--engines-dir", t2v, "--frames", "6"], True),
        ("steps", ["--engines-dir", t2v, "--steps", "0"], True),
        ("shift", ["--engines-dir", t2v, "--shift", "-1"], True),
        ("solver", ["--engines-dir", t2v, "--solver", "heun"], False),  # argparse's quoting varies by Python
        ("output-suffix", ["--engines-dir", t2v, "--output", tmp_path / "out.avi"], True),
        ("output-folder", ["--engines-dir", t2v, "--output", tmp_path / "nowhere" / "out.mp4"], True),
        ("too-large", ["--engines-dir", t2v, "--height", "128"], True),
        ("image-for-t2v", ["--engines-dir", t2v, "--image", junk], True),
        ("no-image", ["--engines-dir", i2v], True),
        ("image-missing", ["--engines-dir", i2v, "--image", tmp_path / "missing.png"], True),
        ("image-unreadable", ["--engines-dir", i2v, "--image", junk], False),  # the decoders' reasons differ
        ("no-engines", ["--engines-dir", tmp_path / "empty"], True),
        ("strength-no-video", ["--engines-dir", t2v, "--strength", "0.5"], True),
        ("strength-range", ["--engines-dir", t2v, "--video", source, "--strength", "1.5"], True),
        ("strength-no-step", ["--engines-dir", t2v, "--video", source, "--strength", "0.1", "--steps", "4"], True),
        ("video-short", ["--engines-dir", t2v, "--video", source, "--frames", "13"], True),
        ("video-missing", ["--engines-dir", t2v, "--video", tmp_path / "missing.mp4"], True),
        ("video-unreadable", ["--engines-dir", t2v, "--video", junk], False),  # the decoders' reasons differ
    ]


def _expect_same_refusal(cpp_build, capsys, tmp_path, args, same_words: bool) -> str:
    out = tmp_path / "bad.mp4"
    args = [*args, "--prompt", PROMPT]
    if "--output" not in args:
        args += ["--output", out]
    code, py_err = _python_run(capsys, *args)
    proc = _cpp(cpp_build, *args)
    cpp_err = proc.stderr.strip().splitlines()
    assert code == 2 and proc.returncode == 2, (py_err, proc.stderr)
    assert len(py_err) == 1 and len(cpp_err) == 1, (py_err, cpp_err)
    assert py_err[0].startswith("wan-rt run: error: ") and cpp_err[0].startswith("wan-rt-cpp: error: ")
    py_msg, cpp_msg = py_err[0][len("wan-rt run: error: "):], cpp_err[0][len("wan-rt-cpp: error: "):]
    if same_words:
        assert cpp_msg == py_msg
    else:
        assert cpp_msg.split(":")[0] == py_msg.split(":")[0], (cpp_msg, py_msg)
    assert not out.exists() and not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*partial*"))
    return cpp_msg


def test_bad_input_is_the_same_one_line_as_wan_rt_run(cpp_build, engines, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for name, args, same_words in _bad_cases(engines, tmp_path):
        try:
            _expect_same_refusal(cpp_build, capsys, tmp_path, args, same_words)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def _copy_engines(src, dst):
    """A copy of an engines dir to break: the packages are hard links (nothing rewritten in place)."""
    shutil.copytree(src, dst, copy_function=os.link)
    for manifest in dst.glob("*/manifest.json"):  # the JSON files are edited: real copies
        manifest.unlink()
        shutil.copyfile(src / manifest.relative_to(dst), manifest)
    for name in ("engines.json", "pipeline.json"):
        (dst / name).unlink()
        shutil.copyfile(src / name, dst / name)
    return dst


def test_stale_or_foreign_engines_are_refused_in_one_line(cpp_build, engines, tmp_path, capsys):
    """Another torch, another CPU ISA, a missing file: the same words as Python's refusal (naming
    the component and the rebuild command). Engines Python runs but C++ cannot (not AOTInductor,
    built before pipeline.json): one line saying so. Nothing is written."""
    def edit(path, change):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    broken = _copy_engines(engines[T2V], tmp_path / "torch")
    edit(broken / "vae_decoder" / "manifest.json", lambda m: m["tool_versions"].update(torch="2.0.0"))
    msg = _expect_same_refusal(cpp_build, capsys, tmp_path, ["--engines-dir", broken], True)
    assert "engine for vae_decoder cannot run here: built with torch 2.0.0" in msg and "wan-rt build" in msg

    broken = _copy_engines(engines[T2V], tmp_path / "isa")
    edit(broken / "dit_low_noise" / "manifest.json", lambda m: m["tool_versions"].update(device="cpu-avx2"))
    if aoti.versions()["device"] != "cpu-avx2":
        msg = _expect_same_refusal(cpp_build, capsys, tmp_path, ["--engines-dir", broken], True)
        assert "dit_low_noise" in msg and "cpu-avx2" in msg

    broken = _copy_engines(engines[T2V], tmp_path / "missing")
    (broken / "dit_high_noise" / "main" / "weights.safetensors").unlink()
    msg = _expect_same_refusal(cpp_build, capsys, tmp_path, ["--engines-dir", broken], True)
    assert "engine for dit_high_noise is incomplete (missing main/weights.safetensors)" in msg

    out = tmp_path / "out.mp4"
    for name, change, words in (
            ("ort", lambda d: edit(d / "engines.json", lambda i: i.update(backend="ort")), "holds ort engines"),
            ("old", lambda d: (d / "pipeline.json").unlink(), "pipeline.json not found"),
            # what `wan-rt build --step-cache` writes: the step as graphs other than "main"
            ("split", lambda d: edit(d / "dit_high_noise" / "manifest.json",
                                     lambda m: m["graphs"].update(embed=m["graphs"].pop("main"))),
             "was built with --step-cache")):
        broken = _copy_engines(engines[T2V], tmp_path / name)
        change(broken)
        proc = _cpp(cpp_build, "--engines-dir", broken, "--prompt", PROMPT, "--output", out)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and words in err[0], err
        assert "wan-rt build" in err[0] or "rebuild without --step-cache" in err[0], err
        assert not out.exists()
