"""AOTInductor backend, run side: `load_graph` runs a .pt2 package plus its `weights.safetensors`
(and the checkpoint bytes its `weights.json` points at) behind the GraphRunner contract (the
build side is wan_rt.export.aoti_export).

The package is code only; the runner loads the weights file and hands the tensors to the
compiled model (`load_constants`, all constants required), so one package serves every
checkpoint of its architecture. On the CPU the package is a C++ .so (built with the machine's
C++ compiler, tied to its vector ISA); on CUDA it embeds Triton kernels for the GPU it was built
on. Both are tied to the torch that built them: `STRICT_VERSIONS` makes a manifest from another
torch (or another CPU ISA / GPU) stale instead of crashing inside the .so.

The runner checks what the compiled code does not: names, dtypes, and that every symbol read off
the inputs is consistent and inside the range the package was compiled for (recorded in the
package's metadata). AOTInductor's own input checks are off by default, and outside its range
the generated code would index out of bounds rather than raise.

NOT VERIFIED on a GPU (no GPU on any machine this was written on): CUDA packages, bf16/fp16.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from wan_rt.runtime.graphs import GraphSpec, engine_inputs, outside_profile_hint, read_sizes

NAME = "aoti"
FILE_SUFFIX = ".pt2"
PACKAGE_FILE = "model" + FILE_SUFFIX
WEIGHTS_FILE = "weights.safetensors"
# Constants that are a checkpoint file's own bytes are not copied into WEIGHTS_FILE: this file
# points at them (export/aoti_export.py writes it), through hard links in weights/
# (export/checkpoint_links.py) where the engines dir shares the checkpoint's disk, else at the
# checkpoint's files themselves (the manifest's weights fingerprint makes a changed checkpoint
# stale either way).
WEIGHT_REFS_FILE = "weights.json"
# safetensors' dtype names (wan_rt/cpp/src/safetensors.cpp reads the same ones).
REF_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# The .so links against the torch that built it; the CPU code uses that machine's vector ISA.
STRICT_VERSIONS = ("torch", "device")
# The runtime replays DiT step graphs from CUDA graphs on a GPU (runtime/cuda_graphs.py): the
# package has no graphs of its own, unlike a TensorRT engine.
CUDA_GRAPHS = True


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU code, or None."""
    from torch._inductor import config

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (tuple, list)) else (config.cpp.cxx,)
    for name in (os.environ.get("CXX"), *candidates, "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason(device: torch.device | str = "cpu") -> str:
    try:
        import torch._inductor
        from torch._inductor import aoti_compile_and_package, aoti_load_package  # noqa: F401
    except ImportError as exc:
        return f"torch._inductor's AOTInductor API is missing ({exc})"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    if cxx_compiler() is None:  # needed on CUDA too: the wrapper is C++
        return "no C++ compiler found (install g++ or set CXX)"
    return ""


def is_available() -> bool:
    return not unavailable_reason()


def device_key() -> str:
    """The CPU vector ISA inductor compiles for, plus the GPU's compute capability if any."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    key = f"cpu-{pick_vec_isa() or 'scalar'}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        key += f"+cuda-sm{major}{minor}"
    return key


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "device": device_key()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------ runtime
def package_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata compiled into a package, read from the archive without loading its .so."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
        return json.loads(z.read(names[0])) if names else {}


def register_custom_ops(path: str | os.PathLike) -> list[str]:
    """Import the wan_rt kernel modules whose custom ops the package calls (AOTInductor's proxy
    executor looks them up when the package loads). Returns the op names."""
    import importlib

    ops = [o for o in package_metadata(path).get("wan_rt.custom_ops", "").split(",") if o]
    if not ops:
        return []
    from wan_rt.kernels import _EXPORTS

    for op in ops:
        if op not in _EXPORTS:
            raise ValueError(f"{path}: the package calls wan_rt::{op}, which this wan_rt does not have; rebuild it")
        try:
            importlib.import_module(f"wan_rt.kernels.{_EXPORTS[op]}")
        except ImportError as exc:
            raise RuntimeError(f"{path}: the package calls wan_rt's Triton kernel {op}, which needs triton "
                               f"({exc})") from None
    return ops


def load_package(path: str | os.PathLike, device: torch.device | str):
    """torch._inductor.aoti_load_package on the right GPU (device_index only where one is named)."""
    device = torch.device(device)
    register_custom_ops(path)
    kwargs = {"device_index": device.index} if device.type == "cuda" and device.index is not None else {}
    return torch._inductor.aoti_load_package(str(path), **kwargs)


def _load_constants(model, constants: dict[str, Tensor]) -> None:
    """All constants at once; the model keeps our tensors (no second copy) where this torch
    lets it (`user_managed`), in which case the runner keeps them alive."""
    kwargs = {"check_full_update": True}
    if "user_managed" in inspect.signature(model.load_constants).parameters:
        kwargs["user_managed"] = True
    model.load_constants(constants, **kwargs)


class AotiRunner:
    """GraphRunner over a loaded AOTI package: {input name: tensor} -> {output name: tensor}."""

    def __init__(self, model, constants: dict[str, Tensor], gspec: GraphSpec, compute_dtype: torch.dtype,
                 device: torch.device):
        self.model, self.constants, self.gspec, self.device = model, constants, gspec, device
        self.compute_dtype = compute_dtype
        self.where = f"{gspec.component}/{gspec.graph}"
        meta = model.get_metadata().get("wan_rt.contract")
        if meta is None:
            raise ValueError(f"{self.where}: the package has no wan_rt contract metadata; rebuild it")
        contract = json.loads(meta)
        names = [n for n, _, _ in contract["inputs"]] + [n for n, _, _ in contract["outputs"]]
        if names != gspec.input_names + gspec.output_names:
            raise ValueError(f"{self.where}: the package's inputs/outputs {names} are not the contract's "
                             f"{gspec.input_names + gspec.output_names}; rebuild it")
        self.min, self.max = contract["min"], contract["max"]

    def sizes(self, inputs: Mapping[str, Tensor]) -> dict[str, int]:
        """The symbols' values read off the inputs, each checked against the compiled range."""
        sizes = read_sizes(self.gspec, inputs)
        for sym, n in sizes.items():
            if not self.min[sym] <= n <= self.max[sym]:
                lo, hi = self.min[sym], self.max[sym]
                raise ValueError(f"{self.where}: {sym} = {n} is outside the range this package was compiled "
                                 f"for [{lo}, {hi}]; {outside_profile_hint(sym, n, lo, hi)}")
        return sizes

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feed = engine_inputs(self.gspec, inputs, self.compute_dtype, self.device)
        self.sizes(feed)
        with torch.inference_mode():
            out = self.model(*feed.values())
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(out) != len(self.gspec.outputs):
            raise RuntimeError(f"{self.where}: package returned {len(out)} outputs, expected {len(self.gspec.outputs)}")
        return dict(zip(self.gspec.output_names, out))


def read_weight_refs(path: Path, device: torch.device) -> dict[str, Tensor]:
    """The constants a weights.json points at. On the CPU they stay memory-mapped from the
    checkpoint's files (file pages, not memory the process owns); elsewhere they are copied to
    `device`. ValueError (one line) if a file it points at is gone or changed size."""
    refs = json.loads(path.read_text())
    storages = []
    for f in refs["files"]:
        where = path.parent / f["path"]  # an absolute path stays absolute
        if not where.is_file() or where.stat().st_size != f["size"]:
            raise ValueError(f"{path}: the checkpoint file its weights are read from, {where}, is missing or changed; "
                             "rebuild the engines with `wan-rt build`")
        storages.append(torch.UntypedStorage.from_file(str(where), shared=False, nbytes=f["size"]))
    out = {}
    for name, t in refs["tensors"].items():
        dtype = REF_DTYPES[t["dtype"]]
        mapped = torch.empty(0, dtype=dtype).set_(storages[t["file"]], t["offset"] // dtype.itemsize, t["shape"])
        out[name] = mapped.to(device)
    return out


def load_graph(out_dir: str | os.PathLike, gspec: GraphSpec, files: Sequence[str], *,
               compute_dtype: torch.dtype, device: torch.device | str) -> AotiRunner:
    """A runner over the .pt2 among `files` (paths relative to out_dir) and the weights beside it."""
    from safetensors.torch import load_file

    device = torch.device(device)
    packages = [f for f in files if f.endswith(FILE_SUFFIX)]
    weights = [f for f in files if Path(f).name == WEIGHTS_FILE]
    if len(packages) != 1 or len(weights) != 1:
        raise ValueError(f"expected one {FILE_SUFFIX} and one {WEIGHTS_FILE} among {list(files)}")
    model = load_package(Path(out_dir) / packages[0], device)
    constants = load_file(str(Path(out_dir) / weights[0]), device=str(device))
    refs = Path(out_dir) / Path(weights[0]).with_name(WEIGHT_REFS_FILE)
    if refs.is_file():
        constants.update(read_weight_refs(refs, device))
    _load_constants(model, constants)
    return AotiRunner(model, constants, gspec, compute_dtype, device)
