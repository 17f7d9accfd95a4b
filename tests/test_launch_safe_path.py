"""Processes wan_rt starts never import the folder they were started in (wan_rt/child_process.py),
and a failed multi-process launch is one line naming the rank that failed first
(wan_rt/parallel/launch.py).

The shadowing check uses a folder holding `json/`, which would shadow the standard library's
json for `python -m json.tool` run there: safe-path mode must make the real one load, on this
Python (-P) and on Python 3.10 (pyproject's oldest; the bootstrap that drops sys.path[0]).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wan_rt import child_process
from wan_rt.parallel.launch import launch



def _python310() -> str | None:
    """A Python 3.10 that runs (a pyenv shim may exist without selecting one)."""
    candidates = [shutil.which("python3.10"), *map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


PY310 = _python310()


@pytest.fixture
def shadowing_folder(tmp_path: Path) -> Path:
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("raise SystemExit('the folder shadowed json')\n")
    return tmp_path


def _run(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, input='{"a": 1}', capture_output=True, text=True, timeout=60, env=env)


def test_plain_python_is_shadowed(shadowing_folder):
    """The hazard itself, so the checks below can fail."""
    proc = _run([sys.executable, "-m", "json.tool"], shadowing_folder)
    assert proc.returncode != 0 and "the folder shadowed json" in proc.stderr


@pytest.mark.parametrize("python", ["current", "3.10"])
def test_children_do_not_import_their_folder(shadowing_folder, monkeypatch, python):
    if python == "3.10":
        if PY310 is None:
            pytest.skip("no python3.10 on PATH to check the 3.10 bootstrap with")
        monkeypatch.setattr(child_process, "SAFE_PATH_FLAG", False)
        monkeypatch.setattr(sys, "executable", PY310)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    as_module = _run(child_process.python_command("-m", "json.tool"), shadowing_folder, env)
    assert as_module.returncode == 0 and '"a": 1' in as_module.stdout, as_module.stderr
    code = "import json, sys; print(json.__file__); print(sys.argv[1:])"
    as_code = _run(child_process.python_command("-c", code, "x", "y"), shadowing_folder, env)
    assert as_code.returncode == 0, as_code.stderr
    assert str(shadowing_folder) not in as_code.stdout and "['x', 'y']" in as_code.stdout


def test_child_environment_drops_the_folder_from_pythonpath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keep = str(tmp_path / "lib")
    (tmp_path / "lib").mkdir()
    env = child_process.child_environment({"PYTHONPATH": os.pathsep.join(["", ".", str(tmp_path), keep])})
    assert env["PYTHONPATH"] == keep and env["PYTHONSAFEPATH"] == "1"
    assert "PYTHONPATH" not in child_process.child_environment({"PYTHONPATH": str(tmp_path)})


# ------------------------------------------------------------------ one line per failed launch
# Each rank of these launches records its failure the way `wan-rt run`'s ranks do
# (record_failure). The cause fails first and then leaves a flag; an "echo" rank (a collective
# whose peer vanished) fails only once it sees the flag, as in a real job. Without the flag the
# order would hang on how fast each rank imported torch, which is seconds apart on a loaded CI box.
RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
from wan_rt.parallel.launch import record_failure
rank = int(os.environ["RANK"])
what = {plan}[rank]
flag = Path({flag!r})
if what == "echo":
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.02)
if what == "kill":
    flag.touch()
    os.kill(os.getpid(), 9)
try:
    raise {{"user": ValueError, "bug": RuntimeError, "echo": ConnectionError}}[what](f"{{what}} on rank {{rank}}")
except Exception as exc:
    record_failure(exc, what == "user")
    flag.touch()
    sys.exit(2 if what == "user" else 1)
"""


@pytest.mark.parametrize("plan,code,line", [
    (["echo", "bug"], 1, "wan-rt: error: rank 1 failed: RuntimeError: bug on rank 1 (WAN_RT_DEBUG=1 shows the tracebacks)"),
    (["user", "echo"], 2, "wan-rt: error: user on rank 0"),
    (["echo", "kill"], 1, "wan-rt: error: rank 1 was killed by SIGKILL"),
])
def test_a_failed_launch_is_one_line_about_the_first_failure(capfd, tmp_path, plan, code, line):
    script = RANK_SCRIPT.format(plan=plan, flag=str(tmp_path / "cause_failed"))
    assert launch(["-c", script], 2) == code
    err = capfd.readouterr().err.strip()
    assert err == line


def test_a_rank_exit_code_without_a_record_is_reported(capfd):
    assert launch(["-c", "import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)"], 2) == 3
    assert capfd.readouterr().err.strip() == "wan-rt: error: rank 1 exited with code 3"
