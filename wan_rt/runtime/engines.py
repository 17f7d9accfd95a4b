"""Load the components of an engines dir behind the component contract, refusing stale ones.

Before an engine is used its manifest is compared with what the checkpoint at hand would give
(spec hash, weights fingerprint, graph I/O, tool versions where the artifact depends on them).
Any difference is one StaleEngineError naming the component and the field, and the command that
fixes it, unless `rebuild=True`, which rebuilds the stale components first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from wan_rt.build import (build_engines, component_dtype, expected_manifest, read_index, version_mismatch,
                          weight_paths)
from wan_rt.loader import ResolvedCheckpoint, build_eager_components, resolve_checkpoint
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.engine_component import DiTComponent, GraphComponent, StreamingVAEComponent
from wan_rt.runtime.graphs import ShapeProfile, components_of, graph_spec
from wan_rt.runtime.manifest import EngineManifest, StaleEngineError, first_difference, weights_fingerprint

_WHY = {
    "spec_hash": "the model architecture changed",
    "weights_fingerprint": "the weights changed",
    "graphs_io": "wan_rt's I/O contract for it changed",
    "component": "it belongs to another component",
    "backend": "it was built for another backend",
    "precision": "it was built at another precision",
    "profile": "it was built for other shapes",
}


def verify(folder: Path, resolved: ResolvedCheckpoint, model: str, backend_mod) -> EngineManifest:
    """The manifest of `folder` if it still matches the checkpoint; StaleEngineError otherwise."""
    have = EngineManifest.read(folder)
    name = have.component
    fix = f"re-run `wan-rt build --model {model} --engines-dir {folder.parent}`"
    fingerprint = weights_fingerprint(weight_paths(resolved, name))
    profile = ShapeProfile(**have.profile)
    want = expected_manifest(resolved, model, name, have.backend, have.precision, profile,
                             torch.device("cpu"), fingerprint)
    field = first_difference(have, want)
    if field is not None:
        raise StaleEngineError(f"engine for {name} is stale: {_WHY.get(field, field)} since it was built "
                               f"({field}); {fix}")
    mismatch = version_mismatch(have, backend_mod)
    if mismatch:
        raise StaleEngineError(f"engine for {name} cannot run here: {mismatch}; {fix}")
    missing = [f for f in have.files() if not (folder / f).is_file()]
    if missing:
        raise StaleEngineError(f"engine for {name} is incomplete (missing {missing[0]}); {fix}")
    return have


def load_engine_components(engines_dir: Path, *, model: Optional[str] = None,
                           backend_for: Optional[Mapping[str, str]] = None,
                           device: Optional[torch.device] = None, rebuild: bool = False,
                           ) -> tuple[ResolvedCheckpoint, dict]:
    """All components of the engines dir's model; `backend_for` pins some to "eager"."""
    engines_dir = Path(engines_dir)
    index = read_index(engines_dir)
    model = model or index["model"]
    resolved = resolve_checkpoint(model)
    spec = resolved.spec
    if index.get("spec_name") != spec.name:
        raise StaleEngineError(f"{engines_dir} holds engines of {index.get('spec_name')}, not {spec.name}; "
                               f"build them with `wan-rt build --model {model} --engines-dir {engines_dir}`")
    model_id = index["model"]
    backend_mod = get_backend(index["backend"])
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pinned = dict(backend_for or {})
    for name, b in pinned.items():
        if name not in components_of(spec):
            raise ValueError(f"--backend-for: {spec.name} has no component {name!r}")
        if b not in ("eager", index["backend"]):
            raise ValueError(f"--backend-for {name}={b}: only 'eager' or the engines' backend ({index['backend']})")

    engine_names = [c for c in components_of(spec) if pinned.get(c, index["backend"]) != "eager"]
    if rebuild:
        stale = [c for c in engine_names if _stale(engines_dir / c, resolved, model_id, backend_mod)]
        if stale:
            build_engines(model, index["backend"], engines_dir, precision=index["precision"], components=stale,
                          **_profile_args(engines_dir / engine_names[0]))
    components = {}
    for name in engine_names:
        manifest = verify(engines_dir / name, resolved, model_id, backend_mod)
        components[name] = _component(engines_dir / name, manifest, resolved, backend_mod, dev)
    eager = [c for c in components_of(spec) if c not in components]
    if eager:
        dtype = component_dtype("dit", index["precision"], index["backend"], dev)
        components.update(build_eager_components(resolved, dev, dtype, eager))
    return resolved, components


def _stale(folder: Path, resolved, model_id: str, backend_mod) -> bool:
    try:
        verify(folder, resolved, model_id, backend_mod)
        return False
    except StaleEngineError:
        return True


def _profile_args(folder: Path) -> dict:
    """Rebuild at the size the engines were built for (the profile's max)."""
    try:
        build_args = EngineManifest.read(folder).build_args
    except StaleEngineError:
        return {}
    return {k: build_args[k] for k in ("height", "width", "frames") if k in build_args}


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
        # Experts load lazily: the residency manager decides when (runtime/residency.py).
        nbytes = sum((folder / f).stat().st_size for f in manifest.files())
        return DiTComponent(name, None, None, graph_spec(spec, name, "text"), graph_spec(spec, name, "main"),
                            dtype, device, nbytes=nbytes, files=[folder / f for f in manifest.files()],
                            factory=lambda: (runner("text")[0], _graphed(runner("main")[0], backend_mod, device)))
    main, gspec = runner("main")
    return GraphComponent(name, main, gspec, dtype, device)


def _graphed(runner, backend_mod, device: torch.device):
    """The DiT step replayed from a CUDA graph where the backend has none of its own (aoti)."""
    if device.type == "cuda" and getattr(backend_mod, "CUDA_GRAPHS", False):
        from wan_rt.runtime.cuda_graphs import CudaGraphRunner

        return CudaGraphRunner(runner)
    return runner


def check_fits(engines_dir: Path, spec, height: int, width: int, frames: int, batch: int = 1) -> None:
    """A clear error when a request is outside the shapes the engines were built for."""
    from wan_rt.runtime.graphs import shape_profile

    index = read_index(engines_dir)
    for name in index.get("components", []):
        try:
            profile = EngineManifest.read(Path(engines_dir) / name).profile
        except StaleEngineError:
            continue
        want = shape_profile(spec, height=height, width=width, frames=frames).opt
        for sym in ("T", "h", "w"):
            lo, hi = profile["min"].get(sym), profile["max"].get(sym)
            if lo is not None and not lo <= want[sym] <= hi:
                lo_, hi_ = profile["min"], profile["max"]
                raise ValueError(
                    f"{width}x{height}x{frames} is outside the shapes the {name} engine was built for "
                    f"(latent T {lo_['T']}..{hi_['T']}, h {lo_['h']}..{hi_['h']}, w {lo_['w']}..{hi_['w']}); "
                    f"rebuild with "
                    f"`wan-rt build --height {height} --width {width} --frames {frames} --engines-dir {engines_dir}`")
