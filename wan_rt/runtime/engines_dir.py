"""The engines dir: what it holds, what a checkpoint expects of it, and when an engine is stale.

One module owns the folder that `wan-rt build` writes and every loader reads (Python, the
server's workers, the C++ library):

    <engines dir>/engines.json              index: model, spec, backend, precision, components
    <engines dir>/<component>/manifest.json what the engine was built from (written last)
    <engines dir>/<component>/<graph>/...   the backend's files (model.onnx, model.pt2, model.plan)

Every manifest holds the identity of the engine's inputs: model spec hash, a fingerprint of the
weights, backend, precision, shape profile, tool versions, and the I/O of each graph. `verify`
recomputes that identity from the checkpoint at hand and refuses on any difference with one
StaleEngineError naming the component, the field and the command that fixes it. Builds write
into hidden `.tmp-*` folders renamed into place (`commit_component`), so an interrupted build
leaves nothing that loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from wan_rt.config import ModelSpec, spec_hash
from wan_rt.resolve import ResolvedCheckpoint, weight_paths
from wan_rt.runtime.graphs import ShapeProfile, graph_names, graph_spec, shape_profile

MANIFEST = "manifest.json"
INDEX = "engines.json"
FORMAT = 1
_EDGE = 1 << 20  # bytes hashed at each end of every weight file


class StaleEngineError(Exception):
    """An engine whose inputs no longer match; the message says what differs and what to run."""


@dataclass
class EngineManifest:
    component: str
    backend: str
    precision: str
    spec_name: str
    spec_hash: str
    weights_fingerprint: str
    profile: dict[str, dict[str, int]]           # {"min": {...}, "opt": {...}, "max": {...}}
    graphs: dict[str, dict[str, Any]]            # graph -> {"files": [...], "inputs": [...], "outputs": [...]}
    model: str                                   # checkpoint path or preset it was built from
    tool_versions: dict[str, str] = field(default_factory=dict)
    device: str = ""
    build_args: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    build_seconds: float = 0.0
    format: int = FORMAT

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "EngineManifest":
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise StaleEngineError(f"{path}: manifest format {data.get('format')} is not {FORMAT}; "
                                       "re-run `wan-rt build`")
            return cls(**data)
        except FileNotFoundError:
            raise StaleEngineError(f"{folder}: no {MANIFEST} (never built, or the build was interrupted); "
                                   "run `wan-rt build`") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise StaleEngineError(f"{path}: unreadable manifest ({exc}); re-run `wan-rt build`") from None

    def files(self) -> list[str]:
        return [f for g in self.graphs.values() for f in g["files"]]


# The fields that make an engine what it is; anything else (timings, dates) is information.
IDENTITY = ("component", "backend", "precision", "spec_hash", "weights_fingerprint", "profile", "graphs_io")


def identity(m: EngineManifest) -> dict[str, Any]:
    ident = {k: getattr(m, k) for k in IDENTITY if k != "graphs_io"}
    ident["graphs_io"] = {g: (v["inputs"], v["outputs"]) for g, v in m.graphs.items()}
    return ident


def first_difference(built: EngineManifest, wanted: EngineManifest) -> str | None:
    a, b = identity(built), identity(wanted)
    for key in IDENTITY:
        if a[key] != b[key]:
            return key
    return None


def weights_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over each weight/config file's name, size and first and last MiB.

    Hashing 57 GB per expert on every load would take minutes; the ends of a safetensors file
    hold its header (every tensor's name, dtype, shape and offset) and the last tensor bytes, and
    the size catches truncation. A change that rewrites only the middle of a file with the same
    length is not caught: re-run `wan-rt build --force` after editing weights in place.
    """
    h = hashlib.sha256()
    for path in sorted(_expand(paths)):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}\n".encode())
        with path.open("rb") as f:
            h.update(f.read(_EDGE))
            if size > 2 * _EDGE:
                f.seek(size - _EDGE)
                h.update(f.read(_EDGE))
    return h.hexdigest()


# LoRA files fused into a component's weights, with the scale each was fused at.
LoraPairs = Sequence[tuple[Path, float]]


