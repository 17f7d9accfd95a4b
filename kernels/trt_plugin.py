"""TensorRT plugin form of the wan_rt kernels, for the DiT / VAE engines (TensorRT ≥ 10.6 QDP API).

**This module has never run.** TensorRT cannot be installed on any machine this project has had
(no wheel installs without a CUDA runtime here); the file has only been type-checked with mypy
against `tensorrt-stubs` 10.13 (tests/kernels/test_trt_plugin.py). Those stubs do not ship the
`tensorrt.plugin` namespace ("quickly deployable plugins": `@trtp.register`, `@trtp.impl`,
`@trtp.autotune`, `trtp.op`), so everything touching `trtp` is typed `Any` and mypy cannot check
it; it is written against NVIDIA's documented API ("Writing custom operators with TensorRT Python
plugins", tensorrt.plugin.register / impl / autotune). The network helpers at the bottom use
`INetworkDefinition.add_plugin`, which the stubs do cover.

Form: JIT plugins. `@trtp.register` describes the outputs from the inputs' shape expressions;
`@trtp.impl` wraps TensorRT's device buffers as torch tensors and launches the same Triton
kernels as the torch custom ops, on TensorRT's stream, straight into TensorRT's output buffer.
An engine built this way needs Python (and these kernels) at run time; an AOT form
(`@trtp.aot_impl` returning the Triton kernel compiled to PTX plus launch parameters) would not,
and is the next step once a GPU with TensorRT is available to check it.

Plugins (namespace `wan_rt`), mirroring the custom ops of the same names:
* `wan_rt::rope3d_attention(q, k, v, cos, sin; scale: float, quant: str) -> out`
* `wan_rt::attention(q, k, v; scale: float) -> out`
* `wan_rt::causal_conv3d(x, weight, bias, cache) -> (y, new_cache)`: bias and cache are required
  (TensorRT plugin inputs cannot be optional): pass zeros for "no bias" / the first chunk, which
  is exactly the no-cache semantics.
"""

# No `from __future__ import annotations` here: TensorRT's decorators read the registered
# functions' annotations as objects (trtp.TensorDesc, float, str), not strings.

from typing import TYPE_CHECKING, Any, Tuple

if TYPE_CHECKING:
    import tensorrt as trt

# Guarded import. mypy sees tensorrt-stubs, which have no `plugin` module: the ignore makes
# `trtp` (and every `trtp.X` annotation below) Any, i.e. unchecked.
try:
    import tensorrt.plugin as trtp  # type: ignore[import-not-found, import-untyped, unused-ignore]

    HAVE_TRT_PLUGIN = True
except (ImportError, OSError):  # no TensorRT, or one without its CUDA libraries
    HAVE_TRT_PLUGIN = False

PLUGIN_NAMESPACE = "wan_rt"
_registered = False


