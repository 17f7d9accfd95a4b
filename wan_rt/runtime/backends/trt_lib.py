"""Which TensorRT: the one seam between wan_rt and the two libraries it builds and runs with.

* `tensorrt` (NVIDIA TensorRT): data-center and RTX GPUs. It builds on the GPU a plan is for
  (the plan's one target is that GPU's compute capability) and compiles every kernel then.
* `tensorrt_rtx` (TensorRT for RTX, `pip install "wan-rt[trt-rtx]"`): RTX GPUs only (SM75-SM121,
  not the data-center SM90/SM100). It builds ahead of time on a machine with no GPU, for the
  compute capabilities asked for, compiles kernels when an engine first runs (kept in a runtime
  cache file beside the engines), and can drop and reload an engine's GPU weights.

Everything else (Builder, OnnxParser, strongly typed networks, optimization profiles, timing
cache where there is one, Refitter, execution contexts) is one API. What differs lives in the two classes below,
which answer the same questions; build and run code asks `active()` and never tests a name.

`trt` is the active library's module for the shared code (`from ...trt_lib import trt`): to mypy
it is tensorrt_rtx's real API (or tensorrt's, run with --always-true=TYPECHECK_WITH_TENSORRT), at
run time a proxy to whichever library this process uses. One library per process: chosen by
WAN_RT_TRT_LIBRARY, else the one that can serve this machine (no GPU or an RTX GPU: tensorrt_rtx;
a GPU it cannot target: tensorrt).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

TYPECHECK_WITH_TENSORRT = False  # mypy --always-true=TYPECHECK_WITH_TENSORRT checks against tensorrt-stubs
if TYPE_CHECKING:
    import tensorrt_rtx as rtx

    if TYPECHECK_WITH_TENSORRT:
        import tensorrt as trt
    else:
        import tensorrt_rtx as trt

LIBRARIES = ("tensorrt_rtx", "tensorrt")
LIBRARY_ENV = "WAN_RT_TRT_LIBRARY"
RUNTIME_CACHE = "runtime.cache"  # kernels TensorRT for RTX compiled at run time, beside the engines
RTX_GPUS = "an RTX GPU (SM75-SM121 except SM90/SM100)"
INSTALL_HINT = "pip install 'wan-rt[trt-rtx]'"


# ------------------------------------------------------------------------------------ targets
def sm_number(target: str) -> int:
    """"sm89" -> 89, "sm120" -> 120."""
    return int(target[2:])


def parse_targets(text: str) -> tuple[str, ...]:
    """"sm89,sm120" (also "SM89", "89", "8.9") -> ("sm89", "sm120"), sorted, no duplicates."""
    out = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        digits = part[2:] if part.startswith("sm") else part.replace(".", "")
        if not digits.isdigit():
            raise ValueError(f"--trt-targets: {part!r} is not a compute capability (e.g. sm89, sm120)")
        out.add(f"sm{int(digits)}")
    if not out:
        raise ValueError("--trt-targets is empty; name compute capabilities, e.g. sm89,sm120")
    return tuple(sorted(out, key=sm_number))


def gpu_target(device: Any = None) -> Optional[str]:
    """"sm89" for the current (or given) CUDA GPU, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def gpu_identity(device: Any = None) -> Optional[str]:
    """"<name> (sm<cc>)" of the current (or given) CUDA GPU, None without one."""
    import torch

    target = gpu_target(device)
    return None if target is None else f"{torch.cuda.get_device_name(device)} ({target})"


def host_bytes(memory: Any) -> bytes:
    """The bytes of an IHostMemory (it has the buffer protocol; neither library's stubs say so)."""
    return bytes(memoryview(memory))


