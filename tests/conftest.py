"""Shared fixtures. Tiny checkpoints made here with diffusers' and transformers' own classes are
the external oracle: wan_rt loads the same files and must reproduce diffusers' numbers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tiny presets are generated on first use; keep them out of the user's cache during tests.
os.environ.setdefault("WAN_RT_CACHE", tempfile.mkdtemp(prefix="wan_rt_test_cache_"))


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def write_diffusers_checkpoint(spec_name: str, folder: Path) -> Path:
    """A tiny checkpoint in the diffusers layout, written by diffusers/transformers classes."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline,
                           WanPipeline, WanTransformer3DModel)
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from wan_rt.config import get_spec
    from wan_rt.models import hf_config
    from wan_rt.tiny import _write_tokenizer

    spec = get_spec(spec_name)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(1234)
    experts = []
    for i, _ in enumerate(spec.stages):
        dit = WanTransformer3DModel(**strip(hf_config.dit_to_diffusers(spec.dit)))
        _perturb(dit, 100 + i)
        experts.append(dit.eval())
    vae = AutoencoderKLWan(**strip(hf_config.vae_to_diffusers(spec.vae)))
    _perturb(vae, 200)
    text_encoder = UMT5EncoderModel(UMT5Config(**hf_config.text_encoder_to_hf(spec.text_encoder)))
    _perturb(text_encoder, 300)
    tok_dir = folder / "_tok"
    _write_tokenizer(tok_dir, spec.text_encoder.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=spec.sample_shift, solver_order=2, solver_type="bh2",
                                        final_sigmas_type="zero", lower_order_final=True)
    cls = WanImageToVideoPipeline if spec.task == "i2v" else WanPipeline
    kwargs = dict(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                  transformer=experts[0], transformer_2=experts[1] if len(experts) > 1 else None,
                  boundary_ratio=spec.boundary, expand_timesteps=spec.dit.per_token_timestep)
    if cls is WanImageToVideoPipeline:
        kwargs.update(image_encoder=None, image_processor=None)
    pipe = cls(**kwargs)
    # A small shard size makes the transformer sharded with an index json, like real checkpoints.
    pipe.save_pretrained(folder / "ckpt", max_shard_size="200KB", safe_serialization=True)
    return folder / "ckpt"


@pytest.fixture(scope="session")
def diffusers_checkpoint(tmp_path_factory):
    """diffusers_checkpoint("tiny-t2v-A14B") -> folder (made once per session)."""
    made: dict[str, Path] = {}

    def make(spec_name: str) -> Path:
        if spec_name not in made:
            made[spec_name] = write_diffusers_checkpoint(spec_name, tmp_path_factory.mktemp(spec_name))
        return made[spec_name]

    return make
