"""`wan-rt run` / `wan-rt build` on a tiny T2V given as component files only (--model t2v-A14B):
an fp8_scaled high-noise expert, a GGUF Q8_0 low-noise expert, single-file VAE and umT5, and a
tokenizer folder with tokenizer.json only (what transformers 5 saves). The eager run equals the
same weights given as plain fp32 files; ORT engines built from the files equal the eager run;
the engines dir gets a spiece.model whose ids are the Python tokenizer's. Wrong files are one
line naming the file, exit 2, no output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from wan_rt.cli import main as wan_rt_main
from wan_rt.models.text_encoder import load_tokenizer, tokenize

pytest.importorskip("gguf")
T2V = "tiny-t2v-A14B"
PROMPTS = ["a red fox running through fresh snow at sunrise, cinematic, detailed", "", "  a   cat\tand\na dog  ",
           "一只狐狸在雪中奔跑，电影感。", "“quoted” ‘text’ and ﬁne ﬂuﬀy ligatures", "ＬＯＵＤ　ＮＯＩＳＥＳ！ｶﾀｶﾅ",
           "emoji 🦊 fox, 火狐 and 여우!", "x" * 80]  # a subset of tests/test_cpp.py's


@pytest.fixture(scope="module")
def files(diffusers_checkpoint, single_files, tmp_path_factory):
    """{flag: path}: the component files, plus "plain_dit"/"plain_dit_2": their weights dequantized (fp32)."""
    import gguf

    from wan_rt.models.checkpoint import read_state_dict

    ckpt, out = diffusers_checkpoint(T2V), tmp_path_factory.mktemp("single_files")
    assert not (ckpt / "tokenizer" / "spiece.model").exists()  # transformers 5: tokenizer.json only
    sf = single_files
    high = sf.write_fp8_scaled_dit(ckpt / "transformer", out / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    low = sf.write_gguf(sf.official_dit(ckpt / "transformer_2"), out / "wan2.2_t2v_low_noise_14B_Q8_0.gguf", "Q8_0")
    plain_high = sf._save({k.removeprefix(sf.PREFIX): v for k, v in sf.dequantized(read_state_dict(high)).items()},
                          out / "high_fp32.safetensors")
    reader = gguf.GGUFReader(str(low))
    plain_low = sf._save({t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
                          .reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}, out / "low_fp32.safetensors")
    return {"--dit": high, "--dit-2": low, "--vae": sf.write_vae(ckpt / "vae", out / "wan_2.1_vae.safetensors", "2.1", 1),
            "--text-encoder": sf.write_umt5(ckpt / "text_encoder", out / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                            scaled=True),
            "--tokenizer": ckpt / "tokenizer", "plain_dit": plain_high, "plain_dit_2": plain_low, "root": out}


def _flags(files, **over) -> list[str]:
    given = {k: files[k] for k in ("--dit", "--dit-2", "--vae", "--text-encoder", "--tokenizer")} | over
    return ["--model", "t2v-A14B"] + [str(x) for k, v in given.items() if v is not None for x in (k, v)]


def _run(tmp_path, name, *args) -> torch.Tensor:
    out = tmp_path / f"{name}.mp4"
    assert wan_rt_main(["run", *map(str, args), "--output", str(out), "--frames-out", str(tmp_path / f"{name}.safetensors"),
                        "--seed", "3"]) == 0
    return load_file(str(tmp_path / f"{name}.safetensors"))["frames"]


def test_files_run_eager_and_as_engines(files, tmp_path, capsys):
    eager = _run(tmp_path, "eager", *_flags(files))
    plain = _run(tmp_path, "plain", *_flags(files, **{"--dit": files["plain_dit"], "--dit-2": files["plain_dit_2"]}))
    assert (eager - plain).abs().max().item() < 1e-5  # fp8 x scale, GGUF on the fly == the dequantized weights
    assert "from tiny-t2v-A14B (eager)" in capsys.readouterr().out  # the architecture off the shapes
    from wan_rt.cli.run import DEFAULT_PROMPT
    from wan_rt.loader import WanPipeline

    pipe = WanPipeline.from_pretrained("t2v-A14B", files={k.lstrip("-").replace("-", "_"): files[k] for k in
                                                          ("--dit", "--dit-2", "--vae", "--text-encoder", "--tokenizer")})
    api = pipe(DEFAULT_PROMPT, generator=torch.Generator().manual_seed(3)).frames[0]
    assert torch.equal(torch.from_numpy(api), eager)  # the Python API takes the same files

    engines = tmp_path / "engines"
    assert wan_rt_main(["build", *map(str, _flags(files)), "--backend", "ort", "--engines-dir", str(engines)]) == 0
    index = json.loads((engines / "engines.json").read_text())
    assert json.loads(index["model"])["dit_2"] == str(files["--dit-2"])  # the engines remember their files
    built = _run(tmp_path, "engines", "--engines-dir", engines)  # no component flags needed again
    assert (built - eager).abs().max().item() < 1e-4

    # tokenizer.json only: the engines dir still gets the spiece.model the C++ runtime reads.
    import sentencepiece as spm

    from wan_rt.models.text_encoder import clean_prompt

    assert json.loads((engines / "pipeline.json").read_text())["tokenizer"] == "tokenizer/spiece.model"
    sp = spm.SentencePieceProcessor(model_file=str(engines / "tokenizer" / "spiece.model"))
    ids, _ = tokenize(load_tokenizer(files["--tokenizer"]), PROMPTS, 24)
    for prompt, row in zip(PROMPTS, ids.tolist()):
        want = (sp.encode(clean_prompt(prompt)) + [1])[:23] + [1] if len(sp.encode(clean_prompt(prompt))) >= 24 \
            else sp.encode(clean_prompt(prompt)) + [1]
        assert row[:len(want)] == want and not any(row[len(want):]), prompt


def test_ti2v_from_files_alone(diffusers_checkpoint, single_files, tmp_path, capsys):
    """TI2V-5B as files: its DiT (per-token timesteps off the 48 channels), the Wan 2.2 VAE file."""
    ckpt, sf = diffusers_checkpoint("tiny-ti2v-5B"), single_files
    args = ["--model", "ti2v-5B", "--dit", sf.write_dit(ckpt / "transformer", tmp_path / "wan2.2_ti2v_5B_fp16.safetensors",
                                                        dtype=torch.float16),
            "--vae", sf.write_vae(ckpt / "vae", tmp_path / "wan2.2_vae.safetensors", "2.2", 1),
            "--text-encoder", sf.write_umt5(ckpt / "text_encoder", tmp_path / "umt5.safetensors"),
            "--tokenizer", ckpt / "tokenizer", "--steps", "2"]
    frames = _run(tmp_path, "ti2v", *args)
    assert frames.shape[0] == 5 and torch.isfinite(frames).all()
    assert "from tiny-ti2v-5B (eager)" in capsys.readouterr().out


def test_converted_spiece_equals_the_original(diffusers_checkpoint):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from wan_rt.models.spiece import spiece_from_tokenizer_json

    ckpt = diffusers_checkpoint(T2V)
    original, ours = pb.ModelProto(), pb.ModelProto()
    original.ParseFromString((ckpt.parent / "_tok" / "spiece.model").read_bytes())  # what tokenizer.json came from
    ours.ParseFromString(spiece_from_tokenizer_json(ckpt / "tokenizer" / "tokenizer.json"))
    assert [(p.piece, p.score, p.type) for p in ours.pieces] == [(p.piece, p.score, p.type) for p in original.pieces]
    for field in ("precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(original.normalizer_spec, field), field
    for field in ("unk_id", "eos_id", "pad_id", "bos_id", "model_type"):
        assert getattr(ours.trainer_spec, field) == getattr(original.trainer_spec, field), field


def test_cpp_tokenizes_the_converted_spiece_like_python(diffusers_checkpoint, cpp_build, tmp_path):
    """The C++ runtime's tokenizer (wan-rt-cpp-probe) on the spiece.model made from tokenizer.json
    gives the Python pipeline's ids on every prompt of tests/test_cpp.py."""
    import importlib.util
    import subprocess
    from pathlib import Path

    from wan_rt.models.spiece import spiece_from_tokenizer_json

    spec = importlib.util.spec_from_file_location("wan_rt_tests_cpp", Path(__file__).with_name("test_cpp.py"))
    test_cpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_cpp)
    tokenizer = diffusers_checkpoint(T2V) / "tokenizer"
    model = tmp_path / "spiece.model"
    model.write_bytes(spiece_from_tokenizer_json(tokenizer / "tokenizer.json"))
    proc = subprocess.run([str(cpp_build / "wan-rt-cpp-probe"), "tokenize", str(model), "16"], capture_output=True,
                          text=True, input=json.dumps(test_cpp.PROMPTS), timeout=300)
    assert proc.returncode == 0, proc.stderr
    ids, mask = tokenize(load_tokenizer(tokenizer), test_cpp.PROMPTS, 16)
    for got, prompt, i, m in zip(json.loads(proc.stdout), test_cpp.PROMPTS, ids.tolist(), mask.tolist()):
        assert (got["ids"], got["mask"]) == (i, m), prompt
    assert len({tuple(i) for i in ids.tolist()}) > len(test_cpp.PROMPTS) // 2  # the prompts tokenize apart