def component_fingerprint(resolved: ResolvedCheckpoint, component: str, loras: LoraPairs = ()) -> str:
    """What an engine's weights were made from: the checkpoint's files for the component, and
    the LoRA files (and scales) fused into them at build time. Without LoRAs it is the plain
    `weights_fingerprint`, so engines built before LoRAs existed stay valid."""
    base = weights_fingerprint(weight_paths(resolved, component))
    if not loras:
        return base
    h = hashlib.sha256(base.encode())
    for path, scale in loras:
        h.update(f"lora {weights_fingerprint([Path(path)])} x {float(scale)!r}\n".encode())
    return h.hexdigest()


def lora_args(loras: LoraPairs) -> list[list]:
    """LoRAs as a manifest records them (build_args["loras"]): [[path, scale], ...]."""
    return [[str(path), float(scale)] for path, scale in loras]


def _expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
        elif p.is_file():
            files.append(p)
    return files


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm{cap[0]}{cap[1]})"
    return f"cpu ({platform.machine()})"


# ------------------------------------------------------------------------------- index
def read_index(engines_dir: Path) -> dict:
    path = Path(engines_dir) / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no engines in {engines_dir} (no {INDEX}); run `wan-rt build` first") from None
    except json.JSONDecodeError as exc:
        raise StaleEngineError(f"{path}: unreadable ({exc}); re-run `wan-rt build`") from None


def check_index(engines_dir: Path, model_id: str, spec: ModelSpec, force: bool) -> None:
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


def write_index(engines_dir: Path, model_id: str, spec: ModelSpec, backend: str, precision: str,
                components: list[str]) -> None:
    index = {"format": 1, "model": model_id, "spec_name": spec.name, "spec_hash": spec_hash(spec),
             "backend": backend, "precision": precision, "components": components}
    tmp = engines_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, engines_dir / INDEX)


# ------------------------------------------------------------------- building into the dir
def new_component_dir(engines_dir: Path, component: str) -> Path:
    """A hidden temporary folder to build `component` into; nothing loads it until committed."""
    return Path(tempfile.mkdtemp(prefix=f".tmp-{component}-", dir=engines_dir))


def commit_component(tmp: Path, engines_dir: Path, component: str) -> None:
    """Rename a finished build (its manifest written last) into place, replacing the old one."""
    final = engines_dir / component
    if final.exists():
        old = engines_dir / f".old-{component}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def remove_leftovers(engines_dir: Path) -> None:
    """Folders of builds that were interrupted (or of replaced engines not yet deleted)."""
    for pattern in (".tmp-*", ".old-*"):
        for leftover in engines_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------ what a checkpoint expects
def expected_manifest(resolved: ResolvedCheckpoint, model: str, component: str, backend: str, precision: str,
                      profile: ShapeProfile, device, fingerprint: Optional[str] = None,
                      layout: str = "whole") -> EngineManifest:
    """The manifest a fresh build would write (files and timings aside); `layout` is a DiT's
    graph layout (graphs.graph_names: "split" / "split:N" for engines a step cache can drive)."""
    spec = resolved.spec
    graphs = {}
    for g in graph_names(component, layout):
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


def version_mismatch(manifest: EngineManifest, backend_mod) -> Optional[str]:
    """Backends whose artifacts are tied to a tool version (AOTI .so files, TensorRT plans)."""
    now = backend_mod.versions()
    for key in getattr(backend_mod, "STRICT_VERSIONS", ()):
        if manifest.tool_versions.get(key) != now.get(key):
            return f"built with {key} {manifest.tool_versions.get(key)}, this machine has {now.get(key)}"
    return None


_WHY = {
    "spec_hash": "the model architecture changed",
    "weights_fingerprint": "the weights changed",
    "graphs_io": "wan_rt's I/O contract for it changed",
    "component": "it belongs to another component",
    "backend": "it was built for another backend",
    "precision": "it was built at another precision",
    "profile": "it was built for other shapes",
}


def run_refusal(manifest: EngineManifest, backend_mod) -> Optional[str]:
    """Why this machine cannot run the engine of `manifest` whatever the checkpoint (a TensorRT
    plan built for GPUs it lacks), in one line; None when it can."""
    refuse = getattr(backend_mod, "run_refusal", None)
    return refuse(manifest) if refuse is not None else None


