"""GGUF experts against diffusers' GGUF loader (`from_single_file(..., quantization_config=
GGUFQuantizationConfig(compute_dtype=float32))`) on the same file: one forward within 1e-4.

gguf 0.19 quantizes F16 and Q8_0 (and the legacy Q4_0/Q5_0) in Python but only dequantizes the
K-quants: their files are written as random quants with finite scales (tests/single_files.py),
which both loaders must decode the same way. The K-quants need rows of 256 values, so this DiT is
wider than the tiny presets (dim 256, one block)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from wan_rt.config import get_spec
from wan_rt.models import load_dit
from wan_rt.models.checkpoint import diffusers_dit_to_official
from wan_rt.models.dit import WanDiT
from wan_rt.models.hf_config import dit_to_diffusers
from wan_rt.runtime.gguf_weights import GGUFLinear, load_gguf_dit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("gguf")

CONFIG = dataclasses.replace(get_spec("tiny-t2v-A14B").dit, dim=256, ffn_dim=512, num_heads=2, num_layers=1,
                             freq_dim=32, text_dim=32)


@pytest.fixture(scope="module")
def dit_and_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    dit = WanDiT(CONFIG)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(dit_to_diffusers(CONFIG)))
    return {diffusers_dit_to_official(k): v for k, v in dit.state_dict().items()}, root


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, CONFIG.in_channels, 2, 4, 4, generator=g), torch.tensor([900.0, 300.0]),
            torch.randn(2, 16, CONFIG.text_dim, generator=g))


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K"])
@torch.no_grad()
def test_gguf_expert_matches_diffusers(qtype, dit_and_config, single_files, tmp_path):
    from diffusers import GGUFQuantizationConfig

    sd, root = dit_and_config
    path = single_files.write_gguf(sd, tmp_path / f"low_{qtype}.gguf", qtype)
    ref = diffusers.WanTransformer3DModel.from_single_file(
        str(path), config=str(root), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    expected = ref(*_inputs(), return_dict=False)[0]
    on_the_fly = load_gguf_dit(path, torch.float32)
    swapped = [m for m in on_the_fly.modules() if isinstance(m, GGUFLinear)]
    if qtype == "F16":  # a float type: plain tensors, nothing to dequantize
        assert not swapped
    else:  # every block Linear stays quantized: at most 8.5 bits a weight (Q8_0) instead of 32
        assert len(swapped) == 10 and {m.qtype for m in swapped} == {qtype}
        assert all(m.qweight.dtype == torch.uint8 and m.qweight.numel() <= 1.07 * m.in_features * m.out_features
                   for m in swapped)
    for ours in (on_the_fly(*_inputs()), load_dit(path, dtype=torch.float32)(*_inputs())):  # eager, build input
        assert (ours - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_torch_dequantization_equals_ggufs_numpy(qtype):
    """wan_rt's torch port (runs on the GPU where the blocks live) decodes random blocks to the
    same float32 values as gguf-py's reference numpy code (blocks with inf/nan scales aside)."""
    import gguf
    import numpy as np

    from wan_rt.models.gguf_dequant import TORCH_DEQUANTIZE

    kind = gguf.GGMLQuantizationType[qtype]
    per_block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = np.random.default_rng(7).integers(0, 256, size=(256, nbytes), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(blocks.reshape(1, -1), kind).reshape(256, per_block)
    finite = np.isfinite(ref)
    ours = TORCH_DEQUANTIZE[qtype](torch.from_numpy(blocks)).numpy()
    assert finite.mean() > 0.8 and np.array_equal(ours[finite], ref[finite])
