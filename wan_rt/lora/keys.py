"""LoRA files in any of the Wan formats -> one canonical map {our parameter: LoraDelta}.

Formats (the mapping follows diffusers' `lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers`
and `_convert_musubi_wan_lora_to_diffusers`, written against our own key map):

* diffusers / PEFT:  `transformer.blocks.0.attn1.to_q.lora_A.weight`, `lora_B.weight`, `lora_B.bias`
  (the scale is `lora_alpha / r` from the file's `lora_adapter_metadata`, else 1, as PEFT does);
* original / ComfyUI / LightX2V: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` (or
  lora_A / lora_B), `.alpha` (scale alpha / rank), `.diff` (a full-weight delta), `.diff_b`
  (a bias delta); official module names (`self_attn.q`, `ffn.0`, `head.head`, `modulation`);
* kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.alpha`: official
  names with "." as "_".

Names are resolved against the model itself: every parameter's own name and its official name
(models.checkpoint's key map), with dots or underscores. A key naming no parameter of the model
is an error listing some of them, never silently dropped. Differences from diffusers: `.diff`
/ `.diff_b` on norms and modulation tables are applied (diffusers drops them; in the published
distill LoRAs they are zero), and `head.head.diff` is a full-weight delta (diffusers turns it into
an identity-up LoRA, the same numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from wan_rt.models.checkpoint import diffusers_dit_to_official

PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.", "lora_unet_")
# key suffix -> field of LoraDelta
SUFFIXES = {
    ".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_up.weight": "up",
    ".lora_B.bias": "peft_bias", ".diff_b": "diff_b", ".diff": "diff", ".alpha": "alpha",
}
_SHOWN = 5


class LoraError(ValueError):
    """A LoRA file that does not fit the model; the message names the keys."""


@dataclass
class LoraDelta:
    """What one LoRA file changes in one parameter (a Linear's weight and bias, or a plain
    parameter such as a modulation table): W += scale * (alpha/rank * up @ down + diff),
    b += scale * diff_b."""

    weight: str                        # our parameter name, e.g. "blocks.0.attn1.to_q.weight"
    bias: Optional[str] = None         # its bias parameter, if the target has one
    down: Optional[Tensor] = None      # [rank, in, ...]
    up: Optional[Tensor] = None        # [out, rank, ...]
    alpha: Optional[float] = None
    diff: Optional[Tensor] = None      # full-weight delta
    diff_b: Optional[Tensor] = None    # bias delta
    keys: list[str] = field(default_factory=list)  # the file's keys, for messages

    @property
    def rank(self) -> int:
        assert self.down is not None
        return self.down.shape[0]

    @property
    def low_rank_scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def weight_delta(self, shape: torch.Size) -> Optional[Tensor]:
        """The float32 change of the weight at scale 1 (low-rank product plus diff), or None."""
        delta = None
        if self.down is not None and self.up is not None:
            delta = (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(shape) * self.low_rank_scale
        if self.diff is not None:
            delta = self.diff.float().reshape(shape) if delta is None else delta + self.diff.float().reshape(shape)
        return delta


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], float]:
    """The tensors of a LoRA .safetensors file and the PEFT scale its metadata gives
    (lora_alpha / r; 1 without metadata). Other formats carry `.alpha` keys instead."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # SafetensorError: not a safetensors file, truncated
        raise LoraError(f"{path}: cannot read as safetensors ({str(exc).splitlines()[0]})") from None
    return tensors, _peft_scale(metadata, path)


