"""The rank-side half of tests/test_parallel.py: run with `python -P parallel_worker.py SUITE
RESULT.json MODELS.json NPROC`; outside a job it starts NPROC ranks of itself through
wan_rt.parallel.launch (torch's elastic launcher), inside one each rank runs SUITE's checks and
rank 0 writes what it measured to RESULT.json. Many checks share one launch: starting a process
group costs seconds per process on a small CPU machine.

Every pipeline check compares the parallel pipeline's frames with the single-process eager
pipeline's from the same latents, records which collectives moved bytes (so a check cannot
pass without the parallel path running) and how far each rank's frames are from rank 0's.
"""

from __future__ import annotations

import json
import os
import sys

SIZES = {  # suite -> model kind -> (height, width, frames): token counts not divisible by the degrees
    "world2": {"a14b": (48, 48, 9), "ti2v": (96, 96, 9)},   # 3x3 tokens x 3 frames = 27 -> padded to 28
    "world4": {"a14b": (32, 48, 9), "ti2v": (64, 96, 9)},   # 2x3 x 3 = 18 -> padded to 20
}
PLANS = {  # suite -> plans (ulysses, ring, cfg, shard_weights)
    "world2": [(2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False), (2, 1, 1, True)],
    "world4": [(4, 1, 1, False), (2, 1, 2, False), (2, 2, 1, False), (1, 2, 2, True)],
}


def main() -> int:
    suite, result_path, models_path, nproc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from wan_rt.parallel.plan import from_environment

    if from_environment() is None:
        from wan_rt.parallel.launch import launch

        return launch(["-P", os.path.abspath(__file__), *sys.argv[1:]], nproc)
    if suite == "kernels":  # before any wan_rt.kernels kernel module is imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    from wan_rt.parallel.launch import init_process_group

    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"))
    models = json.loads(open(models_path).read())
    checks = {"kernels": kernel_checks, "compiled": compiled_checks}
    results = checks[suite](models) if suite in checks else pipeline_checks(suite, models)
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))


def _spread_over_ranks(x) -> float:
    """max |x - rank 0's x| over the ranks."""
    import torch
    import torch.distributed as dist

    x0 = x.clone()
    dist.broadcast(x0, 0)
    worst = (x - x0).abs().max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def pipeline_checks(suite: str, models: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from wan_rt.config import latent_shape
    from wan_rt.loader import WanPipeline
    from wan_rt.parallel import ParallelPlan, comm

    results = []
    first = True
    for kind, path in models.items():
        ref = WanPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        spec = ref.spec
        height, width, frames = SIZES[suite]["ti2v" if spec.task == "ti2v" else "a14b"]
        latents = torch.randn((1, *latent_shape(spec, height, width, frames)), generator=torch.Generator().manual_seed(5))
        # The arguments as a service would hand them out: built on rank 0, broadcast to the others.
        kwargs = comm.broadcast_object(dict(
            prompt="a fox in the snow", negative_prompt="blurry", height=height, width=width, num_frames=frames,
            num_inference_steps=4, guidance_scale=4.0, output_type="pt",
            image=_image() if spec.task != "t2v" else None) if dist.get_rank() == 0 else None)
        expected = ref(latents=latents.clone(), **kwargs)
        for ulysses, ring, cfg, shard in PLANS[suite]:
            plan = ParallelPlan(ulysses=ulysses, ring=ring, cfg=cfg, shard_weights=shard)
            pipe = WanPipeline.from_pretrained(path, device="cpu", dtype=torch.float32, parallel=plan)
            pipe.set_progress_bar_config(disable=True)
            if first:  # a cancel seen by rank 0 only stops every rank after the same step
                results.append({"check": "cancel", "stopped_after": _cancel_on_rank0(pipe, latents, kwargs)})
                first = False
            comm.reset_traffic()
            got = pipe(latents=latents.clone(), **kwargs)
            results.append({
                "model": kind, "task": spec.task, "heads": spec.dit.num_heads, "plan": [ulysses, ring, cfg, shard],
                "max_abs_diff": float((got.frames - expected.frames).abs().max()),
                "ref_std": float(expected.frames.std()),
                "rank_spread": _spread_over_ranks(got.frames),
                "steps": got.steps_per_stage, "ref_steps": expected.steps_per_stage,
                "traffic": sorted(n for n, t in comm.TRAFFIC.items() if t.bytes > 0),
                "sharded": shard and all(hasattr(p, "to_local") for p in pipe.components[spec.dit_components[0]]
                                         .module.blocks[0].ffn.parameters()),
            })
    return results


def _cancel_on_rank0(pipe, latents, kwargs) -> list[int]:
    """Every rank's last step when rank 0 alone asks to stop at step 1 (as a service would):
    -1 where a rank ran to the end."""
    import torch
    import torch.distributed as dist

    from wan_rt.parallel import comm
    from wan_rt.pipeline import GenerationInterrupted

    seen: list[int] = []

    def on_step(p, step_index, timestep, tensors):
        seen.append(step_index)
        p.interrupt = comm.any_rank(dist.get_rank() == 0 and step_index == 1)
        return {}

    try:
        pipe(latents=latents.clone(), callback_on_step_end=on_step, **kwargs)
        last = -1
    except GenerationInterrupted:
        last = seen[-1]
    everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, torch.tensor([last]))
    return [int(t) for t in everyone]


