"""Integration: torch custom ops (opcheck, torch.compile, torch.export), TRITON_OPS, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import wan_rt.kernels as K
from wan_rt.models.ops import EAGER_OPS, Ops, set_ops

from .conftest import GPU, rel_err, wan_rope_tables

DEVICE = "cuda" if GPU else "cpu"
GRID = (2, 3, 5)  # L = 30
D = 32


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(1, L, 2, D, generator=g).to(DEVICE) for _ in range(3))
    cos, sin = (t.to(DEVICE) for t in wan_rope_tables(GRID, D))
    x = torch.randn(1, 3, 2, 5, 3, generator=g).to(DEVICE)
    w = torch.randn(4, 3, 3, 3, 3, generator=g).to(DEVICE)
    b = torch.randn(4, generator=g).to(DEVICE)
    cache = torch.randn(1, 3, 2, 5, 3, generator=g).to(DEVICE)
    return q, k, v, cos, sin, x, w, b, cache


OPCHECK_CASES = {
    "rope3d_attention": lambda i: (i[0], i[1], i[2], i[3], i[4], D ** -0.5, "none"),
    "rope3d_attention_int8": lambda i: (i[0], i[1], i[2], i[3], i[4], D ** -0.5, "int8"),
    "attention": lambda i: (i[0], i[1][:, :7], i[2][:, :7], 0.2),
    "causal_conv3d": lambda i: (i[5], i[6], i[7], i[8]),
    "causal_conv3d_no_cache": lambda i: (i[5], i[6], None, None),
    "rmsnorm_rope": lambda i: (i[0], torch.ones(2 * D, device=DEVICE), i[3], i[4], 1e-6),
    "layernorm_modulate": lambda i: (i[0].flatten(2), i[1][:, :1].flatten(2), i[2][:, :1].flatten(2), 1e-6),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_custom_op_opcheck(case):
    """Schema, fake (meta) implementation and AOT dispatch agree with the real kernel."""
    K.rope3d_attention, K.causal_conv3d, K.rmsnorm_rope  # noqa: B018 (registers the ops)
    name = case.replace("_int8", "").replace("_no_cache", "")
    op = getattr(torch.ops.wan_rt, name).default
    torch.library.opcheck(op, OPCHECK_CASES[case](_inputs()),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _block(q, k, v, cos, sin, x, w, b, cache):
    a = K.rope3d_attention(q, k, v, cos, sin)
    c = K.attention(a, k, v)
    y, new_cache = K.causal_conv3d(x, w, b, cache)
    n = K.rmsnorm_rope(c, torch.ones(2 * D, device=c.device), cos, sin, 1e-6)
    m = K.layernorm_modulate(n.flatten(2), q[:, :1].flatten(2), k[:, :1].flatten(2), 1e-6)
    return m, y, new_cache


def test_custom_ops_trace_under_torch_compile_fullgraph():
    """Dynamo traces every op as one node (no graph break) via the registered fakes."""
    inputs = _inputs(1)
    eager = _block(*inputs)
    torch._dynamo.reset()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)(*inputs)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_custom_ops_export():
    """torch.export sees torch.ops.wan_rt.* nodes (what AOTInductor would compile around)."""

    class Block(torch.nn.Module):
        def forward(self, *args):
            return _block(*args)

    ep = torch.export.export(Block(), _inputs(2))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("rope3d_attention", "attention", "causal_conv3d", "rmsnorm_rope", "layernorm_modulate"):
        assert f"wan_rt.{name}.default" in targets, sorted(targets)


def test_triton_ops_swap_into_a_model():
    """set_ops(model, TRITON_OPS) routes a module's attention through the kernels."""

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ops = EAGER_OPS

        def forward(self, q, k, v, cos, sin, ctx):
            return self.ops.attention(self.ops.rope_attention(q, k, v, cos, sin), ctx, ctx)

    q, k, v, cos, sin, *_ = _inputs(3)
    ctx = k[:, :11]
    model = Attn()
    eager = model(q, k, v, cos, sin, ctx)
    assert isinstance(K.TRITON_OPS, Ops)
    set_ops(model, K.TRITON_OPS)
    assert model.ops is K.TRITON_OPS
    assert rel_err(model(q, k, v, cos, sin, ctx), eager) <= 1e-4


def test_import_without_triton_is_lazy():
    """`import wan_rt.kernels` works without triton; using a kernel names the fix."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import wan_rt.kernels as K\n"
        "assert 'TRITON_OPS' in dir(K)\n"
        "try:\n    K.TRITON_OPS\nexcept ImportError as e:\n    assert 'pip install' in str(e), e\n"
        "else:\n    raise SystemExit('TRITON_OPS resolved without triton')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tiny_dit_with_triton_ops_matches_eager(spy_launches):
    """The real DiT (tiny spec, its own rope_tables) gives the same prediction through TRITON_OPS."""
    from wan_rt.config import SPECS
    from wan_rt.kernels import rope3d_attn
    from wan_rt.models.dit import WanDiT

    counts = spy_launches(rope3d_attn, "_rope3d_attn_fwd_kernel")
    cfg = SPECS["tiny-t2v-A14B"].dit
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # O(1) activations, norms and biases away from 1 / 0
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.2))
        x = torch.randn(1, cfg.in_channels, 3, 6, 10, generator=g)  # tokens (3, 3, 5): L = 45
        t = torch.tensor([700])
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
        eager = model(x, t, ctx)
        set_ops(model, K.TRITON_OPS)
        fused = model(x, t, ctx)
    assert counts["_rope3d_attn_fwd_kernel"] == 2 * cfg.num_layers  # self + cross per block
    assert rel_err(fused, eager) <= 1e-4
