"""The expert swap: both experts resident when they fit, staged and swapped when they do not."""

import time

import torch

from wan_rt.config import get_spec
from wan_rt.loader import WanPipeline
from wan_rt.scheduler import SamplingDefaults
from wan_rt.runtime.residency import ExpertResidency


class FakeExpert:
    """Records what the residency manager does to it; loading takes a little time."""

    def __init__(self, name, log, nbytes=10, load_s=0.05):
        self.name, self.log, self.nbytes, self.load_s = name, log, nbytes, load_s
        self.resident = False

    def stage(self):
        self.log.append(("stage", self.name))

    def load(self):
        time.sleep(self.load_s)
        self.resident = True
        self.log.append(("load", self.name))

    def unload(self):
        self.resident = False
        self.log.append(("unload", self.name))

    def __call__(self, *, latents, timestep, context):
        assert self.resident, f"{self.name} ran while not resident"
        self.log.append(("run", self.name))
        return {"noise_pred": 0.1 * latents}


def _run(budget, steps=6):
    log = []
    experts = {"dit_high_noise": FakeExpert("dit_high_noise", log), "dit_low_noise": FakeExpert("dit_low_noise", log)}
    res = ExpertResidency(experts, list(experts), budget_bytes=budget, prefetch_steps=2)
    stalls = {}
    plan = (("dit_high_noise", steps // 2, "dit_low_noise"), ("dit_low_noise", steps - steps // 2, None))
    for name, n, upcoming in plan:
        stalls[name] = res.enter(name)
        for k in range(n):
            experts[name](latents=torch.zeros(1), timestep=None, context=None)
            res.progress(name, n - k - 1, upcoming)
            time.sleep(0.03)  # compute that a prefetch can overlap
        res.leave(name)
    res.finish()
    return log, stalls, experts


def test_both_fit_second_expert_prefetched_during_first():
    log, stalls, experts = _run(budget=25)
    assert ("unload", "dit_high_noise") not in log and ("unload", "dit_low_noise") not in log
    first_low_load = log.index(("load", "dit_low_noise"))
    last_high_run = max(i for i, e in enumerate(log) if e == ("run", "dit_high_noise"))
    assert first_low_load < last_high_run, "the low-noise expert should load while the high-noise one still runs"
    assert stalls["dit_low_noise"] < 0.04  # overlapped: the switch barely waits
    assert all(e.resident for e in experts.values())


def test_do_not_fit_only_one_resident_and_next_staged_early():
    log, stalls, experts = _run(budget=15)
    # The high-noise expert is released before the low-noise one is uploaded...
    assert log.index(("unload", "dit_high_noise")) < log.index(("load", "dit_low_noise"))
    # ...but its host-side staging started while the high-noise expert was still running.
    last_high_run = max(i for i, e in enumerate(log) if e == ("run", "dit_high_noise"))
    assert log.index(("stage", "dit_low_noise")) < last_high_run
    assert stalls["dit_low_noise"] >= 0.04  # the upload itself is the stall
    # Each ran only while resident (FakeExpert asserts it); never both at once:
    assert log.index(("unload", "dit_high_noise")) < log.index(("run", "dit_low_noise"))
    # and the last one is released too: the next generation starts with the high-noise expert.
    assert log[-1] == ("unload", "dit_low_noise")


def test_pipeline_reports_swap_stall_and_runs_each_expert_resident():
    from wan_rt.models.text_encoder import load_tokenizer
    from wan_rt.tiny import ensure_tiny_checkpoint

    spec = get_spec("tiny-t2v-A14B")
    log = []
    components = {
        "text_encoder": lambda *, input_ids, attention_mask: {"context": torch.ones(*input_ids.shape, 4)},
        "vae_decoder": lambda *, latents: {"video": latents[:, :3]},
        "dit_high_noise": FakeExpert("dit_high_noise", log),
        "dit_low_noise": FakeExpert("dit_low_noise", log),
    }
    defaults = SamplingDefaults(solver="unipc", grid="official", shift=12.0, negative_prompt="")
    pipe = WanPipeline(spec, components, load_tokenizer(ensure_tiny_checkpoint(spec.name) / "tokenizer"), defaults)
    pipe.residency.budget = 15  # force one expert at a time
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=6, output_type="latent")
    assert "swap_stall" in out.timings and out.timings["swap_stall"] > 0
    assert ("unload", "dit_high_noise") in log  # FakeExpert asserts residency on every call


def test_no_prefetch_of_an_expert_this_generation_never_uses():
    log = []
    experts = {"dit_high_noise": FakeExpert("dit_high_noise", log), "dit_low_noise": FakeExpert("dit_low_noise", log)}
    res = ExpertResidency(experts, list(experts), budget_bytes=None)
    res.enter("dit_high_noise")
    for k in range(2):
        res.progress("dit_high_noise", 1 - k, upcoming=None)  # a 2-step run that ends in the high stage
    res.finish()
    assert ("load", "dit_low_noise") not in log and not res._pending
