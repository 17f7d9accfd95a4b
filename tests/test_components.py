"""Component behaviour the loop relies on: the per-prompt text K/V cache and the dtype contract."""

import torch

from wan_rt.runtime.engine_component import TextKVCache


def test_text_kv_is_computed_once_per_prompt_tensor():
    calls = []
    cache = TextKVCache(lambda c: calls.append(c) or c * 2)
    cond, uncond = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    for _ in range(5):  # five CFG steps
        assert torch.equal(cache(cond), cond * 2) and torch.equal(cache(uncond), uncond * 2)
    assert len(calls) == 2
    cache(cond.clone())  # equal values, another tensor: recomputed, never guessed
    assert len(calls) == 3


def test_text_kv_cache_notices_in_place_edits():
    calls = []
    cache = TextKVCache(lambda c: calls.append(1) or c.clone())
    ctx = torch.zeros(1, 2, 3)
    cache(ctx)
    ctx.add_(1.0)
    assert torch.equal(cache(ctx), torch.ones(1, 2, 3)) and len(calls) == 2


def test_eager_dit_component_equals_plain_forward():
    from wan_rt.config import get_spec
    from wan_rt.models.dit import WanDiT
    from wan_rt.runtime.engine_component import EagerDiTComponent

    spec = get_spec("tiny-ti2v-5B")
    torch.manual_seed(0)
    dit = WanDiT(spec.dit).eval()
    comp = EagerDiTComponent("dit", spec, dit, torch.float32, torch.device("cpu"))
    x, ctx = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 16, 32)
    t = torch.full((1, 2 * 2 * 2), 700.0)
    with torch.no_grad():
        want = dit(x, t, ctx)
    for _ in range(2):  # the second call uses the cached text K/V
        assert torch.equal(comp(latents=x, timestep=t, context=ctx)["noise_pred"], want)
