"""Flow-matching samplers with timestep shift: UniPC-2 (default), DPM++ 2M and Euler, and the
few-step sampler of the distilled Wan 2.2 models at an explicit timestep list.

Mirrors Wan2.2 `wan/utils/fm_solvers_unipc.py: FlowUniPCMultistepScheduler` and
`wan/utils/fm_solvers.py: FlowDPMSolverMultistepScheduler` (the "official" grids), and diffusers
0.42 `UniPCMultistepScheduler` / `DPMSolverMultistepScheduler` with `use_flow_sigmas=True` and
`FlowMatchEulerDiscreteScheduler` (the "diffusers" grids). Spec: docs/wan22-spec.md §6.

Convention (§6.1): x_σ = (1−σ)·x0 + σ·ε; the model predicts the velocity v = ε − x0, so the x0
prediction is m = x − σ·v. With α = 1 − σ the half log-SNR is λ = ln α − ln σ; the multistep
solvers step in λ. The network gets int64 timesteps, the solvers use the float32 sigmas.

Arithmetic follows the references operation for operation so results match them step for step:
grids in numpy float64 then cast, solver coefficients as 0-dim float32 tensors, tensor math in
float32. There is no randomness anywhere. State is advanced by a step counter, never by looking a
timestep up (the references pick the *second* match on duplicate integer timesteps, §6.2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor

from wan_rt.config import NUM_TRAIN_TIMESTEPS

Solver = Literal["unipc", "dpm++", "euler"]
Grid = Literal["official", "diffusers"]
GridFn = Callable[[int, float], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class SamplingDefaults:
    """How a checkpoint is sampled when the caller does not say: each layout keeps its own."""

    solver: Solver
    grid: Grid  # official: sigmas 0.999 -> 0; diffusers: 1 -> 1/1000
    shift: float
    negative_prompt: str
    scheduler_config: Optional[Mapping[str, Any]] = None  # a diffusers folder's scheduler_config.json


# 1. Sigma grids. Each returns (sigmas float32 [steps+1] ending in 0, timesteps int64 [steps]).

def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """σ' = s·σ / (1 + (s−1)·σ): spends more steps at high noise for s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _finish(shifted: np.ndarray) -> tuple[Tensor, Tensor]:
    # Both references: timesteps = float64 σ·1000 cast to int64 by torch (truncation toward zero),
    # sigmas = float32 cast of the float64 values with a final 0 appended.
    timesteps = torch.from_numpy(shifted * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.append(shifted, 0.0).astype(np.float32))
    return sigmas, timesteps


def official_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    """Wan2.2 FlowUniPCMultistepScheduler: shift(linspace(σ_max, 0, steps+1)[:-1]), then 0.

    σ_max is the first training sigma 1 − 1/1000 read back from a float32 tensor
    (0.99900001287…), exactly as the official code does (`self.sigmas[0].item()`).
    """
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
    return _finish(_shift(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift))


def diffusers_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    """diffusers UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).

    shift(linspace(1, 1/1000, steps+1)[:-1]); a first sigma of 1 becomes 1 − 1e-6 (diffusers does
    this to keep ln α finite), so the first timestep is 999, not 1000.
    """
    sigmas = _shift(np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    return _finish(sigmas)


def _official_dpm_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    # Wan2.2 `get_sampling_sigmas` + FlowDPMSolverMultistepScheduler(shift=1): starts at σ = 1
    # (timestep 1000, λ = −∞); the first DPM++ step is then exactly x1 = σ1·x + α1·m0.
    return _finish(_shift(np.linspace(1.0, 0.0, steps + 1)[:steps], shift))


def _diffusers_dpm_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    # DPMSolverMultistepScheduler(use_flow_sigmas=True): σ = 1 − linspace(1, 1/1000, steps+1),
    # shifted, reversed, last (zero) dropped. Starts at shift(0.999), like the official UniPC grid.
    sigmas = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)
    return _finish(np.flip(_shift(sigmas, shift))[:-1].copy())


