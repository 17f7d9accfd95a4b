"""MagCache (Ma et al. 2025, "Magnitude-aware Cache"): the ratio of the residual's magnitude
between consecutive steps is nearly a fixed curve of the step for a given model, so it is
calibrated once; at run time the error of reusing the last residual is estimated by
accumulating |1 - product of ratios| since the last computed step, and the blocks are skipped
while that stays under the threshold and at most K steps in a row. The first `retention` share
of each expert's stage always computes. No signal is read: decisions depend on the step alone.

Published ratios: Zehong-Ma/MagCache @df81cb1, MagCache4Wan2.2/magcache_generate.py (cond and
uncond interleaved over the model's default schedule: 40 steps for the A14B models, 50 for
TI2V-5B; the first pair, 1.0 there, is prepended as that file does). Both A14B experts read the
one curve at their global step index. Run parameters from that folder's README: threshold 0.06,
K 2, retention 0.4 (T2V) / 0.1 (I2V, whose high-noise expert MagCache never skips: `i2v` mode) /
0.2 (TI2V). Other step counts interpolate (nearest) as the reference does. Models with no
published curve (the tiny presets, custom checkpoints) need `calibrate_magcache` first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from wan_rt.caching.base import StepInfo, Stream

DEFAULT_THRESHOLD = 0.06
PUBLISHED_RATIOS = {
    "t2v-A14B": (  # magcache_generate.py line 695
        1.00124, 1.00155, 0.99822, 0.99851, 0.99696, 0.99687, 0.99703, 0.99732, 0.9966, 0.99679, 0.99602,
        0.99658, 0.99578, 0.99664, 0.99484, 0.9949, 0.99633, 0.996, 0.99659, 0.99683, 0.99534, 0.99549, 0.99584,
        0.99577, 0.99681, 0.99694, 0.99563, 0.99554, 0.9944, 0.99473, 0.99594, 0.9964, 0.99466, 0.99461,
        0.99453, 0.99481, 0.99389, 0.99365, 0.99391, 0.99406, 0.99354, 0.99361, 0.99283, 0.99278, 0.99268,
        0.99263, 0.99057, 0.99091, 0.99125, 0.99126, 0.65523, 0.65252, 0.98808, 0.98852, 0.98765, 0.98736,
        0.9851, 0.98535, 0.98311, 0.98339, 0.9805, 0.9806, 0.97776, 0.97771, 0.97278, 0.97286, 0.96731, 0.96728,
        0.95857, 0.95855, 0.94385, 0.94385, 0.92118, 0.921, 0.88108, 0.88076, 0.80263, 0.80181,
    ),
    "i2v-A14B": (  # magcache_generate.py line 771
        0.99191, 0.99144, 0.99356, 0.99337, 0.99326, 0.99285, 0.99251, 0.99264, 0.99393, 0.99366, 0.9943,
        0.9943, 0.99276, 0.99288, 0.99389, 0.99393, 0.99274, 0.99289, 0.99316, 0.9931, 0.99379, 0.99377,
        0.99268, 0.99271, 0.99222, 0.99227, 0.99175, 0.9916, 0.91076, 0.91046, 0.98931, 0.98933, 0.99087,
        0.99088, 0.98852, 0.98855, 0.98895, 0.98896, 0.98806, 0.98808, 0.9871, 0.98711, 0.98613, 0.98618,
        0.98434, 0.98435, 0.983, 0.98307, 0.98185, 0.98187, 0.98131, 0.98131, 0.9783, 0.97835, 0.97619, 0.9762,
        0.97264, 0.9727, 0.97088, 0.97098, 0.96568, 0.9658, 0.96045, 0.96055, 0.95322, 0.95335, 0.94579,
        0.94594, 0.93297, 0.93311, 0.91699, 0.9172, 0.89174, 0.89202, 0.8541, 0.85446, 0.79823, 0.79902,
    ),
    "ti2v-5B": (  # magcache_generate.py line 736
        0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548, 0.99468, 0.9946,
        0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441, 0.99409, 0.99398, 0.99403,
        0.99397, 0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378, 0.9933, 0.99328, 0.99303, 0.99301,
        0.99217, 0.99216, 0.992, 0.99201, 0.99201, 0.99202, 0.99133, 0.99132, 0.99112, 0.9911, 0.99155, 0.99155,
        0.98958, 0.98957, 0.98959, 0.98958, 0.98838, 0.98835, 0.98826, 0.98825, 0.9883, 0.98828, 0.98711,
        0.98709, 0.98562, 0.98561, 0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282, 0.98104, 0.98101,
        0.97981, 0.97979, 0.97849, 0.97849, 0.97557, 0.97554, 0.97398, 0.97395, 0.97171, 0.97166, 0.96917,
        0.96913, 0.96511, 0.96507, 0.96263, 0.96257, 0.95839, 0.95835, 0.95483, 0.95475, 0.94942, 0.94936,
        0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872, 0.96949, 0.97015,
    ),
}
# model -> (retention, experts never skipped)
PUBLISHED_PARAMS = {"t2v-A14B": (0.4, ()), "i2v-A14B": (0.1, ("dit_high_noise",)), "ti2v-5B": (0.2, ())}


def nearest_interp(values: np.ndarray, length: int) -> np.ndarray:
    """The reference's resampling of a ratio curve to another number of steps."""
    if length == 1:
        return values[-1:]
    return values[np.round(np.arange(length) * (len(values) - 1) / (length - 1)).astype(int)]