# ------------------------------------------------------------------------------------ libraries
class TrtLibrary:
    """What one TensorRT library can do; subclasses answer for `tensorrt` and `tensorrt_rtx`."""

    name = ""
    title = ""
    gpus = "a CUDA GPU"         # what runs its plans, for messages
    builds_without_gpu = False
    swaps_weights = False       # ICudaEngine.unload_weights / load_weights (deferred weight loading)
    has_timing_cache = True     # tactic timings measured at build time, kept in a timing cache
    refits_without_gpu = True   # can build refittable plans with no GPU present
    # Oldest compute capability whose GEMMs take each kind of operand (a compute dtype or a
    # quantized type): FP8 tensor cores arrived with Ada (SM89), bf16 with Ampere (SM80).
    min_sm: Mapping[str, int] = {"fp32": 0, "fp16": 0, "bf16": 80, "int8": 0, "fp8": 89}

    def __init__(self, module: ModuleType):
        self.module = module

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    def build_targets(self, requested: Sequence[str], gpu: Optional[str]) -> tuple[str, ...]:
        """The compute capabilities a build makes plans for: `requested` (--trt-targets) checked,
        or by default the GPU present. ValueError (one line) when that cannot be."""
        raise NotImplementedError

    # Library objects are typed Any here and by their own library in each subclass (mypy checks
    # TensorRTForRTX against tensorrt_rtx whichever API the shared code is checked against).
    def set_targets(self, config: Any, targets: Sequence[str]) -> None:
        """Point the builder (an IBuilderConfig) at `targets` (no-op where the build's GPU is the target)."""

    def runs_on(self, target: str) -> bool:
        """Whether a GPU of this compute capability runs this library's plans at all."""
        raise NotImplementedError

    def attach_runtime_cache(self, config: Any, cache: Optional["RuntimeCache"]) -> None:
        """Let execution contexts made from `config` (an IRuntimeConfig) reuse and extend `cache`."""

    def open_runtime_cache(self, folder: Path) -> Optional["RuntimeCache"]:
        return None

    # Weight swapping (swaps_weights only): the engine's GPU weights dropped and reloaded while
    # its execution contexts and compiled kernels stay.
    def defer_weights(self, runtime: Any) -> None:
        """Make the next deserialization by `runtime` leave the weights off the GPU."""
        raise NotImplementedError(f"{self.title} cannot load an engine's weights separately")

    def load_weights(self, engine: Any, plan: bytes) -> bool:
        """Upload the weights of a deferred-loading engine from its plan; False on failure."""
        raise NotImplementedError(f"{self.title} cannot load an engine's weights separately")

    def unload_weights(self, engine: Any) -> bool:
        raise NotImplementedError(f"{self.title} cannot unload an engine's weights")

    def weights_loaded(self, engine: Any) -> bool:
        return True


class TensorRT(TrtLibrary):
    """NVIDIA TensorRT: any CUDA GPU it supports, built on that GPU."""

    name, title = "tensorrt", "TensorRT"

    def build_targets(self, requested: Sequence[str], gpu: Optional[str]) -> tuple[str, ...]:
        if gpu is None:
            raise ValueError(f"{self.title} builds on the GPU it builds for, and this machine has none; TensorRT "
                             f"for RTX builds without one ({INSTALL_HINT}, WAN_RT_TRT_LIBRARY=tensorrt_rtx)")
        if requested and tuple(requested) != (gpu,):
            raise ValueError(f"{self.title} builds for the GPU present ({gpu}), not --trt-targets "
                             f"{','.join(requested)}; TensorRT for RTX builds for chosen targets ({INSTALL_HINT})")
        return (gpu,)

    def runs_on(self, target: str) -> bool:
        return True


class TensorRTForRTX(TrtLibrary):
    """TensorRT for RTX: RTX GPUs, built for chosen compute capabilities with or without a GPU."""

    name, title, gpus = "tensorrt_rtx", "TensorRT for RTX", RTX_GPUS
    builds_without_gpu = swaps_weights = True
    # It times no tactics when it builds: its timing-cache calls are no-ops (deprecated since
    # 1.2), and reading a cache file wants a CUDA device.
    has_timing_cache = False
    # Measured with 1.7.1 on a machine with no GPU: any refittable build (BuilderFlag.REFIT, or
    # REFIT_INDIVIDUAL with marked weights; fp32, bf16, fp16, fp8, int8 alike) fails inside its
    # compiler ("CHECK(status == CUDA_SUCCESS) failed"): refittable plans are built on an RTX GPU.
    refits_without_gpu = False
    # Turing (SM75) has no FP32 or BF16 GEMMs in TensorRT for RTX ("FP32 GEMM is not supported"):
    # only fp16, int8 (on fp16) run there.
    min_sm = {**TrtLibrary.min_sm, "fp32": 80}

    @property
    def targets(self) -> tuple[str, ...]:
        """Every compute capability this version can build for (its ComputeCapability enum)."""
        names = [n.lower() for n in self.module.ComputeCapability.__members__ if n.startswith("SM")]
        return tuple(sorted(names, key=sm_number))

    def build_targets(self, requested: Sequence[str], gpu: Optional[str]) -> tuple[str, ...]:
        known = ", ".join(self.targets)
        if not requested:
            if gpu is None:
                raise ValueError(f"--trt-targets is required without a GPU: name the RTX GPUs to build for, "
                                 f"e.g. --trt-targets sm89,sm120 ({self.title} {self.version} targets {known})")
            requested = (gpu,)
        for t in requested:
            if t not in self.targets:
                raise ValueError(f"{self.title} cannot build for {t}: it targets {known}, i.e. {RTX_GPUS}")
        return tuple(requested)

    def set_targets(self, config: "rtx.IBuilderConfig", targets: Sequence[str]) -> None:
        import tensorrt_rtx

        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            if not config.set_compute_capability(getattr(tensorrt_rtx.ComputeCapability, t.upper()), i):
                raise ValueError(f"{self.title} refused compute capability {t}")

    def runs_on(self, target: str) -> bool:
        return target in self.targets

    def attach_runtime_cache(self, config: "rtx.IRuntimeConfig", cache: Optional["RuntimeCache"]) -> None:
        if cache is not None:
            config.set_runtime_cache(cache.attach(config))

    def open_runtime_cache(self, folder: Path) -> Optional["RuntimeCache"]:
        return RuntimeCache.for_folder(folder)

    def defer_weights(self, runtime: "rtx.Runtime") -> None:
        runtime.defer_weights_loading = True

    def load_weights(self, engine: "rtx.ICudaEngine", plan: bytes) -> bool:
        return bool(engine.load_weights(plan))

    def unload_weights(self, engine: "rtx.ICudaEngine") -> bool:
        return bool(engine.unload_weights())

    def weights_loaded(self, engine: "rtx.ICudaEngine") -> bool:
        return bool(engine.weights_loaded)


