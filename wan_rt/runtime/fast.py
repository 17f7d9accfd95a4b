"""The fast eager DiT: runtime variants applied to a WanDiT from outside (gpt-fast style).

`optimize_dit(dit, ...)` changes a model in place, each step a toggle:

1. kernels: the Triton kernels through `set_ops` (wan_rt.kernels): fused 3D-RoPE flash attention
   for self-attention, the same kernel for the text cross-attention, and the fused
   LayerNorm + modulation of each block (`Ops.layernorm_modulate`).
2. attention_quant="int8": self-attention through `rope3d_attention(..., quant="int8")`
   (SageAttention-style int8 q·kᵀ, P·V in bf16); needs the kernels.
3. fp8_linear: every nn.Linear that wan_rt.precision's table does not keep high precision
   becomes an `FP8Linear`: E4M3 weights with one scale per output channel, E4M3 activations
   with one dynamic scale per call (per tensor), multiplied by `torch._scaled_mm` (Hopper FP8
   tensor cores, fp32 accumulation, bf16 out). `EmulatedFP8Linear` does the same quantization
   and dequantizes in PyTorch: for CPU numerics tests only, never a speed path.
4. compile / cuda_graphs: `torch.compile` of each transformer block ("regional" compilation:
   the 30-40 blocks share one compiled graph, so it compiles in about a block's time), with
   CUDA graphs from compile's cudagraph trees; without compile, the `cudagraphs` backend alone.

Numbers: bench/dit_step.py times each step against eager bf16 and diffusers in one run.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
Fp8Mode = Literal["scaled_mm", "emulated"]
COMPILE_MODES = ("default", "max-autotune")


# ---------------------------------------------------------------------------------------------
# FP8 linear layers
# ---------------------------------------------------------------------------------------------

def quantize_weight_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> (E4M3 [N, K], float32 scale [N]) with weight ≈ q · scale[:, None]:
    one scale per output channel, the channel's absolute max mapped to 448."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_activation_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (E4M3 [M, K], float32 0-d scale): one dynamic scale for the whole tensor,
    computed on the device (no host sync, so it can sit inside a CUDA graph)."""
    scale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()  # _scaled_mm: row-major
    return q, scale