def verify(folder: Path, resolved: ResolvedCheckpoint, model: str, backend_mod, loras: LoraPairs = ()) -> EngineManifest:
    """The manifest of `folder` if it still matches the checkpoint (with `loras` fused into the
    component's weights); StaleEngineError otherwise."""
    have = EngineManifest.read(folder)
    name = have.component
    fix = f"re-run `wan-rt build --model {model} --engines-dir {folder.parent}`"
    fingerprint = component_fingerprint(resolved, name, loras)
    profile = ShapeProfile(**have.profile)
    want = expected_manifest(resolved, model, name, have.backend, have.precision, profile, "cpu", fingerprint,
                             have.build_args.get("dit_graphs", "whole"))
    diff = first_difference(have, want)
    if diff is not None:
        why = _WHY.get(diff, diff)
        built_with = have.build_args.get("loras", [])
        if diff == "weights_fingerprint" and (built_with or loras):
            why = (f"the weights or LoRAs differ (built with LoRAs {built_with or 'none'}, asked for "
                   f"{lora_args(loras) or 'none'})")
            fix = fix.replace("`wan-rt build", "`wan-rt build --lora/--lora-2 ...")
        raise StaleEngineError(f"engine for {name} is stale: {why} since it was built ({diff}); {fix}")
    # What this machine lacks to run it (a GPU among a TensorRT plan's targets): rebuilding here
    # would not help, so no rebuild hint.
    refusal = run_refusal(have, backend_mod)
    if refusal:
        raise StaleEngineError(f"engine for {name} cannot run here: {refusal}")
    mismatch = version_mismatch(have, backend_mod)
    if mismatch:
        raise StaleEngineError(f"engine for {name} cannot run here: {mismatch}; {fix}")
    missing = [f for f in have.files() if not (folder / f).is_file()]
    if missing:
        raise StaleEngineError(f"engine for {name} is incomplete (missing {missing[0]}); {fix}")
    return have


def is_stale(folder: Path, resolved: ResolvedCheckpoint, model: str, backend_mod, loras: LoraPairs = ()) -> bool:
    try:
        verify(folder, resolved, model, backend_mod, loras)
        return False
    except StaleEngineError:
        return True


def build_size(folder: Path) -> dict[str, int]:
    """The size an engine was built for (its profile's max), as `wan-rt build` arguments."""
    try:
        build_args = EngineManifest.read(folder).build_args
    except StaleEngineError:
        return {}
    return {k: build_args[k] for k in ("height", "width", "frames") if k in build_args}


def built_loras(engines_dir: Path) -> dict[str, list[tuple[Path, float]]]:
    """{component: [(LoRA file, scale)]} the engines were built with (their manifests' record)."""
    out = {}
    for name in read_index(engines_dir).get("components", []):
        try:
            recorded = EngineManifest.read(Path(engines_dir) / name).build_args.get("loras")
        except StaleEngineError:
            continue
        if recorded:
            out[name] = [(Path(path), float(scale)) for path, scale in recorded]
    return out


def dit_layout(engines_dir: Path) -> str:
    """The DiT graph layout the engines dir was built with (graphs.dit_layout_name: "split" from
    `wan-rt build --step-cache`, "split:N" from `--dit-parts N`)."""
    for name in read_index(engines_dir).get("components", []):
        try:
            layout = EngineManifest.read(Path(engines_dir) / name).build_args.get("dit_graphs", "whole")
        except StaleEngineError:
            continue
        if layout != "whole":
            return layout
    return "whole"


def check_fits(engines_dir: Path, spec: ModelSpec, height: int, width: int, frames: int) -> None:
    """A clear error when a request is outside the shapes the engines were built for."""
    index = read_index(engines_dir)
    want = shape_profile(spec, height=height, width=width, frames=frames).opt
    for name in index.get("components", []):
        try:
            profile = EngineManifest.read(Path(engines_dir) / name).profile
        except StaleEngineError:
            continue
        for sym in ("T", "h", "w"):
            lo, hi = profile["min"].get(sym), profile["max"].get(sym)
            if lo is not None and not lo <= want[sym] <= hi:
                lo_, hi_ = profile["min"], profile["max"]
                raise ValueError(
                    f"{width}x{height}x{frames} is outside the shapes the {name} engine was built for "
                    f"(latent T {lo_['T']}..{hi_['T']}, h {lo_['h']}..{hi_['h']}, w {lo_['w']}..{hi_['w']}); "
                    f"rebuild with "
                    f"`wan-rt build --height {height} --width {width} --frames {frames} --engines-dir {engines_dir}`")
