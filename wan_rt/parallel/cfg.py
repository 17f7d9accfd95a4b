"""CFG parallel: cond on one half of the ranks, uncond on the other, one exchange per step.

The denoise loop already runs CFG as one batch of two ([cond; uncond], pipeline.py). This
wrapper around a DiT component (any backend: eager or engines) gives each CFG rank its half of
that batch, runs the inner component on it, and all-gathers the halves, so the loop gets the
batch of two back, as from one device. A batch that does not split evenly (no CFG: batch 1)
runs whole on every rank: correct, no faster (the CLI refuses --cfg-parallel without guidance).
"""

from __future__ import annotations

from torch import Tensor

from wan_rt.parallel import comm
from wan_rt.parallel.plan import ParallelGroups
from wan_rt.parallel.wrap import ComponentWrapper
from wan_rt.runtime.engine_component import TextKVCache


class CFGParallelDiT(ComponentWrapper):
    def __init__(self, inner, groups: ParallelGroups):
        super().__init__(inner)
        self.group, self.degree, self.index = groups.cfg, groups.plan.cfg, groups.cfg_index
        # The loop passes the same context tensor every step; handing the inner component the
        # same slice tensor every step keeps its per-prompt text K/V cache hitting.
        self._context_half = TextKVCache(self._half)

    def _half(self, x: Tensor) -> Tensor:
        n = x.shape[0] // self.degree
        return x[self.index * n:(self.index + 1) * n]

    def __call__(self, *, latents: Tensor, timestep: Tensor, context: Tensor) -> dict[str, Tensor]:
        if latents.shape[0] % self.degree:
            return self.inner(latents=latents, timestep=timestep, context=context)
        out = self.inner(latents=self._half(latents), timestep=self._half(timestep),
                         context=self._context_half(context))["noise_pred"]
        return {"noise_pred": comm.all_gather(out, 0, self.group, "cfg_gather")}
