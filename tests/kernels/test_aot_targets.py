"""Every Triton kernel and GPU config, compiled ahead of time for every claimed target with no
GPU (kernels/targets.py: sm80, sm86, sm89, sm90, sm100, sm120), and the autotuners' pruning by
what those compiles measured (kernels/aot_targets.json, written by bench/aot_targets.py).

The compiles run in a child process (bench/aot_targets.py --check), outside this directory's
TRITON_INTERPRET=1. By default one target per kernel is compiled afresh, all its kept configs
(the targets spread over the kernels), to check the table against the compiler; the table itself
is checked for every kernel x config x target. WAN_RT_AOT_ALL=1 compiles everything, fp32 and the
flattened-K conv included (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from wan_rt.child_process import python_command
from wan_rt.kernels import targets

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
ALL = os.environ.get("WAN_RT_AOT_ALL") == "1"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = python_command(str(REPO / "bench" / "aot_targets.py"), "--check", str(out), "--workers", "2",
                          *(["--all"] if ALL else []))
    proc = subprocess.run(argv, env=env, cwd=out.parent, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_table_covers_every_kernel_config_and_target(report):
    assert not report["coverage"], "\n".join(report["coverage"]) + "\n(python bench/aot_targets.py --write)"


def test_every_kernel_keeps_a_config_on_every_target(report):
    assert not report["no_config"], "\n".join(report["no_config"])


def test_fresh_compiles_agree_with_the_table(report):
    checked = report["checked"]
    assert {target for _, _, target, _ in checked} == set(targets.TARGETS)
    assert not report["compiled"], "\n".join(report["compiled"])


def _args(dtype: torch.dtype, head_dim: int = 128, quant: bool = False) -> dict:
    tensor = SimpleNamespace(dtype=dtype)
    return {"Q": tensor, "V": tensor, "BLOCK_D": head_dim, "QUANT_INT8": quant}


def test_the_attention_autotuner_prunes_per_gpu(monkeypatch):
    """What the autotuner may benchmark on each GPU: only measured configs that fit it; fp32
    tiles (twice the bytes) keep no more than bf16 ones; an unlisted capability is checked as
    the listed one below it; a GPU older than sm80 is refused."""
    from wan_rt.kernels import rope3d_attn

    tuned = rope3d_attn._rope3d_attn_fwd_tuned
    prune = tuned.early_config_prune
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    table = targets.measured()["rope3d_attention[bf16]"]
    for cc in targets.TARGETS:
        monkeypatch.setattr(targets, "device_capability", lambda index, cc=cc: cc)
        kept = prune(tuned.configs, _args(torch.bfloat16))
        names = [targets.config_name(c.kwargs, c.num_warps, c.num_stages) for c in kept]
        assert names and all(targets.fits(table[str(cc)][n], cc) for n in names)
        assert len(names) == sum(targets.fits(m, cc) for m in table[str(cc)].values())
        wide = prune(tuned.configs, _args(torch.float32))
        assert set(map(id, wide)) <= set(map(id, kept))
    monkeypatch.setattr(targets, "device_capability", lambda index: 87)
    sm86 = [c.kwargs for c in prune(tuned.configs, _args(torch.bfloat16))]
    monkeypatch.setattr(targets, "device_capability", lambda index: 86)
    assert sm86 == [c.kwargs for c in prune(tuned.configs, _args(torch.bfloat16))]
    monkeypatch.setattr(targets, "device_capability", lambda index: 75)
    with pytest.raises(RuntimeError, match="target sm80 and newer, not sm75"):
        prune(tuned.configs, _args(torch.bfloat16))


def test_the_conv_autotuner_prefers_tiles_that_suit_the_channels(monkeypatch):
    """Of the configs that fit, those whose tiles suit the channels; the others when none does."""
    from wan_rt.kernels import causal_conv

    tuned = causal_conv._causal_conv3d_tuned
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = SimpleNamespace(dtype=torch.bfloat16)
    for cc in targets.TARGETS:
        monkeypatch.setattr(targets, "device_capability", lambda index, cc=cc: cc)
        fitting = targets.kept_configs("causal_conv3d[bf16]", tuned.configs, cc)
        for c_in, c_out, n, k in ((384, 384, 64, 32), (12, 16, 32, 16)):
            kept = tuned.early_config_prune(tuned.configs, {"X": x, "C_in": c_in, "C_out": c_out})
            suited = [c for c in fitting if c.kwargs["BLOCK_N"] == n and c.kwargs["BLOCK_K"] == k]
            assert kept == (suited or fitting), (cc, c_in, c_out)