def _diffusers_euler_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    # FlowMatchEulerDiscreteScheduler(shift=shift): its constructor shifts the float32 training
    # sigmas, set_timesteps takes linspace(σ_max, σ_min, steps) of those *shifted* ends and shifts
    # again (so the smallest sigma is shift(shift(1/1000))). Its timesteps are float32 σ·1000;
    # ours are those truncated to int64.
    train_min = torch.tensor([1.0 / NUM_TRAIN_TIMESTEPS], dtype=torch.float32)
    sigma_min = (shift * train_min / (1 + (shift - 1) * train_min)).item()
    ts = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = torch.from_numpy(_shift(ts / NUM_TRAIN_TIMESTEPS, shift)).to(torch.float32)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps


# (solver, grid) -> grid function. Euler has no official sampler; it reuses the official UniPC grid
# so the network sees the official timesteps (and the same expert switch).
_GRIDS: dict[tuple[str, str], GridFn] = {
    ("unipc", "official"): official_sigmas,
    ("unipc", "diffusers"): diffusers_sigmas,
    ("dpm++", "official"): _official_dpm_sigmas,
    ("dpm++", "diffusers"): _diffusers_dpm_sigmas,
    ("euler", "official"): official_sigmas,
    ("euler", "diffusers"): _diffusers_euler_sigmas,
}


# 2. Solvers. One interface: `timesteps`, `sigmas`, `step(model_output, step_index, sample)`.

class FlowScheduler:
    """Base: a fixed grid plus a step counter. Subclasses implement `step`.

    sigmas: float32 [N+1], sigmas[N] == 0. timesteps: int64 [N] (float32 for the timestep-list
    sampler, whose shifted timesteps are not integers), fed to the network.
    `step(v, i, x)` takes the (CFG-combined) velocity at step i and returns x at step i+1, float32.
    Steps must be taken in order 0..N-1; `reset()` starts a new run on the same grid.
    """

    def __init__(self, sigmas: Tensor, timesteps: Tensor) -> None:
        n = timesteps.shape[0]
        assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,) and sigmas[-1] == 0
        assert timesteps.dtype in (torch.int64, torch.float32) and timesteps.ndim == 1 and n > 0
        self.sigmas = sigmas
        self.timesteps = timesteps
        # λ = ln(1−σ) − ln σ per element as 0-dim ops, like the references (a vectorized log may
        # round differently in the last bit). λ_N = +∞ (σ = 0); λ = −∞ where σ = 1.
        self.lambdas = torch.stack([torch.log(1 - s) - torch.log(s) for s in sigmas])
        self.reset()

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def reset(self) -> None:
        self._next_step = 0

    def start_at(self, step_index: int) -> None:
        """A fresh run whose first step is `step_index` (video-to-video skips the noisiest steps):
        no history, so multistep solvers warm up with a first-order step there, as the diffusers
        schedulers do when a truncated timestep list starts mid-grid."""
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"start step must be in 0..{self.num_steps - 1}; got {step_index}")
        self.reset()
        self._next_step = step_index

    def _advance(self, step_index: int) -> int:
        if step_index != self._next_step or step_index >= self.num_steps:
            raise ValueError(f"expected step {self._next_step}, got {step_index}: steps run in order "
                             f"0..{self.num_steps - 1}; call reset() to start again")
        self._next_step += 1
        return step_index

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        raise NotImplementedError


class EulerScheduler(FlowScheduler):
    """x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i (diffusers FlowMatchEulerDiscreteScheduler.step)."""

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        i = self._advance(step_index)
        return sample.float() + (self.sigmas[i + 1] - self.sigmas[i]) * model_output.float()


class DPMppScheduler(FlowScheduler):
    """DPM-Solver++ 2M, midpoint, data (x0) prediction (§6.4).

    Order 1 on the first step (no history) and the last step (final σ = 0, lower_order_final),
    order 2 in between. State: the x0 predictions of the last two steps.
    """

    def reset(self) -> None:
        super().reset()
        self._x0: list[Tensor] = []  # oldest first, at most 2

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        i = self._advance(step_index)
        x = sample.float()
        m = x - self.sigmas[i] * model_output.float()
        self._x0 = (self._x0 + [m])[-2:]
        sigma_s, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        h = self.lambdas[i + 1] - self.lambdas[i]
        coef = (1 - sigma_t) * (torch.exp(-h) - 1.0)
        x_next = sigma_t / sigma_s * x - coef * m
        if len(self._x0) == 2 and i < self.num_steps - 1:  # order 2 once there is history
            r = (self.lambdas[i] - self.lambdas[i - 1]) / h
            d = (1.0 / r) * (m - self._x0[0])  # finite-difference derivative of x0 in λ
            x_next = x_next - 0.5 * coef * d
        return x_next


