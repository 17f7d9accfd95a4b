"""WanDiT against diffusers' WanTransformer3DModel (the numerical oracle) on the tiny specs.

Tolerances: fp32 parity is a relative L2 error (‖a−b‖/‖b‖) < 1e-5; RoPE against an fp64 complex
oracle < 1e-6; bf16 uses the ratio rule (style.md §5.7): our bf16 error against our fp32 output
is at most 2x diffusers' bf16 error against the same reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wan_rt.config import SPECS, DiTConfig
from wan_rt.models.dit import WanDiT, cast_dit, rope_axis_dims, rope_tables
from wan_rt.models.hf_config import dit_to_diffusers
from wan_rt.models.ops import EAGER_OPS, Ops, apply_rope, set_ops

diffusers = pytest.importorskip("diffusers")

TINY = ["tiny-t2v-A14B", "tiny-i2v-A14B", "tiny-ti2v-5B"]
LATENT = (3, 4, 6)  # latent (F, H, W) -> token grid (3, 2, 3): every RoPE axis has > 1 position
TIMESTEPS = (900.0, 300.0)  # batch 2, a different timestep per sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace every parameter with seeded noise of a useful size: default init leaves norm
    weights at 1 and biases near 0, which would let a swapped weight/bias go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("scale_shift_table"):
                p.copy_(0.5 * noise)
            elif p.ndim > 1:  # Linear / Conv3d weight: keep activations O(1) through the stack
                p.copy_(noise * p[0].numel() ** -0.5)
            elif "norm" in name:  # RMSNorm / LayerNorm weight or bias
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:  # bias
                p.copy_(0.2 * noise)


def _pair(name: str) -> tuple[torch.nn.Module, WanDiT]:
    """(diffusers reference, ours) with identical random weights, fp32, eval mode."""
    cfg = SPECS[name].dit
    kwargs = {k: v for k, v in dit_to_diffusers(cfg).items() if not k.startswith("_")}
    ref = diffusers.WanTransformer3DModel(**kwargs).eval()
    _randomize(ref)
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg: DiTConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [2, C_in, 3, 4, 6], timestep [2] (or per-token [2, L] for TI2V), context [2, L_txt, D_txt]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, *LATENT, generator=g)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    t = torch.tensor(TIMESTEPS)
    if cfg.per_token_timestep:  # Wan's TI2V: clean first latent frame at t = 0, the rest at t
        f, h, w = LATENT[0], LATENT[1] // 2, LATENT[2] // 2
        t = t[:, None].repeat(1, f * h * w)
        t[:, : h * w] = 0
    return x, t, context


def _diffusers_forward(ref: torch.nn.Module, x, t, context) -> torch.Tensor:
    return ref(x, t, context, return_dict=False)[0]


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_matches_diffusers_fp32(name):
    ref, ours = _pair(name)
    x, t, context = _inputs(ours.config)
    expected = _diffusers_forward(ref, x, t, context)
    out = ours(x, t, context)
    assert out.shape == expected.shape == (2, ours.config.out_channels, *LATENT)
    assert rel_err(out, expected) < 1e-5


def test_state_dict_is_diffusers_and_has_no_rope():
    ref, ours = _pair("tiny-t2v-A14B")
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(sd) == 69  # 12 top-level + 27 per block x 2 + 3 head (spec §7.3)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert list(ours.buffers()) == []  # RoPE tables are computed from the grid, never stored
    assert not any("rope" in k or "freqs" in k for k in sd)


def _rope_oracle(x: torch.Tensor, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Official Wan2.2 `rope_params` + `rope_apply`: complex float64, interleaved pairs."""
    d = x.shape[-1]
    c = d // 2

    def rope_params(max_seq_len: int, dim: int) -> torch.Tensor:
        freqs = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
        return torch.polar(torch.ones_like(angles), angles)

    freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                       rope_params(1024, 2 * (d // 6))], dim=1)
    f, h, w = grid
    ff, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    table = torch.cat([ff[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                       fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))  # [B, L, H, D/2]
    return torch.view_as_real(xc * table).flatten(-2)


@pytest.mark.parametrize("head_dim,grid", [
    (32, (3, 2, 3)),      # the tiny specs (12/10/10 split)
    (128, (3, 2, 3)),     # real head_dim (44/42/42 split)
    (128, (2, 3, 1000)),  # positions near the 1024 limit, where naive fp32 angles drift ~1e-4
])
def test_rope_matches_complex_fp64_oracle(head_dim, grid):
    cfg = dataclasses.replace(SPECS["tiny-t2v-A14B"].dit, dim=2 * head_dim, num_heads=2)
    assert sum(rope_axis_dims(head_dim)) == head_dim
    cos, sin = rope_tables(cfg, grid)
    length = grid[0] * grid[1] * grid[2]
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (length, head_dim // 2)
    x = torch.randn(1, length, 2, head_dim, generator=torch.Generator().manual_seed(0))
    assert rel_err(apply_rope(x, cos, sin), _rope_oracle(x, grid)) < 1e-6


@torch.no_grad()
def test_constant_per_token_timestep_equals_per_sample():
    _, ours = _pair("tiny-ti2v-5B")
    x, _, context = _inputs(ours.config)
    t = torch.tensor(TIMESTEPS)
    length = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    per_token = ours(x, t[:, None].expand(2, length), context)
    assert rel_err(per_token, ours(x, t, context)) < 1e-6
    # ...and the per-frame values are really used: a clean first frame changes the output.
    t_i2v = t[:, None].repeat(1, length)
    t_i2v[:, : length // LATENT[0]] = 0
    assert rel_err(ours(x, t_i2v, context), per_token) > 1e-3


@torch.no_grad()
def test_set_ops_swaps_attention():
    _, ours = _pair("tiny-t2v-A14B")
    x, t, context = _inputs(ours.config)
    calls = {"rope_attention": 0, "attention": 0}

    def rope_attention(q, k, v, cos, sin):
        calls["rope_attention"] += 1
        assert q.shape[1] == cos.shape[0] and cos.dtype == torch.float32
        return EAGER_OPS.rope_attention(q, k, v, cos, sin)

    def attention(q, k, v):
        calls["attention"] += 1
        return EAGER_OPS.attention(q, k, v)

    expected = ours(x, t, context)
    set_ops(ours, Ops(rope_attention=rope_attention, attention=attention))
    out = ours(x, t, context)
    n = ours.config.num_layers
    assert calls == {"rope_attention": n, "attention": n}  # self- and cross-attention per block
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_bf16_ratio_rule(name):
    """Both models in bf16 with diffusers' keep-in-fp32 policy, against our fp32 output."""
    ref, ours = _pair(name)
    x, t, context = _inputs(ours.config)
    x, context = x.bfloat16(), context.bfloat16()  # same rounded inputs for every run
    reference = ours(x.float(), t, context.float())

    keep = ref._keep_in_fp32_modules  # what diffusers' from_pretrained(torch_dtype=bf16) does
    for pname, p in ref.named_parameters():
        p.data = p.data.to(torch.float32 if any(m in pname.split(".") for m in keep) else torch.bfloat16)
    cast_dit(ours, torch.bfloat16)
    assert {k: p.dtype for k, p in ours.named_parameters()} == {k: p.dtype for k, p in ref.named_parameters()}

    out = ours(x, t, context)
    assert out.dtype == torch.bfloat16
    ours_err = rel_err(out, reference)
    ref_err = rel_err(_diffusers_forward(ref, x, t, context), reference)
    assert 0 < ours_err <= 2 * ref_err + 1e-4, (ours_err, ref_err)


@torch.no_grad()
def test_export_dynamic_grid_without_complex_or_float64():
    _, ours = _pair("tiny-t2v-A14B")
    x, t, context = _inputs(ours.config)
    f, h, w = (torch.export.Dim(n, min=1, max=64) for n in "fhw")
    program = torch.export.export(ours, (x, t, context),
                                  dynamic_shapes=({2: f, 3: 2 * h, 4: 2 * w}, None, None))
    dtypes = {n.meta["val"].dtype for n in program.graph.nodes
              if isinstance(n.meta.get("val"), torch.Tensor)}
    assert dtypes == {torch.float32}
    x2 = torch.randn(2, ours.config.in_channels, 5, 6, 10)  # another grid: (5, 3, 5) tokens
    assert rel_err(program.module()(x2, t, context), ours(x2, t, context)) < 1e-6
