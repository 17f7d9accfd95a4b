"""ONNX Runtime backend, run side: `load_graph` runs a graph's ONNX file in an
`onnxruntime.InferenceSession` behind the GraphRunner contract (the build side, ONNX export with
optional Q/DQ, is wan_rt.export.ort_build).

Providers: on a CUDA device, TensorrtExecutionProvider (when this onnxruntime has it), then
CUDAExecutionProvider, then the CPU for anything they lack; on the CPU, CPUExecutionProvider.
`WAN_RT_ORT_PROVIDERS` (comma-separated provider names) overrides the choice.

Tensors go in and out through IO binding to torch buffers on the runner's device: inputs are
bound where they lie, outputs are allocated by torch at the sizes the contract gives (solved from
the inputs' symbols), so no numpy round trip and no device copies. The CPU path is the tested one
and is the same code with device "cpu".

Precision: fp32 everywhere (the precision that must work on the CPU; it matches eager within
1e-6 on the tiny models). fp16 only with a GPU provider: onnxruntime's CPU kernels cover few fp16
ops, so `build_graph`/`load_graph` refuse it on the CPU. bf16 is refused: onnxruntime has
almost no bf16 kernels. fp8 / int8 (DiTs only): an fp32 graph with Q/DQ nodes (export/quantize.py),
which the CPU provider executes, FP8 E4M3 included. NOT VERIFIED on a GPU: the CUDA / TensorRT
providers and fp16 have never run here (no onnxruntime-gpu and no GPU on any machine this was
written on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from wan_rt.runtime.graphs import GraphSpec, engine_inputs, read_sizes, resolve_dim, torch_dtype

NAME = "ort"
FILE_SUFFIX = ".onnx"
MODEL_FILE = "model" + FILE_SUFFIX
PROVIDERS_ENV = "WAN_RT_ORT_PROVIDERS"


def unavailable_reason() -> str:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (a dependency of wan-rt: pip install {exc.name})"
    return ""


def is_available() -> bool:
    return not unavailable_reason()


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def check_precision(compute_dtype: torch.dtype, device: torch.device) -> None:
    if compute_dtype == torch.bfloat16:
        raise ValueError("the ort backend does not do bf16 (onnxruntime has almost no bf16 kernels); "
                         "use fp16 on a GPU or fp32")
    if compute_dtype == torch.float16 and device.type != "cuda":
        raise ValueError("the ort backend runs fp16 only with a GPU provider (onnxruntime's CPU kernels "
                         "cover few fp16 ops); use fp32 on the CPU")


# ------------------------------------------------------------------------------------ runtime
def providers_for(device: torch.device, compute_dtype: torch.dtype = torch.float32) -> list:
    """Execution providers for a device, best first (see module docstring)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if os.environ.get(PROVIDERS_ENV):
        wanted = [p.strip() for p in os.environ[PROVIDERS_ENV].split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ValueError(f"{PROVIDERS_ENV} names {missing}; this onnxruntime has {available}")
        return wanted
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"the ort backend runs on cpu or cuda, not {device.type}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu: list = []
    if "TensorrtExecutionProvider" in available:
        from wan_rt.tiny import cache_root

        cache = cache_root() / "ort-trt-engines"
        cache.mkdir(parents=True, exist_ok=True)
        gpu.append(("TensorrtExecutionProvider", {"device_id": index, "trt_fp16_enable": compute_dtype == torch.float16,
                                                  "trt_engine_cache_enable": True,
                                                  "trt_engine_cache_path": str(cache)}))
    if "CUDAExecutionProvider" in available:
        gpu.append(("CUDAExecutionProvider", {"device_id": index}))
    if not gpu:
        raise ValueError(f"device {device} asked for, but this onnxruntime has only {available} "
                         "(install onnxruntime-gpu)")
    return [*gpu, "CPUExecutionProvider"]


_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtRunner:
    """GraphRunner over an InferenceSession: {input name: tensor} -> {output name: tensor}."""

    def __init__(self, session, gspec: GraphSpec, compute_dtype: torch.dtype, device: torch.device):
        self.session, self.gspec, self.compute_dtype = session, gspec, compute_dtype
        self.device = device
        # onnxruntime names memory by (kind, index); "cuda" without an index is torch's current GPU.
        self.kind = "cuda" if device.type == "cuda" else "cpu"
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self.kind == "cuda" else 0
        self.dtypes = {t.name: torch_dtype(t, compute_dtype) for t in gspec.outputs}
        names = [i.name for i in session.get_inputs()]
        if names != gspec.input_names:
            raise ValueError(f"{gspec.component}/{gspec.graph}: the ONNX file's inputs {names} are not the "
                             f"contract's {gspec.input_names}; rebuild it")

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feed = engine_inputs(self.gspec, inputs, self.compute_dtype, self.device)  # alive until the run returns
        sizes = read_sizes(self.gspec, feed)
        outputs = {t.name: torch.empty([resolve_dim(d, sizes) for d in t.dims], dtype=self.dtypes[t.name],
                                       device=self.device) for t in self.gspec.outputs}
        binding = self.session.io_binding()
        for name, x in (*feed.items(), *outputs.items()):
            bind = binding.bind_input if name in feed else binding.bind_output
            bind(name, self.kind, self.index, _NUMPY_TYPES[x.dtype], list(x.shape), x.data_ptr())
        if self.kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


def load_graph(out_dir: str | os.PathLike, gspec: GraphSpec, files: Sequence[str], *,
               compute_dtype: torch.dtype, device: torch.device | str) -> OrtRunner:
    """A runner over the .onnx file among `files` (paths relative to out_dir)."""
    import onnxruntime as ort

    device = torch.device(device)
    check_precision(compute_dtype, device)
    models = [f for f in files if f.endswith(FILE_SUFFIX)]
    if len(models) != 1:
        raise ValueError(f"expected one {FILE_SUFFIX} file among {list(files)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: unused-input and shape-merge notices are expected
    session = ort.InferenceSession(str(Path(out_dir) / models[0]), sess_options=options,
                                   providers=providers_for(device, compute_dtype))
    return OrtRunner(session, gspec, compute_dtype, device)
