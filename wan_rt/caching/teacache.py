"""TeaCache (Liu et al. 2024, "Timestep Embedding Tells"), as TeaCache4Wan2.1 and LightX2V run it
on Wan: the relative L1 change of the timestep embedding between consecutive steps, rescaled by a
polynomial fitted per model, is accumulated; while the sum stays under the threshold the blocks
are skipped and the last residual (blocks' output minus their input) is reused.

Two modes, as in the references: `signal="temb"` (the 6-way block modulation e0; TeaCache's
"use_ret_steps": the first 5 steps always computed) and `signal="tproj"` (the time embedding e;
the first and the last step always computed). For the A14B models each expert is its own
TeaCache with its own coefficients, counting steps within its stage.

Published coefficients (numpy.poly1d order, highest power first):
* Wan 2.1 T2V-14B and I2V-14B-720P: ali-vilab/TeaCache @7c10efc, TeaCache4Wan2.1/teacache_generate.py
  (lines 885/892 and 969/976; LightX2V @f8aee98 configs/caching/teacache/wan_i2v_tea_720p.json
  carries the same I2V pair). No per-expert fit for Wan 2.2 A14B is published in either
  repository; the A14B experts keep Wan 2.1 14B's architecture and time embedder, so both
  experts default to those sets. Fit your own with `fit_coefficients` (per expert).
* Wan 2.2 TI2V-5B: LightX2V @f8aee98, configs/caching/teacache/wan_ti2v_tea_720p.json
  ("use_ret_steps": false, threshold 0.26).
Models with no published set (the tiny presets, custom checkpoints) use the identity polynomial:
the plain accumulated relative L1 distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from wan_rt.caching.base import StepInfo, Stream, rel_l1

_T2V_14B = {"temb": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
            "tproj": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)}
_I2V_14B_720P = {"temb": (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
                 "tproj": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683)}
# model -> (signal, threshold, {component: coefficients})
PUBLISHED = {
    "t2v-A14B": ("temb", 0.2, {"dit_high_noise": _T2V_14B["temb"], "dit_low_noise": _T2V_14B["temb"]}),
    "i2v-A14B": ("temb", 0.26, {"dit_high_noise": _I2V_14B_720P["temb"], "dit_low_noise": _I2V_14B_720P["temb"]}),
    "ti2v-5B": ("tproj", 0.26, {"dit": (1.57472669e+05, -1.15702395e+05, 3.10761669e+04, -3.83116651e+03,
                                       2.21608777e+02, -4.81179567e+00)}),
}
IDENTITY = (1.0, 0.0)
DEFAULT_THRESHOLD = 0.2


@dataclass
class TeaCache:
    threshold: float
    coefficients: Sequence[float] = IDENTITY
    signal: str = "temb"
    name: str = "teacache"

    def __post_init__(self) -> None:
        if self.signal not in ("temb", "tproj"):
            raise ValueError(f"TeaCache signal is 'temb' (e0) or 'tproj' (e); got {self.signal!r}")
        self.rescale = np.poly1d(list(self.coefficients))
        # use_ret_steps: 5 warm-up steps, no forced last step; otherwise 1 and the last step.
        self.warmup, self.forced_tail = (5, 0) if self.signal == "temb" else (1, 1)

    def decide(self, stream: Stream, step: StepInfo, signal: Optional[Tensor]) -> bool:
        assert signal is not None
        memory = stream.memory
        previous, memory["previous"] = memory.get("previous"), signal
        forced = step.position < self.warmup or step.position >= step.stage_steps - self.forced_tail
        if self.threshold <= 0 or forced or previous is None or stream.residual is None:
            memory["accumulated"] = 0.0
            return True
        accumulated = memory.get("accumulated", 0.0) + float(self.rescale(rel_l1(signal, previous)))
        if accumulated < self.threshold:
            memory["accumulated"] = accumulated
            return False
        memory["accumulated"] = 0.0
        return True

    def computed(self, stream: Stream, step: StepInfo, residual: Tensor) -> None:
        pass


def fit_coefficients(signal_distances: Sequence[float], output_distances: Sequence[float], degree: int = 4) -> list[float]:
    """TeaCache's calibration: a polynomial from the relative L1 change of the modulated input
    between consecutive steps to that of the model output (numpy.polyfit)."""
    return [float(c) for c in np.polyfit(np.asarray(signal_distances), np.asarray(output_distances), degree)]


@dataclass
class TeaCacheProbe:
    """Computes every step and records, per stream, the relative L1 change of the signal and of
    the blocks' residual between consecutive steps: the data `fit_coefficients` fits."""

    signal: str = "temb"
    threshold: float = 0.0
    name: str = "teacache-probe"

    def __post_init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []

    def decide(self, stream: Stream, step: StepInfo, signal: Optional[Tensor]) -> bool:
        assert signal is not None
        stream.memory["distance"] = (None if "signal" not in stream.memory else rel_l1(signal, stream.memory["signal"]))
        stream.memory["signal"] = signal
        return True

    def computed(self, stream: Stream, step: StepInfo, residual: Tensor) -> None:
        previous, stream.memory["residual"] = stream.memory.get("residual"), residual
        if previous is not None and stream.memory["distance"] is not None:
            self.pairs.append((stream.memory["distance"], rel_l1(residual, previous)))
