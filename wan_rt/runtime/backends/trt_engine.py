"""TensorRT runtime: deserialized engines behind the GraphRunner contract.

**Never executed**: no machine this project has had could run a plan (TensorRT for RTX needs an
RTX GPU; the only GPUs lent were H100/H200, SM90, which it does not target, and they have no
TensorRT). It is type-checked with mypy against the installed tensorrt_rtx (and tensorrt-stubs),
and its bookkeeping (shared memory, binding, shape slots, profile errors, weight swapping, the
runtime cache) is exercised on the CPU with stand-in engines (tests/test_trt.py); the real path
is tests/test_trt_build.py::test_built_engines_match_eager, skipped without an RTX GPU.

Design (TensorRT demoDiffusion's Engine class, minus its copies of shape logic):
* **one execution context per engine**, made from an IRuntimeConfig with the USER_MANAGED
  allocation strategy and pointed at **one device-memory block per GPU** (`SharedDeviceMemory`)
  for activations, sized by the largest `device_memory_size_v2` of the engines loaded. Experts
  (and every other graph) run one after another on one stream, so their scratch never overlaps
  in time; with two A14B experts this halves activation memory. When a newly loaded engine needs
  more, the block is reallocated and every context rebinds before its next run;
* **runtime cache** (TensorRT for RTX, trt_lib.RuntimeCache): kernels compiled when a shape first
  runs go to `<engines dir>/runtime.cache`, shared by every engine of the dir and saved after
  each new shape, so the next process starts without compiling;
* **tensor addresses bound to torch buffers** (static per input-shape set), all work on one CUDA
  stream per device (`trt_stream`), ordered against torch's current stream with wait_stream;
* **CUDA graphs where shapes are static**: the first run at a shape set is a plain
  execute_async_v3 (TensorRT wants one before capture), then it is captured and later calls
  replay it. New shapes, a reallocated memory block, a refit or a weight reload drop the graph.
  Disabled for weight-streaming engines and with WAN_RT_TRT_CUDA_GRAPHS=0;
* **weight swapping** (TensorRT for RTX): engines are deserialized with deferred weight loading,
  so `unload_weights()` frees an expert's GPU weights while its context and compiled kernels stay,
  and `load_weights()` brings them back from the plan, read ahead by `stage_weights()`; the
  residency manager (runtime/residency.py) drives this through DiTComponent;
* **weight streaming**: an engine built with it gets TensorRT's automatic budget, or
  WAN_RT_TRT_WEIGHT_BUDGET_GB, before its context is created.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import torch
from torch import Tensor

from wan_rt.runtime.backends import trt_lib
from wan_rt.runtime.backends.trt_lib import trt
from wan_rt.runtime.graphs import GraphSpec, engine_inputs

CUDA_GRAPHS_ENV = "WAN_RT_TRT_CUDA_GRAPHS"
WEIGHT_BUDGET_ENV = "WAN_RT_TRT_WEIGHT_BUDGET_GB"

Shapes = dict[str, tuple[int, ...]]


def torch_dtype(dtype: "trt.DataType") -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT8: torch.int8, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8,
             trt.DataType.FP8: torch.float8_e4m3fn}
    return table[dtype]


def _dims(dims: "trt.Dims") -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


# ------------------------------------------------------------------------------------ memory
class SharedDeviceMemory:
    """The activation block every execution context on one device uses (see module doc).

    `lock` is held from "is my binding current?" to the end of the enqueue, and by `reserve`:
    the residency manager may load the next expert on a side thread while one runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.block: Optional[Tensor] = None
        self.generation = 0
        self.lock = threading.RLock()

    def reserve(self, nbytes: int) -> None:
        """Make the block at least `nbytes`; reallocating bumps `generation` (contexts rebind)."""
        with self.lock:
            if self.block is not None and self.block.numel() >= nbytes:
                return
            if self.block is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # work enqueued on the old block has finished
            self.block = None  # free before allocating: peak is the new size, not old + new
            self.block = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device)
            self.generation += 1

    @property
    def ptr(self) -> int:
        assert self.block is not None
        return int(self.block.data_ptr())

    @property
    def size(self) -> int:
        return 0 if self.block is None else int(self.block.numel())


_MEMORY: dict[str, SharedDeviceMemory] = {}
_STREAMS: dict[str, Any] = {}
_REGISTRY_LOCK = threading.Lock()


def shared_memory(device: torch.device) -> SharedDeviceMemory:
    with _REGISTRY_LOCK:
        return _MEMORY.setdefault(_key(device), SharedDeviceMemory(device))


def trt_stream(device: torch.device) -> Any:
    """The one CUDA stream every TensorRT engine on `device` runs on (a torch.cuda.Stream)."""
    with _REGISTRY_LOCK:
        if _key(device) not in _STREAMS:
            _STREAMS[_key(device)] = torch.cuda.Stream(device)
        return _STREAMS[_key(device)]


