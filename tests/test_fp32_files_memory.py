"""Memory at a size CI affords: `wan-rt run --dtype bf16` on fp32 files must not own a bf16 copy
of the DiT (wan_rt/runtime/cast_on_use.py keeps the blocks' Linear weights memory-mapped and
casts one layer at a time).

A checkpoint with ~1.2 GB of fp32 DiT weights (the tiny T2V's text encoder and VAE, its two
experts replaced by an 8-layer x 1536 DiT, hard-linked as both) is written on the spot with
bench/real_size.py's write_ci_checkpoint; the run on it and on the tiny model are measured as the
process tree's peak RssAnon. Both experts load, so the run's DiT weights are 1.2 GB at bf16:
the big run may own at most a quarter of that more than the tiny one. Casting the DiTs whole
(what a CPU bf16 run of fp32 files did before) owns all of it.
"""

import sys

import pytest
import torch


@pytest.fixture(scope="module")
def fp32_checkpoint(real_size_bench, tmp_path_factory):
    """(folder, both experts' bytes at bf16): the tiny T2V with an 8-layer x 1536 fp32 DiT as both experts."""
    folder = tmp_path_factory.mktemp("fp32") / "fp32-t2v"
    fp32_bytes = real_size_bench.write_ci_checkpoint(folder, 8, torch.float32)
    assert fp32_bytes > 1.0e9
    return folder, 2 * (fp32_bytes // 2)  # two experts, half the bytes each at bf16


@pytest.mark.slow
def test_bf16_run_of_fp32_files_casts_on_use_instead_of_owning_a_copy(fp32_checkpoint, real_size_bench, tmp_path):
    folder, bf16_bytes = fp32_checkpoint

    def owned(model: str) -> float:
        out = tmp_path / "out.mp4"
        cmd = [sys.executable, "-m", "wan_rt.cli", "run", "--model", model, "--dtype", "bf16", "--steps", "2",
               "--frames", "5", "--height", "32", "--width", "32", "--output", str(out)]
        # cwd: not the repo root, whose kernels/ would shadow the hub package
        row = real_size_bench.measure(cmd, [out], timeout=300, cwd=tmp_path)
        assert row["rc"] == 0 and out.is_file(), row["last_line"]
        return row["peak_anon_gb"] * 2**30

    baseline = owned("tiny-t2v-A14B")
    big_run = owned(str(folder))
    print(f"owned: tiny {baseline / 2**30:.2f} GiB, fp32 files {big_run / 2**30:.2f} GiB "
          f"(bound: +{0.25 * bf16_bytes / 2**30:.2f})")
    assert big_run - baseline < 0.25 * bf16_bytes, (
        f"the bf16 run of {bf16_bytes / 1e9:.1f} GB of bf16 DiT weights (fp32 files) owned {(big_run - baseline) / 2**30:.2f} "
        "GiB more than the tiny one: the DiT is being converted whole instead of cast on use")
