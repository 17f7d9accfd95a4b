"""First Block Cache (ParaAttention; diffusers `hooks.first_block_cache`): block 0 always runs;
when its residual (output minus input) is close to the one of the stream's last computed step,
mean|r - r_prev| / mean|r_prev| <= threshold, the other blocks are skipped and what they added
last time is added to block 0's output. As diffusers: the comparison is against the last
*computed* step's residual, a step computes when the distance is greater than the threshold, and
each branch (cond / uncond) and each expert has its own state. Default threshold: diffusers' 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from wan_rt.caching.base import StepInfo, Stream, rel_l1

DEFAULT_THRESHOLD = 0.05


@dataclass
class FirstBlockCache:
    threshold: float = DEFAULT_THRESHOLD
    signal: str = "first_block"
    name: str = "fbcache"

    def decide(self, stream: Stream, step: StepInfo, signal: Optional[Tensor]) -> bool:
        assert signal is not None
        previous = stream.memory.get("first_residual")
        compute = (self.threshold <= 0 or previous is None or stream.residual is None
                   or rel_l1(signal, previous) > self.threshold)
        if compute:
            stream.memory["first_residual"] = signal
        return compute

    def computed(self, stream: Stream, step: StepInfo, residual: Tensor) -> None:
        pass
