"""An official Wan2.2-layout checkpoint (made by converting a diffusers-made tiny one to the
official file names and keys) loads through WanPipeline.from_pretrained, is sampled by the
official defaults, and computes exactly what the same weights do in the diffusers layout."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_rt.config import OFFICIAL_NEGATIVE_PROMPT, get_spec
from wan_rt.metrics import max_abs_error
from wan_rt.models import hf_config
from wan_rt.models.checkpoint import (diffusers_dit_to_official, diffusers_vae_to_official, hf_t5_to_official,
                                      read_state_dict)
from wan_rt.loader import WanPipeline


def to_official(diffusers_folder, out, spec_name):
    spec = get_spec(spec_name)
    dit_folders = {"transformer": "high_noise_model", "transformer_2": "low_noise_model"} \
        if len(spec.stages) > 1 else {"transformer": "."}
    for src, dst in dit_folders.items():
        (out / dst).mkdir(parents=True, exist_ok=True)
        sd = read_state_dict(diffusers_folder / src)
        save_file({diffusers_dit_to_official(k): v.contiguous() for k, v in sd.items()},
                  out / dst / "diffusion_pytorch_model.safetensors")
        (out / dst / "config.json").write_text(json.dumps(hf_config.dit_to_official(spec.dit, spec.task)))
    vae = read_state_dict(diffusers_folder / "vae")
    v = spec.vae
    torch.save({diffusers_vae_to_official(k, v.version, v.num_res_blocks): t.clone() for k, t in vae.items()},
               out / ("Wan2.2_VAE.pth" if v.version == "2.2" else "Wan2.1_VAE.pth"))
    t5 = read_state_dict(diffusers_folder / "text_encoder")
    torch.save({hf_t5_to_official(k): t.clone() for k, t in t5.items() if k != "encoder.embed_tokens.weight"},
               out / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(diffusers_folder / "tokenizer", out / "google" / "umt5-xxl")
    return out


@pytest.mark.parametrize("spec_name", ["tiny-t2v-A14B", "tiny-ti2v-5B"])
def test_official_layout_loads_and_samples_like_the_same_weights(spec_name, diffusers_checkpoint, tmp_path):
    diffusers_folder = diffusers_checkpoint(spec_name)
    official = to_official(diffusers_folder, tmp_path / "official", spec_name)
    assert not (official / "model_index.json").exists()

    ours = WanPipeline.from_pretrained(str(official), dtype=torch.float32)
    spec = get_spec(spec_name)
    assert ours.spec == spec  # sizes read off the weights: the preset is recognised
    d = ours.defaults
    assert (d.grid, d.solver, d.shift, d.negative_prompt) == ("official", "unipc", spec.sample_shift,
                                                              OFFICIAL_NEGATIVE_PROMPT)

    # The same weights in the diffusers layout, sampled with the same (official) settings.
    same = WanPipeline.from_pretrained(str(diffusers_folder), dtype=torch.float32)
    same.defaults = dataclasses.replace(d, scheduler_config=None)
    for pipe in (ours, same):
        pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, spec.vae.z_dim, 2, spec.height // spec.vae.stride[1], spec.width // spec.vae.stride[2],
                          generator=torch.Generator().manual_seed(5))
    kwargs = dict(prompt="a cat on the beach", num_frames=5, num_inference_steps=3, output_type="np")
    got = ours(latents=latents.clone(), **kwargs)
    want = same(latents=latents.clone(), **kwargs)
    assert max_abs_error(torch.from_numpy(got.frames), torch.from_numpy(want.frames)) < 1e-6
    assert float(torch.from_numpy(got.frames).std()) > 1e-3


def test_official_t5_and_vae_tensors_load_unchanged(diffusers_checkpoint, tmp_path):
    from wan_rt.models import load_text_encoder, load_vae

    folder = diffusers_checkpoint("tiny-t2v-A14B")
    official = to_official(folder, tmp_path / "official", "tiny-t2v-A14B")
    te_o = load_text_encoder(official).encoder.state_dict()
    te_d = load_text_encoder(folder).encoder.state_dict()
    assert te_o.keys() == te_d.keys() and all(torch.equal(te_o[k], te_d[k]) for k in te_o)
    vae_o, vae_d = load_vae(official).state_dict(), load_vae(folder).state_dict()
    assert vae_o.keys() == vae_d.keys() and all(torch.equal(vae_o[k], vae_d[k]) for k in vae_o)
    ref = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") \
        if (folder / "vae" / "diffusion_pytorch_model.safetensors").exists() else None
    assert ref is None or set(ref) <= set(vae_d)
