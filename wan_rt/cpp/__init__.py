"""C++ access to wan_rt's AOTInductor engines: `wan_rt_aoti.h` (header only: load a graph folder,
run named tensors, read/write safetensors) and `run_graph.cpp` (a command-line example).

`compile_command(source, output)` is the g++ command line that builds a program against the
libtorch inside the installed torch wheel; `python -m wan_rt.cpp run_graph [OUTPUT]` prints the
one for the example."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE / "wan_rt_aoti.h"
EXAMPLES = {"run_graph": HERE / "run_graph.cpp"}


def compile_command(source: str | os.PathLike, output: str | os.PathLike, *, opt: str = "-O1") -> list[str]:
    """g++ (or $CXX) against torch's headers and libraries, with torch's C++ ABI and an rpath."""
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
    lib = Path(torch.__file__).resolve().parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{HERE}"]
    return [cxx, "-std=c++20", opt, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", str(output),
            f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]
