"""GGUF block dequantization in torch, on the blocks' own device: a GPU dequantizes a layer's
weight where it lives instead of a host round trip through numpy.

Line-for-line ports of gguf-py's numpy `dequantize_blocks` (gguf/quants.py, the llama.cpp
reference layouts): same bit unpacking, same float32 arithmetic, so the results are identical
(tests/test_gguf.py). `blocks` is uint8 [n_blocks, bytes per block]; the result float32
[n_blocks, values per block]. Types not here are dequantized by gguf's numpy code.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

QK_K = 256


def _f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()


def _shifts(values: list[int], device, shape: tuple[int, ...]) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def q8_0(blocks: Tensor) -> Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks[:, :2])


def q2_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    scales, qs, d, dmin = blocks[:, :16], blocks[:, 16:80], _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device, (1, 1, 4, 1))) & 3
    return (dl * q.reshape(n, QK_K // 16, 16).float() - ml).reshape(n, -1)


def q3_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    hmask, qs, scales, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], blocks.device, (1, 2, 1))).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], blocks.device, (1, 4, 1))).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).view(torch.int8).float() - 32  # 6-bit, offset 32
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device, (1, 1, 4, 1))).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), blocks.device, (1, 1, 8, 1))).reshape(n, 16, 16) & 1
    q = ql.float() - ((qh ^ 1) << 2).float()  # the offset 4 applies where the high bit is 0
    return (dl * q).reshape(n, QK_K)


def _scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes."""
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def q4_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    d, dmin, (sc, mn), qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), _scale_min(blocks[:, 4:16]), blocks[:, 16:]
    q = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 4], blocks.device, (1, 1, 2, 1))) & 0x0F
    return ((d * sc).reshape(n, -1, 1) * q.reshape(n, -1, 32).float() - (dmin * mn).reshape(n, -1, 1)).reshape(n, QK_K)


def q5_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    d, dmin, (sc, mn) = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), _scale_min(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = ((qs.reshape(n, -1, 1, 32) >> _shifts([0, 4], blocks.device, (1, 1, 2, 1))) & 0x0F).reshape(n, -1, 32)
    qh = ((qh.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), blocks.device, (1, 1, 8, 1))) & 1).reshape(n, -1, 32)
    q = (ql | (qh << 4)).float()
    return ((d * sc).reshape(n, -1, 1) * q - (dmin * mn).reshape(n, -1, 1)).reshape(n, QK_K)


def q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    ql = ((ql.reshape(n, -1, 1, 64) >> _shifts([0, 4], blocks.device, (1, 1, 2, 1))) & 0x0F).reshape(n, -1, 32)
    qh = ((qh.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device, (1, 1, 4, 1))) & 0x03).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).view(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


TORCH_DEQUANTIZE: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": q8_0, "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
