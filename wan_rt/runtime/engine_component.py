"""Components made of graph runners: the same two classes serve ONNX Runtime, AOTInductor and
TensorRT (and eager graph modules, which is how the streaming logic itself is tested).

A graph runner is any callable taking {input name: tensor} and returning {output name: tensor}
for one GraphSpec. Backends differ only in how they make runners.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from wan_rt.config import ModelSpec
from wan_rt.runtime.component import OUTPUT_NAMES, HostSwappable
from wan_rt.runtime.graphs import DIT_STEP_GRAPHS, GraphSpec, resolve_dim, rest_block_graphs, torch_dtype

GraphRunner = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


def module_runner(module: nn.Module, gspec: GraphSpec) -> GraphRunner:
    """A runner over a PyTorch graph module (graphs.graph_module): eager, or a reference."""

    def run(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with torch.inference_mode():
            out = module(*(inputs[n] for n in gspec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(gspec.output_names, out))

    return run


def _cast(inputs: Mapping[str, Tensor], gspec: GraphSpec, compute: torch.dtype, device) -> dict[str, Tensor]:
    out = {}
    for t in gspec.inputs:
        if t.name not in inputs:
            raise ValueError(f"{gspec.component}: missing input {t.name!r}")
        out[t.name] = inputs[t.name].to(device=device, dtype=torch_dtype(t, compute))
    return out


class GraphComponent:
    """text_encoder and the DiTs: one graph, the contract's names are the graph's names.

    Built from a runner, or from a `factory` that makes one: then `load()` / `unload()` create
    and drop the engine (session, package, execution context), which is how the residency
    manager swaps experts that do not fit together. `nbytes` is the engine's size on disk.
    """

    def __init__(self, name: str, runner: GraphRunner | None, gspec: GraphSpec, compute_dtype: torch.dtype,
                 device: torch.device, factory: Callable[[], GraphRunner] | None = None, nbytes: int = 0,
                 files: Sequence[Path] = ()):
        if runner is None and factory is None:
            raise ValueError("GraphComponent needs a runner or a factory")
        self.name, self.runner, self.gspec = name, runner, gspec
        self.compute_dtype, self.device = compute_dtype, torch.device(device)
        self.output_name = OUTPUT_NAMES[name]
        self.factory, self.nbytes, self.files = factory, nbytes, list(files)

    def stage(self) -> None:
        """Host-side prefetch: read the engine files so the load that follows hits the page cache."""
        for path in self.files:
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass

    def load(self) -> None:
        if self.runner is None and self.factory is not None:
            self.runner = self.factory()

    def unload(self) -> None:
        if self.factory is not None:
            self.runner = None

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        self.load()
        assert self.runner is not None
        out = self.runner(_cast(inputs, self.gspec, self.compute_dtype, self.device))
        return {self.output_name: out[self.output_name].float()}


class TextKVCache:
    """Per-prompt cross-attention K/V, reused across denoising steps.

    The loop passes the same context tensors (prompt, negative prompt) at every step; an entry
    is keyed by the tensor's identity and version and keeps the tensor alive, so a new or edited
    context can never hit a stale entry. Two entries cover CFG's cond/uncond pair.
    """

    def __init__(self, compute: Callable[[Tensor], Tensor], size: int = 2):
        self.compute, self.size = compute, size
        self._entries: list[tuple[Tensor, int, Tensor]] = []

    @staticmethod
    def _version(t: Tensor) -> int:
        # Inference-mode tensors (what components return) keep no version counter; they can
        # only be changed in place inside inference mode, which the loop never does.
        return -1 if t.is_inference() else t._version

    def __call__(self, context: Tensor) -> Tensor:
        for ctx, version, kv in self._entries:
            if ctx is context and self._version(ctx) == version:
                return kv
        kv = self.compute(context)
        self._entries = [(context, self._version(context), kv), *self._entries][: self.size]
        return kv

    def clear(self) -> None:
        self._entries = []


class DiTComponent:
    """An expert as graphs: `text` once per prompt (cached), then each step either the `main`
    graph or, in the split layout (graphs.DIT_STEP_GRAPHS), embed -> first_block -> rest_blocks
    -> head, rest_blocks being one graph or several run in order (`rest_graphs`, "split:N"). A
    step cache (wan_rt.caching) runs those one by one through `run_graph`.

    Built from runners, or from a `factory` making them ({graph: runner}): then `load()` /
    `unload()` create and drop the engines, which is how the residency manager swaps experts."""

    def __init__(self, name: str, runners: Mapping[str, GraphRunner] | None, specs: Mapping[str, GraphSpec],
                 compute_dtype: torch.dtype, device: torch.device,
                 factory: Callable[[], dict[str, GraphRunner]] | None = None, nbytes: int = 0,
                 files: Sequence[Path] = ()):
        if runners is None and factory is None:
            raise ValueError("DiTComponent needs runners or a factory")
        self.name, self.specs = name, dict(specs)
        # The graphs that run the blocks after the first, in order: rest_blocks, or its parts.
        parts = [g for g in self.specs if g.startswith("rest_blocks_")]
        self.rest_graphs = ("rest_blocks",) if "rest_blocks" in self.specs else rest_block_graphs(len(parts)) \
            if parts else ()
        self.runners: dict[str, GraphRunner] | None = None if runners is None else dict(runners)
        self.compute_dtype, self.device = compute_dtype, torch.device(device)
        self.factory, self._nbytes, self.files = factory, nbytes, list(files)
        self.text_kv = TextKVCache(self._encode_text)
        self._weights_out = False  # weights unloaded by unload(), engines kept

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def has_step_graphs(self) -> bool:
        """Whether the step can be run graph by graph (what a step cache needs)."""
        return bool(self.rest_graphs) and all(g in self.specs for g in ("embed", "first_block", "head",
                                                                         *self.rest_graphs))

    def run_graph(self, graph: str, **inputs: Tensor) -> dict[str, Tensor]:
        """One graph on named tensors (cast to the graph's dtypes); outputs as the graph gives them."""
        self.load()
        assert self.runners is not None
        return self.runners[graph](_cast(inputs, self.specs[graph], self.compute_dtype, self.device))

    def _encode_text(self, context: Tensor) -> Tensor:
        return self.run_graph("text", context=context)["text_kv"]

    # Residency (runtime/residency.py). Runners that can drop their weights (TensorRT for RTX:
    # TrtRunner.swaps_weights) keep their engines, contexts and compiled kernels, and only the
    # weights leave and return; other runners are dropped and made again by the factory.
    def _weight_swapping(self) -> list:
        runners = list((self.runners or {}).values())
        return runners if runners and all(getattr(r, "swaps_weights", False) for r in runners) else []

    def stage(self) -> None:
        swapping = self._weight_swapping()
        if swapping:
            for r in swapping:
                r.stage_weights()
        else:
            GraphComponent.stage(self)  # type: ignore[arg-type]  (reads self.files the same way)

    def load(self) -> None:
        if self.runners is None and self.factory is not None:
            self.runners = self.factory()
        elif self._weights_out:
            for r in self._weight_swapping():
                r.load_weights()
            self._weights_out = False

    def unload(self) -> None:
        swapping = self._weight_swapping()
        if swapping and not self._weights_out:
            for r in swapping:
                r.unload_weights()
            self._weights_out = True
            self.text_kv.clear()
        elif self.factory is not None and not swapping:
            self.runners = None
            self.text_kv.clear()

    def __call__(self, *, latents: Tensor, timestep: Tensor, context: Tensor) -> dict[str, Tensor]:
        kv = self.text_kv(context)
        if "main" in self.specs:
            return {"noise_pred": self.run_graph("main", latents=latents, timestep=timestep, text_kv=kv)["noise_pred"].float()}
        embedded = self.run_graph("embed", latents=latents, timestep=timestep)
        hidden = self.run_graph("first_block", hidden=embedded["hidden"], temb=embedded["temb"], text_kv=kv)["hidden_out"]
        for graph in self.rest_graphs:
            hidden = self.run_graph(graph, hidden=hidden, temb=embedded["temb"], text_kv=kv)["hidden_out"]
        return {"noise_pred": self.run_graph("head", hidden=hidden, tproj=embedded["tproj"])["noise_pred"].float()}


class EagerDiTComponent(HostSwappable, DiTComponent):
    """The eager expert: every graph of both layouts as PyTorch modules over one DiT (identical
    numbers to `dit(latents, timestep, context)`); residency moves its weights between host and GPU."""

    def __init__(self, name: str, spec: ModelSpec, dit: nn.Module, compute_dtype: torch.dtype,
                 device: torch.device):
        from wan_rt.runtime.graphs import graph_module, graph_spec

        graphs = ("text", "main", *DIT_STEP_GRAPHS)
        specs = {g: graph_spec(spec, name, g) for g in graphs}
        DiTComponent.__init__(self, name, {g: module_runner(graph_module(name, g, dit), specs[g]) for g in graphs},
                              specs, compute_dtype, device)
        self.module = dit

    def stage(self) -> None:
        pass

    def unload(self) -> None:
        HostSwappable.unload(self)
        self.text_kv.clear()


class StreamingVAEComponent:
    """vae_encoder / vae_decoder over a `first` and a `step` graph with explicit cache tensors:
    frame 0 alone, then chunks of `stride_t` frames (encoder) or one latent frame (decoder)."""

    def __init__(self, name: str, spec: ModelSpec, first: GraphRunner, step: GraphRunner,
                 first_spec: GraphSpec, step_spec: GraphSpec, device: torch.device):
        self.name, self.spec = name, spec
        self.first, self.step = first, step
        self.first_spec, self.step_spec = first_spec, step_spec
        self.device = torch.device(device)
        self.output_name = OUTPUT_NAMES[name]

    def _zero_cache(self, batch: int, h: int, w: int) -> dict[str, Tensor]:
        sizes = {"B": batch, "h": h, "w": w}
        return {t.name: torch.zeros([resolve_dim(d, sizes) for d in t.dims], device=self.device)
                for t in self.first_spec.inputs if t.name.startswith("cache_in_")}

    def _stream(self, chunks: list[Tensor], x_name: str, batch: int, h: int, w: int) -> list[Tensor]:
        cache = self._zero_cache(batch, h, w)
        outs = []
        for i, chunk in enumerate(chunks):
            runner, gspec = (self.first, self.first_spec) if i == 0 else (self.step, self.step_spec)
            inputs = _cast({x_name: chunk, **cache}, gspec, torch.float32, self.device)
            result = runner(inputs)
            outs.append(result[gspec.output_names[0]].float())
            cache = {n.replace("cache_out_", "cache_in_"): v for n, v in result.items() if n.startswith("cache_out_")}
        return outs

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        st, sh, sw = self.spec.vae.stride
        if self.name == "vae_decoder":
            z = inputs["latents"]
            chunks = [z[:, :, i:i + 1] for i in range(z.shape[2])]
            outs = self._stream(chunks, "latents", z.shape[0], z.shape[3], z.shape[4])
        else:
            v = inputs["video"]
            chunks = [v[:, :, :1]] + [v[:, :, i:i + st] for i in range(1, v.shape[2], st)]
            outs = self._stream(chunks, "video", v.shape[0], v.shape[3] // sh, v.shape[4] // sw)
        return {self.output_name: torch.cat(outs, dim=2)}
