"""Building blocks of the Wan 2.1 / 2.2 VAE, with the causal frame cache passed explicitly.

Mirrors diffusers `models/autoencoders/autoencoder_kl_wan.py` (WanCausalConv3d, WanRMS_norm,
WanResample, WanResidualBlock, WanAttentionBlock, WanMidBlock, AvgDown3D, DupUp3D, the residual
down/up blocks) and Wan2.2 `wan/modules/vae2_1.py`, `vae2_2.py`. Submodule and parameter names are
diffusers' so a `vae/` checkpoint loads strictly.

Cache protocol (replaces diffusers' `feat_cache` list + `feat_idx=[0]` counter + "Rep" sentinel):
every block that owns cache slots has `num_slots` and
    forward(x, cache: tuple[Tensor, ...], first_chunk: bool) -> (x, new_cache)
    cache_shapes(h, w) -> ([(C, T, H, W) per slot], h_out, w_out)
where `cache` holds exactly its own `num_slots` tensors, in execution order. Slots of a 3x3x3 conv
hold the last CACHE_T=2 frames of that conv's input; a zero slot is the same as the causal zero
padding, which is why zero initial caches reproduce the first chunk (and the decoder's 'Rep' chunk).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

CACHE_T = 2  # frames a 3-tap causal conv needs from the past
Shape = tuple[int, int, int, int]  # (channels, frames, height, width) of one cache slot, no batch


def causal_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor | None,
                  padding: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)) -> Tensor:
    """Conv3d that is causal in time and 'same'-padded in space. Pure-torch reference op; a fast
    kernel with this signature can be set per module as `CausalConv3d.conv_op`.

    x: [B, Cin, T, H, W]; weight: [Cout, Cin, kT, kH, kW]; padding (pT, pH, pW) as nn.Conv3d's.
    Time is laid out as [zeros, cache, x]: `cache` ([B, Cin, n, H, W], x's dtype) is prepended and
    max(0, 2*pT - n) zero frames go before it; H and W get pH / pW zeros on both sides.
    Every cached stride-1 conv in Wan has padding (k-1)/2 and a 2-frame cache, i.e. exactly
    `kernels.causal_conv3d(x, weight, bias, cache)[0]`; only the encoder's stride-2 `time_conv`
    (1-frame cache, no padding) needs the general form.
    """
    p_t, p_h, p_w = padding
    zeros_t = 2 * p_t
    if cache is not None:
        x = torch.cat([cache, x], dim=2)
        zeros_t = max(0, zeros_t - cache.shape[2])
    x = F.pad(x, (p_w, p_w, p_h, p_h, zeros_t, 0))
    return F.conv3d(x, weight, bias, stride)


def roll_cache(cache: Tensor, x: Tensor) -> Tensor:
    """The last CACHE_T frames of [cache, x]: the slot value for the next chunk."""
    t = x.shape[2]
    if t >= CACHE_T:
        # Copy, so the slot does not pin the whole activation `x` in memory.
        return x[:, :, -CACHE_T:].contiguous()
    return torch.cat([cache[:, :, t:], x], dim=2)


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, cache: Sequence[Tensor],
               first_chunk: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Thread `x` through cached blocks, handing each its own slice of `cache`."""
    new: list[Tensor] = []
    for block in blocks:
        n = block.num_slots
        x, c = block(x, tuple(cache[len(new):len(new) + n]), first_chunk)
        new.extend(c)
    assert len(new) == len(cache), (len(new), len(cache))
    return x, tuple(new)


def blocks_cache_shapes(blocks: Sequence[nn.Module], h: int, w: int) -> tuple[list[Shape], int, int]:
    shapes: list[Shape] = []
    for block in blocks:
        s, h, w = block.cache_shapes(h, w)
        shapes += s
    return shapes, h, w


class CausalConv3d(nn.Conv3d):
    """nn.Conv3d whose padding is done by `causal_conv3d` (so weights keep nn.Conv3d's names)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        p = padding if isinstance(padding, tuple) else (padding,) * 3
        self.causal_padding: tuple[int, int, int] = p
        self.conv_op = causal_conv3d

    def forward(self, x: Tensor, cache: Tensor | None = None) -> Tensor:
        return self.conv_op(x, self.weight, self.bias, cache, self.causal_padding, self.stride)


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) * gamma. No bias, no mean-square eps."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        # gamma is [C,1,1] for per-frame 2-D use (attention) and [C,1,1,1] for 5-D tensors.
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise low-precision inputs in fp32, as diffusers does.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 shortcut when widths differ.
    Slots: conv1's input (in_dim), conv2's input (out_dim)."""

    num_slots = 2

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def cache_shapes(self, h: int, w: int) -> tuple[list[Shape], int, int]:
        return [(self.in_dim, CACHE_T, h, w), (self.out_dim, CACHE_T, h, w)], h, w

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        shortcut = self.conv_shortcut(x)
        x = F.silu(self.norm1(x))
        c1 = roll_cache(cache[0], x)
        x = self.conv1(x, cache[0])
        x = F.silu(self.norm2(x))  # (dropout is 0 at inference)
        c2 = roll_cache(cache[1], x)
        x = self.conv2(x, cache[1])
        return x + shortcut, (c1, c2)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention, run per frame (tokens = H*W, head dim = C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # Swappable from outside, like CausalConv3d.conv_op: a decode split by height
        # (wan_rt.parallel.vae) attends local queries to every rank's keys and values.
        self.attention_op = F.scaled_dot_product_attention

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 3 * c, h * w).transpose(1, 2)  # [bt, hw, 3c]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [bt, 1, hw, c]
        y = self.attention_op(q, k, v)
        # The reshape is a channels-last view; made contiguous because torch.export's conv meta
        # picks a memory format by asking `b*t > 1`, which fixes a dynamic batch (AOTInductor).
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w).contiguous())
        return x + y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class MidBlock(nn.Module):
    """[Res, Attn, Res] at the lowest resolution."""

    num_slots = 2 * ResidualBlock.num_slots

    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def cache_shapes(self, h: int, w: int) -> tuple[list[Shape], int, int]:
        return blocks_cache_shapes(self.resnets, h, w)

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        x, c0 = self.resnets[0](x, cache[:2], first_chunk)
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, cache[2:], first_chunk)
        return x, c0 + c1