def _refused(capsys, tmp_path, args, *words) -> str:
    capsys.readouterr()
    out = tmp_path / "never.mp4"
    assert wan_rt_main(["run", *map(str, args), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not out.exists()
    return err


def test_wrong_files_are_one_line(files, diffusers_checkpoint, single_files, tmp_path, capsys):
    sf = single_files
    ti2v = diffusers_checkpoint("tiny-ti2v-5B")
    other = sf.write_dit(ti2v / "transformer", tmp_path / "ti2v_dit.safetensors")
    _refused(capsys, tmp_path, _flags(files, **{"--dit-2": other}), str(other), "a ti2v DiT", "not t2v")
    _refused(capsys, tmp_path, ["--model", "tiny-ti2v-5B", "--vae", files["--vae"]], str(files["--vae"]),
             "a Wan 2.1 VAE", "Wan 2.2 VAE")
    _refused(capsys, tmp_path, _flags(files, **{"--dit": files["--vae"]}), str(files["--vae"]), "a Wan VAE, not a Wan DiT")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["plain_dit"].read_bytes()[:-1000])
    _refused(capsys, tmp_path, _flags(files, **{"--dit": truncated}), str(truncated), "cannot read safetensors")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["--dit-2"].read_bytes()[:-1000])
    _refused(capsys, tmp_path, _flags(files, **{"--dit-2": cut}), str(cut), "GGUF")
    _refused(capsys, tmp_path, _flags(files, **{"--tokenizer": None}), "t2v-A14B names an architecture only",
             "--tokenizer")
    unknown = _gguf_with_type(sf, files["plain_dit_2"], tmp_path / "iq.gguf")
    _refused(capsys, tmp_path, _flags(files, **{"--dit-2": unknown}), str(unknown), "IQ4_NL", "cannot dequantize")


