"""The README's entry points, typed from the root of the clone (where CI runs and a new user
stands): the clone's `kernels/` folder must not shadow the installed hub package `kernels` that
transformers imports, in any process wan_rt starts. Cheap forms of each command; outputs go to
tmp_path. `wan-rt run --ulysses 2` from the root is tests/test_launch_stress.py; setup failures
(a missing C++ library, a missing optional Python package) are one line that names the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from wan_rt.child_process import python_command

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command(name: str) -> str:
    """A console script of this environment (next to its python, else on PATH)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"no `{name}` command installed")
    return found


def run_from_root(argv: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert "cannot import name" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_build_and_run_from_the_repo_root(tmp_path):
    """README "On a fresh machine", on the embedded tiny default (ONNX Runtime engines; `wan-rt
    parity` is the same kind of process, left out for time)."""
    engines = tmp_path / "engines"
    build = run_from_root([command("wan-rt"), "build", "--engines-dir", str(engines)])
    assert build.returncode == 0, build.stderr[-3000:]
    run = run_from_root([command("wan-rt"), "run", "--engines-dir", str(engines), "--steps", "2",
                         "--output", str(tmp_path / "out.mp4")])
    assert run.returncode == 0 and (tmp_path / "out.mp4").stat().st_size > 0, run.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_from_the_repo_root(tmp_path):
    """README "Multi-GPU": torchrun starts `python -m wan_rt.cli` itself, with no -P."""
    out = tmp_path / "fox.mp4"
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun`, of this environment
    proc = run_from_root([*torchrun, "--nproc-per-node", "2", "-m", "wan_rt.cli", "run", "--model",
                          "tiny-t2v-A14B", "--ulysses", "2", "--steps", "2", "--output", str(out)])
    assert proc.returncode == 0 and out.stat().st_size > 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_serve_from_the_repo_root(tmp_path):
    """README "Serve it": the worker (a child process) loads the pipeline, umT5 included."""
    proc = subprocess.Popen([command("wan-rt"), "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                             "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "serve.log", "w"), text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, f"{line!r}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(match[1] + "/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:  # 503 until the worker has loaded
                pass
            log = (tmp_path / "serve.log").read_text()
            assert "cannot import name" not in log and proc.poll() is None, log[-3000:]
            assert time.monotonic() < deadline, f"the worker did not get ready:\n{log[-3000:]}"
            time.sleep(0.5)
        assert json.loads(urllib.request.urlopen(match[1] + "/readyz", timeout=5).read())["workers"][0]["ready"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_module_entry_points_from_the_repo_root():
    """`python -m wan_rt.cpp source-dir` and `python bench/parallel.py --model-only`."""
    cpp = run_from_root([sys.executable, "-m", "wan_rt.cpp", "source-dir"], timeout=120)
    assert cpp.returncode == 0 and Path(cpp.stdout.strip()) == REPO / "wan_rt" / "cpp", cpp.stderr
    model = run_from_root([sys.executable, "bench/parallel.py", "--model-only"], timeout=120)
    assert model.returncode == 0 and "U=8" in model.stdout, model.stderr[-2000:]


def test_cli_module_drops_the_repo_root_from_sys_path():
    """`python -m wan_rt.cli` (what torchrun starts) from the root: `kernels` is the hub package."""
    code = ("import runpy, sys; sys.argv = ['wan_rt.cli', '--help']\n"
            "try:\n    runpy.run_module('wan_rt.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import importlib.util; spec = importlib.util.find_spec('kernels')\n"
            "print('KERNELS', spec.origin if spec else None)")
    proc = run_from_root([sys.executable, "-c", code], timeout=120)
    origin = re.search(r"KERNELS (.*)", proc.stdout)
    assert origin, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not origin[1].startswith(str(REPO / "kernels")), origin[1]


# ------------------------------------------------------------------ setup failures name the fix
def test_a_missing_cpp_library_names_the_debian_package(tmp_path):
    """pkg-config finds nothing: CMake fails on sentencepiece, and the one line names every
    missing -dev package and the apt-get line."""
    empty = tmp_path / "pc"
    empty.mkdir()
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(empty), WAN_RT_CACHE=str(tmp_path / "cache"))
    proc = run_from_root([sys.executable, "-m", "wan_rt.cpp", "build"], timeout=300, env=env)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1, proc.stderr
    assert error[0].startswith("python -m wan_rt.cpp build: error: C++ configure failed: missing libsentencepiece-dev")
    assert ("sudo apt-get install -y libsentencepiece-dev libavformat-dev libavcodec-dev libswscale-dev "
            "libavutil-dev (full log: ") in error[0]


def test_missing_tools_are_all_named_at_once(monkeypatch):
    from wan_rt import cpp

    monkeypatch.setattr(cpp.shutil, "which", lambda name: None)
    missing = cpp.missing_packages()
    assert missing[:3] == ["cmake", "pkg-config", "g++"] and "libsentencepiece-dev" in missing
    with pytest.raises(cpp.CppBuildError, match=r"^missing cmake, pkg-config, g\+\+, .*apt-get install -y cmake "):
        cpp.build()


def test_every_extra_the_code_names_exists():
    """`pip install 'wan-rt[X]'` in a message must name an extra pyproject.toml declares."""
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {}
    for folder in ("wan_rt", "kernels", "export"):
        for path in (REPO / folder).rglob("*.py"):
            for extra in re.findall(r"wan-rt\[([a-z0-9,-]+)\]", path.read_text()):
                for name in extra.split(","):
                    named.setdefault(name, path.relative_to(REPO))
    assert named and not {n: p for n, p in named.items() if n not in extras}


@pytest.mark.parametrize("blocked,argv,extra", [
    ("triton", ["run", "--model", "tiny-t2v-A14B", "--kernels", "triton", "--steps", "1"], "triton"),
    ("psycopg", ["serve", "--store", "postgresql://127.0.0.1:1/none", "--port", "0"], "postgres"),
])
def test_a_missing_optional_package_names_its_extra(tmp_path, blocked, argv, extra):
    """The package is made unimportable (None in sys.modules): one line naming the extra."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from wan_rt.cli import main; sys.exit(main(sys.argv[1:]))")
    where = ["--output", str(tmp_path / "o.mp4")] if argv[0] == "run" else ["--data-dir", str(tmp_path / "data")]
    proc = subprocess.run(python_command("-c", code, *argv, *where),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"pip install 'wan-rt[{extra}]'" in lines[0], lines[0]
