"""The specs carry the official numbers, and tiny specs keep the real wiring."""

import dataclasses

import pytest

from wan_rt import config as C


def test_official_numbers():
    t2v, i2v, ti2v = C.SPECS["t2v-A14B"], C.SPECS["i2v-A14B"], C.SPECS["ti2v-5B"]
    assert (t2v.dit.dim, t2v.dit.ffn_dim, t2v.dit.num_heads, t2v.dit.num_layers) == (5120, 13824, 40, 40)
    assert (t2v.dit.head_dim, t2v.dit.text_dim, t2v.dit.text_len, t2v.dit.freq_dim) == (128, 4096, 512, 256)
    assert (ti2v.dit.dim, ti2v.dit.ffn_dim, ti2v.dit.num_heads, ti2v.dit.num_layers) == (3072, 14336, 24, 30)
    assert (t2v.dit.in_channels, i2v.dit.in_channels, ti2v.dit.in_channels) == (16, 36, 48)
    assert (t2v.dit.out_channels, i2v.dit.out_channels, ti2v.dit.out_channels) == (16, 16, 48)
    assert ti2v.dit.per_token_timestep and not t2v.dit.per_token_timestep
    assert (t2v.vae.stride, ti2v.vae.stride) == ((4, 8, 8), (4, 16, 16))
    assert (t2v.vae.z_dim, ti2v.vae.z_dim) == (16, 48)
    assert (t2v.sample_shift, i2v.sample_shift, ti2v.sample_shift) == (12.0, 5.0, 5.0)
    assert (t2v.sample_steps, ti2v.sample_steps, ti2v.num_frames, ti2v.fps) == (40, 50, 121, 24)
    assert (t2v.boundary, i2v.boundary, ti2v.boundary) == (0.875, 0.9, None)


def test_experts_are_named_with_their_guidance():
    t2v = C.SPECS["t2v-A14B"]
    high, low = t2v.stages
    assert (high.component, high.guide_scale, low.component, low.guide_scale) == (
        "dit_high_noise", 4.0, "dit_low_noise", 3.0)
    assert t2v.stage_for(875).component == "dit_high_noise"
    assert t2v.stage_for(874).component == "dit_low_noise"
    assert C.SPECS["ti2v-5B"].dit_components == ("dit",)


@pytest.mark.parametrize("name,size,frames,latent,tokens", [
    ("t2v-A14B", (720, 1280), 81, (16, 21, 90, 160), 75_600),
    ("t2v-A14B", (480, 832), 81, (16, 21, 60, 104), 32_760),
    ("ti2v-5B", (704, 1280), 121, (48, 31, 44, 80), 27_280),
])
def test_latent_shape_and_tokens(name, size, frames, latent, tokens):
    spec = C.SPECS[name]
    assert C.latent_shape(spec, *size, frames) == latent
    assert C.seq_len(spec, *size, frames) == tokens


@pytest.mark.parametrize("name", ["t2v-A14B", "i2v-A14B", "ti2v-5B"])
def test_tiny_keeps_wiring(name):
    real, small = C.SPECS[name], C.SPECS[f"tiny-{name}"]
    assert small.task == real.task
    for field in ("in_channels", "out_channels", "patch_size", "per_token_timestep"):
        assert getattr(small.dit, field) == getattr(real.dit, field)
    assert [(s.component, s.min_timestep) for s in small.stages] == [(s.component, s.min_timestep) for s in real.stages]
    assert (small.vae.version, small.vae.z_dim, small.vae.stride) == (real.vae.version, real.vae.z_dim, real.vae.stride)
    assert small.dit.text_dim == small.text_encoder.d_model
    assert small.height % small.spatial_multiple == 0 and small.dit.dim < real.dit.dim


def test_spec_hash_is_stable_and_distinguishes():
    hashes = {C.spec_hash(s) for s in C.SPECS.values()}
    assert len(hashes) == len(C.SPECS)
    spec = C.SPECS["t2v-A14B"]
    assert C.spec_hash(spec) == C.spec_hash(dataclasses.replace(spec))
    assert C.spec_hash(spec) != C.spec_hash(dataclasses.replace(spec, sample_shift=5.0))


def test_specs_are_frozen_and_fully_annotated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        C.SPECS["t2v-A14B"].sample_steps = 1  # type: ignore[misc]
    # Every plain class attribute must be a dataclass field (the sglang `text_len = 512` trap).
    for cls in (C.DiTConfig, C.VAEConfig, C.TextEncoderConfig, C.Stage, C.ModelSpec):
        fields = {f.name for f in dataclasses.fields(cls)}
        plain = {k for k, v in vars(cls).items()
                 if not k.startswith("_") and not callable(v) and not isinstance(v, property)}
        assert plain <= fields, f"{cls.__name__}: unannotated {plain - fields}"
