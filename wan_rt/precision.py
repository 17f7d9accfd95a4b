"""What stays high precision when a DiT is quantized: the one declared table, read by the Q/DQ
pass (wan_rt.export.quantize), the tests and the docs.

A quantized build (`--precision fp8|int8`) puts Q/DQ only on the linear layers (MatMul/Gemm
with a constant weight) of the transformer blocks, and optionally on the attention matmuls.
Everything below keeps the graph's base precision, following NVIDIA Model Optimizer's Wan recipe
(FP8 per-tensor E4M3 with max calibration; patch embedding, condition embedder and output
projection high precision; blocks 0-2 and 37-39 of the 40-layer experts in bf16) and
diffusers' / LightX2V's lists of sensitive layers:

* embeddings: patch (a Conv3d, never a Q/DQ candidate), text and time (the condition embedder);
* modulation: `time_proj` (timestep -> the 6-way shift/scale/gate) and the scale-shift tables;
* norms: every LayerNorm/RMSNorm (`norm1/2/3`, `norm_q/k`, `norm_out`): not matmuls either;
* head: `norm_out`, `proj_out`;
* the first and last blocks: `keep_blocks(num_layers)` at each end (below).

Norms, tables and the patch embedding are listed although the pass would never quantize them
(they are not MatMul/Gemm): the table is the declaration, and the pass checks it, not the reverse.
"""

from __future__ import annotations

import re

import torch

QUANTIZED_PRECISIONS = ("fp8", "int8")

# Module path (dotted, as in WanDiT.named_modules) prefix -> why it stays high precision.
HIGH_PRECISION_MODULES: dict[str, str] = {
    "patch_embedding": "embedding (patch)",
    "condition_embedder.text_embedder": "embedding (text)",
    "condition_embedder.time_embedder": "embedding (time)",
    "condition_embedder.time_proj": "modulation (timestep -> shift/scale/gate)",
    "scale_shift_table": "modulation table",
    "norm_out": "norm (head)",
    "proj_out": "head (output projection)",
}
# Any path component named like this is a norm, wherever it sits (blocks.3.attn1.norm_q).
_NORM = re.compile(r"^norm(\d|_q|_k|_out)?$")
_BLOCK = re.compile(r"^blocks\.(\d+)(\.|$)")

# NVIDIA's recipe keeps 3 of 40 blocks at each end in bf16.
KEEP_FRACTION = 3 / 40

# Quality bounds recorded in each quantized DiT's manifest at build time and checked by
# `wan-rt parity` on the fp32 oracle's trajectory: per-step noise-prediction relative L2
# (quantized vs fp32, the same inputs every step) and decoded-frame PSNR. Measured on the three
# tiny presets (random weights, ONNX Runtime CPU): fp8 0.9-1.5e-2 per step and 43-44 dB, int8
# 0.9-2.4e-2 and 36-46 dB, so the bounds leave 4x / 10 dB of headroom. Not yet measured on real
# checkpoints: re-measure there and tighten.
QUALITY_TOLERANCE: dict[str, dict[str, float]] = {
    "fp8": {"noise_pred_rel_l2": 0.1, "frame_psnr_db": 25.0},
    "int8": {"noise_pred_rel_l2": 0.1, "frame_psnr_db": 25.0},
}


def keep_blocks(num_layers: int) -> frozenset[int]:
    """Blocks kept high precision: round(3/40 * num_layers) at each end, so 0-2 and 37-39 for the
    40-layer A14B experts and 0-1 and 28-29 for TI2V-5B's 30. At least one block is always left
    to quantize, so the 2-layer tiny presets keep none (3/40 of 2 layers rounds to zero): their
    blocks exist to exercise the quantized path, and keeping both would leave nothing quantized."""
    k = min(int(KEEP_FRACTION * num_layers + 0.5), (num_layers - 1) // 2)
    return frozenset([*range(k), *range(num_layers - k, num_layers)])


def keep_reason(module_path: str, num_layers: int) -> str | None:
    """Why `module_path` (a dotted WanDiT submodule name) stays high precision, or None if it is
    a quantization candidate (a linear layer inside a block that is not kept)."""
    for prefix, why in HIGH_PRECISION_MODULES.items():
        if module_path == prefix or module_path.startswith(prefix + "."):
            return why
    if any(_NORM.match(part) for part in module_path.split(".")):
        return "norm"
    block = _BLOCK.match(module_path)
    if block is None:
        return "outside the transformer blocks"
    index = int(block.group(1))
    if index in keep_blocks(num_layers):
        return f"block {index} (first/last blocks of {num_layers})"
    return None


def quantized_base_dtype(component: str, backend: str | None, device_type: str = "cpu") -> torch.dtype:
    """The dtype of everything a quantized build does not quantize. The VAE stays float32 as in
    every build. Under TensorRT the rest is bf16 (the Q/DQ graph is built strongly typed); with
    ONNX Runtime it is float32, since its CPU kernels have almost no bf16 or fp16 coverage; an
    AOTInductor fp8 build is bf16 on a GPU, float32 on a CPU."""
    if component.startswith("vae"):
        return torch.float32
    if backend == "trt" or (backend == "aoti" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


# Every precision an engine can be built at. fp8 / int8: the DiTs' linear layers quantized
# (Q/DQ after calibration, or FP8 GEMMs); everything else at the backend's base dtype.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                      "fp8": torch.float32, "int8": torch.float32}


def component_dtype(component: str, precision: str, backend: str | None = None,
                    device: torch.device | None = None) -> torch.dtype:
    """The dtype a component computes in at `precision`. The VAE stays fp32 (as the official code
    runs it): it is a small share of the time and the streaming cache accumulates rounding. umT5
    is never fp16 (its activations overflow it; bf16 is fine). Everything else follows the
    requested precision. A quantized precision (fp8, int8) is the base dtype the Q/DQ graph is
    built in (quantized_base_dtype)."""
    if precision in QUANTIZED_PRECISIONS:
        return quantized_base_dtype(component, backend, device.type if device is not None else "cpu")
    if component.startswith("vae") or (component == "text_encoder" and precision == "fp16"):
        return torch.float32
    return PRECISIONS[precision]
