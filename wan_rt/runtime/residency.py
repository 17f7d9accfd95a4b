"""Which expert is resident: the runtime owns the A14B high-noise -> low-noise swap.

When both experts fit in the memory budget both stay resident, and the second is loaded on a
background thread while the first runs its last `prefetch_steps` steps. When they do not fit,
that background work is the host-side half only (`stage()`: read the engine or weights from disk
into host memory); at the switch the first expert is released and the second uploaded. The time
the loop waits at the switch is reported as the swap stall.

Components take part by having `nbytes`, `load()` and `unload()` (and optionally `stage()`);
EagerComponent and the engine components do. Anything else counts as always resident.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping, Optional, Sequence


class ExpertResidency:
    def __init__(self, components: Mapping[str, object], experts: Sequence[str],
                 budget_bytes: Optional[int] = None, prefetch_steps: int = 2):
        self.components = components
        self.experts = list(experts)
        self.budget = budget_bytes
        self.prefetch_steps = prefetch_steps
        self._pending: dict[str, threading.Thread] = {}
        self._errors: dict[str, BaseException] = {}
        self._loaded: set[str] = set()
        self.events: list[tuple[str, str]] = []  # (action, expert), in order: for tests and logs

    @property
    def all_fit(self) -> bool:
        if self.budget is None:
            return True
        return sum(int(getattr(self.components[e], "nbytes", 0) or 0) for e in self.experts) <= self.budget

    def _swappable(self, name: str) -> bool:
        c = self.components[name]
        return hasattr(c, "load") and hasattr(c, "unload")

    def _background(self, name: str, action: str, fn: Callable[[], None]) -> None:
        if name in self._pending:
            return

        def work():
            try:
                fn()
            except BaseException as exc:  # re-raised on the loop's thread in enter()
                self._errors[name] = exc

        self.events.append((action, name))
        self._pending[name] = threading.Thread(target=work, name=f"{action}-{name}", daemon=True)
        self._pending[name].start()

    def _wait(self, name: str) -> None:
        thread = self._pending.pop(name, None)
        if thread is not None:
            thread.join()
        if name in self._errors:
            raise self._errors.pop(name)

    def progress(self, name: str, steps_left: int, upcoming: Optional[str]) -> None:
        """After each step of `name`'s stage: near its end, start on `upcoming`, the expert of
        the next stage of this generation (None when this is the last stage)."""
        nxt = upcoming
        if nxt is None or nxt == name or steps_left > self.prefetch_steps:
            return
        if not self._swappable(nxt) or nxt in self._loaded:
            return
        comp = self.components[nxt]
        if self.all_fit:
            self._background(nxt, "prefetch", lambda: (comp.load(), self._loaded.add(nxt)))
        elif hasattr(comp, "stage"):
            self._background(nxt, "stage", comp.stage)

    def enter(self, name: str) -> float:
        """Make `name` resident before its stage; returns the seconds the loop waited."""
        start = time.perf_counter()
        if not self._swappable(name):
            return 0.0
        if not self.all_fit:
            for other in self.experts:
                if other != name and other in self._loaded:
                    self._unload(other)
        self._wait(name)
        if name not in self._loaded:
            self.components[name].load()
            self._loaded.add(name)
        self.events.append(("resident", name))
        return time.perf_counter() - start

    def finish(self) -> None:
        """End of a generation: no background work may outlive it."""
        for name in list(self._pending):
            self._wait(name)

    def leave(self, name: str) -> None:
        """After a stage (it will not run again in this generation): release it if memory is short."""
        if not self.all_fit and name in self._loaded:
            self._unload(name)

    def _unload(self, name: str) -> None:
        self.events.append(("unload", name))
        self.components[name].unload()
        self._loaded.discard(name)
