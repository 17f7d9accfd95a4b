"""Put the Triton kernels into an eager model, from outside it (the model files stay pure).

`install(model)` swaps the DiT's attention for the fused 3D-RoPE flash attention (`set_ops`)
and every VAE causal conv that fits the conv-cache kernel (stride 1, causal time padding of
kt-1 frames, same padding in space) for `causal_conv3d`. The strided downsample time convs of
the VAE encoder keep the PyTorch op. Returns how many modules were changed.
"""

from __future__ import annotations

from torch import Tensor, nn


def _fits(conv) -> bool:
    kt, kh, kw = conv.weight.shape[2:]
    pt, ph, pw = conv.causal_padding
    return tuple(conv.stride) == (1, 1, 1) and 2 * pt == kt - 1 and ph == kh // 2 and pw == kw // 2 \
        and kh % 2 == 1 and kw % 2 == 1


def _triton_conv(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor | None,
                 padding: tuple[int, int, int], stride) -> Tensor:
    from wan_rt.kernels.causal_conv import causal_conv3d

    kt = weight.shape[2]
    if kt == 1:
        cache = None
    elif cache is not None and cache.shape[2] != kt - 1:  # a short cache: the reference handles it
        from wan_rt.models.vae_blocks import causal_conv3d as reference

        return reference(x, weight, bias, cache, padding, stride)
    return causal_conv3d(x, weight, bias, cache)[0]


def install(model: nn.Module) -> int:
    from wan_rt.kernels import TRITON_OPS
    from wan_rt.models.ops import set_ops
    from wan_rt.models.vae_blocks import CausalConv3d

    changed = sum(1 for m in model.modules() if hasattr(m, "ops"))
    set_ops(model, TRITON_OPS)
    for m in model.modules():
        if isinstance(m, CausalConv3d) and _fits(m):
            m.conv_op = _triton_conv
            changed += 1
    return changed
