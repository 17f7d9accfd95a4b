"""Wan 2.1 and 2.2 VAE as one pure nn.Module, with the causal frame cache held in explicit tensors.

Mirrors diffusers `models/autoencoders/autoencoder_kl_wan.py` (AutoencoderKLWan, WanEncoder3d,
WanDecoder3d, patchify/unpatchify), itself a port of Wan2.2 `wan/modules/vae2_1.py` /
`vae2_2.py`. Parameter names equal AutoencoderKLWan's state_dict keys, so a diffusers `vae/`
checkpoint loads with `load_state_dict(strict=True)`. Blocks are in `vae_blocks.py`.

Streaming (spec 4.4): the encoder runs frame 0, then chunks of `stride_t` (4) frames, each giving
one latent frame; the decoder runs one latent frame per chunk, giving 1, 4, 4, ... frames.
`encode_chunk` / `decode_chunk` are pure functions of (input, cache tuple, first_chunk) that return
the new cache tuple; the cache slot shapes depend only on the batch and spatial size, so a
steady-state chunk has static I/O shapes (ONNX / TensorRT graph inputs and outputs). `first_chunk`
is a Python bool: one graph for the first chunk, one for every later chunk. Zero caches stand in
for the official "no cache yet" and "Rep" states, so the second decoder chunk needs no third graph.

Latent normalisation lives here: `encode` returns (mu - mean) / std and `decode` takes that form.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from wan_rt.config import VAEConfig
from wan_rt.models.vae_blocks import (
    CACHE_T, CausalConv3d, MidBlock, Resample, ResidualBlock, ResidualDownBlock, RMSNorm, Shape,
    UpBlock, blocks_cache_shapes, causal_conv3d, roll_cache, run_blocks,
)

__all__ = ["WanVAE", "causal_conv3d", "patchify", "unpatchify", "CACHE_T"]


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, F, H*p, W*p] -> [B, C*p*p, F, H, W]; channel = c*p*p + r*p + q (r: width offset)."""
    if p == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, f, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), f, h * p, w * p)


class Encoder(nn.Module):
    """conv_in -> down stages -> mid -> RMS/SiLU/conv_out; outputs 2*z_dim channels (mu, logvar).
    Slots: conv_in input, the stages' and mid block's slots, conv_out input."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.in_channels = 3 * cfg.patch_size ** 2
        self.conv_in = CausalConv3d(self.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = cfg.temporal_downsample[i] if i != last else False
            if cfg.version == "2.2":
                blocks.append(ResidualDownBlock(d_in, d_out, cfg.num_res_blocks, temporal, down=i != last))
                continue
            for j in range(cfg.num_res_blocks):  # 2.1: one flat list of blocks
                blocks.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i != last:
                blocks.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)
        self.out_dim = dims[-1]
        self.num_slots = 2 + sum(m.num_slots for m in self._chain())

    def _chain(self) -> list[nn.Module]:
        return [*self.down_blocks, self.mid_block]

    def cache_shapes(self, h: int, w: int) -> list[Shape]:
        shapes, h2, w2 = blocks_cache_shapes(self._chain(), h, w)
        return [(self.in_channels, CACHE_T, h, w), *shapes, (self.out_dim, CACHE_T, h2, w2)]

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        c_in = roll_cache(cache[0], x)
        x = self.conv_in(x, cache[0])
        x, c_mid = run_blocks(self._chain(), x, cache[1:-1], first_chunk)
        x = F.silu(self.norm_out(x))
        c_out = roll_cache(cache[-1], x)
        return self.conv_out(x, cache[-1]), (c_in, *c_mid, c_out)


class Decoder(nn.Module):
    """conv_in -> mid -> up stages -> RMS/SiLU/conv_out. Slots in that execution order."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        last = len(mult) - 1
        residual = cfg.version == "2.2"
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not residual:
                d_in //= 2  # the 2.1 resampler before this stage halved the width
            mode = None if i == last else ("upsample3d" if temporal_up[i] else "upsample2d")
            blocks.append(UpBlock(d_in, d_out, cfg.num_res_blocks, mode, residual))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3 * cfg.patch_size ** 2, 3, padding=1)
        self.z_dim, self.out_dim = cfg.z_dim, dims[-1]
        self.num_slots = 2 + sum(m.num_slots for m in self._chain())

    def _chain(self) -> list[nn.Module]:
        return [self.mid_block, *self.up_blocks]

    def cache_shapes(self, h: int, w: int) -> list[Shape]:
        shapes, h2, w2 = blocks_cache_shapes(self._chain(), h, w)
        return [(self.z_dim, CACHE_T, h, w), *shapes, (self.out_dim, CACHE_T, h2, w2)]

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        c_in = roll_cache(cache[0], x)
        x = self.conv_in(x, cache[0])
        x, c_mid = run_blocks(self._chain(), x, cache[1:-1], first_chunk)
        x = F.silu(self.norm_out(x))
        c_out = roll_cache(cache[-1], x)
        return self.conv_out(x, cache[-1]), (c_in, *c_mid, c_out)


