"""fp32 files run at bf16 on the CPU cast the DiT blocks' Linear weights on use
(wan_rt/runtime/cast_on_use.py): the outputs must be bit-identical to the fully cast model's,
and the weights must stay the fp32 tensors read from the file (memory-mapped, not owned).
The presets store fp32, so they are the fp32 checkpoints here."""

import pytest
import torch
from safetensors.torch import load_file

from wan_rt.eager import build_eager_components
from wan_rt.models import load_dit
from wan_rt.resolve import resolve_checkpoint
from wan_rt.runtime.cast_on_use import CastOnUseLinear, cast_dit_on_use

CPU = torch.device("cpu")


def _inputs(dit, per_token: bool):
    cfg = dit.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 3, 8, 8, generator=gen)
    tokens = 3 * (8 // cfg.patch_size[1]) * (8 // cfg.patch_size[2])
    t = torch.full((2, tokens), 700.0) if per_token else torch.tensor([700.0, 300.0])
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=gen)
    return x, t, context


@pytest.mark.parametrize("preset", ["tiny-t2v-A14B", "tiny-ti2v-5B"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_on_use_is_bit_identical_to_the_full_cast(preset, dtype):
    files = resolve_checkpoint(preset).files
    name = next(iter(files.dits))
    full = load_dit(files, name, dtype=dtype)
    on_use = cast_dit_on_use(load_dit(files, name), dtype)
    swapped = [m for m in on_use.modules() if isinstance(m, CastOnUseLinear)]
    assert len(swapped) == 10 * len(on_use.blocks)  # q k v out, twice; the FFN's two
    assert all(m.weight.dtype == torch.float32 for m in swapped)
    # every other parameter as the full cast has it (KEEP_IN_FP32 still fp32)
    full_params = dict(full.named_parameters())
    for key, p in on_use.named_parameters():
        if not any(p is m.weight for m in swapped):
            assert p.dtype == full_params[key].dtype, key
    x, t, context = _inputs(full, full.config.per_token_timestep)
    with torch.no_grad():
        assert torch.equal(full(x, t, context=context), on_use(x, t, context=context))
        kv_full, kv_on_use = full.encode_text(context), on_use.encode_text(context)
        assert torch.equal(kv_full, kv_on_use)
        assert torch.equal(full(x, t, text_kv=kv_full), on_use(x, t, text_kv=kv_on_use))


def test_cpu_bf16_run_keeps_fp32_weights_mapped_and_the_text_encoder_in_fp32():
    r = resolve_checkpoint("tiny-t2v-A14B")
    components = build_eager_components(r, CPU, torch.bfloat16)
    stored = load_file(r.files.dits["dit_high_noise"] / "diffusion_pytorch_model.safetensors")
    dit = components["dit_high_noise"].module
    q = dit.blocks[0].attn1.to_q
    assert isinstance(q, CastOnUseLinear) and torch.equal(q.weight, stored["blocks.0.attn1.to_q.weight"])
    assert dit.patch_embedding.weight.dtype == torch.bfloat16
    te = components["text_encoder"]
    assert te.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in te.module.parameters())


def test_bf16_files_and_fp32_runs_load_as_before(tiny_t2v_bf16):
    components = build_eager_components(resolve_checkpoint(str(tiny_t2v_bf16)), CPU, torch.bfloat16)
    assert not any(isinstance(m, CastOnUseLinear) for m in components["dit_high_noise"].module.modules())
    assert components["text_encoder"].dtype == torch.bfloat16
    # fp32 run of fp32 files: nothing to cast
    fp32 = build_eager_components(resolve_checkpoint("tiny-t2v-A14B"), CPU, torch.float32, ["dit_high_noise"])
    assert not any(isinstance(m, CastOnUseLinear) for m in fp32["dit_high_noise"].module.modules())
