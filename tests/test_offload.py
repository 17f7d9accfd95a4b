"""Low VRAM (wan_rt.offload): the plan a memory budget picks, and the same video under every plan.

No GPU here: "host" and "device" are both the CPU. Block offload then really copies each block
before it runs and drops the copy after (the hooks and their order are the GPU path's; the side
stream, pinned memory and the peak-memory figure are not exercised), and expert swapping runs
the residency manager's decisions with load/unload as no-ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_rt.config import get_spec, latent_shape
from wan_rt.offload import RESERVE_FRACTION, BlockOffload, ComponentBytes, choose_plan, weight_bytes

T2V = "tiny-t2v-A14B"
GIB = 2**30


def _sizes(expert_gib=28.0, block_gib=0.65, blocks=40, text_gib=11.0, vae_gib=0.5):
    expert = ComponentBytes(int(expert_gib * GIB), int(block_gib * GIB), blocks)
    return {"dit_high_noise": expert, "dit_low_noise": expert, "text_encoder": ComponentBytes(int(text_gib * GIB)),
            "vae_encoder": ComponentBytes(int(vae_gib * GIB)), "vae_decoder": ComponentBytes(int(vae_gib * GIB))}


@pytest.mark.parametrize("budget_gib,cpu,plan", [
    (120, (), "resident"),                         # 2 x 28 + 11.5 fits in 96 GiB of weights
    (60, (), "swap"),                              # one expert + others: 39.5 <= 48
    (40, ("text_encoder", "vae_encoder", "vae_decoder"), "swap"),  # 28 <= 32 once umT5 and the VAE sit on the CPU
    (24, (), "blocks"),                            # a 24 GiB card: 28 - 26 + 1.3 + 11.5 <= 19.2
])
def test_the_cheapest_plan_that_fits_wins(budget_gib, cpu, plan):
    got = choose_plan(get_spec("t2v-A14B"), _sizes(), int(budget_gib * GIB), cpu)
    assert got.name == plan and got.needed <= got.budget == int(budget_gib * GIB * (1 - RESERVE_FRACTION))
    assert (got.expert_budget is not None) == (plan == "swap")


def test_no_plan_fits_is_one_line_with_the_budget_that_would():
    with pytest.raises(ValueError, match=r"too small .* a budget of 18\.50 GiB") as err:
        choose_plan(get_spec("t2v-A14B"), _sizes(), 8 * GIB)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="block offload needs eager experts"):
        choose_plan(get_spec("t2v-A14B"), _sizes(), 24 * GIB, engines=True)  # engines cannot stream blocks


def test_one_expert_model_never_swaps():
    sizes = {"dit": ComponentBytes(10 * GIB, GIB // 4, 30), "text_encoder": ComponentBytes(0),
             "vae_encoder": ComponentBytes(0), "vae_decoder": ComponentBytes(0)}
    assert choose_plan(get_spec("ti2v-5B"), sizes, 8 * GIB).name == "blocks"


def test_weight_bytes_are_the_loaded_models():
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.models import load_dit

    resolved = resolve_checkpoint(T2V)
    sizes = weight_bytes(resolved, torch.float32)
    dit = load_dit(resolved.files, "dit_high_noise")
    assert sizes["dit_high_noise"].total == sum(p.numel() * 4 for p in dit.parameters())
    assert sizes["dit_high_noise"].block == sum(p.numel() * 4 for p in dit.blocks[0].parameters())
    assert sizes["dit_high_noise"].blocks == len(dit.blocks)


def _run(pipe):
    size = get_spec(T2V).height  # the 4-layer checkpoint is a custom model: its defaults are A14B's 720p
    latents = torch.randn((1, *latent_shape(pipe.spec, size, size, 5)), generator=torch.Generator().manual_seed(5))
    return pipe(prompt="a red fox", negative_prompt="blurry", height=size, width=size, num_frames=5,
                num_inference_steps=4, latents=latents, output_type="np")


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A T2V checkpoint with 4 blocks per expert (the tiny preset's 2 leave block offload nothing to save)."""
    import dataclasses

    from wan_rt.tiny import write_tiny_checkpoint

    spec = get_spec(T2V)
    spec = dataclasses.replace(spec, name="tiny-t2v-4L", dit=dataclasses.replace(spec.dit, num_layers=4))
    folder = tmp_path_factory.mktemp("four") / "ckpt"
    write_tiny_checkpoint(spec, folder)
    return folder


