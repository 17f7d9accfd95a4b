"""LoRA for the Wan DiT experts, applied from outside the model.

    deltas = lora_deltas(model, "style.safetensors")        # any Wan LoRA format (keys.py)
    applied = apply_lora(model, deltas, scale=0.8, mode="runtime")   # or "fuse" (apply.py)
    applied.fuse(); applied.remove()

Each A14B expert takes its own LoRAs (the distilled 4-step LoRAs come as a high-noise and a
low-noise file); `expert_component` names the component an `expert` argument means.
`WanPipeline.load_lora` / `wan-rt run --lora` use this on eager experts; `wan-rt build --lora`
fuses into the weights before export, so engines carry them (and their manifests' weights
fingerprint covers the LoRA files and scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from wan_rt.config import ModelSpec
from wan_rt.lora.apply import AppliedLora, Mode, apply_lora
from wan_rt.lora.keys import LoraDelta, LoraError, canonical_lora, read_lora_file

__all__ = ["AppliedLora", "LoraDelta", "LoraError", "LoraRef", "apply_lora", "expert_component", "load_lora",
           "lora_deltas", "parse_lora_arg"]

EXPERTS = {"high_noise": "dit_high_noise", "low_noise": "dit_low_noise"}


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file and the scale it is applied at (what manifests and fingerprints record)."""

    path: Path
    scale: float = 1.0

    def as_pair(self) -> tuple[Path, float]:
        return (self.path, self.scale)


def parse_lora_arg(value: str) -> LoraRef:
    """"PATH" or "PATH:SCALE" (the CLI's --lora)."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return LoraRef(Path(path), float(scale))
        except ValueError:
            pass
    return LoraRef(Path(value))


def expert_component(spec: ModelSpec, expert: Optional[str]) -> str:
    """"high_noise" / "low_noise" -> the A14B expert's component; None -> the first (high-noise)
    expert, or the only DiT (TI2V-5B, which takes no expert argument)."""
    if expert is None:
        return spec.dit_components[0]
    if len(spec.dit_components) == 1:
        raise ValueError(f"{spec.name} has one DiT: leave the expert out")
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {', '.join(EXPERTS)}; got {expert!r}")
    return EXPERTS[expert]


def lora_deltas(model: nn.Module, path: str | Path) -> dict[str, LoraDelta]:
    tensors, peft_scale = read_lora_file(path)
    return canonical_lora(tensors, model, path, peft_scale)


def load_lora(model: nn.Module, path: str | Path, scale: float = 1.0, mode: Mode = "fuse",
              name: Optional[str] = None) -> AppliedLora:
    return apply_lora(model, lora_deltas(model, path), scale, mode, name or Path(path).stem)
