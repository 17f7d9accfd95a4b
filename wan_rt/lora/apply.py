"""Put a canonical LoRA (keys.py) on a model: fused into its weights, or at run time.

* fused: W += scale·ΔW for every target, computed in float32 and stored in the weight's dtype.
  Nothing is left to compute per step; `remove()` subtracts the same ΔW (exact up to the
  rounding of the weight's dtype, as diffusers' unfuse is).
* at run time: a forward hook on each target Linear adds scale·((alpha/rank)·up(down(x)) +
  diff·x + diff_b), its parameters untouched, so `remove()` restores them exactly. Targets that
  are not Linear layers (norm weights, modulation tables, the patch embedding: vectors, or rare)
  are fused even then.

Several LoRAs stack (their deltas add). New tensors replace the parameters' data instead of
writing in place: a freshly loaded checkpoint's parameters may be views of a read-only mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_rt.lora.keys import LoraDelta

Mode = Literal["fuse", "runtime"]


@dataclass
class AppliedLora:
    """One LoRA file on one model at one scale; `remove()` undoes it."""

    name: str
    model: nn.Module
    deltas: dict[str, LoraDelta]
    scale: float
    mode: Mode
    _hooks: list = field(default_factory=list)
    _fused: list[str] = field(default_factory=list)  # weights whose delta is in the parameters

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        params = dict(self.model.named_parameters())
        for weight in self._fused:
            _add(params, self.deltas[weight], -self.scale)
        self._fused.clear()

    def fuse(self) -> None:
        """Run-time LoRA -> fused (faster steps)."""
        if self.mode == "fuse":
            return
        self.remove()
        self.mode = "fuse"
        _attach(self)


def apply_lora(model: nn.Module, deltas: dict[str, LoraDelta], scale: float = 1.0, mode: Mode = "fuse",
               name: str = "lora") -> AppliedLora:
    if mode not in ("fuse", "runtime"):
        raise ValueError(f"LoRA mode must be 'fuse' or 'runtime'; got {mode!r}")
    applied = AppliedLora(name, model, deltas, float(scale), mode)
    _attach(applied)
    return applied


def _attach(applied: AppliedLora) -> None:
    params = dict(applied.model.named_parameters())
    for weight, delta in applied.deltas.items():
        module = applied.model.get_submodule(weight.rpartition(".")[0]) if "." in weight else applied.model
        if applied.mode == "runtime" and isinstance(module, nn.Linear) and weight.endswith(".weight"):
            applied._hooks.append(module.register_forward_hook(_LinearDeltaHook(delta, applied.scale, module.weight)))
        else:
            _add(params, delta, applied.scale)
            applied._fused.append(weight)


def _add(params: dict[str, nn.Parameter], delta: LoraDelta, scale: float) -> None:
    """params += scale * delta, out of place."""
    weight = params[delta.weight]
    change = delta.weight_delta(weight.shape)
    if change is not None:
        weight.data = (weight.data.float() + scale * change.to(weight.device)).to(weight.dtype)
    if delta.diff_b is not None and delta.bias is not None:
        bias = params[delta.bias]
        bias.data = (bias.data.float() + scale * delta.diff_b.float().reshape(bias.shape).to(bias.device)).to(bias.dtype)


class _LinearDeltaHook:
    """y += scale·((alpha/rank)·up(down(x)) + diff·x + diff_b) after a Linear, in its dtype."""

    def __init__(self, delta: LoraDelta, scale: float, weight: Tensor):
        def place(t: Optional[Tensor], factor: float = 1.0) -> Optional[Tensor]:
            return None if t is None else (t.float() * factor).to(weight.device, weight.dtype)

        self.device = weight.device
        self.down = self.up = None
        if delta.down is not None and delta.up is not None:
            self.down = place(delta.down.flatten(1))
            self.up = place(delta.up.flatten(1), scale * delta.low_rank_scale)
        self.diff = place(None if delta.diff is None else delta.diff.reshape(weight.shape), scale)
        self.diff_b = place(delta.diff_b, scale)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if output.device != self.device:  # the module moved (expert residency): follow it
            self.device = output.device
            for name in ("down", "up", "diff", "diff_b"):
                t = getattr(self, name)
                setattr(self, name, None if t is None else t.to(self.device))
        x = args[0].to(output.dtype)
        if self.down is not None and self.up is not None:
            output = output + F.linear(F.linear(x, self.down), self.up)
        if self.diff is not None:
            output = output + F.linear(x, self.diff)
        if self.diff_b is not None:
            output = output + self.diff_b
        return output
