"""wan_rt.scheduler against diffusers' schedulers (the oracle) and the official timestep lists.

Each solver is driven by the same seeded sequence of random "model outputs" as its diffusers
counterpart and must match it after every step. Wan2.2's official schedulers are diffusers code
(copied from v0.31) on another grid, so the official grids are checked by feeding them to the
diffusers solver and against the timestep lists in docs/wan22-spec.md §3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wan_rt.scheduler import (DPMppScheduler, EulerScheduler, UniPCScheduler, diffusers_sigmas,
                              make_scheduler, official_sigmas, scheduler_from_diffusers_config)

SHAPE = (1, 16, 3, 4, 6)
UNIPC_KW = dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
                solver_type="bh2", final_sigmas_type="zero", lower_order_final=True)
DPM_KW = dict(prediction_type="flow_prediction", use_flow_sigmas=True, algorithm_type="dpmsolver++",
              solver_order=2, final_sigmas_type="zero", lower_order_final=True)


def unipc(**kw):
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(**{**UNIPC_KW, **kw})


def dpm(**kw):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(**{**DPM_KW, **kw})


def assert_same_run(ours, ref, seed: int = 0) -> None:
    """Step both with identical inputs; the samples must agree to 1e-6 after every step."""
    assert torch.equal(ours.sigmas, ref.sigmas)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    x_ref = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(SHAPE, generator=gen)
        x = ours.step(v, i, x)
        x_ref = ref.step(v, t, x_ref).prev_sample
        assert x.dtype == torch.float32
        err = ((x - x_ref).abs().max() / x_ref.abs().max()).item()
        assert err <= 1e-6, f"step {i} (t={int(t)}): relative error {err:.2e}"
    assert x.abs().max() > 0.1  # the run ended in the x0 prediction, not a degenerate zero


# 1. Official grid = official timesteps (spec §3), including the expert switch.

T2V_40_SHIFT_12 = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947,
                   941, 936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717,
                   678, 631, 571, 492, 386, 235]
I2V_40_SHIFT_5 = [999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870,
                  859, 846, 833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416,
                  356, 288, 208, 113]


@pytest.mark.parametrize("shift,boundary,expected,n_high", [
    (12.0, 875, T2V_40_SHIFT_12, 26), (5.0, 900, I2V_40_SHIFT_5, 15)], ids=["t2v", "i2v"])
def test_official_grid_reproduces_official_timesteps(shift, boundary, expected, n_high):
    sigmas, timesteps = official_sigmas(40, shift)
    assert timesteps.dtype == torch.int64 and timesteps.tolist() == expected
    assert int((timesteps >= boundary).sum()) == n_high
    assert sigmas.dtype == torch.float32 and sigmas.shape == (41,) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    for solver in ("unipc", "euler"):  # Euler borrows the official UniPC grid
        assert make_scheduler(solver, 40, shift, "official").timesteps.tolist() == expected


def test_diffusers_grid_differs_from_official_as_documented():
    # Spec §6.6: linspace(1 → 1/1000) instead of (0.999 → 0); the tails differ visibly.
    sigmas, timesteps = diffusers_sigmas(40, 12.0)
    assert timesteps[0] == 999 and timesteps[-4:].tolist() == [573, 496, 391, 242]
    assert 1 - sigmas[0].item() == pytest.approx(1e-6, rel=0.1)  # diffusers' 1 − 1e-6 nudge


# 2. Step-for-step parity with diffusers on the diffusers grids.

@pytest.mark.parametrize("steps", [10, 40])
@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])
def test_unipc_matches_diffusers(steps, shift):
    ref = unipc(flow_shift=shift)
    ref.set_timesteps(steps)
    ours = make_scheduler("unipc", steps, shift, "diffusers")
    assert isinstance(ours, UniPCScheduler)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_same_run(ours, ref, seed=steps)


@pytest.mark.parametrize("steps", [10, 40])
@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])
def test_dpmpp_matches_diffusers(steps, shift):
    ref = dpm(flow_shift=shift)
    ref.set_timesteps(steps)
    ours = make_scheduler("dpm++", steps, shift, "diffusers")
    assert isinstance(ours, DPMppScheduler)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_same_run(ours, ref, seed=steps)


@pytest.mark.parametrize("steps", [10, 40])
@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])
def test_euler_matches_diffusers(steps, shift):
    # FlowMatchEulerDiscreteScheduler has its own grid (linspace of shifted ends, shifted again)
    # and float timesteps; ours reproduces its sigmas and truncates its timesteps to int64.
    from diffusers import FlowMatchEulerDiscreteScheduler
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    ours = make_scheduler("euler", steps, shift, "diffusers")
    assert isinstance(ours, EulerScheduler)
    assert torch.equal(ours.timesteps, ref.timesteps.to(torch.int64))
    assert_same_run(ours, ref, seed=steps)


# 3. Official grids through the reference solver code.

@pytest.mark.parametrize("shift", [5.0, 12.0])
def test_official_unipc_grid_runs_like_the_reference(shift):
    # FlowUniPCMultistepScheduler = diffusers' UniPC on the §6.2 grid; diffusers takes that grid
    # as custom sigmas (flow_shift=1 leaves them unshifted).
    sigma_max = float(np.float32(0.999))
    grid = np.linspace(sigma_max, 0, 41)[:-1]
    ref = unipc(flow_shift=1.0)
    ref.set_timesteps(sigmas=shift * grid / (1 + (shift - 1) * grid))
    ours = make_scheduler("unipc", 40, shift, "official")
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_same_run(ours, ref, seed=1)


def test_official_dpmpp_grid_starts_at_sigma_one():
    # Official --sample_solver dpm++: get_sampling_sigmas (σ from 1.0, so t = 1000 and λ = −∞
    # on the first step) with the same DPM++ step code as diffusers. Run diffusers' solver on it.
    shift, steps = 12.0, 20
    grid = np.linspace(1, 0, steps + 1)[:steps]
    grid = shift * grid / (1 + (shift - 1) * grid)
    ours = make_scheduler("dpm++", steps, shift, "official")
    assert ours.timesteps[0] == 1000 and torch.equal(ours.timesteps, torch.from_numpy(grid * 1000).long())
    assert torch.equal(ours.sigmas[:-1], torch.from_numpy(grid).float())
    ref = dpm()
    ref.set_timesteps(steps)
    ref.sigmas, ref.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
    assert_same_run(ours, ref, seed=2)


# 4. State handling.

def test_step_counter_and_reset():
    sched = make_scheduler("unipc", 6, 5.0, "official")
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=gen)
    vs = [torch.randn(SHAPE, generator=gen).bfloat16() for _ in range(6)]
    with pytest.raises(ValueError, match="expected step 0"):
        sched.step(vs[0], 1, x0)
    sched.reset()
    runs = []
    for _ in range(2):  # a reset must clear the history: the second run repeats the first
        x = x0
        for i, v in enumerate(vs):
            x = sched.step(v, i, x)
        assert x.dtype == torch.float32
        runs.append(x)
        with pytest.raises(ValueError):
            sched.step(vs[0], 6, x)
        sched.reset()
    assert torch.equal(runs[0], runs[1])


# 5. diffusers scheduler_config.json.

def saved_config(sched, tmp_path) -> dict:
    sched.save_config(tmp_path)
    return json.loads((tmp_path / "scheduler_config.json").read_text())


def test_from_diffusers_config_round_trip(tmp_path):
    from diffusers import UniPCMultistepScheduler
    d = saved_config(unipc(flow_shift=3.0, disable_corrector=[1, 4]), tmp_path)
    for override in (None, 12.0):
        ref = UniPCMultistepScheduler.from_config(d, **({} if override is None else {"flow_shift": override}))
        ref.set_timesteps(12)
        ours = scheduler_from_diffusers_config(d, 12, shift_override=override)
        assert isinstance(ours, UniPCScheduler)
        assert torch.equal(ours.timesteps, ref.timesteps)
        assert_same_run(ours, ref, seed=4)  # also checks disable_corrector was carried over
    assert not torch.equal(scheduler_from_diffusers_config(d, 12).timesteps,
                           scheduler_from_diffusers_config(d, 12, shift_override=12.0).timesteps)


def test_from_diffusers_config_other_solvers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    for ref, cls in ((dpm(flow_shift=5.0), DPMppScheduler),
                     (FlowMatchEulerDiscreteScheduler(shift=5.0), EulerScheduler)):
        ours = scheduler_from_diffusers_config(saved_config(ref, tmp_path), 10)
        ref.set_timesteps(10)
        assert isinstance(ours, cls)
        assert torch.equal(ours.sigmas, ref.sigmas)
        assert torch.equal(ours.timesteps, ref.timesteps.to(torch.int64))


@pytest.mark.parametrize("change,message", [
    ({"prediction_type": "epsilon"}, "prediction_type='epsilon'"),
    ({"use_flow_sigmas": False}, "use_flow_sigmas=False"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"solver_order": 3}, "solver_order=3"),
    ({"_class_name": "EulerDiscreteScheduler"}, "unsupported scheduler class"),
])
def test_from_diffusers_config_rejects_unsupported(tmp_path, change, message):
    d = {**saved_config(unipc(flow_shift=3.0), tmp_path), **change}
    with pytest.raises(ValueError, match=message):
        scheduler_from_diffusers_config(d, 10)


def test_from_diffusers_config_needs_class_name():
    # `.config` of a live scheduler has no `_class_name`; a missing prediction_type means epsilon.
    with pytest.raises(ValueError, match="_class_name"):
        scheduler_from_diffusers_config(dict(unipc().config), 10)
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        scheduler_from_diffusers_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}, 10)
