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

from wan_rt.child_process import child_environment

SOURCE_DIR = Path(__file__).resolve().parent
EXECUTABLE = "wan-rt-cpp"
_SOURCE_SUFFIXES = (".h", ".cpp", ".inc", ".txt")
_STAMP = "wan_rt_build.ok"
# The libraries CMakeLists.txt finds, by their pkg-config module, and the Debian package of each.
DEBIAN_PACKAGES = {"nlohmann_json": "nlohmann-json3-dev", "CLI11": "libcli11-dev", "sentencepiece": "libsentencepiece-dev",
                   "libavformat": "libavformat-dev", "libavcodec": "libavcodec-dev", "libswscale": "libswscale-dev",
                   "libavutil": "libavutil-dev"}
_HEADER_ONLY = {"nlohmann_json": "nlohmann/json.hpp", "CLI11": "CLI/CLI.hpp"}


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
        raise CppBuildError(install_line(missing_packages()))
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
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=child_environment())
                if proc.returncode != 0:
                    missing = missing_packages() if what == "configure" else []
                    cause = install_line(missing) if missing else _first_error(log_path)
                    raise CppBuildError(f"C++ {what} failed: {cause} (full log: {log_path})")
        (folder / _STAMP).write_text("\n".join(str(p) for p in sources()) + "\n")
    return exe


def missing_packages() -> list[str]:
    """The Debian packages of the build's tools and libraries this machine lacks: each library
    as pkg-config finds it (Debian's -dev packages ship the .pc files CMake's checks use too)."""
    missing = [deb for tool, deb in (("cmake", "cmake"), ("pkg-config", "pkg-config")) if not shutil.which(tool)]
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cxx):
        missing.append("g++")
    pkg_config = shutil.which("pkg-config")
    for module, deb in DEBIAN_PACKAGES.items():
        if pkg_config is not None and subprocess.run([pkg_config, "--exists", module]).returncode == 0:
            continue
        header = _HEADER_ONLY.get(module)  # CMake finds these by their config files, not pkg-config
        if header is None or not any((Path(root) / header).is_file() for root in ("/usr/include", "/usr/local/include")):
            missing.append(deb)
    return missing


def install_line(packages: list[str]) -> str:
    """What to run for `packages` (Debian / Ubuntu)."""
    if not packages:
        return "install the C++ dependencies (README: C++ services)"
    return (f"missing {', '.join(packages)}; on Debian/Ubuntu: sudo apt-get install -y "
            f"{' '.join(packages)}")


def _first_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:
        if "error" in line.lower() and not line.startswith("$"):
            return line.strip()
    return lines[-1].strip() if lines else "no output"
