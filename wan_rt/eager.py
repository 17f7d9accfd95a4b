"""Eager PyTorch components from a checkpoint: the oracle, and the fallback for any component
an engines dir leaves out (`--backend-for X=eager`).

Runtime variants are applied here, from outside the models: wan_rt's Triton kernels
(`wan_rt.kernels.install`) when asked for or, by default, on a CUDA GPU; on the CPU, fp32 files
run at bf16/fp16 without a converted copy (wan_rt.runtime.cast_on_use).
"""

from __future__ import annotations

import importlib.util
from typing import Mapping, Optional

import torch

from wan_rt.models import load_dit, load_text_encoder, load_vae
from wan_rt.models.single_file import is_gguf
from wan_rt.resolve import ResolvedCheckpoint
from wan_rt.runtime import cast_on_use
from wan_rt.runtime.component import EagerComponent, VAEDecodeGraph, VAEEncodeGraph
from wan_rt.runtime.engine_component import EagerDiTComponent


def use_triton_kernels(choice: str, device: torch.device) -> bool:
    """"auto": the Triton kernels on a CUDA GPU when triton is installed; PyTorch ops otherwise
    (on a CPU they would only run in Triton's interpreter). "triton" / "torch" force a side."""
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be auto, triton or torch; got {choice!r}")
    if choice != "auto":
        return choice == "triton"
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def build_eager_components(resolved: ResolvedCheckpoint, device: torch.device, dtype: torch.dtype,
                           names: Optional[list[str]] = None, kernels: str = "auto",
                           dit_load_device: Optional[torch.device] = None,
                           placement: Optional[Mapping[str, torch.device]] = None) -> dict:
    """`names` (default: every component of the model) as eager components on `device`, or
    where `placement` puts them (a low-VRAM plan: text encoder / VAE on the CPU, experts in host
    memory for block offload; wan_rt/offload.py). dit_load_device: where the DiT weights are
    loaded when that is not their component's device (the CPU, for a runtime that moves them on
    itself: FSDP sharding, wan_rt.parallel.shard)."""
    spec, files = resolved.spec, resolved.files
    where = {name: torch.device((placement or {}).get(name, device))
             for name in ("text_encoder", *spec.dit_components, "vae_encoder", "vae_decoder")}
    wanted = names or ["text_encoder", *spec.dit_components, "vae_encoder", "vae_decoder"]
    out = {}
    fast = use_triton_kernels(kernels, device)
    if fast:  # imported only when used: triton is an optional dependency
        from wan_rt.kernels import install
    # The VAE and text encoder stay in fp32 unless asked otherwise: they are a small share of the
    # time and the official code runs the VAE in fp32 too.
    if "text_encoder" in wanted:
        te_dtype = dtype if dtype != torch.float16 else torch.float32  # umT5 overflows in fp16
        if cast_on_use.applies(files.text_encoder, te_dtype, device, dit=False):
            te_dtype = torch.float32  # stored fp32: run as stored, mapped, rather than own a bf16 copy
        out["text_encoder"] = EagerComponent("text_encoder", load_text_encoder(files, dtype=te_dtype,
                                                                               device=where["text_encoder"]),
                                             where["text_encoder"], te_dtype)
    for name in spec.dit_components:
        if name in wanted:
            dit_device = (placement or {}).get(name) or dit_load_device or device
            if is_gguf(files.dits[name]):  # quantized blocks stay quantized; each Linear dequantizes its own
                from wan_rt.runtime.gguf_weights import load_gguf_dit

                dit = load_gguf_dit(files.dits[name], dtype, dit_device)
            elif dit_load_device is None and cast_on_use.applies(files.dits[name], dtype, device, dit=True):
                dit = cast_on_use.cast_dit_on_use(load_dit(files, name), dtype)  # fp32 blocks stay mapped
            else:
                dit = load_dit(files, name, dtype=dtype, device=dit_device)
            if fast:
                install(dit)
            out[name] = EagerDiTComponent(name, spec, dit, dtype, where[name])
    if "vae_encoder" in wanted or "vae_decoder" in wanted:
        vae_device = where["vae_decoder"] if "vae_decoder" in wanted else where["vae_encoder"]
        vae = load_vae(files, dtype=torch.float32, device=vae_device)
        if fast and vae_device.type == torch.device(device).type:  # not on a VAE moved to the CPU
            install(vae)
        if "vae_encoder" in wanted:
            out["vae_encoder"] = EagerComponent("vae_encoder", VAEEncodeGraph(vae), vae_device, torch.float32)
        if "vae_decoder" in wanted:
            out["vae_decoder"] = EagerComponent("vae_decoder", VAEDecodeGraph(vae), vae_device, torch.float32)
    return out
