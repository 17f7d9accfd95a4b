"""Triton kernels for wan_rt (installed as `wan_rt.kernels`; import it only under that name).

Public API (each also registered as a torch custom op `torch.ops.wan_rt.<name>` with a fake
implementation, so torch.compile / torch.export / AOTInductor trace it as one node):

* `rope3d_attention(q, k, v, cos, sin, *, scale=None, quant=None)`: fused 3D-RoPE flash
  attention (bf16 / fp16 / fp32; `quant="int8"` for SageAttention-style int8 q·kᵀ).
* `attention(q, k, v, *, scale=None)`: the same kernel without RoPE (text cross-attention).
* `causal_conv3d(x, weight, bias=None, cache=None) -> (y, new_cache)`: VAE causal conv.
* `rmsnorm_rope(x, weight, cos, sin, eps)`, `layernorm_modulate(x, shift, scale, eps)`.
* `TRITON_OPS`: a `wan_rt.models.ops.Ops` for `set_ops(model, TRITON_OPS)` (attention, and the
  blocks' LayerNorm + modulation through `layernorm_modulate`).
* `install(model)`: put the kernels into an eager DiT or VAE from outside (kernels/integrate.py).
* `*_ref`: the pure-torch references the tests compare against.

Modules: rope3d_attn.py, causal_conv.py, fused_norms.py (kernel + wrapper + custom op + `_ref`
each), trt_plugin.py (TensorRT plugin form, never run here). Module names differ from the function
names on purpose: `import wan_rt.kernels.causal_conv3d` would otherwise rebind the package
attribute `causal_conv3d` from the function to the module.

Importing this package needs neither triton nor a GPU: names resolve lazily on first access
(PEP 562), and only then is triton imported. Kernel modules decide between compiled and
interpreted kernels when first imported (TRITON_INTERPRET=1 runs them on the CPU).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

_EXPORTS = {
    "install": "integrate",
    "rope3d_attention": "rope3d_attn",
    "rope3d_attention_ref": "rope3d_attn",
    "attention": "rope3d_attn",
    "attention_ref": "rope3d_attn",
    "apply_rope_ref": "rope3d_attn",
    "causal_conv3d": "causal_conv",
    "causal_conv3d_ref": "causal_conv",
    "rmsnorm_rope": "fused_norms",
    "rmsnorm_rope_ref": "fused_norms",
    "layernorm_modulate": "fused_norms",
    "layernorm_modulate_ref": "fused_norms",
}

__all__ = [*_EXPORTS, "TRITON_OPS"]


def _import(module: str) -> Any:
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] == "triton":
            raise ImportError(
                "wan_rt.kernels needs Triton: pip install 'wan-rt[triton]'"
            ) from e
        raise


def _ops_layernorm_modulate(kernel: Any, x: Any, shift: Any, scale: Any, norm: Any) -> Any:
    """`Ops.layernorm_modulate` on the fused kernel (`norm` is the block's LayerNorm without
    affine; the kernel takes its eps). The model's shift/scale are [B, n, C] with row i covering
    the i-th run of L/n tokens (n = latent frames for TI2V); the kernel takes [B, 1, C], so each
    run becomes its own batch row (views, no copies)."""
    assert norm.weight is None and norm.bias is None, "the fused kernel is LayerNorm without affine"
    B, L, C = x.shape
    n = shift.shape[1]
    if n == 1:
        return kernel(x, shift, scale, norm.eps)
    y = kernel(x.reshape(B * n, L // n, C), shift.reshape(B * n, 1, C), scale.reshape(B * n, 1, C), norm.eps)
    return y.reshape(B, L, C)


def __getattr__(name: str) -> Any:
    if name == "TRITON_OPS":
        from wan_rt.models.ops import Ops

        mod = _import("rope3d_attn")  # fails here, with the message above, without triton
        norms = _import("fused_norms")
        ops = Ops(rope_attention=mod.rope3d_attention, attention=mod.attention,
                  layernorm_modulate=functools.partial(_ops_layernorm_modulate, norms.layernorm_modulate))
        globals()["TRITON_OPS"] = ops
        return ops
    if name in _EXPORTS:
        value = getattr(_import(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
