"""WanVAE (wan_rt/models/vae.py) against diffusers' AutoencoderKLWan, the numerical oracle.

Both tiny VAEs (2.1 from tiny-t2v-A14B, 2.2 from tiny-ti2v-5B) get random weights from a seed, so
every layer matters; diffusers' weights are loaded into WanVAE with strict=True.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from wan_rt.config import SPECS, WAN21_VAE, WAN22_VAE
from wan_rt.models.hf_config import vae_to_diffusers
from wan_rt.models.vae import WanVAE, causal_conv3d

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # relative L2 error at fp32
# spec name -> test frame size (2.1 needs multiples of 8, 2.2 of 16)
SIZES = {"tiny-t2v-A14B": 32, "tiny-ti2v-5B": 64}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm()).item()


@functools.lru_cache(maxsize=None)
def build_pair(name: str):
    """(cfg, size, diffusers reference, WanVAE) with the same random weights."""
    cfg = SPECS[name].vae
    kwargs = {k: v for k, v in vae_to_diffusers(cfg).items() if not k.startswith("_")}
    ref = diffusers.AutoencoderKLWan(**kwargs).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if pname.endswith("gamma"):  # RMS norm scales default to exactly 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # ~unit-variance activations: std 1/sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    vae = WanVAE(cfg).eval()
    vae.load_state_dict(ref.state_dict(), strict=True)
    return cfg, SIZES[name], ref, vae


@pytest.fixture(params=list(SIZES))
def pair(request):
    return build_pair(request.param)


def stats(cfg):
    z = cfg.z_dim
    return torch.tensor(cfg.latents_mean).view(1, z, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, z, 1, 1, 1)


def video(batch, frames, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


def latents(cfg, batch, frames, size, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = cfg.stride[1]
    return torch.randn(batch, cfg.z_dim, frames, size // s, size // s, generator=g)


# ---- the reference op --------------------------------------------------------------------------


def test_causal_conv3d_cache_continues_the_sequence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 5, 6, generator=g)
    w, b = torch.randn(3, 4, 3, 3, 3, generator=g), torch.randn(3, generator=g)
    whole = causal_conv3d(x, w, b, None, (1, 1, 1))
    # No cache == causal zero padding: 2 zero frames before, 1 pixel around.
    expect = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), w, b)
    assert rel_err(whole, expect) < 1e-6
    assert rel_err(causal_conv3d(x, w, b, torch.zeros_like(x[:, :, :2]), (1, 1, 1)), whole) < 1e-6
    # A chunk whose cache holds the previous 2 frames continues the sequence.
    tail = causal_conv3d(x[:, :, 3:], w, b, x[:, :, 1:3], (1, 1, 1))
    assert rel_err(tail, whole[:, :, 3:]) < 1e-6
    # A 1-frame cache gets one zero frame before it.
    assert rel_err(causal_conv3d(x[:, :, 1:], w, b, x[:, :, :1], (1, 1, 1)), whole[:, :, 1:]) < 1e-6


# ---- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("frames", [9, 1])
def test_encode_matches_diffusers(pair, frames):
    cfg, size, ref, vae = pair
    mean, std = stats(cfg)
    x = video(2, frames, size)
    with torch.no_grad():
        expect = (ref.encode(x).latent_dist.mean - mean) / std
        got = vae.encode(x)
    assert got.shape == (2, cfg.z_dim, (frames - 1) // 4 + 1, size // cfg.stride[1], size // cfg.stride[2])
    assert rel_err(got, expect) < TOL


@pytest.mark.parametrize("frames", [3, 1])
def test_decode_matches_diffusers(pair, frames):
    cfg, size, ref, vae = pair
    mean, std = stats(cfg)
    z = latents(cfg, 2, frames, size)
    with torch.no_grad():
        expect = ref.decode(z * std + mean).sample
        got = vae.decode(z)
    assert got.shape == (2, 3, 4 * (frames - 1) + 1, size, size)
    # Not mostly saturated, or the clamp would hide errors.
    assert (expect.abs() < 1).float().mean() > 0.5
    assert rel_err(got, expect) < TOL


# ---- streaming with explicit caches ------------------------------------------------------------


def run_stream(step, chunks, cache, expected_shapes):
    """Feed chunks through `step(x, cache, first_chunk)`; check purity and static cache shapes."""
    outs = []
    for i, chunk in enumerate(chunks):
        before = [c.clone() for c in cache]
        out, new_cache = step(chunk, cache, i == 0)
        assert all(torch.equal(a, b) for a, b in zip(before, cache)), "input cache was mutated"
        assert isinstance(new_cache, tuple)
        assert [tuple(c.shape[1:]) for c in new_cache] == expected_shapes
        outs.append(out)
        cache = new_cache
    return outs


def test_chunked_decode(pair):
    """Chunk by chunk from zero caches == diffusers' decode (vae.decode runs this same loop, so
    diffusers is the independent check); a multi-frame steady-state chunk gives the same frames."""
    cfg, size, ref, vae = pair
    mean, std = stats(cfg)
    z = latents(cfg, 1, 4, size)
    h, w = z.shape[-2:]
    shapes = vae.decoder_cache_shapes(h, w)
    cache = vae.init_decoder_cache(1, h, w)
    assert [tuple(c.shape) for c in cache] == [(1, *s) for s in shapes]
    assert all(c.abs().sum() == 0 for c in cache)
    with torch.no_grad():
        outs = run_stream(vae.decode_chunk, list(z.split(1, dim=2)), cache, shapes)
        expect = ref.decode(z * std + mean).sample
        first, cache1 = vae.decode_chunk(z[:, :, :1], cache, first_chunk=True)
        rest, _ = vae.decode_chunk(z[:, :, 1:], cache1, first_chunk=False)
    assert [o.shape[2] for o in outs] == [1, 4, 4, 4]
    streamed = torch.cat(outs, dim=2)
    assert rel_err(streamed, expect) < TOL
    assert rel_err(torch.cat([first, rest], dim=2), streamed) < 1e-5


def test_chunked_encode(pair):
    """Frame 0, then 4-frame chunks, from zero caches == diffusers' encode; one 12-frame
    steady-state chunk gives the same latents."""
    cfg, size, ref, vae = pair
    mean, std = stats(cfg)
    x = video(1, 13, size)
    shapes = vae.encoder_cache_shapes(size, size)
    cache = vae.init_encoder_cache(1, size, size)
    chunks = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:9], x[:, :, 9:13]]
    with torch.no_grad():
        outs = run_stream(vae.encode_chunk, chunks, cache, shapes)
        expect = (ref.encode(x).latent_dist.mean - mean) / std
        first, cache1 = vae.encode_chunk(x[:, :, :1], cache, first_chunk=True)
        rest, _ = vae.encode_chunk(x[:, :, 1:], cache1, first_chunk=False)
    assert [o.shape[2] for o in outs] == [1, 1, 1, 1]
    streamed = torch.cat(outs, dim=2)
    assert rel_err(streamed, expect) < TOL
    assert rel_err(torch.cat([first, rest], dim=2), streamed) < 1e-5


def test_cache_layout_of_the_real_vaes():
    """Slot counts and shapes from spec 4.4 (official vae_cache.py), built on meta: no weights."""
    with torch.device("meta"):
        v21, v22 = WanVAE(WAN21_VAE), WanVAE(WAN22_VAE)
    hl, wl = 60, 104
    dec21 = v21.decoder_cache_shapes(hl, wl)
    expect = ([(16, 2, hl, wl)] + [(384, 2, hl, wl)] * 11 + [(192, 2, 2 * hl, 2 * wl)]
              + [(384, 2, 2 * hl, 2 * wl)] * 6 + [(192, 2, 4 * hl, 4 * wl)] * 6 + [(96, 2, 8 * hl, 8 * wl)] * 7)
    assert dec21 == expect
    hin, win = 480, 832
    enc21 = v21.encoder_cache_shapes(hin, win)
    assert len(enc21) == 24
    assert [s for s in enc21 if s[1] == 1] == [(192, 1, hin // 4, win // 4), (384, 1, hin // 8, win // 8)]
    assert enc21[0] == (3, 2, hin, win) and enc21[-1] == (384, 2, hin // 8, win // 8)
    dec22 = v22.decoder_cache_shapes(hl, wl)
    assert len(dec22) == 32
    assert dec22[:12] == [(48, 2, hl, wl)] + [(1024, 2, hl, wl)] * 11
    assert dec22[-7:] == [(512, 2, 8 * hl, 8 * wl)] + [(256, 2, 8 * hl, 8 * wl)] * 6
    enc22 = v22.encoder_cache_shapes(704, 1280)
    assert len(enc22) == 24 and enc22[0] == (12, 2, 352, 640)
    assert [s for s in enc22 if s[1] == 1] == [(320, 1, 88, 160), (640, 1, 44, 80)]


def test_22_round_trip_shapes():
    _, _, _, vae = build_pair("tiny-ti2v-5B")
    x = video(1, 9, 64)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, 48, 3, 4, 4)
        assert vae.decode(z).shape == x.shape


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_steady_state_chunk_exports(kind):
    """torch.export traces a steady-state chunk: no data-dependent control flow, caches as I/O.
    2.2 only: its blocks are a superset of 2.1's (plus patchify, AvgDown3D, DupUp3D)."""
    cfg, size, _, vae = build_pair("tiny-ti2v-5B")
    if kind == "encode":
        x, cache, step = video(1, 4, size), vae.init_encoder_cache(1, size, size), vae.encode_chunk
    else:
        z = latents(cfg, 1, 1, size)
        x, cache, step = z, vae.init_decoder_cache(1, *z.shape[-2:]), vae.decode_chunk
    g = torch.Generator().manual_seed(3)
    cache = tuple(torch.randn(c.shape, generator=g) for c in cache)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae  # registers the weights with the exported program

        def forward(self, x, *cache):
            out, new_cache = step(x, cache, first_chunk=False)
            return (out, *new_cache)

    with torch.no_grad():
        program = torch.export.export(Step(), (x, *cache))
        got, expect = program.module()(x, *cache), Step()(x, *cache)
    assert len(got) == len(expect) == 1 + len(cache)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, expect))
