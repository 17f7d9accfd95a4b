"""Multi-process launches are reliable: `wan-rt run` with a 2-process and a 4-process plan,
started from the root of the clone, launched again and again on the tiny model, succeeds every
time and writes the same frames every time.

CI launches each plan WAN_RT_LAUNCH_STRESS times (default 1, which also covers `wan-rt run
--ulysses 2` from the root); the full stress run is `WAN_RT_LAUNCH_STRESS=20 pytest
tests/test_launch_stress.py` (bench/RESULTS.md, issue 22, has its result).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHES = int(os.environ.get("WAN_RT_LAUNCH_STRESS", "1"))
PLANS = {"ulysses2": ["--ulysses", "2"], "cfg2_ulysses2": ["--cfg-parallel", "--ulysses", "2"]}


@pytest.mark.slow
@pytest.mark.parametrize("plan", list(PLANS))
def test_repeated_launches_from_the_repo_root_all_succeed(tmp_path, plan):
    from safetensors.torch import load_file

    wan_rt = shutil.which("wan-rt", path=str(Path(sys.executable).parent)) or shutil.which("wan-rt")
    if wan_rt is None:
        pytest.skip("no `wan-rt` command installed")
    first = None
    failures = []
    for i in range(LAUNCHES):
        frames = tmp_path / f"{i}.safetensors"
        start = time.monotonic()
        proc = subprocess.run([wan_rt, "run", "--model", "tiny-t2v-A14B", *PLANS[plan], "--steps", "2",
                               "--output", str(tmp_path / f"{i}.mp4"), "--frames-out", str(frames)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            failures.append(f"launch {i} exited {proc.returncode} after {time.monotonic() - start:.0f} s:\n"
                            f"{proc.stderr[-2000:]}")
            continue
        got = load_file(frames)["frames"]
        first = got if first is None else first
        assert got.equal(first), f"launch {i} wrote other frames than launch 0"
    assert not failures, f"{len(failures)} of {LAUNCHES} launches failed:\n" + "\n".join(failures)
