"""The text encoder on one rank: rank 0 loads and runs umT5 (11 GB for the real model) and
broadcasts the context; the other ranks hold no text encoder at all. Every rank calls the
component with the same token ids, as every rank runs the same pipeline call."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from wan_rt.parallel import comm


class TextEncoderOnOneRank:
    def __init__(self, inner: Optional[Callable[..., dict[str, Tensor]]], d_model: int, device: torch.device,
                 src: int = 0, group=None):
        self.name = "text_encoder"
        self.inner, self.d_model, self.device, self.src, self.group = inner, d_model, device, src, group

    def __call__(self, *, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        context = None
        if self.inner is not None:
            context = self.inner(input_ids=input_ids, attention_mask=attention_mask)["context"]
        shape = (*input_ids.shape, self.d_model)
        return {"context": comm.broadcast(context, self.src, self.group, "text_broadcast", shape=shape,
                                          dtype=torch.float32, device=self.device)}
