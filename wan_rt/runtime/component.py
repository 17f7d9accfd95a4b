"""The one contract between the denoise loop and every backend: named tensors in, named out.

Components and their tensors (the same names in eager kwargs, ONNX graphs and engines):
  text_encoder:                 input_ids, attention_mask      -> context
  dit_high_noise/dit_low_noise/dit: latents, timestep, context -> noise_pred
                                (inside: a `text` graph per prompt, a `main` graph per step)
  vae_encoder:                  video                          -> latents   (normalised)
  vae_decoder:                  latents                        -> video     (in [-1, 1])
The pipeline passes float32 tensors and gets float32 back; each component casts to its own
compute dtype inside, so the loop never needs to know what runs underneath.

Optional, for components that keep state across the steps of a generation (a step cache,
wan_rt/caching): `begin_stage(step_indices, total_steps)`, called before the component's stage
of the denoise loop, and `stage_report() -> {figure: value}`, whose figures the loop adds to
`out.timings` as "<component>.<figure>". Residency (runtime/residency.py) uses `nbytes`, `load`,
`unload` and `stage` where a component has them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

DIT_COMPONENTS = ("dit_high_noise", "dit_low_noise", "dit")
OUTPUT_NAMES = {
    "text_encoder": "context",
    "dit_high_noise": "noise_pred",
    "dit_low_noise": "noise_pred",
    "dit": "noise_pred",
    "vae_encoder": "latents",
    "vae_decoder": "video",
}


@runtime_checkable
class Component(Protocol):
    name: str

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]: ...


class VAEEncodeGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, video: Tensor) -> Tensor:
        return self.vae.encode(video)


class VAEDecodeGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents)


class HostSwappable:
    """Residency (runtime/residency.py) for a PyTorch module: on a GPU an idle expert can wait
    in host memory. Needs `self.module` and `self.device`."""

    module: nn.Module
    device: torch.device

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def load(self) -> None:
        if self.device.type == "cuda":
            self.module.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()

    def unload(self) -> None:
        if self.device.type == "cuda":
            self.module.to("cpu")
            torch.cuda.empty_cache()


class EagerComponent(HostSwappable):
    """A PyTorch module behind the contract: the correctness oracle for every other backend."""

    def __init__(self, name: str, module: nn.Module, device: torch.device, dtype: torch.dtype):
        self.name = name
        self.module = module.eval()
        self.device = device
        self.dtype = dtype
        self.output_name = OUTPUT_NAMES[name]

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        cast = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.module(**cast)
        return {self.output_name: out.float()}

    def __repr__(self) -> str:
        return f"EagerComponent({self.name}, {self.dtype}, {self.device})"