def test_every_plan_gives_the_same_video(four_layers):
    from wan_rt.loader import WanPipeline
    from wan_rt.offload import plan_needs
    from wan_rt.resolve import resolve_checkpoint

    resolved = resolve_checkpoint(str(four_layers))
    cpu = ["text_encoder", "vae_encoder", "vae_decoder"]
    needs = plan_needs(resolved.spec, weight_bytes(resolved, torch.float32), cpu)
    assert needs["resident"] > needs["swap"] > needs["blocks"]
    reference = None
    for plan, need in needs.items():
        pipe = WanPipeline.from_pretrained(str(four_layers), device="cpu", cpu_components=cpu,
                                           memory_budget_gb=need / (1 - RESERVE_FRACTION) / GIB * 1.001)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.memory_plan.name == plan, (plan, pipe.memory_plan)
        out = _run(pipe)
        reference = out.frames if reference is None else reference
        assert np.array_equal(out.frames, reference), plan
        if plan == "swap":  # the high-noise expert left before the low-noise one came in
            events = pipe.residency.events
            assert events.index(("unload", "dit_high_noise")) < events.index(("resident", "dit_low_noise"))
        if plan == "blocks":
            offload = pipe.components["dit_high_noise"]
            assert isinstance(offload, BlockOffload)
            # every block copied for the text graph and for each of the expert's 3 steps
            assert all(n >= 4 for n in offload.loads), offload.loads
            assert all(p.data_ptr() == offload._host[i][name].data_ptr() for i, b in enumerate(offload.blocks)
                       for name, p in b.named_parameters() if i not in offload._events)


def test_block_offload_copies_a_block_only_around_its_run():
    """While block i runs its weights are a copy, not the host tensors; after, the host again."""
    from wan_rt.loader import WanPipeline

    pipe = WanPipeline.from_pretrained(T2V, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    offload = BlockOffload(pipe.components["dit_low_noise"], torch.device("cpu"))
    seen = []  # pre-hooks run in order: after the offload's, which copies the block in
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.append(
        (i, m.attn1.to_q.weight.data_ptr() == offload._host[i]["attn1.to_q.weight"].data_ptr())))
        for i, b in enumerate(offload.blocks)]
    dit = offload.module
    with torch.no_grad():
        dit(torch.randn(1, 16, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 16, 32))
    for h in hooks:
        h.remove()
    assert seen == [(0, False), (1, False)]
    assert all(b.attn1.to_q.weight.data_ptr() == offload._host[i]["attn1.to_q.weight"].data_ptr()
               for i, b in enumerate(offload.blocks) if i not in offload._events)
    offload.remove()


def test_cli_memory_budget(tmp_path, capsys):
    from wan_rt.cli import main

    # tiny: 0.6 MB per expert, 1.2 MB for both; 0.001 GiB less the reserve holds one
    assert main(["run", "--model", T2V, "--steps", "2", "--memory-budget", "0.001", "--text-encoder-on-cpu",
                 "--vae-on-cpu", "--output", str(tmp_path / "a.mp4")]) == 0
    assert "memory plan: swap" in capsys.readouterr().err
    assert main(["run", "--model", T2V, "--steps", "2", "--memory-budget", "0.00001",
                 "--output", str(tmp_path / "b.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small" in err[0] and not (tmp_path / "b.mp4").exists()
