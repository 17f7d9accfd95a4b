"""wan_rt.models.checkpoint: key maps, memory-mapped reading, strict loading, layout detection.

Official-layout files are made from tiny diffusers / transformers models with the inverse maps;
the maps themselves are pinned to the names listed in the spec (wan22-spec.md §7.3-7.5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from wan_rt.config import SPECS
from wan_rt.models import hf_config
from wan_rt.models.checkpoint import (
    CheckpointError, detect_layout, diffusers_dit_to_official, diffusers_vae_to_official,
    hf_t5_to_official, load_into, locate_checkpoint, map_keys, meta_parameters,
    official_dit_to_diffusers, official_t5_to_hf, official_vae_to_diffusers, read_state_dict,
)

T2V, TI2V = SPECS["tiny-t2v-A14B"], SPECS["tiny-ti2v-5B"]


def _kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def make_dit(spec=T2V, **extra) -> WanTransformer3DModel:
    return WanTransformer3DModel(**_kwargs(hf_config.dit_to_diffusers(spec.dit)) | extra)


def make_vae(spec) -> AutoencoderKLWan:
    return AutoencoderKLWan(**_kwargs(hf_config.vae_to_diffusers(spec.vae)))


def make_t5() -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(**hf_config.text_encoder_to_hf(T2V.text_encoder)))


@pytest.fixture(scope="module")
def dit() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return make_dit().eval()


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, T2V.dit.text_len, T2V.dit.text_dim, generator=g),
                return_dict=False)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds t's data, or None (anonymous memory: a copy)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        addr, *rest = line.split()
        lo, hi = (int(x, 16) for x in addr.split("-"))
        if lo <= ptr < hi:
            return rest[4] if len(rest) > 4 else None
    return None


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


def round_trip(keys, to_official, to_ours) -> dict[str, str]:
    official = {k: to_official(k) for k in keys}
    assert len(set(official.values())) == len(official), "two keys share an official name"
    assert {to_ours(o): k for k, o in official.items()} == {k: k for k in keys}
    return official


# -- key maps --------------------------------------------------------------------------------

def test_dit_key_map_matches_spec_and_round_trips(dit):
    keys = list(dit.state_dict())
    assert len(keys) == 69  # spec §7.3: 12 top-level + 27 per block x 2 layers + 3 head
    official = round_trip(keys, diffusers_dit_to_official, official_dit_to_diffusers)
    wb = ("weight", "bias")
    block = (["modulation", "norm3.weight", "norm3.bias"]
             + [f"{a}.{p}.{s}" for a in ("self_attn", "cross_attn") for p in "qkvo" for s in wb]
             + [f"{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"]
             + [f"ffn.{i}.{s}" for i in (0, 2) for s in wb])
    spec_names = ({f"{m}.{s}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2",
                                        "time_embedding.0", "time_embedding.2", "time_projection.1",
                                        "head.head") for s in wb}
                  | {"head.modulation"} | {f"blocks.{n}.{b}" for n in range(2) for b in block})
    assert set(official.values()) == spec_names
    for ours, theirs in [("blocks.0.norm2.weight", "blocks.0.norm3.weight"), ("scale_shift_table", "head.modulation"),
                         ("blocks.1.scale_shift_table", "blocks.1.modulation"),
                         ("condition_embedder.time_proj.weight", "time_projection.1.weight"),
                         ("blocks.0.attn1.to_out.0.bias", "blocks.0.self_attn.o.bias"),
                         ("blocks.1.attn2.norm_k.weight", "blocks.1.cross_attn.norm_k.weight"),
                         ("blocks.0.ffn.net.0.proj.weight", "blocks.0.ffn.0.weight"), ("proj_out.bias", "head.head.bias")]:
        assert official[ours] == theirs
    # ComfyUI single files carry a prefix; unknown keys pass through so load_into can name them.
    assert official_dit_to_diffusers("model.diffusion_model.head.modulation") == "scale_shift_table"
    assert official_dit_to_diffusers("blocks.0.norm2.weight") == "blocks.0.norm3.weight"  # parameter-free on our side
    assert official_dit_to_diffusers("foo.bar") == "foo.bar"


def test_dit_key_map_wan21_image_branch():
    with torch.device("meta"):
        m = make_dit(TI2V, image_dim=32, added_kv_proj_dim=64, pos_embed_seq_len=8)
    official = round_trip(list(m.state_dict()), diffusers_dit_to_official, official_dit_to_diffusers)
    assert official["blocks.0.attn2.add_k_proj.weight"] == "blocks.0.cross_attn.k_img.weight"
    assert official["blocks.1.attn2.norm_added_k.weight"] == "blocks.1.cross_attn.norm_k_img.weight"
    assert official["condition_embedder.image_embedder.ff.net.2.bias"] == "img_emb.proj.3.bias"
    assert official["condition_embedder.image_embedder.pos_embed"] == "img_emb.emb_pos"


# Names that exist only on the diffusers side: none may survive the map to official.
_DIFFUSERS_ONLY = re.compile(r"down_blocks|up_blocks|mid_block|resnets|attentions|norm[12]\.|conv_in|conv_out|"
                             r"norm_out|quant_conv|conv_shortcut|upsampler|downsampler")


@pytest.mark.parametrize("spec, size, pairs", [
    (T2V, 146, {"decoder.up_blocks.0.upsamplers.0.resample.1.weight": "decoder.upsamples.2.resample.1.weight",
                "decoder.up_blocks.1.resnets.1.conv1.weight": "decoder.upsamples.4.residual.2.weight"}),
    (SPECS["t2v-A14B"], 194, {  # full size: spec §7.4 examples (upsamplers at N = 3, 7, 11)
        "quant_conv.weight": "conv1.weight", "post_quant_conv.bias": "conv2.bias",
        "encoder.conv_in.weight": "encoder.conv1.weight", "decoder.norm_out.gamma": "decoder.head.0.gamma",
        "encoder.conv_out.bias": "encoder.head.2.bias",
        "encoder.mid_block.attentions.0.to_qkv.weight": "encoder.middle.1.to_qkv.weight",
        "decoder.mid_block.resnets.1.norm2.gamma": "decoder.middle.2.residual.3.gamma",
        "encoder.down_blocks.5.time_conv.weight": "encoder.downsamples.5.time_conv.weight",
        "encoder.down_blocks.3.conv_shortcut.weight": "encoder.downsamples.3.shortcut.weight",
        "decoder.up_blocks.1.upsamplers.0.time_conv.bias": "decoder.upsamples.7.time_conv.bias",
        "decoder.up_blocks.2.upsamplers.0.resample.1.weight": "decoder.upsamples.11.resample.1.weight",
        "decoder.up_blocks.3.resnets.2.conv2.weight": "decoder.upsamples.14.residual.6.weight"}),
    (TI2V, 148, {"encoder.down_blocks.0.downsampler.resample.1.weight": "encoder.downsamples.0.downsamples.1.resample.1.weight",
                 "decoder.up_blocks.1.upsampler.time_conv.weight": "decoder.upsamples.1.upsamples.2.time_conv.weight"}),
    (SPECS["ti2v-5B"], 196, {
        "encoder.down_blocks.0.downsampler.resample.1.weight": "encoder.downsamples.0.downsamples.2.resample.1.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.downsamples.1.downsamples.0.shortcut.weight",
        "decoder.up_blocks.1.upsampler.time_conv.weight": "decoder.upsamples.1.upsamples.3.time_conv.weight",
        "decoder.up_blocks.2.resnets.2.norm1.gamma": "decoder.upsamples.2.upsamples.2.residual.0.gamma"}),
], ids=["2.1-tiny", "2.1-full", "2.2-tiny", "2.2-full"])
def test_vae_key_map(spec, size, pairs):
    with torch.device("meta"):
        keys = list(make_vae(spec).state_dict())
    assert len(keys) == size
    v, nrb = spec.vae.version, spec.vae.num_res_blocks
    official = round_trip(keys, lambda k: diffusers_vae_to_official(k, v, nrb),
                          lambda k: official_vae_to_diffusers(k, v, nrb))
    assert [o for o in official.values() if _DIFFUSERS_ONLY.search(o)] == []
    assert {k: official[k] for k in pairs} == pairs


def test_t5_key_map():
    keys = [k for k in make_t5().state_dict() if k != "encoder.embed_tokens.weight"]  # tied alias of shared
    official = round_trip(keys, hf_t5_to_official, official_t5_to_hf)
    assert len(official) == 22
    assert official["shared.weight"] == "token_embedding.weight"
    assert official["encoder.final_layer_norm.weight"] == "norm.weight"
    assert official["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] == \
        "blocks.1.pos_embedding.embedding.weight"
    assert official["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] == "blocks.0.ffn.gate.0.weight"
    assert official["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] == "blocks.0.ffn.fc1.weight"
    assert official["encoder.block.0.layer.0.SelfAttention.o.weight"] == "blocks.0.attn.o.weight"


def test_map_keys_refuses_collisions():
    with pytest.raises(CheckpointError, match=r"x\.pth: keys 'a' and 'b' both map to 'c'"):
        map_keys({"a": torch.zeros(1), "b": torch.zeros(1)}, lambda k: "c", source="x.pth")


# -- reading ---------------------------------------------------------------------------------

@needs_proc_maps
def test_read_sharded_safetensors_is_mmapped(dit, tmp_path):
    dit.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 5  # really sharded
    ref = dit.state_dict()
    for path in (tmp_path, tmp_path / "diffusion_pytorch_model.safetensors.index.json"):
        sd = read_state_dict(path)
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        # No copy: every tensor lives in a file mapping of one of the shards.
        assert {Path(mapped_file(t) or "copy").parent for t in sd.values()} == {tmp_path}


@needs_proc_maps
def test_read_pth_weights_only(tmp_path):
    sd = {"a": torch.randn(64, 64), "b": torch.arange(3)}
    torch.save(sd, tmp_path / "w.pth")
    got = read_state_dict(tmp_path)  # folder with one .pth
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert mapped_file(got["a"]) == str(tmp_path / "w.pth")

    torch.save({"a": torch.zeros(1), "evil": Path("/")}, tmp_path / "evil.pth")  # a pickled object
    with pytest.raises(CheckpointError, match=r"evil\.pth: cannot load with torch\.load\(weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")
    torch.save({"a": torch.zeros(1), "step": 3}, tmp_path / "meta.pth")  # allowed type, still not a tensor
    with pytest.raises(CheckpointError, match=r"meta\.pth: key 'step' holds int"):
        read_state_dict(tmp_path / "meta.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "w.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot load"):
        read_state_dict(cut)


def test_read_errors_name_the_file(dit, tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=r"no weights"):
        read_state_dict(tmp_path)

    single = tmp_path / "single"
    dit.save_pretrained(single)
    f = single / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ": cannot read safetensors"):
        read_state_dict(single)

    sharded = tmp_path / "sharded"
    dit.save_pretrained(sharded, max_shard_size="20KB")
    index = sharded / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    key, shard = next(iter(weight_map.items()))
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard) + r": shard named in .*index\.json is missing") as e:
        read_state_dict(sharded)
    assert min(k for k, s in weight_map.items() if s == shard) in str(e.value)

    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: not a sharded-safetensors index"):
        read_state_dict(index)


# -- loading ---------------------------------------------------------------------------------

@needs_proc_maps
def test_load_official_dit_into_meta_model(dit, tmp_path):
    path = tmp_path / "wan2.2_comfy.safetensors"  # official names with the ComfyUI prefix
    save_file({"model.diffusion_model." + diffusers_dit_to_official(k): v.contiguous()
               for k, v in dit.state_dict().items()}, path)
    sd = map_keys(read_state_dict(path), official_dit_to_diffusers, source=path)

    with meta_parameters():
        model = make_dit()
    assert model.patch_embedding.weight.is_meta and not model.rope.freqs_cos.is_meta
    load_into(model, sd, source=path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert mapped_file(model.blocks[1].ffn.net[2].weight) == str(path)  # assigned, not copied
    with torch.no_grad():
        assert torch.equal(model(**dit_inputs())[0], dit(**dit_inputs())[0])

    # torch.device("meta") leaves the RoPE tables (non-persistent buffers) empty: say so.
    with torch.device("meta"):
        bare = make_dit()
    with pytest.raises(CheckpointError, match=r"still on the meta device.*rope\.freqs_cos.*meta_parameters"):
        load_into(bare, sd, source=path)


def test_load_into_key_and_shape_errors(dit):
    sd = dit.state_dict()
    cases = [
        ({k: v for k, v in sd.items() if k != "blocks.1.attn2.to_k.bias"}, r"1 missing keys: blocks\.1\.attn2\.to_k\.bias"),
        (sd | {"blocks.0.attn1.to_x.weight": torch.zeros(1)}, r"1 unexpected keys: blocks\.0\.attn1\.to_x\.weight"),
        (sd | {"proj_out.weight": torch.zeros(3, 64)}, r"1 mis-shaped keys: proj_out\.weight \(3, 64\) != \(64, 64\)"),
    ]
    for bad, message in cases:
        with meta_parameters():
            model = make_dit()
        with pytest.raises(CheckpointError, match=r"^/ckpt/dit\.safetensors: " + message):
            load_into(model, bad, source="/ckpt/dit.safetensors")


def test_load_official_t5_keeps_tie(tmp_path):
    torch.manual_seed(0)
    ref = make_t5().eval()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({hf_t5_to_official(k): v for k, v in ref.state_dict().items()
                if k != "encoder.embed_tokens.weight"}, path)
    sd = map_keys(read_state_dict(path), official_t5_to_hf, source=path)
    assert "encoder.embed_tokens.weight" not in sd

    cfg = UMT5Config(**hf_config.text_encoder_to_hf(T2V.text_encoder))
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    load_into(model, sd, source=path)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    ids = torch.tensor([[5, 17, 99, 1, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state,
                           ref(ids, attention_mask=mask).last_hidden_state)

    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    load_into(model, sd, source=path, dtype=torch.bfloat16)  # conversion keeps the tie
    assert model.shared.weight.dtype == torch.bfloat16 and model.shared.weight is model.encoder.embed_tokens.weight

    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    with pytest.raises(CheckpointError, match=r"tied weights shared\.weight and encoder\.embed_tokens\.weight differ"):
        load_into(model, sd | {"encoder.embed_tokens.weight": torch.zeros_like(sd["shared.weight"])}, source=path)


@pytest.mark.parametrize("spec", [T2V, TI2V], ids=["vae2.1", "vae2.2"])
def test_load_official_vae(spec, tmp_path):
    torch.manual_seed(0)
    ref = make_vae(spec).eval()
    v, nrb = spec.vae.version, spec.vae.num_res_blocks
    path = tmp_path / f"Wan{v}_VAE.pth"
    torch.save({diffusers_vae_to_official(k, v, nrb): t for k, t in ref.state_dict().items()}, path)
    sd = map_keys(read_state_dict(path), lambda k: official_vae_to_diffusers(k, v, nrb), source=path)
    with torch.device("meta"):
        model = make_vae(spec)
    load_into(model, sd, source=path)
    # Equal tensors under every name; whether those names are the official ones is
    # test_vae_key_map's job (a decode here would take seconds and prove nothing more).
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- layouts ---------------------------------------------------------------------------------

def touch(root: Path, *files: str) -> Path:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")
    return root


def diffusers_folder(root: Path, two_experts: bool) -> Path:
    dits = ["transformer", "transformer_2"] if two_experts else ["transformer"]
    touch(root, "tokenizer/spiece.model", "scheduler/scheduler_config.json", "vae/config.json",
          "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
          "text_encoder/model.safetensors.index.json",
          *(f"{d}/{f}" for d in dits for f in ("config.json", "diffusion_pytorch_model.safetensors.index.json")))
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if two_experts else [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def official_folder(root: Path, two_experts: bool) -> Path:
    dit = ("high_noise_model/", "low_noise_model/") if two_experts else ("",)
    return touch(root, "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model",
                 "Wan2.1_VAE.pth" if two_experts else "Wan2.2_VAE.pth",
                 *(f"{d}{f}" for d in dit for f in ("config.json", "diffusion_pytorch_model.safetensors.index.json")))


def test_locate_diffusers(tmp_path):
    a14b = locate_checkpoint(diffusers_folder(tmp_path / "a14b", two_experts=True))
    assert detect_layout(a14b.root) == "diffusers" and a14b.layout == "diffusers"
    assert a14b.dits == {"dit_high_noise": tmp_path / "a14b/transformer", "dit_low_noise": tmp_path / "a14b/transformer_2"}
    assert (a14b.vae, a14b.text_encoder, a14b.tokenizer, a14b.scheduler) == tuple(
        tmp_path / "a14b" / d for d in ("vae", "text_encoder", "tokenizer", "scheduler"))
    ti2v = locate_checkpoint(diffusers_folder(tmp_path / "ti2v", two_experts=False))
    assert ti2v.dits == {"dit": tmp_path / "ti2v/transformer"}

    (tmp_path / "a14b/transformer_2/diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"transformer_2: no weights"):
        locate_checkpoint(tmp_path / "a14b")
    (tmp_path / "ti2v/text_encoder/config.json").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder: missing config\.json"):
        locate_checkpoint(tmp_path / "ti2v")


def test_locate_official(tmp_path):
    a14b = locate_checkpoint(official_folder(tmp_path / "a14b", two_experts=True))
    assert detect_layout(a14b.root) == "official" and a14b.model_index is None
    assert a14b.dits == {"dit_high_noise": tmp_path / "a14b/high_noise_model",
                         "dit_low_noise": tmp_path / "a14b/low_noise_model"}
    assert a14b.vae.name == "Wan2.1_VAE.pth" and a14b.tokenizer == tmp_path / "a14b/google/umt5-xxl"
    ti2v = locate_checkpoint(official_folder(tmp_path / "ti2v", two_experts=False))
    assert ti2v.dits == {"dit": tmp_path / "ti2v"} and ti2v.vae.name == "Wan2.2_VAE.pth"
    assert ti2v.text_encoder == tmp_path / "ti2v/models_t5_umt5-xxl-enc-bf16.pth"

    for f in (tmp_path / "a14b/low_noise_model").iterdir():
        f.unlink()
    (tmp_path / "a14b/low_noise_model").rmdir()
    with pytest.raises(CheckpointError, match=r"low_noise_model: missing low-noise expert folder"):
        locate_checkpoint(tmp_path / "a14b")
    (tmp_path / "ti2v/Wan2.2_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"Wan2\.2_VAE\.pth: missing Wan 2\.2 VAE"):
        locate_checkpoint(tmp_path / "ti2v")


def test_detect_layout_neither(tmp_path):
    touch(tmp_path, "config.json", "weights.bin")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path)) + r": neither a diffusers checkpoint"):
        detect_layout(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such checkpoint folder"):
        locate_checkpoint(tmp_path / "absent")
