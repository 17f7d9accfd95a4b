"""`wan-rt build`: export every component of a checkpoint and compile engines, atomically.

Each component is built into a hidden temporary folder of the engines dir, its manifest written
last, and only then renamed into place: an interrupted build leaves nothing that loads. A
component whose manifest already verifies against the checkpoint, backend, precision and
profile is skipped, so building twice costs nothing the second time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from wan_rt.config import ModelSpec, spec_hash
from wan_rt.loader import ResolvedCheckpoint, resolve_checkpoint
from wan_rt.runtime.backends import get_backend
from wan_rt.runtime.graphs import (ShapeProfile, components_of, graph_module, graph_names, graph_spec,
                                   shape_profile)
from wan_rt.runtime.manifest import (INDEX, EngineManifest, StaleEngineError, device_name, first_difference,
                                     weights_fingerprint)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def best_backend() -> str:
    """TensorRT where it runs; otherwise ONNX Runtime (fast to build, runs on any CPU)."""
    from wan_rt.runtime.backends import trt

    return "trt" if trt.is_available() else "ort"


def default_precision(backend: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "fp16" if backend == "ort" else "bf16"


def component_dtype(component: str, precision: str) -> torch.dtype:
    """The VAE stays fp32 (as the official code runs it): it is a small share of the time and
    the streaming cache accumulates rounding. umT5 is never fp16 (its activations overflow it;
    bf16 is fine). Everything else follows the requested precision."""
    if component.startswith("vae") or (component == "text_encoder" and precision == "fp16"):
        return torch.float32
    return PRECISIONS[precision]


def weight_paths(resolved: ResolvedCheckpoint, component: str) -> list[Path]:
    files = resolved.files
    if component == "text_encoder":
        return [files.text_encoder]
    if component.startswith("vae"):
        return [files.vae]
    return [files.dits[component]]


def expected_manifest(resolved: ResolvedCheckpoint, model: str, component: str, backend: str, precision: str,
                      profile: ShapeProfile, device: torch.device, fingerprint: Optional[str] = None) -> EngineManifest:
    """The manifest a fresh build would write (files and timings aside)."""
    spec = resolved.spec
    graphs = {}
    for g in graph_names(component):
        gs = graph_spec(spec, component, g)
        graphs[g] = {"files": [], "inputs": [dataclasses.asdict(t) for t in gs.inputs],
                     "outputs": [dataclasses.asdict(t) for t in gs.outputs]}
    # JSON round trip so tuples compare equal to what a manifest file holds.
    graphs = json.loads(json.dumps(graphs))
    return EngineManifest(
        component=component, backend=backend, precision=precision, spec_name=spec.name,
        spec_hash=spec_hash(spec),
        weights_fingerprint=fingerprint or weights_fingerprint(weight_paths(resolved, component)),
        profile={"min": profile.min, "opt": profile.opt, "max": profile.max}, graphs=graphs,
        model=model, device=device_name(device),
    )


def _load_model(resolved: ResolvedCheckpoint, component: str, dtype: torch.dtype, device: torch.device):
    from wan_rt.models import load_dit, load_text_encoder, load_vae

    if component == "text_encoder":
        return load_text_encoder(resolved.files, dtype=dtype, device=device)
    if component.startswith("vae"):
        return load_vae(resolved.files, dtype=dtype, device=device)
    return load_dit(resolved.files, component, dtype=dtype, device=device)


def build_engines(model: str, backend: str, engines_dir: Path, *, precision: Optional[str] = None,
                  height: Optional[int] = None, width: Optional[int] = None, frames: Optional[int] = None,
                  components: Optional[list[str]] = None, force: bool = False,
                  device: Optional[str] = None, log: Callable[[str], None] = print) -> list[EngineManifest]:
    backend_mod = get_backend(backend)
    if not backend_mod.is_available():
        why = getattr(backend_mod, "unavailable_reason", lambda: "its libraries are not installed")()
        raise ValueError(f"backend {backend!r} is not available on this machine: {why}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or default_precision(backend, dev)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported yet; choose from {', '.join(PRECISIONS)}")
    resolved = resolve_checkpoint(model)
    spec = resolved.spec
    height, width = height or spec.height, width or spec.width
    frames = frames or spec.num_frames
    from wan_rt.pipeline import check_request

    check_request(spec, height, width, frames, 1)
    profile = shape_profile(spec, height=height, width=width, frames=frames)
    wanted = components or list(components_of(spec))
    unknown = [c for c in wanted if c not in components_of(spec)]
    if unknown:
        raise ValueError(f"{spec.name} has no component {unknown[0]!r}; it has {', '.join(components_of(spec))}")
    model_id = model if not Path(model).exists() else str(Path(model).resolve())
    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    _check_index(engines_dir, model_id, spec, backend, precision, force)
    _remove_leftovers(engines_dir)

    built = []
    for name in wanted:
        want = expected_manifest(resolved, model_id, name, backend, precision, profile, dev)
        want.tool_versions = backend_mod.versions()
        want.build_args = {"height": height, "width": width, "frames": frames}
        final = engines_dir / name
        if not force and _up_to_date(final, want, backend_mod):
            log(f"  {name:<16} up to date ({final})")
            built.append(EngineManifest.read(final))
            continue
        log(f"  {name:<16} building ({backend}, {precision}) ...")
        start = time.perf_counter()
        manifest = _build_component(resolved, name, want, backend_mod, profile, dev, engines_dir)
        log(f"  {name:<16} built in {time.perf_counter() - start:.1f}s -> {final}")
        built.append(manifest)
    _write_index(engines_dir, model_id, spec, backend, precision, [m.component for m in built])
    return built


def _up_to_date(folder: Path, want: EngineManifest, backend_mod) -> bool:
    try:
        have = EngineManifest.read(folder)
    except StaleEngineError:
        return False
    return (first_difference(have, want) is None and version_mismatch(have, backend_mod) is None
            and all((folder / f).is_file() for f in have.files()))


def version_mismatch(manifest: EngineManifest, backend_mod) -> Optional[str]:
    """Backends whose artifacts are tied to a tool version (AOTI .so files, TensorRT plans)."""
    now = backend_mod.versions()
    for key in getattr(backend_mod, "STRICT_VERSIONS", ()):
        if manifest.tool_versions.get(key) != now.get(key):
            return f"built with {key} {manifest.tool_versions.get(key)}, this machine has {now.get(key)}"
    return None


def _build_component(resolved: ResolvedCheckpoint, name: str, want: EngineManifest, backend_mod,
                     profile: ShapeProfile, device: torch.device, engines_dir: Path) -> EngineManifest:
    start = time.perf_counter()
    dtype = component_dtype(name, want.precision)
    model = _load_model(resolved, name, dtype, device)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=engines_dir))
    try:
        for g in graph_names(name):
            gspec = graph_spec(resolved.spec, name, g)
            sub = tmp / g
            sub.mkdir()
            files = backend_mod.build_graph(graph_module(name, g, model), gspec, profile, sub,
                                            compute_dtype=dtype, device=device)
            want.graphs[g]["files"] = [f"{g}/{f}" for f in files]
        want.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        want.build_seconds = round(time.perf_counter() - start, 2)
        want.write(tmp)  # last: a folder without a manifest never loads
        final = engines_dir / name
        if final.exists():
            old = engines_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        return want
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del model


def _remove_leftovers(engines_dir: Path) -> None:
    for leftover in engines_dir.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in engines_dir.glob(".old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def read_index(engines_dir: Path) -> dict:
    path = Path(engines_dir) / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no engines in {engines_dir} (no {INDEX}); run `wan-rt build` first") from None
    except json.JSONDecodeError as exc:
        raise StaleEngineError(f"{path}: unreadable ({exc}); re-run `wan-rt build`") from None


def _check_index(engines_dir: Path, model_id: str, spec: ModelSpec, backend: str, precision: str, force: bool):
    """One engines dir holds one model's engines: refuse to mix, unless --force."""
    try:
        index = read_index(engines_dir)
    except (FileNotFoundError, StaleEngineError):
        return
    if force:
        return
    if index.get("spec_name") != spec.name or index.get("model") != model_id:
        raise ValueError(f"{engines_dir} holds engines of {index.get('model')} ({index.get('spec_name')}); "
                         f"use another --engines-dir for {model_id}, or --force to replace them")


def _write_index(engines_dir: Path, model_id: str, spec: ModelSpec, backend: str, precision: str,
                 components: list[str]) -> None:
    index = {"format": 1, "model": model_id, "spec_name": spec.name, "spec_hash": spec_hash(spec),
             "backend": backend, "precision": precision, "components": components}
    tmp = engines_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, engines_dir / INDEX)
