"""wan_rt's C++ runtime (this folder's CMake project): a library that runs an engines dir end to end
and the `wan-rt-cpp` command, built against the libtorch inside the installed torch wheel.

`build()` configures and builds the project into a cache folder keyed by the sources, the torch
it builds against and the CMake options (`~/.cache/wan_rt/cpp-build-<key>`, under $WAN_RT_CACHE
when set), and reuses it while none of them changed: `python -m wan_rt.cpp build` prints the
executable's path on its last line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

SOURCE_DIR = Path(__file__).resolve().parent
EXECUTABLE = "wan-rt-cpp"
_SOURCE_SUFFIXES = (".h", ".cpp", ".inc", ".txt")
_STAMP = "wan_rt_build.ok"


class CppBuildError(RuntimeError):
    """The C++ build cannot run or failed; the message is one line and names the log."""


def sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES)


def _cmake_options() -> list[str]:
    import torch
    import torch.utils

    opts = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DWAN_RT_TORCH_VERSION={torch.__version__}",
            "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        opts.append("-GNinja")
    return opts


def build_dir() -> Path:
    """The cache folder for the current sources, torch and options."""
    from wan_rt.tiny import cache_root

    h = hashlib.sha256()
    for path in sources():
        h.update(f"{path.relative_to(SOURCE_DIR)}\n".encode())
        h.update(path.read_bytes())
    h.update("\n".join(_cmake_options()).encode())
    return cache_root() / f"cpp-build-{h.hexdigest()[:16]}"


def build(jobs: Optional[int] = None, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """Configure and build (once per key; concurrent callers wait for the first), return the
    path of `wan-rt-cpp`. Its siblings: `run_graph` (example) and `wan-rt-cpp-probe` (tests)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise CppBuildError("cmake not found: install cmake >= 3.18 and the C++ dependencies (Debian: cmake "
                            "nlohmann-json3-dev libcli11-dev libsentencepiece-dev libavformat-dev libavcodec-dev "
                            "libswscale-dev libavutil-dev)")
    folder = build_dir()
    exe = folder / EXECUTABLE
    if (folder / _STAMP).is_file() and exe.is_file():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / _STAMP).is_file() and exe.is_file():
            return exe
        log(f"building the C++ runtime in {folder} ...")
        log_path = folder / "build.log"
        jobs = jobs or os.cpu_count() or 2
        steps = (("configure", [cmake, "-S", str(SOURCE_DIR), "-B", str(folder), *_cmake_options()]),
                 ("build", [cmake, "--build", str(folder), "-j", str(jobs)]))
        with open(log_path, "w") as out:
            for what, cmd in steps:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
                if proc.returncode != 0:
                    raise CppBuildError(f"C++ {what} failed: {_first_error(log_path)} (full log: {log_path})")
        (folder / _STAMP).write_text("\n".join(str(p) for p in sources()) + "\n")
    return exe


def _first_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:
        if "error" in line.lower() and not line.startswith("$"):
            return line.strip()
    return lines[-1].strip() if lines else "no output"