def _gguf_with_type(single_files, plain, path):
    """A GGUF expert whose first block weight is IQ4_NL (an importance-matrix type wan_rt does not decode)."""
    import gguf
    import numpy as np

    sd = load_file(str(plain))
    rows, cols = sd["blocks.0.self_attn.q.weight"].shape
    blocks = np.zeros((rows, cols // 32 * 18), dtype=np.uint8)
    return single_files.write_gguf(sd, path, "F16", raw={"blocks.0.self_attn.q.weight":
                                                         (blocks, gguf.GGMLQuantizationType.IQ4_NL)})


def test_fp8_build_keeps_the_files_fp8_weights_and_scales(files, tmp_path):
    """`--precision fp8` on an fp8_scaled expert: every quantized weight of the graph is the
    file's own fp8 tensor with its per-tensor scale_weight (no requantizing)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from wan_rt.build import build_engines
    from wan_rt.export.quantize import QuantConfig
    from wan_rt.models.checkpoint import diffusers_dit_to_official, read_state_dict
    from wan_rt.resolve import compose_model

    model = compose_model("t2v-A14B", **{k.lstrip("-").replace("-", "_"): str(files[k]) for k in
                                         ("--dit", "--dit-2", "--vae", "--text-encoder", "--tokenizer")})
    build_engines(model, "ort", tmp_path / "engines", precision="fp8", components=["dit_high_noise"],
                  quant_config=QuantConfig("fp8", calib_prompts=("a fox",), calib_steps=2), log=lambda _: None)
    main = tmp_path / "engines" / "dit_high_noise" / "main"
    inits = {i.name: i for i in onnx.load(str(main / "model.onnx")).graph.initializer}
    report = json.loads((main / "qdq_report.json").read_text())
    raw = read_state_dict(files["--dit"])
    checked = 0
    for name, path in report["weights"].items():
        if name not in inits or inits[name].data_type != onnx.TensorProto.FLOAT8E4M3FN:
            continue
        key = "model.diffusion_model." + diffusers_dit_to_official(path + ".weight")
        q = torch.from_numpy(numpy_helper.to_array(inits[name]).astype(np.float32)).T  # graph: [in, out]
        scale = numpy_helper.to_array(inits[name.removesuffix("_q") + "_scale"])
        assert torch.equal(q, raw[key].float()), path
        assert np.all(scale == np.float32(raw[key.removesuffix("weight") + "scale_weight"].item())), path
        checked += 1
    assert checked == 16  # 2 blocks x 8 linears of the step graph (cross-attention K/V live in the text graph)
