"""CUDA graphs around any GraphRunner: capture once per input signature, then replay.

A denoising run calls the same DiT graph with the same shapes 40-50 times; at batch 1-2 the
kernel launches of a 30-40 block forward (thousands of them, plus AOTInductor's wrapper) are a
measurable share of a step at small sizes and a stall source between kernels at any size.
`CudaGraphRunner` wraps a runner (an AOTInductor package, an eager module runner): the first
call of a signature (names, shapes, dtypes) runs normally, warming allocators, autotuning and
lazy initialisation; the next one runs it on a side stream once more and captures it into a
`torch.cuda.CUDAGraph` over static input buffers; every later call copies the inputs into those
buffers and replays. Outputs are cloned out of the graph's memory, so a caller may keep them
across calls (a copy of the latent-sized output, small beside the step itself).

Graphs of one runner share a memory pool (pass `pool` to share one across runners that always
run in the same order, e.g. the blocks of a model: each graph's scratch memory is reused by the
next, since outputs are cloned out). A graph holds its memory for as long as it lives:
`max_graphs` bounds how many signatures are kept (least recently used dropped first).

NOT VERIFIED: written against torch.cuda's documented graph API; no GPU was available to run it
(tests/test_cuda_graphs.py skips, "needs a CUDA GPU").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

GraphRunner = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def signature(inputs: Mapping[str, Tensor]) -> Signature:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


class CudaGraphRunner:
    """runner(inputs) -> outputs, replayed from a CUDA graph after `warmup` plain calls per
    input signature. Inputs must be CUDA tensors (they are copied into the static buffers)."""

    def __init__(self, runner: GraphRunner, *, warmup: int = 1, max_graphs: int = 4, clone_outputs: bool = True,
                 pool=None):
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA GPU")
        self.runner, self.warmup, self.max_graphs, self.clone_outputs = runner, warmup, max_graphs, clone_outputs
        self.graphs: OrderedDict[Signature, _Captured] = OrderedDict()
        self.calls: dict[Signature, int] = {}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.replays = 0

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        key = signature(inputs)
        captured = self.graphs.get(key)
        if captured is None:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= self.warmup:
                return self.runner(inputs)
            captured = self._capture(key, inputs)
        else:
            self.graphs.move_to_end(key)
            for name, t in inputs.items():
                captured.inputs[name].copy_(t, non_blocking=True)
        captured.graph.replay()
        self.replays += 1
        if self.clone_outputs:
            return {name: t.clone() for name, t in captured.outputs.items()}
        return dict(captured.outputs)

    def _capture(self, key: Signature, inputs: Mapping[str, Tensor]) -> _Captured:
        for name, t in inputs.items():
            if t.device.type != "cuda":
                raise ValueError(f"CUDA graph input {name} is on {t.device}; graphs replay device memory only")
        static = {name: t.clone() for name, t in inputs.items()}
        # The documented recipe: run once on a side stream before capturing (lazy cuBLAS / Triton
        # state must not be created inside the capture), then capture on that stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.runner(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.runner(static)
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        self.graphs[key] = _Captured(graph, static, dict(outputs))
        # The capture recorded the kernels without running them: replay computes this call.
        return self.graphs[key]
