"""umT5 text encoding as Wan does it (official `wan/modules/t5.py` + `tokenizers.py`).

The encoder itself is transformers' UMT5EncoderModel. What Wan adds: prompt cleaning, padding
to max length with EOS appended, and "trim to the true length, then zero-pad": the rows past the
real tokens are zeros, not the encoder's outputs at pad positions. Because padding is on the
right, trim-then-pad equals multiplying by the attention mask, which keeps the exported graph
free of data-dependent shapes.
"""

from __future__ import annotations

import html
import re

import torch
from torch import Tensor, nn


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: fix mojibake, unescape HTML twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a declared dependency; this only keeps odd installs working
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
    """-> input_ids, attention_mask: int64 [B, max_sequence_length]."""
    out = tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                    max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    return out.input_ids.long(), out.attention_mask.long()


class TextEncoder(nn.Module):
    """input_ids, attention_mask [B, L] -> context [B, L, D] with zeros past each true length."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask[..., None].to(hidden.dtype)


def build_umt5_encoder(hf_config_kwargs: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(**hf_config_kwargs))
    return model.to(dtype).eval()


def load_tokenizer(folder):
    """The checkpoint's own tokenizer (diffusers `tokenizer/` or official `google/umt5-xxl/`)."""
    from transformers import AutoTokenizer

    from wan_rt.models.checkpoint import CheckpointError

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({exc})") from None
