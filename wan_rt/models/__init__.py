"""The eager oracle: pure PyTorch modules plus loaders for both checkpoint layouts.

`load_dit`, `load_vae` and `load_text_encoder` build each module on the meta device and assign
the checkpoint's (memory-mapped) tensors, so a 14B expert never exists twice in RAM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch

from wan_rt.models.checkpoint import (CheckpointError, CheckpointFiles, load_into, locate_checkpoint,
                                      map_keys, meta_parameters, official_dit_to_diffusers, read_state_dict)

Source = Union[str, Path, CheckpointFiles]
__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_component"]


def _files(source: Source) -> Optional[CheckpointFiles]:
    if isinstance(source, CheckpointFiles):
        return source
    path = Path(source)
    if (path / "model_index.json").is_file() or (path / "high_noise_model").is_dir() \
            or (path / "Wan2.2_VAE.pth").is_file() or (path / "Wan2.1_VAE.pth").is_file():
        return locate_checkpoint(path)
    return None


def read_config(path: Path) -> dict:
    """A checkpoint's JSON file; a missing or broken one is one CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def load_dit(source: Source, component: Optional[str] = None, *, dtype: Optional[torch.dtype] = None,
             device: Optional[Union[str, torch.device]] = None):
    """A DiT folder (diffusers `transformer/`, official `high_noise_model/`), one DiT file
    (.safetensors in Wan / ComfyUI / diffusers names, fp8 scaled, or .gguf: dequantized), or a
    checkpoint root plus `component` ("dit_high_noise", "dit_low_noise" or "dit"; default: the
    first stage)."""
    from wan_rt.models.dit import WanDiT, cast_dit

    files = _files(source)
    if files is not None:
        name = component or next(iter(files.dits))
        if name not in files.dits:
            raise CheckpointError(f"{files.root}: no {name} in this checkpoint (has {', '.join(files.dits)})")
        folder = files.dits[name]
    else:
        folder = Path(source)
    if folder.is_file():  # one file: the architecture comes from its shapes
        from wan_rt.models.single_file import dit_state

        config, sd = dit_state(folder, dtype or torch.float32)
    else:
        config, sd = _dit_folder(folder)
    with meta_parameters():
        model = WanDiT(config)
    # Cast on the host before moving: a 57 GB fp32 expert must not land on the GPU uncast. The
    # cast keeps diffusers' fp32 modules (time embedder, modulation tables, cross-attn norm).
    model = load_into(model, sd, source=folder)
    if dtype is not None:
        cast_dit(model, dtype)
    return model.to(device) if device is not None else model


def _dit_folder(folder: Path):
    """(config, tensors in our names) of a diffusers or official DiT folder."""
    from wan_rt.models import hf_config

    cfg = read_config(folder / "config.json")
    official = "dim" in cfg and "num_attention_heads" not in cfg
    if official:
        config = hf_config.dit_from_official(cfg, per_token_timestep=cfg.get("model_type") == "ti2v")
    else:
        per_token = int(cfg["in_channels"]) == int(cfg["out_channels"]) == 48  # TI2V-5B
        config = hf_config.dit_from_diffusers(cfg, text_len=512, per_token_timestep=per_token)
    sd = read_state_dict(folder)
    if official:
        from wan_rt.models.shapes import infer_dit_text_dim

        config = dataclasses.replace(config, text_dim=infer_dit_text_dim(sd))
        sd = map_keys(sd, official_dit_to_diffusers, source=folder)
    return config, sd


def load_vae(source: Source, *, dtype: Optional[torch.dtype] = torch.float32,
             device: Optional[Union[str, torch.device]] = None):
    """A diffusers `vae/` folder, an official Wan2.1_VAE.pth / Wan2.2_VAE.pth, one VAE file in the
    Wan names (ComfyUI's wan_2.1_vae / wan2.2_vae.safetensors), or a checkpoint root."""
    from wan_rt.models import hf_config
    from wan_rt.models.vae import WanVAE

    files = _files(source)
    path = files.vae if files is not None else Path(source)
    if path.is_dir():
        config = hf_config.vae_from_diffusers(read_config(path / "config.json"))
        sd = read_state_dict(path)
    else:  # one file: the version and sizes come from its shapes
        from wan_rt.models.single_file import vae_state

        config, sd = vae_state(path)
    with meta_parameters():
        model = WanVAE(config)
    return load_into(model, sd, source=path, dtype=dtype, device=device)


def load_text_encoder(source: Source, *, dtype: Optional[torch.dtype] = None,
                      device: Optional[Union[str, torch.device]] = None):
    """A transformers `text_encoder/` folder, the official umT5 .pth, one umT5 file (ComfyUI's
    umt5_xxl_*.safetensors, fp8 scaled too), or a checkpoint root.
    Returns wan_rt.models.text_encoder.TextEncoder (input_ids, attention_mask -> context)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from wan_rt.models import hf_config
    from wan_rt.models.text_encoder import TextEncoder

    files = _files(source)
    path = files.text_encoder if files is not None else Path(source)
    if path.is_dir():
        config = UMT5Config.from_pretrained(str(path))
        config.dropout_rate = 0.0
        sd = read_state_dict(path)
    else:
        from wan_rt.models.single_file import text_encoder_state

        te_config, sd = text_encoder_state(path, dtype or torch.float32)
        config = UMT5Config(**hf_config.text_encoder_to_hf(te_config))
    with meta_parameters():
        encoder = UMT5EncoderModel(config)
    encoder = load_into(encoder, sd, source=path, dtype=dtype, device=device)
    return TextEncoder(encoder).eval()


def load_component(source: Source, component: str, *, dtype: Optional[torch.dtype] = None,
                   device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """The eager model an engine component is made of: the text encoder, a DiT expert, or the
    VAE (both `vae_encoder` and `vae_decoder` are graphs of the one VAE)."""
    if component == "text_encoder":
        return load_text_encoder(source, dtype=dtype, device=device)
    if component.startswith("vae"):
        return load_vae(source, dtype=dtype, device=device)
    return load_dit(source, component, dtype=dtype, device=device)
