"""Engine components from an engines dir, behind the component contract, refusing stale ones.

Before an engine is used its manifest is verified against the checkpoint at hand
(runtime/engines_dir.py); any difference is one StaleEngineError naming the component and the
field. Rebuilding stale engines and filling in eager components is the loader's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from wan_rt.precision import component_dtype
from wan_rt.resolve import ResolvedCheckpoint
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engine_component import DiTComponent, GraphComponent, StreamingVAEComponent
from wan_rt.runtime.engines_dir import EngineManifest, LoraPairs, StaleEngineError, read_index, verify
from wan_rt.runtime.graphs import components_of, graph_spec


def check_engines_model(engines_dir: Path, resolved: ResolvedCheckpoint, model: str) -> dict:
    """The index of `engines_dir`, if its engines are of `resolved`'s model."""
    index = read_index(engines_dir)
    if index.get("spec_name") != resolved.spec.name:
        raise StaleEngineError(f"{engines_dir} holds engines of {index.get('spec_name')}, not {resolved.spec.name}; "
                               f"build them with `wan-rt build --model {model} --engines-dir {engines_dir}`")
    return index


def load_engine_components(engines_dir: Path, resolved: ResolvedCheckpoint, device: torch.device,
                           names: Iterable[str] | None = None, loras: Mapping[str, LoraPairs] | None = None) -> dict:
    """Components `names` (default: all of the model's) from their verified engines; `loras`
    (per component) are the LoRAs their weights must have been built with."""
    engines_dir = Path(engines_dir)
    index = read_index(engines_dir)
    backend_mod = get_backend(index["backend"])
    components = {}
    for name in names if names is not None else components_of(resolved.spec):
        manifest = verify(engines_dir / name, resolved, index["model"], backend_mod, (loras or {}).get(name, ()))
        components[name] = _component(engines_dir / name, manifest, resolved, backend_mod, device)
        if "S" in manifest.profile["max"]:  # the text length the engine was built for (--text-len)
            components[name].text_len = manifest.profile["max"]["S"]
    return components


def _component(folder: Path, manifest: EngineManifest, resolved: ResolvedCheckpoint, backend_mod, device):
    name, spec = manifest.component, resolved.spec
    dtype = component_dtype(name, manifest.precision, manifest.backend, device)

    def runner(graph: str):
        gspec = graph_spec(spec, name, graph)
        files = manifest.graphs[graph]["files"]
        return backend_mod.load_graph(folder, gspec, files, compute_dtype=dtype, device=device), gspec

    if name.startswith("vae"):
        (first, first_spec), (step, step_spec) = runner("first"), runner("step")
        return StreamingVAEComponent(name, spec, first, step, first_spec, step_spec, device)
    if name.startswith("dit"):
        # Experts load lazily: the residency manager decides when (runtime/residency.py). The
        # graphs are the manifest's: text + main, or text + the split step (a step cache's).
        nbytes = sum((folder / f).stat().st_size for f in manifest.files())

        def runners() -> dict:
            made = {g: runner(g)[0] for g in manifest.graphs}
            if "main" in made:
                made["main"] = _graphed(made["main"], backend_mod, device)
            return made

        return DiTComponent(name, None, {g: graph_spec(spec, name, g) for g in manifest.graphs}, dtype, device,
                            factory=runners, nbytes=nbytes, files=[folder / f for f in manifest.files()])
    main, gspec = runner("main")
    return GraphComponent(name, main, gspec, dtype, device)


def _graphed(runner, backend_mod, device: torch.device):
    """The DiT step replayed from a CUDA graph where the backend has none of its own (aoti)."""
    if device.type == "cuda" and getattr(backend_mod, "CUDA_GRAPHS", False):
        from wan_rt.runtime.cuda_graphs import CudaGraphRunner

        return CudaGraphRunner(runner)
    return runner
