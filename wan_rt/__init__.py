"""wan_rt: a compiled-engine runtime for Wan 2.2 video models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from wan_rt.loader import WanPipeline
    from wan_rt.video import export_to_video

# Heavy modules (torch, transformers) load on first use, so `wan-rt --help` stays fast.
_LAZY = {"WanPipeline": "wan_rt.loader", "export_to_video": "wan_rt.video"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wan_rt' has no attribute {name!r}")


__all__ = ["WanPipeline", "export_to_video", "__version__"]
