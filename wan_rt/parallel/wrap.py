"""The base of every parallel component wrapper: the named-tensor contract on the outside, an
inner component inside, and the inner component's residency hooks (`nbytes`, `load`, `unload`,
`stage`: runtime/residency.py) passed through, so expert swapping works as before."""

from __future__ import annotations

from typing import Any


class ComponentWrapper:
    def __init__(self, inner: Any):
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes the wrapper lacks: residency hooks, module, device, ...
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