class UniPCScheduler(FlowScheduler):
    """UniPC-2: bh2 predictor (UniP) + corrector (UniC), predict-x0 (§6.3).

    At step i the corrector first re-solves the previous step x_{i−1} → x_i using the fresh x0
    prediction m_i (skipped at step 0 and where `disable_corrector` names step i−1, as diffusers
    does), then the predictor goes x_i → x_{i+1}. Predictor order: 1 on the first step (warm-up)
    and on the last (lower_order_final: σ_N = 0 makes the order-2 term degenerate), else 2. The
    corrector reuses the order of the predictor it corrects. At σ_N = 0 the step returns m.
    """

    def __init__(self, sigmas: Tensor, timesteps: Tensor, disable_corrector: tuple[int, ...] = ()) -> None:
        self.disable_corrector = frozenset(disable_corrector)
        super().__init__(sigmas, timesteps)

    def reset(self) -> None:
        super().reset()
        self._x0: list[Tensor] = []           # x0 predictions m of the last two steps, oldest first
        self._last_sample: Tensor | None = None  # x the last predictor started from
        self._last_order = 0                  # order of that predictor

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        i = self._advance(step_index)
        x = sample.float()
        m = x - self.sigmas[i] * model_output.float()
        if self._last_sample is not None and i - 1 not in self.disable_corrector:
            x = self._correct(m, i)
        self._x0 = (self._x0 + [m])[-2:]
        # len(self._x0) is the warm-up limit: 1 on step 0, 2 afterwards.
        order = min(2, self.num_steps - i, len(self._x0))
        self._last_sample, self._last_order = x, order
        return self._predict(x, i, order)

    def _predict(self, x: Tensor, i: int, order: int) -> Tensor:
        m0 = self._x0[-1]
        sigma_s, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        alpha_t = 1 - sigma_t
        h = self.lambdas[i + 1] - self.lambdas[i]
        phi = torch.expm1(-h)  # h·φ1 at −h (predict-x0); also B(h) for bh2
        x_next = sigma_t / sigma_s * x - alpha_t * phi * m0
        if order == 2:
            r = (self.lambdas[i - 1] - self.lambdas[i]) / h
            d = (self._x0[-2] - m0) / r
            x_next = x_next - alpha_t * phi * (0.5 * d)  # UniP-2 uses ρ = 1/2
        return x_next

    def _correct(self, m: Tensor, i: int) -> Tensor:
        """Redo x_{i−1} → x_i with m_i known; self._x0 still ends at m_{i−1}."""
        assert self._last_sample is not None
        m0 = self._x0[-1]
        sigma_s, sigma_t = self.sigmas[i - 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        h = self.lambdas[i] - self.lambdas[i - 1]
        phi = torch.expm1(-h)
        x_corr = sigma_t / sigma_s * self._last_sample - alpha_t * phi * m0
        if self._last_order == 1:
            return x_corr - alpha_t * phi * (0.5 * (m - m0))
        r = (self.lambdas[i - 2] - self.lambdas[i - 1]) / h
        d = (self._x0[-2] - m0) / r
        # ρ solves [[1, 1], [r, 1]]·ρ = b with b_k = k!·hφ_k / B(h),
        # hφ_1 = φ/(−h) − 1 and hφ_2 = hφ_1/(−h) − 1/2 (diffusers' recursion).
        hphi_1 = phi / -h - 1
        hphi_2 = hphi_1 / -h - 0.5
        # An LU solve (not Cramer's rule) rounds like diffusers' torch.linalg.solve: bit-identical runs.
        one = torch.ones((), dtype=torch.float32)
        R = torch.stack([torch.stack([one, one]), torch.stack([r, one])])
        rho = torch.linalg.solve(R, torch.stack([hphi_1 / phi, hphi_2 * 2 / phi]))
        return x_corr - alpha_t * phi * (rho[0] * d + rho[1] * (m - m0))


class TimestepListScheduler(FlowScheduler):
    """The few-step sampler of the distilled Wan 2.2 models (LightX2V `WanStepDistillScheduler`,
    `denoising_step_list`): flow Euler at the timesteps a distillation was trained on.

    Written as LightX2V writes it: x0 = x − σ_i·v, then x_{i+1} = x0 + σ_{i+1}·v (x0 itself at
    the last step), in float32 with Python-float sigmas; algebraically EulerScheduler's step.
    """

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        i = self._advance(step_index)
        v = model_output.float()
        x0 = sample.float() - v * self.sigmas[i].item()
        if i < self.num_steps - 1:
            x0 = x0 + v * self.sigmas[i + 1].item()
        return x0


def timestep_list_sigmas(timesteps: Sequence[int], shift: float) -> tuple[Tensor, Tensor]:
    """LightX2V's grid for a `denoising_step_list`: the 1000 training sigmas 1 − k/1000
    (torch.linspace(1, 0, 1001)[:-1], float32), shifted (σ' = s·σ / (1 + (s−1)·σ)); timestep t in
    the list picks entry 1000 − t, i.e. σ = t/1000 before the shift. The network is fed the
    shifted σ'·1000, a float (e.g. 937.5 for t = 750 at shift 5). Returns (sigmas float32 [N+1]
    ending in 0, timesteps float32 [N])."""
    steps = list(timesteps)
    if not steps:
        raise ValueError("timesteps: give at least one")
    bad = [t for t in steps if int(t) != t or not 1 <= t <= NUM_TRAIN_TIMESTEPS]
    if bad:
        raise ValueError(f"timesteps must be integers in 1..{NUM_TRAIN_TIMESTEPS} (the training grid a "
                         f"distillation indexes); got {bad[0]!r}")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must decrease strictly; got {steps}")
    if not shift > 0:
        raise ValueError(f"need shift > 0, got {shift}")
    grid = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    picked = grid[[NUM_TRAIN_TIMESTEPS - int(t) for t in steps]]
    return torch.cat([picked, picked.new_zeros(1)]), picked * NUM_TRAIN_TIMESTEPS


def scheduler_from_timesteps(timesteps: Sequence[int], shift: float) -> TimestepListScheduler:
    """A fresh few-step sampler at the given timesteps (e.g. [1000, 750, 500, 250])."""
    return TimestepListScheduler(*timestep_list_sigmas(timesteps, float(shift)))


_SOLVERS: dict[str, type[FlowScheduler]] = {
    "unipc": UniPCScheduler, "dpm++": DPMppScheduler, "euler": EulerScheduler}


def make_scheduler(solver: Solver, steps: int, shift: float, grid: Grid) -> FlowScheduler:
    """A fresh scheduler for one run.

    grid="official": the grid Wan2.2 uses for that solver (UniPC: FlowUniPC's 0.999 → 0 grid;
    DPM++: `get_sampling_sigmas`, 1 → 0; Euler, which Wan2.2 lacks: the UniPC grid).
    grid="diffusers": the grid of the matching diffusers class (UniPCMultistepScheduler,
    DPMSolverMultistepScheduler or FlowMatchEulerDiscreteScheduler); they differ from each other.
    """
    if (solver, grid) not in _GRIDS:
        raise ValueError(f"unknown solver/grid {solver!r}/{grid!r}; solvers: {sorted(_SOLVERS)}, "
                         "grids: 'official', 'diffusers'")
    if steps < 1 or not shift > 0:
        raise ValueError(f"need steps >= 1 and shift > 0, got steps={steps}, shift={shift}")
    sigmas, timesteps = _GRIDS[solver, grid](steps, float(shift))
    return _SOLVERS[solver](sigmas, timesteps)


# 3. diffusers scheduler_config.json -> scheduler (diffusers grid).

# class name -> (our solver, shift key, {key: (diffusers default, the only value we support)}).
# Keys not listed do not affect the flow-sigma path (beta schedule, timestep_spacing, ...).
_NO_SIGMA_TRICKS = {"use_karras_sigmas": (False, False), "use_exponential_sigmas": (False, False),
                    "use_beta_sigmas": (False, False), "use_dynamic_shifting": (False, False),
                    "num_train_timesteps": (1000, NUM_TRAIN_TIMESTEPS)}
_DIFFUSERS: dict[str, tuple[Solver, str, dict[str, tuple[Any, Any]]]] = {
    "UniPCMultistepScheduler": ("unipc", "flow_shift", {
        "prediction_type": ("epsilon", "flow_prediction"), "use_flow_sigmas": (False, True),
        "solver_order": (2, 2), "solver_type": ("bh2", "bh2"), "predict_x0": (True, True),
        "lower_order_final": (True, True), "final_sigmas_type": ("zero", "zero"),
        "thresholding": (False, False), "shift_terminal": (None, None), "solver_p": (None, None),
        **_NO_SIGMA_TRICKS}),
    # lower_order_final / euler_at_final only change the last step, which a zero final sigma
    # already makes first order.
    "DPMSolverMultistepScheduler": ("dpm++", "flow_shift", {
        "prediction_type": ("epsilon", "flow_prediction"), "use_flow_sigmas": (False, True),
        "algorithm_type": ("dpmsolver++", "dpmsolver++"), "solver_type": ("midpoint", "midpoint"),
        "solver_order": (2, 2), "final_sigmas_type": ("zero", "zero"), "thresholding": (False, False),
        "use_lu_lambdas": (False, False), "variance_type": (None, None), **_NO_SIGMA_TRICKS}),
    "FlowMatchEulerDiscreteScheduler": ("euler", "shift", {
        "invert_sigmas": (False, False), "shift_terminal": (None, None),
        "stochastic_sampling": (False, False), **_NO_SIGMA_TRICKS}),
}


@dataclass(frozen=True)
class DiffusersSampling:
    """What a diffusers `scheduler_config.json` asks of wan_rt's schedulers (diffusers grid)."""

    solver: Solver
    shift: float                         # the file's shift (1.0, diffusers' default, when absent)
    disable_corrector: tuple[int, ...]   # UniPC only: steps whose corrector is skipped


def diffusers_sampling(d: Mapping[str, Any]) -> DiffusersSampling:
    """Read and check a parsed diffusers `scheduler_config.json` (it must carry `_class_name`).
    Missing keys take diffusers' defaults. Raises ValueError for what wan_rt cannot sample exactly."""
    name = d.get("_class_name")
    if name not in _DIFFUSERS:
        raise ValueError(f"unsupported scheduler class {name!r}; supported: {sorted(_DIFFUSERS)} "
                         "(pass the parsed scheduler_config.json, which names `_class_name`)")
    solver, shift_key, required = _DIFFUSERS[name]
    bad = [f"{k}={d.get(k, default)!r} (need {want!r})"
           for k, (default, want) in required.items() if d.get(k, default) != want]
    if bad:
        raise ValueError(f"unsupported {name} config: " + ", ".join(bad))
    corrector = tuple(int(i) for i in (d.get("disable_corrector") or ())) if solver == "unipc" else ()
    return DiffusersSampling(solver, float(d.get(shift_key, 1.0)), corrector)


def scheduler_from_diffusers_config(d: Mapping[str, Any], steps: int,
                                    shift_override: float | None = None) -> FlowScheduler:
    """The scheduler a diffusers `scheduler_config.json` describes, on its diffusers grid.

    `shift_override` replaces the file's shift: the diffusers Wan 2.2 A14B configs say 3.0 where
    the official shift is 12.0 (T2V) / 5.0 (I2V) (§6.6). Raises ValueError (diffusers_sampling).
    """
    sampling = diffusers_sampling(d)
    shift = sampling.shift if shift_override is None else float(shift_override)
    sched = make_scheduler(sampling.solver, steps, shift, "diffusers")
    if isinstance(sched, UniPCScheduler):
        sched.disable_corrector = frozenset(sampling.disable_corrector)
    return sched
