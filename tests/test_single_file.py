"""One-file components (ComfyUI repackaged, fp8 scaled, official .pth names) load as the same
weights: DiT files against diffusers' `WanTransformer3DModel.from_single_file` on the same file;
VAE and umT5 files against the folders they were written from (diffusers 0.42.1's Wan VAE
single-file conversion assumes the released VAE's two res-blocks per level and has no Wan 2.2
VAE path, so it cannot load the tiny VAEs: the key-map equivalence is the check there); fp8
scaled files against their dequantized weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wan_rt.config import get_spec
from wan_rt.models import load_dit, load_text_encoder, load_vae
from wan_rt.models.checkpoint import read_state_dict

diffusers = pytest.importorskip("diffusers")


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    assert not bad, bad[:3]


@pytest.mark.parametrize("spec_name,naming,dtype", [
    ("tiny-t2v-A14B", "comfyui", torch.bfloat16), ("tiny-t2v-A14B", "official", torch.float16),
    ("tiny-ti2v-5B", "comfyui", torch.float32), ("tiny-i2v-A14B", "official", torch.bfloat16)])
def test_dit_file_equals_diffusers_from_single_file(spec_name, naming, dtype, diffusers_checkpoint, single_files,
                                                    tmp_path):
    folder = diffusers_checkpoint(spec_name)
    path = single_files.write_dit(folder / "transformer", tmp_path / "dit.safetensors", naming=naming, dtype=dtype)
    ref = diffusers.WanTransformer3DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                           torch_dtype=torch.float32)
    ours = load_dit(path, dtype=torch.float32)
    _same(ours.state_dict(), ref.state_dict())
    spec = get_spec(spec_name)
    assert ours.config == dataclasses.replace(spec.dit, text_len=512)  # architecture off the shapes


def test_dit_file_in_diffusers_names_equals_its_folder(diffusers_checkpoint, single_files, tmp_path):
    folder = diffusers_checkpoint("tiny-t2v-A14B")
    path = single_files.write_dit(folder / "transformer_2", tmp_path / "d.safetensors", naming="diffusers",
                                  dtype=torch.float32)
    _same(load_dit(path).state_dict(), load_dit(folder / "transformer_2").state_dict())


@pytest.mark.parametrize("spec_name", ["tiny-t2v-A14B", "tiny-ti2v-5B"])  # Wan 2.1 and Wan 2.2 VAE
def test_vae_file_equals_its_folder(spec_name, diffusers_checkpoint, single_files, tmp_path):
    folder, spec = diffusers_checkpoint(spec_name), get_spec(spec_name)
    path = single_files.write_vae(folder / "vae", tmp_path / "vae.safetensors", spec.vae.version,
                                  spec.vae.num_res_blocks)
    ours, ref = load_vae(path), load_vae(folder / "vae")
    assert ours.config == ref.config == spec.vae
    _same(ours.state_dict(), ref.state_dict())


@pytest.mark.parametrize("naming,scaled", [("comfyui", False), ("official", False), ("comfyui", True)])
def test_umt5_file_equals_its_folder(naming, scaled, diffusers_checkpoint, single_files, tmp_path):
    folder = diffusers_checkpoint("tiny-t2v-A14B") / "text_encoder"
    path = single_files.write_umt5(folder, tmp_path / "umt5.safetensors", naming=naming, scaled=scaled)
    want = read_state_dict(folder)
    if scaled:  # fp8 x scale_weight is what the file means
        want = single_files.dequantized(single_files.fp8_scaled(want))
    ours = load_text_encoder(path, dtype=torch.float32).encoder.state_dict()
    ours.pop("encoder.embed_tokens.weight")  # the tie of shared.weight
    _same(ours, want)


def test_fp8_scaled_dit_computes_with_its_dequantized_weights(diffusers_checkpoint, single_files, tmp_path):
    folder = diffusers_checkpoint("tiny-t2v-A14B") / "transformer"
    path = single_files.write_fp8_scaled_dit(folder, tmp_path / "high_fp8_scaled.safetensors")
    raw = read_state_dict(path)
    assert raw["model.diffusion_model.blocks.0.self_attn.q.weight"].dtype == torch.float8_e4m3fn
    want = {k.removeprefix("model.diffusion_model."): v for k, v in single_files.dequantized(raw).items()}
    plain = tmp_path / "dequantized.safetensors"
    single_files._save(want, plain)
    ours, ref = load_dit(path, dtype=torch.float32), load_dit(plain, dtype=torch.float32)
    _same(ours.state_dict(), ref.state_dict())
    # ... and not the original weights: the test would not see a dropped scale otherwise.
    assert not torch.equal(ours.state_dict()["blocks.0.attn1.to_q.weight"],
                           load_dit(folder).state_dict()["blocks.0.attn1.to_q.weight"])
