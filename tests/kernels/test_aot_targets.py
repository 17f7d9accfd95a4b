"""Every Triton kernel and GPU config, compiled ahead of time for every claimed target with no
GPU (kernels/targets.py: sm80, sm86, sm89, sm90, sm100, sm120), and the autotuners' pruning by
what those compiles measured (kernels/aot_targets.json, written by bench/aot_targets.py).

The compiles run in a child process (bench/aot_targets.py --check), outside this directory's
TRITON_INTERPRET=1. The table itself is checked for every kernel variant (bf16, int8, fp32, the
flattened-K conv) x config x target: a variant that keeps no config on a target fails. By default
one target per variant is compiled afresh, all its kept configs (the targets spread over the
variants), to check the table against the compiler; WAN_RT_AOT_ALL=1 compiles everything
(minutes on 2 cores).
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


def _names(configs: list) -> set[str]:
    return {targets.config_name(c.kwargs, c.num_warps, c.num_stages) for c in configs}


def test_the_attention_autotuner_prunes_per_gpu(monkeypatch):
    """What the autotuner may benchmark on each GPU: exactly the configs measured for the
    launch's variant (bf16, fp32, int8 on bf16 / fp32 inputs) that fit it, so fp32 launches are
    pruned by fp32 spills and never see a bf16-only config; an unlisted capability is checked as
    the listed one below it; a GPU older than sm80 is refused."""
    from wan_rt.kernels import rope3d_attn

    tuned = rope3d_attn._rope3d_attn_fwd_tuned
    prune = tuned.early_config_prune
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launches = {"rope3d_attention[bf16]": _args(torch.bfloat16), "rope3d_attention[fp32]": _args(torch.float32),
                "rope3d_attention[int8]": _args(torch.bfloat16, quant=True),
                "rope3d_attention[int8,fp32]": _args(torch.float32, quant=True)}
    for cc in targets.TARGETS:
        monkeypatch.setattr(targets, "device_capability", lambda index, cc=cc: cc)
        for variant, args in launches.items():
            table = targets.measured()[variant][str(cc)]
            kept = _names(prune(tuned.configs, args))
            assert kept and kept == {name for name, m in table.items() if targets.fits(m, cc)}, (variant, cc)
        assert not _names(prune(tuned.configs, launches["rope3d_attention[fp32]"])) \
            & {targets.config_name({"BLOCK_M": m, "BLOCK_N": n}, w, s) for (m, n), w, s in rope3d_attn.GPU_CONFIGS}
    monkeypatch.setattr(targets, "device_capability", lambda index: 87)
    sm86 = [c.kwargs for c in prune(tuned.configs, _args(torch.bfloat16))]
    monkeypatch.setattr(targets, "device_capability", lambda index: 86)
    assert sm86 == [c.kwargs for c in prune(tuned.configs, _args(torch.bfloat16))]
    monkeypatch.setattr(targets, "device_capability", lambda index: 75)
    with pytest.raises(RuntimeError, match="target sm80 and newer, not sm75"):
        prune(tuned.configs, _args(torch.bfloat16))


def test_the_conv_autotuner_prefers_tiles_that_suit_the_channels(monkeypatch):
    """Of the configs measured for the launch's variant (its dtype, flattened K or not) that fit,
    those whose tiles suit the channels; the others when none does."""
    from wan_rt.kernels import causal_conv

    tuned = causal_conv._causal_conv3d_tuned
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for cc in targets.TARGETS:
        monkeypatch.setattr(targets, "device_capability", lambda index, cc=cc: cc)
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for c_in, c_out, n, k in ((384, 384, 64, 32), (12, 16, 32, 16)):
                flat = c_in < 16
                variant = f"causal_conv3d[{name}{',flat' if flat else ''}]"
                fitting = targets.kept_configs(variant, tuned.configs, cc)
                args = {"X": SimpleNamespace(dtype=dtype), "C_in": c_in, "C_out": c_out, "FLAT_K": flat}
                kept = tuned.early_config_prune(tuned.configs, args)
                suited = [c for c in fitting if c.kwargs["BLOCK_N"] == n and c.kwargs["BLOCK_K"] == k]
                assert kept == (suited or fitting), (cc, variant, c_in, c_out)


def test_fp32_attention_is_pruned_by_its_own_spills(monkeypatch):
    """A config whose fp32 compile spills past the bound is dropped for fp32 launches although it
    fits by shared memory (what scaling the bf16 figures for tile bytes could not see)."""
    from wan_rt.kernels import rope3d_attn

    tuned = rope3d_attn._rope3d_attn_fwd_tuned
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(targets, "device_capability", lambda index: 89)
    table = {k: {cc: dict(v) for cc, v in per.items()} for k, per in targets.measured().items()}
    spilling, *rest = [targets.config_name({"BLOCK_M": m, "BLOCK_N": n}, w, s) for (m, n), w, s in rope3d_attn.FP32_CONFIGS]
    table["rope3d_attention[fp32]"]["89"] = {name: {"shared": 1024, "registers": 255, "spill_bytes": 0} for name in rest}
    table["rope3d_attention[fp32]"]["89"][spilling] = {"shared": 1024, "registers": 255,
                                                      "spill_bytes": targets.MAX_SPILL_BYTES + 1}
    monkeypatch.setattr(targets, "measured", lambda: table)
    assert _names(tuned.early_config_prune(tuned.configs, _args(torch.float32))) == set(rest)