def kernel_checks(models: dict) -> list[dict]:
    """DiT-level: Ulysses around the Triton kernels (exact and int8 attention, emulated FP8
    linears: the fast variant), ring blocks through the Triton kernel's log-sum-exp, and FSDP2
    sharding of a bf16 DiT (float32 tables kept whole), each against the same model unsplit."""
    import copy

    import torch

    from wan_rt.models import load_dit
    from wan_rt.models.dit import cast_dit
    from wan_rt.models.ops import set_ops
    from wan_rt.parallel import ParallelPlan, comm
    from wan_rt.parallel.sequence import apply_sequence_parallel
    from wan_rt.parallel.shard import shard_dit
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.fast import optimize_dit, triton_ops

    resolved = resolve_checkpoint(models["t2v"])
    spec = resolved.spec
    base = load_dit(resolved.files, "dit_high_noise", dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 6, 6, generator=gen)  # 27 tokens: padded to 28 over two ranks
    t = torch.tensor([900.0, 900.0])
    context = torch.randn(2, spec.dit.text_len, spec.dit.text_dim, generator=gen)
    results = []
    with torch.inference_mode():
        exact = base(x, t, context)  # fp32, torch ops: the oracle for the quantized variant
    variants = {
        "triton": lambda m: set_ops(m, triton_ops()),
        "triton + int8 attention": lambda m: set_ops(m, triton_ops("int8")),
        "fast: triton + int8 attention + fp8 (emulated)": lambda m: optimize_dit(
            m, kernels=True, fp8_linear="emulated", attention_quant="int8", compile=None, cuda_graphs=False),
    }
    for name, make in variants.items():
        for ulysses, ring in ((2, 1), (1, 2)):
            if ring > 1 and "int8" in name:
                continue  # ring blocks are exact attention (README)
            single, split = copy.deepcopy(base), copy.deepcopy(base)
            make(single)
            make(split)
            apply_sequence_parallel(split, ParallelPlan(ulysses=ulysses, ring=ring).groups())
            comm.reset_traffic()
            with torch.inference_mode():
                want, got = single(x, t, context), split(x, t, context)
            results.append({"check": name, "plan": [ulysses, ring], "max_abs_diff": float((got - want).abs().max()),
                            "scale": float(want.abs().max()), "rank_spread": _spread_over_ranks(got),
                            "error_vs_fp32": float((got - exact).norm() / exact.norm()),
                            "single_error_vs_fp32": float((want - exact).norm() / exact.norm()),
                            "traffic": sorted(comm.TRAFFIC)})
    bf16 = cast_dit(copy.deepcopy(base), torch.bfloat16)
    sharded = copy.deepcopy(bf16)
    shard_dit(sharded, torch.device("cpu"))
    with torch.inference_mode():
        want = bf16(x, t, context).float()
        got = sharded(x, t, context).float()
        kv_want, kv_got = bf16.encode_text(context.bfloat16()), sharded.encode_text(context.bfloat16())
    block = sharded.blocks[0]
    results.append({"check": "fsdp2 bf16", "max_abs_diff": float((got - want).abs().max()),
                    "text_kv_diff": float((kv_got.float() - kv_want.float()).abs().max()),
                    "ffn_sharded": all(hasattr(p, "to_local") for p in block.ffn.parameters()),
                    "fp32_tables_whole": not hasattr(block.scale_shift_table, "to_local")
                    and block.scale_shift_table.dtype == torch.float32,
                    "rank_spread": _spread_over_ranks(got)})
    return results


def compiled_checks(models: dict) -> list[dict]:
    """(1) torch.compile per block (runtime/fast.py, fullgraph) with Ulysses' all-to-all traced
    inside, against the eager single-process DiT; (2) torch.export keeps a functional all-to-all
    as a graph node, and the AOTInductor package of it runs on every rank like the eager module."""
    import copy
    import tempfile

    import torch
    import torch.distributed as dist

    from wan_rt.models import load_dit
    from wan_rt.parallel import ParallelPlan, comm
    from wan_rt.parallel.sequence import apply_sequence_parallel
    from wan_rt.runtime.fast import optimize_dit
    from wan_rt.resolve import resolve_checkpoint

    resolved = resolve_checkpoint(models["t2v"])
    base = load_dit(resolved.files, "dit_high_noise", dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 6, 6, generator=gen)
    t = torch.tensor([900.0, 900.0])
    context = torch.randn(2, resolved.spec.dit.text_len, resolved.spec.dit.text_dim, generator=gen)
    compiled = copy.deepcopy(base)
    apply_sequence_parallel(compiled, ParallelPlan(ulysses=2).groups())
    optimize_dit(compiled, kernels=False, fp8_linear=False, attention_quant=None, compile="default", cuda_graphs=False)
    with torch.inference_mode():
        want, got = base(x, t, context), compiled(x, t, context)
    results = [{"check": "compiled blocks, ulysses 2", "max_abs_diff": float((got - want).abs().max()),
                "scale": float(want.abs().max()), "rank_spread": _spread_over_ranks(got)}]

    class Exchange(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.b(comm.all_to_all(self.a(x), dist.group.WORLD, "test"))

    torch.manual_seed(0)
    module = Exchange().eval()
    y = torch.randn(2, 4, 8) + dist.get_rank()
    with torch.no_grad():
        eager = module(y)
    program = torch.export.export(module, (y,))
    nodes = sorted({str(n.target) for n in program.graph.nodes if "c10d" in str(n.target)})
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=f"{tempfile.mkdtemp()}/exchange_rank{dist.get_rank()}.pt2")
    aoti = torch._inductor.aoti_load_package(package)(y)
    results.append({"check": "aoti all-to-all", "export_nodes": nodes, "max_abs_diff": float((aoti - eager).abs().max()),
                    "rank_spread": 0.0})
    return results


if __name__ == "__main__":
    sys.exit(main())
