"""The VAE decode split by height over the ranks, equal to the single-device decode.

Rank i decodes latent rows [start_i, start_i + n_i) of every frame. Nothing in the decoder mixes
rows except (a) its 'same'-padded spatial convolutions and (b) the mid block's spatial
self-attention; norms, nearest upsampling, the 2.2 pixel shuffles and the causal time axis are
per row. So, applied to the decoder from outside (the model stays pure):

(a) before each spatial conv, every rank swaps its edge rows with its neighbours (a halo of
    kernel//2 rows; zeros at the image's top and bottom, exactly the conv's zero padding) and the
    conv runs without height padding. The causal cache holds each rank's own rows; its frames get
    the same halo in the same exchange. (`CausalConv3d.conv_op`; the upsamplers' nn.Conv2d
    through its padding and a pre-hook.)
(b) the attention gathers every rank's keys and values (`AttentionBlock.attention_op`), at the
    lowest resolution, where they are smallest.

The frames are then all-gathered by rows, so every rank returns the whole video. A latent with
fewer rows than ranks is decoded whole on every rank. Engine VAEs (ONNX Runtime, AOTInductor)
cannot take the exchanges inside their graphs: they decode whole on every rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_rt.models.vae import WanVAE
from wan_rt.models.vae_blocks import AttentionBlock, CausalConv3d, Resample, causal_conv3d
from wan_rt.parallel import comm
from wan_rt.parallel.wrap import ComponentWrapper


def split_rows(rows: int, parts: int) -> list[int]:
    """Rows per rank, as even as possible (the first ranks take the remainder)."""
    return [rows // parts + (i < rows % parts) for i in range(parts)]


class HaloRows:
    """This rank's place in a height split, while one is running (else every pad is zeros)."""

    def __init__(self, group, ranks: Sequence[int], index: int):
        self.group, self.ranks, self.index = group, list(ranks), index
        self.sizes: Optional[list[int]] = None  # latent rows per rank during a split decode

    def pad(self, x: Tensor, rows: int, dim: int) -> Tensor:
        """x with `rows` rows of each neighbour (zeros past the image's edges) on both sides of `dim`."""
        shape = list(x.shape)
        shape[dim] = rows
        top, bottom = x.new_zeros(shape), x.new_zeros(shape)
        if self.sizes is not None:
            sends, recvs = [], []
            i = self.index
            if i > 0:
                sends.append((x.narrow(dim, 0, rows), self.ranks[i - 1]))
                recvs.append((top, self.ranks[i - 1]))
            if i < len(self.ranks) - 1:
                sends.append((x.narrow(dim, x.shape[dim] - rows, rows), self.ranks[i + 1]))
                recvs.append((bottom, self.ranks[i + 1]))
            comm.exchange(sends, recvs, "vae_halo").wait()
        return torch.cat([top, x, bottom], dim)

    def gather_keys(self, t: Tensor, local_rows: int) -> Tensor:
        """[N, 1, rows·W, C] attention keys or values of the local rows -> every rank's, in order."""
        if self.sizes is None:
            return t
        scale = local_rows // self.sizes[self.index]  # same resolution factor on every rank
        width = t.shape[2] // local_rows
        return comm.all_gather_uneven(t, 2, [n * scale * width for n in self.sizes], self.group, "vae_attention_kv")


def _halo_conv3d(halo: HaloRows, fallback):
    def op(x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: Optional[Tensor],
           padding: tuple[int, int, int], stride) -> Tensor:
        p_t, p_h, p_w = padding
        if p_h == 0:
            return fallback(x, weight, bias, cache, padding, stride)
        if cache is None:
            x = halo.pad(x, p_h, 3)
        else:  # one exchange for the cached frames and the new ones
            both = halo.pad(torch.cat([cache, x], 2), p_h, 3)
            cache, x = both.split([cache.shape[2], x.shape[2]], 2)
        return causal_conv3d(x, weight, bias, cache, (p_t, 0, p_w), stride)

    return op


def _gathered_attention(halo: HaloRows, block: AttentionBlock):
    def op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rows = getattr(block, "_local_rows")
        return F.scaled_dot_product_attention(q, halo.gather_keys(k, rows), halo.gather_keys(v, rows))

    return op


def _record_rows(block: nn.Module, args) -> None:
    block._local_rows = args[0].shape[3]  # [B, C, T, rows, W]: for the key gather's sizes


def install_height_split(decoder: nn.Module, halo: HaloRows) -> None:
    """Make a VAE decoder (WanVAE.decoder) exchange halos and gather attention keys, in place."""
    for module in decoder.modules():
        if isinstance(module, CausalConv3d):
            module.conv_op = _halo_conv3d(halo, module.conv_op)
        elif isinstance(module, AttentionBlock):
            module.register_forward_pre_hook(_record_rows)
            module.attention_op = _gathered_attention(halo, module)
        elif isinstance(module, Resample) and module.mode.startswith("upsample"):
            conv = module.resample[1]
            assert isinstance(conv, nn.Conv2d) and isinstance(conv.padding, tuple)
            pad_h, pad_w = conv.padding
            conv.padding = (0, pad_w)
            conv.register_forward_pre_hook(lambda _m, args, p=pad_h: (halo.pad(args[0], p, 2),))


class HeightSplitVAEDecoder(ComponentWrapper):
    """vae_decoder (an eager component over `vae`) with the decode split by height over `group`."""

    def __init__(self, inner, vae: WanVAE, group, ranks: Sequence[int], index: int):
        super().__init__(inner)
        self.halo = HaloRows(group, ranks, index)
        self.row_stride = int(vae.config.stride[1])
        install_height_split(vae.decoder, self.halo)

    def __call__(self, *, latents: Tensor) -> dict[str, Tensor]:
        parts = len(self.halo.ranks)
        rows = latents.shape[3]
        if rows < parts:
            return self.inner(latents=latents)
        sizes = split_rows(rows, parts)
        start = sum(sizes[:self.halo.index])
        self.halo.sizes = sizes
        try:
            video = self.inner(latents=latents[:, :, :, start:start + sizes[self.halo.index]])["video"]
        finally:
            self.halo.sizes = None
        pixel_rows = [n * self.row_stride for n in sizes]
        return {"video": comm.all_gather_uneven(video, 3, pixel_rows, self.halo.group, "vae_frames_gather")}