class FP8Linear(nn.Module):
    """y = x·Wᵀ + b on FP8 tensor cores: W in E4M3 with a scale per output channel, x quantized
    to E4M3 per call with one scale per tensor, `torch._scaled_mm` with row-wise scales (fp32
    accumulation; `use_fast_accum` lets Hopper promote partial sums less often, as torchao's
    inference path does). Output in x's dtype. in/out features must be multiples of 16."""

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                 use_fast_accum: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)  # a parameter: moves and counts with the model
        self.register_buffer("weight_scale", weight_scale.float().reshape(1, -1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.use_fast_accum = use_fast_accum

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_fast_accum: bool = True) -> "FP8Linear":
        q, scale = quantize_weight_fp8(linear.weight)
        return cls(q, scale, linear.bias, use_fast_accum)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_activation_fp8(x2)
        out_dtype = x.dtype
        # _scaled_mm pairs row-wise scales with row-wise scales: the per-tensor activation scale
        # is repeated over the M rows. Its bias must be bf16/fp16 (and match the output).
        fused_bias = self.bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(
            xq, self.weight.t(), x_scale.reshape(1, 1).expand(x2.shape[0], 1).contiguous(), self.weight_scale,
            bias=self.bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype,
            use_fast_accum=self.use_fast_accum,
        )
        if self.bias is not None and not fused_bias:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-channel weight, " \
               f"per-tensor dynamic activation, bias={self.bias is not None}"


class EmulatedFP8Linear(FP8Linear):
    """EMULATION, for CPU tests only: the same E4M3 quantization of weight and activation as
    FP8Linear, then dequantized and multiplied in float32 (what `_scaled_mm` computes, up to
    the summation order). Slow and memory-hungry; never a speed path."""

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_activation_fp8(x2)
        y = (xq.float() @ self.weight.float().t()) * (x_scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return "EMULATED (dequantized fp32 matmul), " + super().extra_repr()


def default_keep(dit: nn.Module) -> Callable[[str], Optional[str]]:
    """wan_rt.precision's table for this model: module path -> why it stays high precision."""
    from wan_rt.precision import keep_reason

    num_layers = dit.config.num_layers
    return lambda path: keep_reason(path, num_layers)


def quantize_linears_fp8(dit: nn.Module, *, mode: Fp8Mode = "scaled_mm",
                         keep: Optional[Callable[[str], Optional[str]]] = None,
                         use_fast_accum: bool = True) -> tuple[tuple[str, ...], dict[str, str]]:
    """Swap every nn.Linear of `dit` that `keep` (default: wan_rt.precision's table) does not keep
    for an FP8Linear (`mode="emulated"`: EmulatedFP8Linear). Returns (quantized paths,
    {kept path: reason}). Layers whose sizes `_scaled_mm` cannot take (not multiples of 16)
    stay as they are, with that reason."""
    keep = keep or default_keep(dit)
    cls = EmulatedFP8Linear if mode == "emulated" else FP8Linear
    quantized, kept = [], {}
    for path, module in list(dit.named_modules()):
        if type(module) is not nn.Linear:
            continue
        why = keep(path)
        if why is None and (module.in_features % 16 or module.out_features % 16):
            why = "sizes not multiples of 16 (torch._scaled_mm)"
        if why is not None:
            kept[path] = why
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(dit.get_submodule(parent_path), child, cls.from_linear(module, use_fast_accum))
        quantized.append(path)
    return tuple(quantized), kept


# ---------------------------------------------------------------------------------------------
# The whole fast path
# ---------------------------------------------------------------------------------------------

def triton_ops(attention_quant: Optional[str] = None):
    """wan_rt.kernels' Ops, with self-attention quantized when `attention_quant` is given."""
    import wan_rt.kernels as K

    if attention_quant is None:
        return K.TRITON_OPS
    return dataclasses.replace(K.TRITON_OPS,
                               rope_attention=functools.partial(K.rope3d_attention, quant=attention_quant))


@dataclass
class FastPath:
    """What `optimize_dit` did to a model."""

    kernels: bool
    attention_quant: Optional[str]
    fp8: Optional[Fp8Mode]
    compile: Optional[str]
    cuda_graphs: bool
    quantized: tuple[str, ...] = ()
    kept: dict[str, str] = field(default_factory=dict)  # every other nn.Linear -> why

    def describe(self) -> str:
        parts = ["triton kernels" if self.kernels else "torch ops"]
        if self.attention_quant:
            parts.append(f"{self.attention_quant} attention")
        if self.fp8:
            parts.append(f"fp8 linears ({len(self.quantized)} of {len(self.quantized) + len(self.kept)}"
                         f"{', EMULATED' if self.fp8 == 'emulated' else ''})")
        if self.compile:
            parts.append(f"compile {self.compile} (per block)")
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        return " + ".join(parts)


def optimize_dit(dit: nn.Module, *, kernels: bool = True, fp8_linear: bool | Fp8Mode = True,
                 attention_quant: Optional[str] = "int8", compile: Optional[str] = "max-autotune",
                 cuda_graphs: bool = True, keep: Optional[Callable[[str], Optional[str]]] = None,
                 use_fast_accum: bool = True) -> FastPath:
    """Make a WanDiT fast, in place; the defaults are the fastest path on a Hopper GPU.

    kernels: Triton attention + fused LayerNorm-modulate (a CPU model needs TRITON_INTERPRET=1).
    attention_quant: "int8" or None (self-attention's q·kᵀ precision; needs kernels).
    fp8_linear: True ("scaled_mm" on a CUDA model, "emulated" elsewhere), "scaled_mm",
        "emulated" (EMULATION: CPU numerics tests only) or False.
    compile: "max-autotune", "default" or None; applied per transformer block.
    cuda_graphs: CUDA graphs around each block (compile's cudagraph trees; without compile the
        `cudagraphs` backend); CUDA models only. A forward pre-hook marks each DiT call as a new
        step, so a call's outputs stay valid until the next call.
    keep: path -> reason-or-None deciding which linears stay high precision (default:
        wan_rt.precision.keep_reason for this model's depth).
    """
    device = next(dit.parameters()).device
    if attention_quant is not None and not kernels:
        raise ValueError("attention_quant needs the Triton kernels (kernels=True)")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a model on a CUDA GPU, this one is on {device}")
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES} or None, got {compile!r}")
    fp8: Optional[Fp8Mode] = None
    if fp8_linear is True:
        fp8 = "scaled_mm" if device.type == "cuda" else "emulated"
    elif fp8_linear:
        if fp8_linear not in ("scaled_mm", "emulated"):
            raise ValueError(f"fp8_linear must be a bool, 'scaled_mm' or 'emulated', got {fp8_linear!r}")
        fp8 = fp8_linear
    report = FastPath(kernels, attention_quant, fp8, compile, cuda_graphs)

    if kernels:
        from wan_rt.kernels._util import interpreting
        from wan_rt.models.ops import set_ops

        if device.type != "cuda" and not interpreting():
            raise ValueError("the Triton kernels run on a CUDA GPU; a CPU model needs TRITON_INTERPRET=1 "
                             "set before wan_rt.kernels' kernel modules are imported")
        set_ops(dit, triton_ops(attention_quant))
    if fp8 is not None:
        report.quantized, report.kept = quantize_linears_fp8(dit, mode=fp8, keep=keep, use_fast_accum=use_fast_accum)
    if compile is not None or cuda_graphs:
        if compile is None:
            options: dict = {"backend": "cudagraphs"}
        elif compile == "max-autotune":
            options = {"mode": "max-autotune" if cuda_graphs else "max-autotune-no-cudagraphs"}
        else:
            options = {"mode": "reduce-overhead" if cuda_graphs else "default"}
        for block in dit.blocks:
            block.compile(fullgraph=True, **options)
        if cuda_graphs:
            dit.register_forward_pre_hook(_new_cudagraph_step)
    return report


def _new_cudagraph_step(_module: nn.Module, _args) -> None:
    # cudagraph trees reuse their output memory on the next replay of a step; each DiT call is
    # one step, so the previous call's noise prediction must be consumed before the next call.
    torch.compiler.cudagraph_mark_step_begin()


# ---------------------------------------------------------------------------------------------
# The fast path as an AOTInductor package (wan-rt build --backend aoti)
# ---------------------------------------------------------------------------------------------

KERNEL_CHOICES = ("auto", "torch", "triton")
ATTENTION_CHOICES = ("exact", "int8")


@dataclass(frozen=True)
class DiTVariant:
    """The ops an AOTInductor DiT package is compiled from: `optimize_dit` without torch.compile
    or CUDA graphs (the package is the compiled form; the runtime replays it in a CUDA graph,
    runtime/cuda_graphs.py). The Triton kernels enter the package as wan_rt custom ops."""

    kernels: bool
    attention_quant: Optional[str]
    fp8_linear: bool

    def apply(self, model: nn.Module) -> FastPath:
        dit = getattr(model, "dit", model)
        return optimize_dit(dit, kernels=self.kernels, attention_quant=self.attention_quant,
                            fp8_linear="scaled_mm" if self.fp8_linear else False, compile=None, cuda_graphs=False)

    def manifest_args(self) -> dict:
        return {"kernels": "triton" if self.kernels else "torch", "attention": self.attention_quant or "exact",
                "fp8_linear": self.fp8_linear}


def dit_variant(precision: str, device: torch.device, *, kernels: str = "auto",
                attention: str = "exact") -> Optional[DiTVariant]:
    """The DiT variant of an AOTInductor build, or None for the plain oracle ops. `kernels`:
    "auto" takes the Triton kernels on a GPU and torch's ops on a CPU (Triton runs on a CPU
    only in its interpreter, a testing tool: "triton" there needs TRITON_INTERPRET=1).
    `attention`: "int8" quantizes self-attention's q·kᵀ (needs the kernels). `precision` fp8:
    FP8 linear layers (torch._scaled_mm; wan_rt.precision's table keeps the rest)."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    use_kernels = kernels == "triton" or (kernels == "auto" and device.type == "cuda")
    if use_kernels and device.type != "cuda":
        from wan_rt.kernels._util import interpreting

        if not interpreting():
            raise ValueError("--kernels triton needs a CUDA GPU (on a CPU only under TRITON_INTERPRET=1, for tests)")
    if attention == "int8" and not use_kernels:
        raise ValueError("--attention int8 needs the Triton kernels (--kernels triton, or a GPU)")
    if precision == "int8":
        raise ValueError("aoti takes fp8 (FP8 GEMMs); int8 engines are Q/DQ graphs for --backend ort or trt")
    variant = DiTVariant(use_kernels, "int8" if attention == "int8" else None, precision == "fp8")
    if variant == DiTVariant(False, None, False):
        return None
    return variant
