"""Checkpoint files an engine points at instead of holding a copy of their bytes.

An engine's graph folder gets a hard link to each checkpoint file it reads weights from, under
LINKS_DIR: the engines dir then keeps what it was built from at no cost in disk, and stays valid
if the checkpoint is moved or deleted. A link cannot cross disks (EXDEV) or be made where the
filesystem refuses; the caller then points at the file itself (AOTInductor's weights.json) or
writes a copy (ONNX, whose external data must lie inside the model's folder). Both backends'
manifests say which ("linked" / "referenced").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

LINKS_DIR = "weights"


def link_files(sources: Iterable[Path], folder: Path) -> dict[Path, str | None]:
    """{checkpoint file: its hard link's path relative to `folder` (LINKS_DIR/<n>-<name>), or None
    where no link could be made}, in first-seen order of `sources`."""
    out: dict[Path, str | None] = {}
    for source in sources:
        if source in out:
            continue
        link = Path(LINKS_DIR) / f"{len(out)}-{source.name}"
        try:
            (folder / LINKS_DIR).mkdir(parents=True, exist_ok=True)
            os.link(source, folder / link)
            out[source] = str(link)
        except OSError:  # another disk (EXDEV), or links not allowed here
            out[source] = None
    if out and not any(out.values()):
        try:
            (folder / LINKS_DIR).rmdir()  # nothing linked: no empty folder left in the engine
        except OSError:
            pass
    return out
