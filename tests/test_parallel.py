"""wan_rt.parallel: one video over several processes (gloo on the CPU) equals the single-process
eager video from the same latents (fp32, 1e-5), for T2V, I2V and TI2V, under Ulysses, ring, CFG
parallel and FSDP2 sharding, with 2 and 4 processes; the Triton kernels and the fast variant
under sequence parallelism; the CLI; bad plans as one line.

Each multi-process suite is one launch of tests/parallel_worker.py (several checks per launch:
a process group costs seconds per process here), bounded by a timeout after which the launcher
and every process under it are killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_rt.cli import main
from wan_rt.config import get_spec
from wan_rt.parallel import ParallelPlan, PlanError
from wan_rt.parallel.ring import attention_lse_torch, merge
from wan_rt.parallel.sequence import chunk_size, run_rows
from wan_rt.parallel.vae import split_rows

WORKER = Path(__file__).with_name("parallel_worker.py")
TOLERANCE = 1e-5  # fp32 frames in [-1, 1]


def _reap(proc: subprocess.Popen) -> None:
    """Stop the launcher and every process it started (the elastic agent puts each rank in its
    own session, so a process-group kill would miss them)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()


def run_suite(suite: str, nproc: int, models: dict, folder: Path, timeout: float) -> list[dict]:
    result, models_file = folder / f"{suite}.json", folder / f"{suite}-models.json"
    models_file.write_text(json.dumps(models))
    proc = subprocess.Popen([sys.executable, "-P", str(WORKER), suite, str(result), str(models_file), str(nproc)],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _reap(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{suite}: no result within {timeout:.0f} s; last output:\n{output[-3000:]}")
    finally:
        _reap(proc)
    assert proc.returncode == 0, f"{suite} failed:\n{output[-4000:]}"
    return json.loads(result.read_text())


def _four_head_checkpoint(name: str, folder: Path) -> str:
    """The tiny preset with 4 attention heads (head_dim 16): U = 4 needs heads divisible by 4."""
    from wan_rt.tiny import write_tiny_checkpoint

    spec = get_spec(name)
    spec = dataclasses.replace(spec, dit=dataclasses.replace(spec.dit, num_heads=4))
    write_tiny_checkpoint(spec, folder / name)
    return str(folder / name)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    models = {"t2v": "tiny-t2v-A14B", "i2v": "tiny-i2v-A14B", "ti2v": "tiny-ti2v-5B"}
    return run_suite("world2", 2, models, tmp_path_factory.mktemp("world2"), timeout=300)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world4")
    models = {kind: _four_head_checkpoint(name, folder)
              for kind, name in (("t2v", "tiny-t2v-A14B"), ("i2v", "tiny-i2v-A14B"), ("ti2v", "tiny-ti2v-5B"))}
    return run_suite("world4", 4, models, folder, timeout=420)


EXPECTED_TRAFFIC = {  # what each plan must have moved (besides the VAE's split decode)
    "ulysses": {"ulysses_qkv", "ulysses_out", "sequence_gather"},
    "ring": {"ring_kv", "sequence_gather"},
    "cfg": {"cfg_gather"},
}


def _check_pipelines(results: list[dict], world: int) -> None:
    cancel = [r for r in results if r.get("check") == "cancel"]
    assert len(cancel) == 1 and cancel[0]["stopped_after"] == [1] * world, cancel
    results = [r for r in results if "check" not in r]
    assert {r["task"] for r in results} == {"t2v", "i2v", "ti2v"}
    for r in results:
        ulysses, ring, cfg, shard = r["plan"]
        what = f"{r['model']} U={ulysses} R={ring} C={cfg}{' sharded' if shard else ''}"
        assert ulysses * ring * cfg == world and r["heads"] % ulysses == 0, what
        assert r["ref_std"] > 1e-2, f"{what}: a degenerate reference video would make the comparison meaningless"
        assert r["steps"] == r["ref_steps"], what
        assert r["max_abs_diff"] <= TOLERANCE, f"{what}: max |parallel - single| = {r['max_abs_diff']:.2e}"
        assert r["rank_spread"] == 0.0, f"{what}: ranks returned different frames"
        wanted = {"vae_halo", "vae_frames_gather", "vae_attention_kv"}
        wanted |= EXPECTED_TRAFFIC["ulysses"] if ulysses > 1 else set()
        wanted |= EXPECTED_TRAFFIC["ring"] if ring > 1 else set()
        wanted |= EXPECTED_TRAFFIC["cfg"] if cfg > 1 else set()
        assert wanted <= set(r["traffic"]), f"{what}: no traffic for {wanted - set(r['traffic'])}"
        assert r["sharded"] == shard, what


@pytest.mark.slow
def test_two_processes_equal_one(world2):
    """U=2, R=2, C=2 and U=2 with sharded experts, for T2V, I2V and TI2V (27 tokens: padded)."""
    _check_pipelines(world2, 2)
    assert len(world2) == 13


@pytest.mark.slow
def test_four_processes_equal_one(world4):
    """U=4, C=2 x U=2, U=2 x R=2 and C=2 x R=2 sharded, on 4-head models (18 tokens: padded)."""
    _check_pipelines(world4, 4)
    assert len(world4) == 13


@pytest.mark.slow
def test_triton_kernels_fast_variant_and_fsdp2(tmp_path):
    """DiT level, 2 processes, Triton in its CPU interpreter: Ulysses around the Triton attention
    (exact, and the fast variant's int8 attention + emulated FP8 linears), ring blocks merged by
    the Triton kernel's log-sum-exp, and a bf16 DiT sharded by FSDP2, each against the same
    model unsplit in one process."""
    results = run_suite("kernels", 2, {"t2v": "tiny-t2v-A14B"}, tmp_path, timeout=420)
    by_check = {(r["check"], tuple(r.get("plan", ()))): r for r in results}
    assert len(by_check) == 5
    for (check, plan), r in by_check.items():
        assert r["rank_spread"] == 0.0, check
        if check == "fsdp2 bf16":
            # the same bf16 arithmetic on all-gathered weights: bit for bit
            assert r["max_abs_diff"] == 0.0 and r["text_kv_diff"] == 0.0
            assert r["ffn_sharded"] and r["fp32_tables_whole"]
            continue
        assert ("ring_kv" if plan[1] > 1 else "ulysses_qkv") in r["traffic"], (check, plan)
        if "fp8" in check:
            # FP8 activations take one dynamic scale per tensor, i.e. per rank's share of the
            # tokens: another (not a worse) quantization. Ratio rule against the fp32 model.
            assert r["error_vs_fp32"] <= 2 * r["single_error_vs_fp32"], (check, plan, r)
            continue
        assert r["max_abs_diff"] <= 1e-5 * r["scale"], f"{check} {plan}: {r['max_abs_diff']:.2e}"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WAN_RT_TEST_COMPILE"), reason="compiles with inductor on 2 ranks: several "
                    "minutes on a 2-core machine; set WAN_RT_TEST_COMPILE=1 (checked by hand, see the README)")
def test_compiled_blocks_and_aoti_carry_the_collectives(tmp_path):
    """The compiled paths of README "Multi-GPU": per-block torch.compile with Ulysses' all-to-all
    inside; torch.export + AOTInductor with a functional all-to-all in the package."""
    results = {r["check"]: r for r in run_suite("compiled", 2, {"t2v": "tiny-t2v-A14B"}, tmp_path, timeout=900)}
    blocks = results["compiled blocks, ulysses 2"]
    assert blocks["max_abs_diff"] <= 1e-5 * blocks["scale"] and blocks["rank_spread"] == 0.0
    aoti = results["aoti all-to-all"]
    assert "_c10d_functional.all_to_all_single.default" in aoti["export_nodes"]
    assert aoti["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_cli_ulysses_writes_the_same_video(tmp_path):
    """`wan-rt run --ulysses 2` (which starts its two processes itself) makes the video `wan-rt
    run` makes, same seed: frames equal before the uint8 conversion (`--frames-out`), and both
    mp4 files decode to a video of that shape. (The mp4 files themselves are not compared: a
    1e-6 change that moves one 8-bit value to the next level can change the encoder's choices
    for a whole block, several levels on this 32x32 video.)"""
    import imageio.v3 as iio
    from safetensors.torch import load_file

    out = {}
    for name, extra in (("single", []), ("ulysses", ["--ulysses", "2"])):
        proc = subprocess.run([sys.executable, "-m", "wan_rt.cli", "run", "--steps", "3", *extra,
                               "--output", f"{name}.mp4", "--frames-out", f"{name}.safetensors"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = load_file(tmp_path / f"{name}.safetensors")["frames"]
        assert iio.imread(tmp_path / f"{name}.mp4", plugin="pyav").shape == (5, 32, 32, 3)
    assert "ulysses 2 on 2 processes" in proc.stdout
    a, b = out["single"], out["ulysses"]
    assert a.shape == b.shape == (5, 32, 32, 3) and float(a.std()) > 0
    assert float((a - b).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("args,message", [
    (["--ulysses", "3"], "--ulysses 3 does not divide the 2 attention heads of tiny-t2v-A14B; "
                         "valid Ulysses degrees: 1, 2"),
    (["--ulysses", "2", "--nproc-per-node", "4"], "world size 4 is not cfg 1 × ring 1 × ulysses 2 = 2"),
    (["--cfg-parallel", "--guidance", "1"], "--cfg-parallel needs classifier-free guidance (> 1) on every expert"),
    (["--cfg-parallel", "--guidance-2", "1.0"], "guidance is dit_low_noise 1"),
    (["--ring", "0"], "--ring must be a positive integer; got 0"),
])
def test_bad_plans_are_one_line_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "bad.mp4"
    assert main(["run", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_plan_checks_name_the_valid_degrees():
    with pytest.raises(PlanError, match=r"40 attention heads of t2v-A14B; valid Ulysses degrees: 1, 2, 4, 5, 8, 10, 20, 40$"):
        ParallelPlan(ulysses=3).check_model(get_spec("t2v-A14B"))
    with pytest.raises(PlanError, match=r"24 attention heads of ti2v-5B; valid Ulysses degrees: 1, 2, 3, 4, 6, 8, 12, 24$"):
        ParallelPlan(ulysses=16).check_model(get_spec("ti2v-5B"))
    ParallelPlan(ulysses=8).check_model(get_spec("t2v-A14B"))
    ParallelPlan(ulysses=4, cfg=2).check_model(get_spec("ti2v-5B"))
    with pytest.raises(PlanError, match="CFG degree is 1 or 2"):
        ParallelPlan(cfg=4)
    assert ParallelPlan(ulysses=4, ring=2, cfg=2).world_size == 16
    with pytest.raises(PlanError, match=r"work on the eager DiT; dit_low_noise runs on an engine"):
        ParallelPlan(ulysses=2).check_engine_dits(["dit_low_noise"])
    ParallelPlan(cfg=2).check_engine_dits(["dit_low_noise"])  # CFG parallel wraps any component


def test_modulation_rows_follow_the_token_split():
    """TI2V: one modulation row per latent frame; each chunk's rows, expanded to tokens, equal
    the per-token rows of its slice of the sequence (padding takes the last row)."""
    for length, rows, parts in ((27, 3, 2), (18, 3, 4), (880 * 31, 31, 8), (12, 1, 4)):
        per_token = torch.arange(rows).repeat_interleave(length // rows)
        size = chunk_size(length, parts)
        padded = torch.cat([per_token, per_token[-1:].expand(size * parts - length)])
        for index in range(parts):
            chunk_rows = run_rows(length, rows, index * size, size)
            assert size % len(chunk_rows) == 0
            expanded = chunk_rows.repeat_interleave(size // len(chunk_rows))
            assert torch.equal(expanded, padded[index * size:(index + 1) * size]), (length, rows, parts, index)
    assert len(run_rows(880 * 31, 31, 3410 * 3, 3410)) == 31  # 720p TI2V on 8 ranks: runs of 110 tokens


def test_log_sum_exp_merge_equals_attention_over_all_keys():
    """The ring's merge rule on key blocks of uneven sizes, against SDPA over every key."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=gen) for n in (10, 23, 23))
    out = lse = None
    for a, b in ((0, 7), (7, 8), (8, 23)):
        out, lse = merge(out, lse, *attention_lse_torch(q, k[:, a:b], v[:, a:b]))
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)
    assert (out - want).abs().max() < 1e-6


def test_vae_rows_split_evenly():
    assert split_rows(6, 4) == [2, 2, 1, 1] and split_rows(90, 8) == [12, 12, 11, 11, 11, 11, 11, 11]


def test_launcher_returns_the_failing_rank_exit_code():
    """Ranks that exit non-zero (a rank's own one-line error) make launch() return that code."""
    from wan_rt.parallel.launch import launch

    code = "import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)"
    assert launch(["-c", code], 2) == 3
    assert launch(["-c", "import os; assert os.environ['WORLD_SIZE'] == '2'"], 2) == 0


def test_wrappers_pass_the_residency_hooks_through():
    """The expert residency (runtime/residency.py) sees through a parallel wrapper."""
    from wan_rt.parallel.cfg import CFGParallelDiT
    from wan_rt.parallel.plan import ParallelGroups

    class Expert:
        name, nbytes, calls = "dit_high_noise", 123, []

        def load(self):
            self.calls.append("load")

        def unload(self):
            self.calls.append("unload")

        def __call__(self, **inputs):
            return {"noise_pred": inputs["latents"] * 2}

    plan = ParallelPlan(cfg=2)
    wrapped = CFGParallelDiT(Expert(), ParallelGroups(plan, 0, 2, 0, 0, 0, None, None, None, None, None))
    assert wrapped.name == "dit_high_noise" and wrapped.nbytes == 123
    wrapped.load(), wrapped.unload()
    assert Expert.calls == ["load", "unload"]
    x = torch.ones(1, 2)  # batch 1 (no CFG pair): runs whole, no exchange
    assert torch.equal(wrapped(latents=x, timestep=x, context=x)["noise_pred"], 2 * x)