def _peft_scale(metadata: Mapping[str, str], path: Path) -> float:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return 1.0
    config = json.loads(raw)
    # Saved by a pipeline the keys carry the component ("transformer.r"); by a model, bare ("r").
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraError(f"{path}: per-module rank/alpha patterns in lora_adapter_metadata are not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    return float(alpha) / float(r) if r and alpha else 1.0


def target_names(model: nn.Module) -> dict[str, tuple[str, Optional[str]]]:
    """Every name a LoRA may use for a part of `model` -> (weight parameter, bias parameter).

    A Linear / Conv is named by its module ("blocks.0.attn1.to_q", official "blocks.0.self_attn.q"),
    a plain parameter by itself ("blocks.0.scale_shift_table", official "blocks.0.modulation");
    each name also with "_" for ".", as kohya writes them."""
    params = dict(model.named_parameters())
    names: dict[str, tuple[str, Optional[str]]] = {}
    for name in params:
        owner, _, attr = name.rpartition(".")
        if attr == "bias" and f"{owner}.weight" in params:
            continue
        if attr == "weight":
            target = (name, f"{owner}.bias" if f"{owner}.bias" in params else None)
            ours, official = owner, diffusers_dit_to_official(name).removesuffix(".weight")
        else:  # a plain parameter: its name is the module name
            target = (name, None)
            ours, official = name, diffusers_dit_to_official(name)
        for alias in (ours, official):
            names[alias] = target
            names[alias.replace(".", "_")] = target
    return names


def canonical_lora(tensors: Mapping[str, Tensor], model: nn.Module, source: str | Path,
                   peft_scale: float = 1.0) -> dict[str, LoraDelta]:
    """{our weight parameter: LoraDelta} for `model` (a WanDiT); LoraError listing the keys that
    name nothing in it, or whose shapes do not fit."""
    names = target_names(model)
    params = dict(model.named_parameters())
    out: dict[str, LoraDelta] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        parsed = _split(key)
        if parsed is None or parsed[0] not in names:
            unknown.append(key)
            continue
        module, slot = parsed
        weight, bias = names[module]
        delta = out.setdefault(weight, LoraDelta(weight, bias))
        delta.keys.append(key)
        if slot == "alpha":
            delta.alpha = float(value.item())
        elif slot in ("diff_b", "peft_bias") and bias is None:
            unknown.append(key)
        elif slot == "peft_bias":  # PEFT's lora_B bias is scaled like the low-rank product
            delta.diff_b = value * peft_scale
        else:
            setattr(delta, slot, value)
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} keys match no layer of the model: "
                        + ", ".join(unknown[:_SHOWN]) + (" ..." if len(unknown) > _SHOWN else ""))
    for delta in out.values():
        _check(delta, params, source)
        if delta.alpha is None and peft_scale != 1.0 and delta.down is not None:
            delta.alpha = peft_scale * delta.rank
    return out


def _split(key: str) -> Optional[tuple[str, str]]:
    """(module name without prefix, slot) or None for a key in no known format."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, slot in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], slot
    return None


def _check(delta: LoraDelta, params: Mapping[str, Tensor], source: str | Path) -> None:
    where = f"{source}: {delta.keys[0].rsplit('.', 2)[0]}"
    if (delta.down is None) != (delta.up is None):
        raise LoraError(f"{where}: has lora_{'down' if delta.up is None else 'up'} without its other half")
    if delta.alpha is not None and delta.down is None:
        raise LoraError(f"{where}: has alpha but no low-rank pair")
    shape = params[delta.weight].shape
    if delta.down is not None and delta.up is not None:
        if delta.up.shape[1] != delta.down.shape[0] or delta.up.shape[0] != shape[0] \
                or delta.down[0].numel() != shape[1:].numel():
            raise LoraError(f"{where}: up {list(delta.up.shape)} @ down {list(delta.down.shape)} does not make the "
                            f"weight's shape {list(shape)}")
    if delta.diff is not None and delta.diff.numel() != shape.numel():
        raise LoraError(f"{where}: diff has {list(delta.diff.shape)}, the weight {list(shape)}")
    if delta.diff_b is not None and delta.bias is not None and delta.diff_b.numel() != params[delta.bias].numel():
        raise LoraError(f"{where}: diff_b has {list(delta.diff_b.shape)}, the bias {list(params[delta.bias].shape)}")