def register_plugins() -> None:
    """Register the wan_rt plugins with TensorRT's plugin registry (idempotent)."""
    global _registered
    if _registered:
        return
    if not HAVE_TRT_PLUGIN:
        raise ImportError(
            "wan_rt.kernels.trt_plugin needs TensorRT >= 10.6 with its Python plugin API "
            "(`pip install tensorrt`) on a CUDA machine"
        )
    import torch

    # ---- rope3d_attention ---------------------------------------------------------------------
    @trtp.register("wan_rt::rope3d_attention")
    def _rope3d_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                               cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                               scale: float, quant: str) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune("wan_rt::rope3d_attention")
    def _rope3d_attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                                   cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                                   outputs: Tuple[trtp.TensorDesc]) -> list[Any]:
        # q, k, v, out share one of bf16 / fp16 / fp32; the RoPE tables are always fp32
        return [trtp.AutoTuneCombination("BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32, FP32, FP32, "
                                         "BF16|FP16|FP32", "LINEAR")]

    @trtp.impl("wan_rt::rope3d_attention")
    def _rope3d_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, cos: trtp.Tensor,
                               sin: trtp.Tensor, scale: float, quant: str,
                               outputs: Tuple[trtp.Tensor], stream: int) -> None:
        from .rope3d_attn import _launch_attention

        tq, tk, tv, tc, ts, out = (torch.as_tensor(t, device="cuda") for t in (q, k, v, cos, sin, outputs[0]))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _launch_attention(tq, tk, tv, tc, ts, scale, quant, out=out)

    # ---- attention (no RoPE) ------------------------------------------------------------------
    @trtp.register("wan_rt::attention")
    def _attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                        scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune("wan_rt::attention")
    def _attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                            outputs: Tuple[trtp.TensorDesc]) -> list[Any]:
        return [trtp.AutoTuneCombination("BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32",
                                         "LINEAR")]

    @trtp.impl("wan_rt::attention")
    def _attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, scale: float,
                        outputs: Tuple[trtp.Tensor], stream: int) -> None:
        from .rope3d_attn import _launch_attention

        tq, tk, tv, out = (torch.as_tensor(t, device="cuda") for t in (q, k, v, outputs[0]))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _launch_attention(tq, tk, tv, None, None, scale, "none", out=out)

    # ---- causal_conv3d ------------------------------------------------------------------------
    @trtp.register("wan_rt::causal_conv3d")
    def _causal_conv3d_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                            cache: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        xs, ws = x.shape_expr, weight.shape_expr
        y = trtp.from_shape_expr((xs[0], ws[0], xs[2], xs[3], xs[4]), dtype=x.dtype)
        return y, cache.like()  # cache: [B, C_in, kt-1, H, W], same as the one passed in

    @trtp.autotune("wan_rt::causal_conv3d")
    def _causal_conv3d_autotune(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                                cache: trtp.TensorDesc,
                                outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> list[Any]:
        return [trtp.AutoTuneCombination("BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32, "
                                         "BF16|FP16|FP32, BF16|FP16|FP32", "LINEAR")]

    @trtp.impl("wan_rt::causal_conv3d")
    def _causal_conv3d_impl(x: trtp.Tensor, weight: trtp.Tensor, bias: trtp.Tensor, cache: trtp.Tensor,
                            outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        from .causal_conv import _launch_causal_conv3d

        tx, tw, tb, tc, y, new_cache = (torch.as_tensor(t, device="cuda")
                                        for t in (x, weight, bias, cache, outputs[0], outputs[1]))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _, nc = _launch_causal_conv3d(tx, tw, tb, tc if tc.shape[2] > 0 else None, y=y)
            new_cache.copy_(nc)

    _registered = True


# ---- network helpers (checked by mypy against tensorrt-stubs) ------------------------------------


def add_rope3d_attention(network: "trt.INetworkDefinition", q: "trt.ITensor", k: "trt.ITensor",
                         v: "trt.ITensor", cos: "trt.ITensor", sin: "trt.ITensor", *, scale: float,
                         quant: str = "none") -> "trt.ITensor":
    """Add a `wan_rt::rope3d_attention` layer; q/k/v [B, L, H, D], cos/sin float32 [L, D/2]."""
    if quant not in ("none", "int8"):
        raise ValueError(f"quant must be 'none' or 'int8', got {quant!r}")
    register_plugins()
    layer = network.add_plugin(trtp.op.wan_rt.rope3d_attention(q, k, v, cos, sin, scale=scale, quant=quant))
    layer.name = "wan_rt_rope3d_attention"
    return layer.get_output(0)


def add_attention(network: "trt.INetworkDefinition", q: "trt.ITensor", k: "trt.ITensor", v: "trt.ITensor",
                  *, scale: float) -> "trt.ITensor":
    """Add a `wan_rt::attention` layer; q [B, Lq, H, D], k/v [B, Lk, H, D]."""
    register_plugins()
    layer = network.add_plugin(trtp.op.wan_rt.attention(q, k, v, scale=scale))
    layer.name = "wan_rt_attention"
    return layer.get_output(0)


def add_causal_conv3d(network: "trt.INetworkDefinition", x: "trt.ITensor", weight: "trt.ITensor",
                      bias: "trt.ITensor", cache: "trt.ITensor") -> "tuple[trt.ITensor, trt.ITensor]":
    """Add a `wan_rt::causal_conv3d` layer; returns (y, new_cache) tensors of the network."""
    register_plugins()
    layer = network.add_plugin(trtp.op.wan_rt.causal_conv3d(x, weight, bias, cache))
    layer.name = "wan_rt_causal_conv3d"
    return layer.get_output(0), layer.get_output(1)