class RuntimeCache:
    """One IRuntimeCache per engines dir, shared by every execution context made from it (as
    TensorRT-Edge-LLM shares one per deployment): loaded from `<engines dir>/runtime.cache` when
    the first engine attaches, written back (atomically) by `save()` after new kernels were
    compiled. A cache from another GPU, driver or TensorRT for RTX is refused by TensorRT itself
    and starts empty."""

    _open: dict[Path, "RuntimeCache"] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path):
        self.path = path
        self.cache: Optional["rtx.IRuntimeCache"] = None  # made by the first engine's runtime config
        self.loaded = False     # whether the file's contents were accepted
        self.lock = threading.Lock()

    @classmethod
    def for_folder(cls, folder: Path) -> "RuntimeCache":
        path = Path(folder).resolve() / RUNTIME_CACHE
        with cls._lock:
            return cls._open.setdefault(path, cls(path))

    def attach(self, config: "rtx.IRuntimeConfig") -> "rtx.IRuntimeCache":
        with self.lock:
            if self.cache is None:
                self.cache = config.create_runtime_cache()
                if self.path.is_file():
                    self.loaded = bool(self.cache.deserialize(self.path.read_bytes()))
            return self.cache

    def save(self) -> None:
        with self.lock:
            if self.cache is None:
                return
            data = host_bytes(self.cache.serialize())
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)


_CLASSES: dict[str, type[TrtLibrary]] = {"tensorrt": TensorRT, "tensorrt_rtx": TensorRTForRTX}


def library_class(name: str) -> Optional[type[TrtLibrary]]:
    """The class describing library `name` (e.g. a manifest's trt_library), None if unknown."""
    return _CLASSES.get(name)


def load_library(name: str) -> Optional[TrtLibrary]:
    """The library `name` if it imports (a real one: tensorrt-stubs alone makes `import
    tensorrt` succeed as an empty namespace package), else None."""
    if name not in _CLASSES:
        raise ValueError(f"{LIBRARY_ENV}: unknown TensorRT library {name!r}; choose {' or '.join(LIBRARIES)}")
    try:
        module = importlib.import_module(name)
    except (ImportError, OSError):
        return None
    if not hasattr(module, "Builder"):
        return None
    return _CLASSES[name](module)


@functools.lru_cache(maxsize=1)
def active() -> Optional[TrtLibrary]:
    """The TensorRT library this process uses (see the module doc), or None if none imports."""
    wanted = os.environ.get(LIBRARY_ENV)
    if wanted:
        lib = load_library(wanted)
        if lib is None:
            raise ValueError(f"{LIBRARY_ENV}={wanted}, but {wanted} cannot be imported here")
        return lib
    found = [lib for lib in (load_library(n) for n in LIBRARIES) if lib is not None]
    gpu = gpu_target()
    for lib in found:
        if (gpu is None and lib.builds_without_gpu) or (gpu is not None and lib.runs_on(gpu)):
            return lib
    return found[0] if found else None


def require() -> TrtLibrary:
    lib = active()
    if lib is None:
        raise ValueError(f"no TensorRT library is installed ({INSTALL_HINT})")
    return lib


class _ActiveModule:
    """`trt` at run time: attribute access goes to the active library's module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(require().module, name)


if not TYPE_CHECKING:
    trt = _ActiveModule()
