"""A step cache: a DiT component wrapper that decides, for each denoising step and each sample
row, whether to run the expert's transformer blocks or to reuse what they added last time.

The expert runs as its split graphs (runtime.graphs.DIT_STEP_GRAPHS: embed -> first_block ->
rest_blocks -> head; eager modules, or engines built with `wan-rt build --step-cache`), so the
same wrapper serves every backend. A policy (teacache.py, magcache.py, fbcache.py) decides from
a signal: the timestep embedding (TeaCache), the step index (MagCache; no signal) or the first
block's residual (FirstBlockCache, which therefore always runs block 0). On a reused step the
hidden state is the base (block 0's input, or its output for FirstBlockCache) plus the residual
the blocks added at the stream's last computed step; the head always runs.

Streams: each sample row of each context is its own stream (cond and uncond under CFG, as
every reference keeps separate states per branch). Rows that disagree run the blocks on the
computing rows only. State lives for one stage: `begin_stage` (called by the pipeline at the
start of every expert's stage) clears it; positions count the stream's calls within the stage.
A threshold of 0 (or below) computes every step: the uncached video, through the split graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor


@dataclass
class Stream:
    """One sample row's state within a stage."""

    index: int                       # order of first appearance in the stage (0: cond, 1: uncond under CFG)
    position: int = 0                # calls taken in this stage
    residual: Optional[Tensor] = None  # what the skipped blocks added at the last computed step
    memory: dict[str, Any] = field(default_factory=dict)  # the policy's own state


@dataclass(frozen=True)
class StepInfo:
    position: int        # within the stage
    stage_steps: int
    global_index: int    # within the whole schedule
    total_steps: int


class Policy(Protocol):
    """Decides per stream and step. `signal`: "temb" / "tproj" (the embed graph's outputs), or
    "first_block" (block 0's residual; the blocks after it are what is skipped), or None."""

    name: str
    threshold: float
    signal: Optional[str]

    def decide(self, stream: Stream, step: StepInfo, signal: Optional[Tensor]) -> bool:
        """True: compute the blocks; False: reuse the stream's residual."""
        ...

    def computed(self, stream: Stream, step: StepInfo, residual: Tensor) -> None:
        """After the blocks ran for the stream (calibration hooks)."""
        ...


def rel_l1(now: Tensor, before: Tensor) -> float:
    """mean|now - before| / mean|before|: every reference's distance between consecutive steps."""
    return float((now.float() - before.float()).abs().mean() / before.float().abs().mean())


class StepCache:
    """Wraps a DiT component with step graphs; the component contract in and out, plus the
    pipeline's optional stage hooks (begin_stage / stage_report)."""

    def __init__(self, dit: Any, policy: Policy):
        if not getattr(dit, "has_step_graphs", False):
            raise ValueError(f"{dit.name}: a step cache needs the DiT step as separate graphs; these engines have one "
                             "`main` graph: rebuild them with `wan-rt build --step-cache`")
        self.inner, self.policy = dit, policy
        self.decisions: list[tuple[int, int, bool]] = []  # (global step, stream, computed), this stage
        self.begin_stage([], 0)

    def __getattr__(self, item: str) -> Any:  # name, load/unload/stage/nbytes, module, text_kv ...
        return getattr(self.inner, item)

    # ------------------------------------------------------------------ pipeline hooks
    def begin_stage(self, indices: Sequence[int], total_steps: int) -> None:
        self._indices, self._total = list(indices), total_steps
        self._streams: dict[tuple[int, int], Stream] = {}
        self._contexts: list[Tensor] = []  # keeps the keyed contexts alive (ids stay unique)
        self.decisions = []

    def stage_report(self) -> dict[str, float]:
        """Steps of the stage whose blocks ran for some stream, and steps that ran none."""
        per_step: dict[int, bool] = {}
        for step, _, computed in self.decisions:
            per_step[step] = per_step.get(step, False) or computed
        computed = sum(per_step.values())
        return {"steps_computed": float(computed), "steps_reused": float(len(per_step) - computed)}

    # ------------------------------------------------------------------ the step
    def __call__(self, *, latents: Tensor, timestep: Tensor, context: Tensor) -> dict[str, Tensor]:
        dit = self.inner
        kv = dit.text_kv(context)
        embedded = dit.run_graph("embed", latents=latents, timestep=timestep)
        x0, temb, tproj = embedded["hidden"], embedded["temb"], embedded["tproj"]
        streams = [self._stream(context, row) for row in range(x0.shape[0])]
        skipped = ("first_block", *dit.rest_graphs)
        base, signal = x0, embedded.get(self.policy.signal or "")
        if self.policy.signal == "first_block":
            base = dit.run_graph("first_block", hidden=x0, temb=temb, text_kv=kv)["hidden_out"]
            signal, skipped = base - x0, dit.rest_graphs
        infos = [self._info(s) for s in streams]
        compute = [self.policy.decide(s, info, None if signal is None else signal[row:row + 1])
                   for row, (s, info) in enumerate(zip(streams, infos))]
        hidden = self._blocks(base, temb, kv, skipped, [r for r, c in enumerate(compute) if c])
        for row, (s, info, computed) in enumerate(zip(streams, infos, compute)):
            if computed:
                s.residual = hidden[row:row + 1] - base[row:row + 1]
                self.policy.computed(s, info, s.residual)
            else:
                assert s.residual is not None, f"{self.policy.name} reused a step with nothing cached"
                hidden[row:row + 1] = base[row:row + 1] + s.residual
            self.decisions.append((info.global_index, s.index, computed))
            s.position += 1
        noise = dit.run_graph("head", hidden=hidden, tproj=tproj)["noise_pred"]
        return {"noise_pred": noise.float()}

    def _blocks(self, base: Tensor, temb: Tensor, kv: Tensor, graphs: tuple[str, ...], rows: list[int]) -> Tensor:
        """The skippable graphs on the computing rows; the other rows hold `base` for now."""
        if not rows:
            return base.clone()
        everyone = len(rows) == base.shape[0]
        index = torch.tensor(rows, device=base.device)
        hidden = base if everyone else base.index_select(0, index)
        temb_rows = temb if everyone else temb.index_select(0, index.to(temb.device))
        kv_rows = kv if everyone else kv.index_select(2, index.to(kv.device))
        for graph in graphs:
            hidden = self.inner.run_graph(graph, hidden=hidden, temb=temb_rows, text_kv=kv_rows)["hidden_out"]
        if everyone:
            return hidden
        out = base.clone()
        out[index] = hidden
        return out

    def _stream(self, context: Tensor, row: int) -> Stream:
        key = (id(context), row)
        if key not in self._streams:
            if not any(c is context for c in self._contexts):
                self._contexts.append(context)
            self._streams[key] = Stream(index=len(self._streams))
        return self._streams[key]

    def _info(self, s: Stream) -> StepInfo:
        n = len(self._indices)
        if s.position >= n:
            raise RuntimeError(f"{self.inner.name}: step cache called more often than the {n} steps its stage "
                               "announced (begin_stage); the pipeline calls begin_stage per stage")
        return StepInfo(s.position, n, self._indices[s.position], self._total)