class Resample(nn.Module):
    """Spatial x2 / /2 per frame, optionally with a temporal x2 / /2 `time_conv`.

    Cache (one slot for the 3-D modes):
    - upsample3d: time_conv's input, 2 frames. The first chunk skips time upsampling (1 latent
      frame -> 1 frame) and leaves the slot zero, which is exactly diffusers' 'Rep' case: the
      second chunk then runs time_conv with causal zero padding.
    - downsample3d: the last spatially downsampled frame, 1 frame. The first chunk (1 frame) skips
      the stride-2 time conv; later chunks convolve [cached frame, x] with no padding.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.dim, self.mode = dim, mode
        out_dim = dim // 2 if out_dim is None else out_dim  # 2.1 halves width here; 2.2 passes dim
        if mode in ("upsample2d", "upsample3d"):
            # For an exact x2 factor every nearest mode copies pixel i//2, in any dtype, so plain
            # "nearest" equals diffusers' "nearest-exact" here; it is also the mode the TorchScript
            # ONNX exporter (and TensorRT's Resize) supports.
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
                                          nn.Conv2d(dim, out_dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        self.num_slots = 1 if mode.endswith("3d") else 0

    def cache_shapes(self, h: int, w: int) -> tuple[list[Shape], int, int]:
        if self.mode.startswith("up"):
            return ([(self.dim, CACHE_T, h, w)] if self.mode == "upsample3d" else []), 2 * h, 2 * w
        return ([(self.dim, 1, h // 2, w // 2)] if self.mode == "downsample3d" else []), h // 2, w // 2

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        new: tuple[Tensor, ...] = ()
        if self.mode == "upsample3d":
            if first_chunk:
                new = (torch.zeros_like(cache[0]),)
            else:
                new = (roll_cache(cache[0], x),)
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache[0])
                # Channels [0:C] and [C:2C] are frames 2i and 2i+1.
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            # clone, not .contiguous(): the latter's stride check on this permuted view asks
            # `B != 1` under torch.export and fixes a dynamic batch (same values either way).
            new = (x[:, :, -1:].clone(memory_format=torch.contiguous_format),)
            if not first_chunk:
                x = self.time_conv(x, cache[0])  # time = [cached frame, x], stride 2, no zeros
        return x, new


class AvgDown3D(nn.Module):
    """Parameter-free 2.2 shortcut: fold a (ft, fs, fs) sub-grid into channels, average groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        assert in_dim * factor_t * factor_s ** 2 % out_dim == 0
        self.group = in_dim * factor_t * factor_s ** 2 // out_dim

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))  # left-pad time to a multiple of ft
        # x may have a resampler's permuted strides; a view of it makes torch.export ask `B != 1`
        # and fix a dynamic batch, so copy to contiguous first (same values).
        x = x.clone(memory_format=torch.contiguous_format)
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free 2.2 shortcut: repeat channels, unfold them into a (ft, fs, fs) sub-grid.
    On the first chunk the first ft-1 frames are dropped (1 latent frame -> 1 frame)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        assert out_dim * factor_t * factor_s ** 2 % in_dim == 0
        self.repeats = out_dim * factor_t * factor_s ** 2 // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        ft, fs = self.ft, self.fs
        b, c, t, h, w = x.shape
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)  # == repeat_interleave on channels
        x = x.reshape(b, self.out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """2.2 encoder stage: [Res x n, Resample?](x) + AvgDown3D(x)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks))
        self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d") if down else None
        self.num_slots = sum(m.num_slots for m in self._chain())

    def _chain(self) -> list[nn.Module]:
        return [*self.resnets] + ([self.downsampler] if self.downsampler is not None else [])

    def cache_shapes(self, h: int, w: int) -> tuple[list[Shape], int, int]:
        return blocks_cache_shapes(self._chain(), h, w)

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        y, new = run_blocks(self._chain(), x, cache, first_chunk)
        return y + self.avg_shortcut(x), new


class UpBlock(nn.Module):
    """Decoder stage: [Res x (n+1), Resample?]. 2.1 (`residual=False`) keeps the resampler in
    `upsamplers[0]` and halves the width there; 2.2 names it `upsampler`, keeps the width and adds
    a DupUp3D shortcut of the stage input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, residual: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1))
        resample = None if mode is None else Resample(out_dim, mode, out_dim if residual else None)
        self.residual = residual
        self.avg_shortcut = None
        if residual:
            self.upsampler = resample
            if resample is not None:
                self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if mode == "upsample3d" else 1, 2)
        else:
            self.upsamplers = None if resample is None else nn.ModuleList([resample])
        self.num_slots = sum(m.num_slots for m in self._chain())

    def _chain(self) -> list[nn.Module]:
        if self.residual:
            resample = self.upsampler
        else:
            resample = self.upsamplers[0] if self.upsamplers is not None else None
        return [*self.resnets] + ([resample] if resample is not None else [])

    def cache_shapes(self, h: int, w: int) -> tuple[list[Shape], int, int]:
        return blocks_cache_shapes(self._chain(), h, w)

    def forward(self, x: Tensor, cache: Sequence[Tensor], first_chunk: bool):
        y, new = run_blocks(self._chain(), x, cache, first_chunk)
        if self.avg_shortcut is not None:
            y = y + self.avg_shortcut(x, first_chunk)
        return y, new
