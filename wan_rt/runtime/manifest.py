"""What an engine was built from, so a stale engine is never used silently.

Every component folder in an engines dir holds `manifest.json` (written last, after the engine
files) with the identity of its inputs: model spec hash, a fingerprint of the weights, backend,
precision, shape profile, tool versions, and the I/O of each graph. Loading recomputes the
identity from the checkpoint at hand and refuses on any difference, naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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


def _expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
        elif p.is_file():
            files.append(p)
    return files


def device_name(device) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm{cap[0]}{cap[1]})"
    return f"cpu ({platform.machine()})"