# ------------------------------------------------------------------------------------ engine
@dataclass
class _Slot:
    """Static buffers bound to the context for one set of input shapes, and its CUDA graph."""

    shapes: Shapes
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    graph: Optional[Any] = None  # torch.cuda.CUDAGraph
    runs: int = 0


class TrtEngine:
    """One deserialized engine and its execution context: `infer({name: tensor}) -> {name: tensor}`."""

    def __init__(self, engine: "trt.ICudaEngine", device: torch.device | str, *, name: str = "",
                 cuda_graphs: Optional[bool] = None, memory: Optional[SharedDeviceMemory] = None,
                 runtime: Optional["trt.Runtime"] = None, lib: Optional[trt_lib.TrtLibrary] = None,
                 runtime_cache: Optional[trt_lib.RuntimeCache] = None, plan_path: Optional[Path] = None,
                 weights_deferred: bool = False):
        """`weights_deferred`: the engine was deserialized with deferred weight loading, so its
        weights can be unloaded and reloaded from `plan_path` (the file it was read from)."""
        self.engine, self.name = engine, name
        self.device = torch.device(device)
        self._runtime = runtime  # the runtime must outlive the engine it deserialized
        self.lib = lib or trt_lib.require()
        self.runtime_cache, self.plan_path = runtime_cache, plan_path
        self.swaps_weights = weights_deferred and plan_path is not None
        self._staged: Optional[bytes] = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.streams_weights = engine.streamable_weights_size > 0
        if self.streams_weights:
            self._set_weight_budget()
        self.memory = memory or shared_memory(self.device)
        self.memory.reserve(engine.device_memory_size_v2)
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.lib.attach_runtime_cache(config, runtime_cache)
        self.context = engine.create_execution_context(config)
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {name or 'an engine'}")
        self._generation = -1
        enabled = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0" if cuda_graphs is None else cuda_graphs
        self.cuda_graphs = enabled and not self.streams_weights and self.device.type == "cuda"
        self._slot: Optional[_Slot] = None
        self.graph_replays = 0

    @classmethod
    def load(cls, plan_path: Path, device: torch.device | str, *, lib: trt_lib.TrtLibrary,
             **kwargs: Any) -> "TrtEngine":
        """Deserialize `plan_path`; where the library can swap weights, with deferred loading
        (then loaded at once: the engine starts resident and can be unloaded later)."""
        plan = Path(plan_path).read_bytes()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if lib.swaps_weights:
            lib.defer_weights(runtime)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeError(f"{lib.title} could not deserialize {plan_path} (its log above says why)")
        if lib.swaps_weights and not lib.load_weights(engine, plan):
            raise RuntimeError(f"{lib.title} could not load the weights of {plan_path}")
        return cls(engine, device, runtime=runtime, lib=lib, plan_path=Path(plan_path),
                   weights_deferred=lib.swaps_weights, **kwargs)

    def _set_weight_budget(self) -> None:
        budget = os.environ.get(WEIGHT_BUDGET_ENV)
        if budget:
            self.engine.weight_streaming_budget_v2 = int(float(budget) * 2**30)
        else:
            self.engine.weight_streaming_budget_v2 = self.engine.get_weight_streaming_automatic_budget()

    # ---- weight swapping (residency): the context and its compiled kernels stay
    def stage_weights(self) -> None:
        """Host side of a reload, off the loop's thread: read the plan the weights come from."""
        if self.swaps_weights and self._staged is None:
            assert self.plan_path is not None
            self._staged = self.plan_path.read_bytes()

    def unload_weights(self) -> None:
        """Free the engine's GPU weights (nothing may be running on it: waits for its stream)."""
        with self.memory.lock:
            if self.device.type == "cuda":
                trt_stream(self.device).synchronize()
            if not self.lib.unload_weights(self.engine):
                raise RuntimeError(f"{self.name}: TensorRT could not unload its weights")
            self.invalidate_graphs()  # captured with the old weight addresses

    def load_weights(self) -> None:
        with self.memory.lock:
            self.stage_weights()
            assert self._staged is not None
            blob, self._staged = self._staged, None
            if not self.lib.load_weights(self.engine, blob):
                raise RuntimeError(f"{self.name}: TensorRT could not load its weights from {self.plan_path}")
            self.invalidate_graphs()

    @property
    def weights_loaded(self) -> bool:
        return self.lib.weights_loaded(self.engine)

    def profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shape of an input in the engine's optimization profile."""
        lo, mid, hi = self.engine.get_tensor_profile_shape(name, 0)
        return _dims(lo), _dims(mid), _dims(hi)

    def _bind_memory(self) -> None:
        if self._generation != self.memory.generation:
            self.context.set_device_memory(self.memory.ptr, self.memory.size)
            self._generation = self.memory.generation
            if self._slot is not None:
                self._slot.graph = None  # captured against the old block

    def _prepare(self, shapes: Shapes) -> _Slot:
        for name in self.input_names:
            if not self.context.set_input_shape(name, shapes[name]):
                lo, _, hi = self.profile(name)
                raise ValueError(f"{self.name}: {name} of shape {list(shapes[name])} is outside the engine's "
                                 f"profile (min {list(lo)}, max {list(hi)}); rebuild the engines for this size")
        inputs = {n: torch.empty(shapes[n], dtype=torch_dtype(self.engine.get_tensor_dtype(n)), device=self.device)
                  for n in self.input_names}
        outputs = {n: torch.empty(_dims(self.context.get_tensor_shape(n)),
                                  dtype=torch_dtype(self.engine.get_tensor_dtype(n)), device=self.device)
                   for n in self.output_names}
        for n, t in (*inputs.items(), *outputs.items()):
            self.context.set_tensor_address(n, t.data_ptr())
        return _Slot(shapes, inputs, outputs)

    def _execute(self, stream: Any) -> None:
        handle = stream.cuda_stream if stream is not None else 0
        if not self.context.execute_async_v3(handle):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (see its log)")

    def _capture(self, slot: _Slot, stream: Any) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a residency thread staging the next expert must not break the capture
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self._execute(stream)
        except RuntimeError as exc:
            self.cuda_graphs = False
            warnings.warn(f"{self.name}: CUDA graph capture failed ({exc}); running without graphs")
            return
        slot.graph = graph

    def infer(self, feed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run on `feed` (tensors on the engine's device, the engine's dtypes); fresh outputs."""
        shapes = {n: tuple(int(d) for d in feed[n].shape) for n in self.input_names}
        with self._on_stream() as stream, self.memory.lock:
            self._bind_memory()
            if self._slot is None or self._slot.shapes != shapes:
                self._slot = self._prepare(shapes)  # new shapes: new buffers, the old graph goes
            slot = self._slot
            for n in self.input_names:
                slot.inputs[n].copy_(feed[n], non_blocking=True)
            if slot.graph is not None:
                slot.graph.replay()
                self.graph_replays += 1
            else:
                self._execute(stream)
                slot.runs += 1
                if slot.runs == 1 and self.runtime_cache is not None:
                    self.runtime_cache.save()  # the kernels just compiled for these shapes
                if self.cuda_graphs:
                    self._capture(slot, stream)  # replayed from the next call on
            # Clones: the static buffers are rewritten by the next call (CFG calls twice per step).
            outputs = {n: t.clone() for n, t in slot.outputs.items()}
        if self.device.type == "cuda":  # made on the engine's stream, used on torch's current one
            for t in outputs.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        return outputs

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[Any]:
        """The engine's stream, ordered after torch's current stream and before what follows.
        Off CUDA (stand-in engines in tests) there is no stream."""
        if self.device.type != "cuda":
            yield None
            return
        stream, current = trt_stream(self.device), torch.cuda.current_stream(self.device)
        stream.wait_stream(current)  # inputs written by torch are ready
        with torch.cuda.stream(stream):
            yield stream
        current.wait_stream(stream)

    def invalidate_graphs(self) -> None:
        if self._slot is not None:
            self._slot.graph = None


# ------------------------------------------------------------------------------------ runner
class TrtRunner:
    """GraphRunner over a TrtEngine: checks names, dtypes and the profile, moves inputs to the
    device; {input name: tensor} -> {output name: tensor}."""

    def __init__(self, engine: TrtEngine, gspec: GraphSpec, compute_dtype: torch.dtype):
        self.engine, self.gspec = engine, gspec
        where = f"{gspec.component}/{gspec.graph}"
        if engine.input_names != gspec.input_names or not set(gspec.output_names) <= set(engine.output_names):
            raise ValueError(f"{where}: the engine's I/O {engine.input_names} -> {engine.output_names} is not the "
                             f"contract's {gspec.input_names} -> {gspec.output_names}; rebuild it")
        self.compute_dtype = compute_dtype

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feed = engine_inputs(self.gspec, inputs, self.compute_dtype, self.engine.device)
        out = self.engine.infer(feed)
        return {n: out[n] for n in self.gspec.output_names}

    # Weight swapping, for DiTComponent (engine_component.py) and the residency manager.
    @property
    def swaps_weights(self) -> bool:
        return self.engine.swaps_weights

    def stage_weights(self) -> None:
        self.engine.stage_weights()

    def unload_weights(self) -> None:
        self.engine.unload_weights()

    def load_weights(self) -> None:
        self.engine.load_weights()


# ------------------------------------------------------------------------------------ refit
def refit_from_onnx(engine: "trt.ICudaEngine", onnx_path: Path) -> int:
    """Refit a refittable engine with the initializers of `onnx_path` (the same graph exported
    from new weights, and quantized the same way if it was); returns how many weights it has."""
    if not engine.refittable:
        raise ValueError("this engine was built without refit support (rebuild with --refittable)")
    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"refit from {onnx_path} failed:\n  " + "\n  ".join(errors[:20]))
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"refit from {onnx_path} failed; weights never set: {refitter.get_missing_weights()[:20]}")
    return len(refitter.get_all_weights())
