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
import warnings

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


WAN_T5_ATTENTION = "wan_t5"


def wan_t5_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, position_bias: Tensor | None = None,
                     **kwargs) -> tuple[Tensor, None]:
    """umT5 attention as the official `wan/modules/t5.py` computes it: q·kᵀ (umT5 does not scale
    it) + relative position bias + additive mask, softmax in float32, back to the input dtype.

    Why not transformers' default (SDPA with scale=1.0): under the TorchScript ONNX exporter an
    explicit SDPA scale on a bf16/fp16 graph is cast with torch's dtype number used as an ONNX
    type (bf16 -> COMPLEX128), so the text encoder would not export below fp32."""
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:
        scores = scores * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_wan_t5_attention() -> None:
    """Make WAN_T5_ATTENTION a transformers attention implementation, with the additive float
    mask its eager implementation uses. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(WAN_T5_ATTENTION, wan_t5_attention)
    AttentionMaskInterface.register(WAN_T5_ATTENTION, eager_mask)


class TextEncoder(nn.Module):
    """input_ids, attention_mask [B, L] -> context [B, L, D] with zeros past each true length."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        _register_wan_t5_attention()
        encoder.set_attn_implementation(WAN_T5_ATTENTION)
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask[..., None].to(hidden.dtype)


def build_umt5_encoder(hf_config_kwargs: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(**hf_config_kwargs))
    return model.to(dtype).eval()


# A tokenizer this many times smaller than the embedding table is broken, not merely trimmed
# (umT5-xxl's table is padded a little past its tokenizer's 256k pieces; the tiny presets'
# tokenizers have 145 tokens for 256 rows).
DEGENERATE_RATIO = 4


def check_tokenizer(tokenizer, vocab_size: int, where: str) -> bool:
    """Warn in one line when the tokenizer's vocabulary is far smaller than the text encoder's
    embedding table (`vocab_size` rows): such a tokenizer (e.g. transformers 5's
    `T5Tokenizer(vocab_file=...)`, which builds 4 tokens) maps every prompt to a few ids, and the
    model then ignores its prompt. Returns True when the tokenizer looks sound."""
    size = len(tokenizer)
    if size * DEGENERATE_RATIO >= vocab_size:
        return True
    warnings.warn(f"{where}: the tokenizer has {size} tokens for a text encoder with {vocab_size} embeddings; "
                  "prompts will encode to a handful of ids (rebuild the tokenizer from its spiece.model)",
                  stacklevel=3)
    return False


def load_tokenizer(folder, vocab_size: int | None = None):
    """The checkpoint's own tokenizer (diffusers `tokenizer/` or official `google/umt5-xxl/`);
    with `vocab_size` (the text encoder's embedding rows) a degenerate one warns (check_tokenizer)."""
    from transformers import AutoTokenizer

    from wan_rt.models.checkpoint import CheckpointError

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({exc})") from None
    if vocab_size is not None:
        check_tokenizer(tokenizer, vocab_size, str(folder))
    return tokenizer