def ratio_curves(interleaved: Sequence[float], steps: int) -> np.ndarray:
    """Published or calibrated ratios (cond, uncond interleaved, first pair omitted) -> [2, steps]."""
    values = np.asarray([1.0, 1.0, *interleaved], dtype=np.float64)
    return np.stack([nearest_interp(values[branch::2], steps) for branch in (0, 1)])


@dataclass
class MagCache:
    threshold: float
    ratios: Optional[Sequence[float]] = None   # None: calibrate (every step computes, ratios recorded)
    max_skips: int = 2
    retention: float = 0.2
    name: str = "magcache"
    signal: Optional[str] = None
    recorded: dict[tuple[int, int], float] = field(default_factory=dict)  # (branch, step) -> ratio, calibrating
    _curves: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # steps -> [2, steps]

    def decide(self, stream: Stream, step: StepInfo, signal: Optional[Tensor]) -> bool:
        if self.ratios is None or self.threshold <= 0 or step.position < int(self.retention * step.stage_steps + 0.5):
            return True
        memory = stream.memory
        if step.total_steps not in self._curves:
            self._curves[step.total_steps] = ratio_curves(self.ratios, step.total_steps)
        ratio = self._curves[step.total_steps][stream.index % 2, step.global_index]
        memory["ratio"] = memory.get("ratio", 1.0) * ratio
        memory["skips"] = memory.get("skips", 0) + 1
        memory["error"] = memory.get("error", 0.0) + abs(1.0 - memory["ratio"])
        if stream.residual is not None and memory["error"] < self.threshold and memory["skips"] <= self.max_skips:
            return False
        memory.update(ratio=1.0, skips=0, error=0.0)
        return True

    def computed(self, stream: Stream, step: StepInfo, residual: Tensor) -> None:
        """Calibration: mean over tokens of |residual| / |previous residual| (the reference's norm_ratio)."""
        if self.ratios is not None:
            return
        previous = stream.memory.get("calibration_residual")
        if previous is not None:
            ratio = (torch.linalg.norm(residual.float(), dim=-1) / torch.linalg.norm(previous.float(), dim=-1)).mean()
            self.recorded[stream.index % 2, step.global_index] = float(ratio)
        stream.memory["calibration_residual"] = residual

    def calibrated(self, steps: int) -> list[float]:
        """The recorded curve as PUBLISHED_RATIOS holds one (1.0 where a stage began)."""
        return [self.recorded.get((branch, i), 1.0) for i in range(1, steps) for branch in (0, 1)]