class WanVAE(nn.Module):
    """Wan 2.1 (z 16, /4 x /8 x /8) or 2.2 (z 48, /4 x /16 x /16) VAE, chosen by `config.version`.

    Caches are tuples of tensors, one per slot (see `encoder_cache_shapes` /
    `decoder_cache_shapes` for the per-slot [C, T, H, W]; batch is dim 0). Start every stream from
    `init_*_cache` zeros with `first_chunk=True`, then feed each returned cache to the next chunk.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder(config)
        # Not in diffusers' state_dict (it keeps them in config.json), hence non-persistent.
        stats = dict(dtype=torch.float32)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, **stats).view(1, z, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, **stats).view(1, z, 1, 1, 1),
                             persistent=False)

    # ---- cache layout -------------------------------------------------------------------------

    def encoder_cache_shapes(self, height: int, width: int) -> list[Shape]:
        """[C, T, H, W] per encoder slot for a `height` x `width` pixel video."""
        p = self.config.patch_size
        return self.encoder.cache_shapes(height // p, width // p)

    def decoder_cache_shapes(self, latent_h: int, latent_w: int) -> list[Shape]:
        """[C, T, H, W] per decoder slot for a `latent_h` x `latent_w` latent."""
        return self.decoder.cache_shapes(latent_h, latent_w)

    def init_encoder_cache(self, batch: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        return tuple(torch.zeros(batch, *s, dtype=dtype, device=device)
                     for s in self.encoder_cache_shapes(height, width))

    def init_decoder_cache(self, batch: int, latent_h: int, latent_w: int, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        return tuple(torch.zeros(batch, *s, dtype=dtype, device=device)
                     for s in self.decoder_cache_shapes(latent_h, latent_w))

    # ---- one chunk ------------------------------------------------------------------------------

    def encode_chunk(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool
                     ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """x: [B, 3, T, H, W] in [-1, 1]; T = 1 on the first chunk, else a multiple of stride_t (4).
        Returns normalised latents [B, z_dim, T // stride_t or 1, H/s, W/s] and the new cache."""
        t = x.shape[2]
        assert (t == 1) if first_chunk else (t % self.config.stride[0] == 0), (t, first_chunk)
        assert len(cache) == self.encoder.num_slots, (len(cache), self.encoder.num_slots)
        h, new_cache = self.encoder(patchify(x, self.config.patch_size), cache, first_chunk)
        mu = self.quant_conv(h)[:, :self.config.z_dim]  # 1x1x1, so per chunk == on the whole video
        return (mu - self.latents_mean.to(mu.dtype)) / self.latents_std.to(mu.dtype), new_cache

    def decode_chunk(self, z: Tensor, cache: Sequence[Tensor], first_chunk: bool
                     ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """z: normalised latents [B, z_dim, T, h, w]; T = 1 on the first chunk (Wan streams T = 1
        throughout). Returns video [B, 3, 1 or 4*T, h*s, w*s] clamped to [-1, 1] and the new cache."""
        assert z.shape[2] == 1 or not first_chunk, z.shape
        assert len(cache) == self.decoder.num_slots, (len(cache), self.decoder.num_slots)
        z = z * self.latents_std.to(z.dtype) + self.latents_mean.to(z.dtype)
        x, new_cache = self.decoder(self.post_quant_conv(z), cache, first_chunk)
        return unpatchify(x, self.config.patch_size).clamp(-1.0, 1.0), new_cache

    # ---- whole videos -------------------------------------------------------------------------

    def encode(self, video: Tensor) -> Tensor:
        """video: [B, 3, F, H, W] in [-1, 1], F = 1 + 4k -> normalised mean [B, z, 1 + k, H/s, W/s]."""
        b, _, f, h, w = video.shape
        st, sh, sw = self.config.stride
        if (f - 1) % st or h % sh or w % sw:
            raise ValueError(f"video {tuple(video.shape)}: need F = 1 + {st}k and H, W multiples of {sh}")
        cache = self.init_encoder_cache(b, h, w, video.dtype, video.device)
        chunks = [video[:, :, i:i + st] for i in range(1, f, st)]  # frame 0 alone, then st frames
        chunks.insert(0, video[:, :, :1])
        out = []
        for i, chunk in enumerate(chunks):
            z, cache = self.encode_chunk(chunk, cache, first_chunk=i == 0)
            out.append(z)
        return torch.cat(out, dim=2)

    def decode(self, latents: Tensor) -> Tensor:
        """latents: normalised [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), h*s, w*s] in [-1, 1]."""
        b, _, t, h, w = latents.shape
        cache = self.init_decoder_cache(b, h, w, latents.dtype, latents.device)
        out = []
        for i in range(t):
            x, cache = self.decode_chunk(latents[:, :, i:i + 1], cache, first_chunk=i == 0)
            out.append(x)
        return torch.cat(out, dim=2)
