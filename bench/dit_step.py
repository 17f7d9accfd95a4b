"""One denoising forward of a Wan DiT: diffusers eager vs wan_rt eager vs wan_rt's fast path.

    python bench/dit_step.py --json bench/dit_step.json          # a CUDA GPU: real sizes, every variant
    python bench/dit_step.py --models t2v-A14B --full-forward t2v-A14B   # + full 40-layer forwards
    python bench/dit_step.py --models t2v-A14B --size 480x832x81         # another size (HxWxF)
    python bench/dit_step.py --tiny --json out.json              # CPU smoke test (fp32, interpreter)

One scenario per command (--models) keeps each run within a few minutes; the fast variant's
first call compiles (max-autotune: minutes; --compile default is quicker), reported as warmup_s.

Scenarios: an A14B expert at 1280×720×81 (75,600 tokens, dim 5120, 40 heads × 128, FFN 13,824)
and TI2V-5B at 1280×704×121 (27,280 tokens, dim 3072), batch 1, 512 text tokens, the same
random weights for every variant (built on the device, no checkpoint; diffusers' model shares
wan_rt's parameter tensors, so both compute with the very same numbers).

Variants, each on a fresh copy of the model (parameters shared, so only FP8 copies cost memory):
  diffusers         WanTransformer3DModel, bf16 (its keep-in-fp32 policy), SDPA attention
  eager             wan_rt eager bf16 (same policy): the oracle; text K/V computed once per prompt
  kernels           + Triton attention and fused LayerNorm-modulate
  kernels+int8      + int8 self-attention (q·kᵀ)
  kernels+int8+fp8  + FP8 linears (wan_rt.precision's table keeps the rest in bf16)
  fast              + torch.compile max-autotune per block + CUDA graphs: optimize_dit's defaults
  aoti              kernels+int8+fp8 compiled ahead of time: each block an AOTInductor package
                    (wan_rt.export.aoti_export, the Triton kernels inside as custom ops, FP8 GEMMs
                    through torch._scaled_mm, max-autotune on a GPU) replayed from a CUDA graph
                    (runtime/cuda_graphs.py): what `wan-rt build --backend aoti --precision fp8
                    --attention int8` ships. Blocks of one kind share one package (weights apart).

To keep a run short, a forward is estimated from its parts: embeddings + head (a 0-layer model)
+ layers × one block, where an FP8 variant's kept blocks (the table's first/last ones) are timed
apart from its quantized ones. `--full-forward` adds real full-depth forwards beside the estimate.
Each line prints ms, TFLOP/s from the closed-form count (wan_rt.flops.dit_flops; the anchors of
docs/perf-anchors.md), the fraction of the H100's dense bf16 (989) and fp8 (1979) TFLOP/s, and
the error against the oracle: relative L2 of one block's output against eager bf16 and against
an fp32 copy of the block, their ratio to eager bf16's own fp32 error (the flash-attention
ratio rule), and of the forward's output against eager bf16.

Random weights give near-uniform attention, which flatters int8 attention's error; quality on
trained weights is `wan-rt parity`'s job. On a CPU (--tiny) the timings and peak fractions mean
nothing: the run checks that every variant runs and computes the same thing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, sync, write_json  # noqa: E402

from wan_rt.config import T2V_A14B, TI2V_5B, ModelSpec, get_spec, token_grid  # noqa: E402
from wan_rt.flops import dit_flops  # noqa: E402

H100_PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # SXM datasheet, dense (docs/perf-anchors.md)

# optimize_dit keyword arguments per wan_rt variant (None: plain eager); order = the ladder.
VARIANTS: dict[str, Optional[dict]] = {
    "diffusers": None,
    "eager": None,
    "kernels": dict(kernels=True, attention_quant=None, fp8_linear=False, compile=None, cuda_graphs=False),
    "kernels+int8": dict(kernels=True, attention_quant="int8", fp8_linear=False, compile=None, cuda_graphs=False),
    "kernels+int8+fp8": dict(kernels=True, attention_quant="int8", fp8_linear=True, compile=None, cuda_graphs=False),
    "fast": dict(kernels=True, attention_quant="int8", fp8_linear=True, compile="max-autotune", cuda_graphs=True),
    "aoti": dict(kernels=True, attention_quant="int8", fp8_linear="scaled_mm", compile=None, cuda_graphs=False),
}
AOTI_OPTIONS: dict = {"autotune": True, "quick": False}  # set from the command line


@dataclass(frozen=True)
class Scenario:
    spec: ModelSpec
    height: int
    width: int
    frames: int
    batch: int = 1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def grid(self) -> tuple[int, int, int]:
        return token_grid(self.spec, self.height, self.width, self.frames)

    @property
    def tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w


def scenarios(tiny: bool, batch: int) -> list[Scenario]:
    if tiny:
        return [Scenario(s, s.height, s.width, s.num_frames, batch)
                for s in (get_spec("tiny-t2v-A14B"), get_spec("tiny-ti2v-5B"))]
    return [Scenario(T2V_A14B, 720, 1280, 81, batch), Scenario(TI2V_5B, 704, 1280, 121, batch)]


# ---------------------------------------------------------------------------------------------
# Random models without a checkpoint
# ---------------------------------------------------------------------------------------------

def randomize_(model: nn.Module, seed: int) -> None:
    """Seeded weights of a useful size, made on the parameters' device: linear/conv/embedding
    weights N(0, 1/fan_in) (O(1) activations through the stack), norm weights 1 ± 0.2, biases
    ± 0.2, modulation tables ± 0.5 (as tests/test_dit.py). fp32 noise one tensor at a time, so
    14B parameters never exist twice. Tied parameters are visited once."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.endswith("scale_shift_table"):
                noise.mul_(0.5)
            elif p.ndim > 1:
                noise.mul_(p[0].numel() ** -0.5)
            elif ("norm" in name and name.endswith("weight")) or name.endswith("gamma"):  # VAE norms: gamma
                noise.mul_(0.2).add_(1.0)
            else:
                noise.mul_(0.2)
            p.copy_(noise)
            del noise


def random_dit(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A WanDiT with random weights, built on `device` in `dtype` (KEEP_IN_FP32 stays float32)
    without ever holding a float32 copy: meta -> cast -> to_empty -> randomize_."""
    from wan_rt.models.dit import WanDiT, cast_dit

    with torch.device("meta"):
        dit = WanDiT(cfg)
    cast_dit(dit, dtype)
    dit.to_empty(device=device)
    randomize_(dit, seed)
    return dit.eval().requires_grad_(False)


def twin_dit(source: nn.Module, cfg=None) -> nn.Module:
    """Another WanDiT (of config `cfg`, default the source's) over the source's parameter tensors."""
    from wan_rt.models.dit import WanDiT

    cfg = cfg or source.config
    with torch.device("meta"):
        dit = WanDiT(cfg)
    wanted = set(dit.state_dict())
    dit.load_state_dict({k: v for k, v in source.state_dict().items() if k in wanted}, strict=True, assign=True)
    return dit.eval().requires_grad_(False)


def diffusers_twin(source: nn.Module, cfg=None) -> nn.Module:
    """diffusers' WanTransformer3DModel over the same parameter tensors (keys are identical);
    its RoPE tables are non-persistent buffers, so they are rebuilt on the device."""
    from diffusers import WanTransformer3DModel

    from wan_rt.models.hf_config import dit_to_diffusers

    cfg = cfg or source.config
    kwargs = {k: v for k, v in dit_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = WanTransformer3DModel(**kwargs)
    wanted = set(ref.state_dict())
    ref.load_state_dict({k: v for k, v in source.state_dict().items() if k in wanted}, strict=True, assign=True)
    device = next(source.parameters()).device
    ref.rope = type(ref.rope)(cfg.head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(device)
    return ref.eval().requires_grad_(False)


def probe_keep(real_layers: int) -> tuple[Callable[[str], Optional[str]], int, int]:
    """The precision table for a 2-block probe standing in for a `real_layers`-deep model: its
    block 0 plays a kept block (the table's first) and block 1 a quantized middle block.
    Returns (keep, kept blocks, quantized blocks) of the real model."""
    from wan_rt.precision import keep_blocks, keep_reason

    kept = keep_blocks(real_layers)
    stand_in = (min(kept) if kept else 0, real_layers // 2)

    def keep(path: str) -> Optional[str]:
        m = re.match(r"^blocks\.(\d+)(\..*)?$", path)
        if m:
            path = f"blocks.{stand_in[int(m.group(1))]}{m.group(2) or ''}"
        return keep_reason(path, real_layers)

    return keep, len(kept), real_layers - len(kept)


# ---------------------------------------------------------------------------------------------
# Timing and errors
# ---------------------------------------------------------------------------------------------

def time_fn(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def rel_l2(a: Tensor, b: Tensor) -> float:
    from wan_rt.metrics import relative_error

    return relative_error(a.float(), b.float())


def capture_call(module: nn.Module, run: Callable[[], object]) -> tuple[tuple, dict]:
    """The (args, kwargs) `module` is called with while `run()` runs."""
    seen: list = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def fp32_attention(device: torch.device):
    """SDPA's memory-efficient kernel for fp32 on a GPU (flash has no fp32 kernel, and the math
    fallback would materialize an L×L score matrix: ~900 GB at 75,600 tokens)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])


def mark_step(graphs: bool) -> None:
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()


def release_compiled() -> None:
    """Drop compiled code and CUDA-graph memory pools between variants."""
    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    except Exception:  # noqa: BLE001 - private API; best effort only
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# One scenario
# ---------------------------------------------------------------------------------------------

def make_inputs(sc: Scenario, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    cfg = sc.spec.dit
    g = torch.Generator(device=device).manual_seed(1)
    f, h, w = sc.grid
    pt, ph, pw = cfg.patch_size
    x = torch.randn(sc.batch, cfg.in_channels, f * pt, h * ph, w * pw, generator=g, device=device).to(dtype)
    context = torch.randn(sc.batch, cfg.text_len, cfg.text_dim, generator=g, device=device).to(dtype)
    t = torch.full((sc.batch,), 700.0, device=device)
    if cfg.per_token_timestep:  # TI2V: a clean first latent frame (t = 0), t elsewhere
        t = t[:, None].repeat(1, sc.tokens)
        t[:, : h * w] = 0
    return {"x": x, "t": t, "context": context}


@dataclass
class Probe:
    """A 2-block model at full width (block 0 plays a kept block, block 1 a quantized one), its
    inputs, and the oracle's answers every variant is compared with."""

    eager: nn.Module               # wan_rt eager: owns the weights, every other model shares them
    x: Tensor
    t: Tensor
    context: Tensor
    block_inputs: tuple            # (hidden, e0, rope) entering block 0 in the oracle
    want_forward: Tensor
    want_block: Tensor             # eager block 1 on block_inputs
    ref32: Tensor                  # a float32 copy of block 1 on the same inputs
    eager_err32: float             # the oracle's own error against ref32

    def block_args(self, kv: Tensor, i: int) -> tuple:
        """Block i's arguments: the common inputs and that block's own text K/V."""
        hidden, e0, rope = self.block_inputs
        return hidden, None, e0, rope, kv[i].to(hidden.dtype)


def build_probe(sc: Scenario, device: torch.device, dtype: torch.dtype) -> Probe:
    cfg = dataclasses.replace(sc.spec.dit, num_layers=2)
    inputs = make_inputs(sc, device, dtype)
    x, t, context = inputs["x"], inputs["t"], inputs["context"]
    eager = random_dit(cfg, device, dtype, seed=0)
    text_kv = eager.encode_text(context)
    (hidden, _, e0, rope, _), _ = capture_call(eager.blocks[0], lambda: eager(x, t, text_kv=text_kv))
    want_forward = eager(x, t, text_kv=text_kv)
    want_block = eager.blocks[1](hidden, None, e0, rope, text_kv[1])
    # The fp32 reference computes its K/V itself, from a float32 text embedding.
    block32 = copy.deepcopy(eager.blocks[1]).float()
    embed32 = copy.deepcopy(eager.condition_embedder.text_embedder).float()
    with fp32_attention(device):
        ref32 = block32(hidden.float(), embed32(context.float()), e0, tuple(r.float() for r in rope)).float()
    return Probe(eager, x, t, context, (hidden, e0, rope), want_forward, want_block, ref32,
                 rel_l2(want_block, ref32))


def variant_calls(name: str, probe: Probe, keep) -> tuple[str, Callable, dict[str, Callable], Callable,
                                                         Callable[[], dict]]:
    """(description, forward, {"q": quantized-kind block, "k": kept block (FP8 variants)},
    embeddings + head, counters read after the timings) for one variant, over the probe's weights."""
    from wan_rt.runtime.fast import optimize_dit

    x, t, context, eager = probe.x, probe.t, probe.context, probe.eager
    head_cfg = dataclasses.replace(eager.config, num_layers=0)
    if name == "diffusers":
        model = diffusers_twin(eager)
        dargs, dkwargs = capture_call(model.blocks[0], lambda: model(x, t, context, return_dict=False))
        head = diffusers_twin(eager, head_cfg)
        return ("diffusers WanTransformer3DModel, SDPA",
                lambda: model(x, t, context, return_dict=False)[0],
                {"q": lambda: model.blocks[1](*dargs, **dkwargs)},
                lambda: head(x, t, context, return_dict=False),
                dict)
    model = twin_dit(eager)
    opts = VARIANTS[name]
    description = "wan_rt eager" if opts is None else optimize_dit(model, keep=keep, **opts).describe()
    graphs = bool(opts and opts["cuda_graphs"])
    kv = model.encode_text(context)  # once per prompt, as the runtime does (not timed)
    args_q, args_k = probe.block_args(kv, 1), probe.block_args(kv, 0)
    head = twin_dit(eager, head_cfg)
    counters: Callable[[], dict] = dict
    if name == "aoti":
        note, runners = package_blocks(model, args_k)
        description += " -> " + note
        if probe.x.device.type == "cuda":  # proof the timed calls were replays, not plain runs
            counters = lambda: {"cuda_graph_replays": sum(r.replays for r in runners)}  # noqa: E731
    blocks = {"q": lambda: (mark_step(graphs), model.blocks[1](*args_q))[1]}
    if opts is not None and opts["fp8_linear"]:
        blocks["k"] = lambda: (mark_step(graphs), model.blocks[0](*args_k))[1]
    return (description,
            lambda: (mark_step(graphs), model(x, t, text_kv=kv))[1],
            blocks,
            lambda: head(x, t, text_kv=kv[:0]),
            counters)


class BlockStep(nn.Module):
    """One transformer block as a graph of named tensors (what an AOTInductor package takes)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden: Tensor, e0: Tensor, rope_cos: Tensor, rope_sin: Tensor, text_kv: Tensor) -> Tensor:
        return self.block(hidden, None, e0, (rope_cos, rope_sin), text_kv)


def package_blocks(model: nn.Module, block_args: tuple) -> tuple[str, list]:
    """Compile each block of `model` into an AOTInductor package at the probe's (static) shapes
    and make the block call it, replayed from a CUDA graph on a GPU. Blocks of the same kind
    (same ops and shapes: kept or FP8) share one compiled package through aoti_export's cache;
    each loads its own weights. Returns a description with compile times, and the runners."""
    import tempfile

    from wan_rt.export.aoti_export import compile_aoti
    from wan_rt.runtime.backends import aoti
    from wan_rt.runtime.graphs import GraphSpec, ShapeProfile, TensorSpec

    hidden, _, e0, (cos, sin), kv = block_args
    device, dtype = hidden.device, hidden.dtype
    named = {"hidden": hidden, "e0": e0, "rope_cos": cos, "rope_sin": sin, "text_kv": kv}

    def spec_of(n: str, t: Tensor) -> TensorSpec:
        return TensorSpec(n, "float32" if t.dtype == torch.float32 and dtype != torch.float32 else "compute",
                          tuple(t.shape))

    gspec = GraphSpec("dit_block", "main", tuple(spec_of(n, t) for n, t in named.items()),
                      (spec_of("hidden_out", hidden),))
    profile = ShapeProfile(min={}, opt={}, max={})
    out_root = Path(tempfile.mkdtemp(prefix="wan_rt_aoti_blocks_"))
    configs = {"max_autotune": True} if device.type == "cuda" and AOTI_OPTIONS["autotune"] else {}
    notes, runners = [], []
    pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None  # blocks run in order: one pool
    for i, block in enumerate(model.blocks):
        stats: dict = {}
        folder = out_root / f"block{i}"
        files = compile_aoti(BlockStep(block), gspec, profile, folder / "model.pt2", compute_dtype=dtype,
                             device=device, fast=AOTI_OPTIONS["quick"], configs=configs, stats=stats)
        runner = aoti.load_graph(folder, gspec, files, compute_dtype=dtype, device=device)
        if device.type == "cuda":
            from wan_rt.runtime.cuda_graphs import CudaGraphRunner

            runner = CudaGraphRunner(runner, pool=pool)
        block.forward = _packaged_forward(runner)
        runners.append(runner)
        compiled = "cached" if stats["cached"] else f"compiled in {stats['compile_s']:.0f}s"
        notes.append(f"block{i} {compiled}")
    graphs = " + CUDA graphs" if device.type == "cuda" else ""
    return f"AOTInductor packages{graphs} ({', '.join(notes)})", runners


def _packaged_forward(runner: Callable) -> Callable:
    def forward(hidden, context, e0, rope, text_kv):
        assert context is None, "packaged blocks take the text K/V, not the context"
        return runner({"hidden": hidden, "e0": e0, "rope_cos": rope[0], "rope_sin": rope[1],
                       "text_kv": text_kv})["hidden_out"]
    return forward


def measure_variant(name: str, probe: Probe, keep, cfg, flops, n_kept: int, n_quant: int, repeats: int,
                    warmup: int, head_ms: dict[str, float], device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row: dict = {"variant": name}
    row["description"], forward, blocks, head_fn, counters = variant_calls(name, probe, keep)

    start = time.perf_counter()
    got_forward = forward()
    sync()
    row["warmup_s"] = time.perf_counter() - start  # includes compilation
    row["forward_rel_l2_vs_eager"] = rel_l2(got_forward, probe.want_forward)
    del got_forward
    got_block = blocks["q"]().clone()
    row["block_rel_l2_vs_eager"] = rel_l2(got_block, probe.want_block)
    row["block_rel_l2_vs_fp32"] = rel_l2(got_block, probe.ref32)
    # The ratio rule's k; meaningless (None) when the run is fp32 and eager *is* the reference.
    row["ratio_vs_eager_bf16"] = row["block_rel_l2_vs_fp32"] / probe.eager_err32 if probe.eager_err32 > 1e-6 \
        else None
    del got_block

    family = "diffusers" if name == "diffusers" else "wan_rt"  # embeddings + head: the same in a family
    if family not in head_ms:
        head_ms[family] = median(time_fn(head_fn, repeats, warmup)) * 1e3
    row["embed_head_ms"] = head_ms[family]
    row["block_ms"] = median(time_fn(blocks["q"], repeats, warmup)) * 1e3
    if "k" in blocks:
        row["block_kept_ms"] = median(time_fn(blocks["k"], repeats, warmup)) * 1e3
        est = row["embed_head_ms"] + n_quant * row["block_ms"] + n_kept * row["block_kept_ms"]
    else:
        est = row["embed_head_ms"] + cfg.num_layers * row["block_ms"]
    row["est_forward_ms"] = est
    row["est_tflops"] = flops.total / (est * 1e-3) / 1e12
    row["block_tflops"] = flops.layer_total / (row["block_ms"] * 1e-3) / 1e12
    row["frac_bf16_peak"] = row["est_tflops"] / H100_PEAK_TFLOPS["bf16"]
    row["frac_fp8_peak"] = row["est_tflops"] / H100_PEAK_TFLOPS["fp8"]
    row.update(counters())
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def run_scenario(sc: Scenario, variants: list[str], device: torch.device, dtype: torch.dtype, repeats: int,
                 warmup: int, full_forward: bool, full_repeats: int, log: Callable[[str], None],
                 progress: Callable[[dict], None] = lambda result: None) -> dict:
    """Every variant on one scenario. A variant that raises gets a row with its `error` and the
    others still run; `progress(result so far)` is called after each variant."""
    cfg = sc.spec.dit
    flops = dit_flops(cfg, sc.tokens, batch=sc.batch)
    keep, n_kept, n_quant = probe_keep(cfg.num_layers)
    rows: list[dict] = []
    result = {"name": sc.name, "size": [sc.width, sc.height, sc.frames], "grid": list(sc.grid), "tokens": sc.tokens,
              "batch": sc.batch, "num_layers": cfg.num_layers, "dim": cfg.dim, "kept_blocks_fp8": n_kept,
              "flops": flops.as_dict(), "rows": rows}
    log(f"\n== {sc.name}: {sc.width}x{sc.height}x{sc.frames}, grid {sc.grid} = {sc.tokens} tokens, batch {sc.batch}, "
        f"{cfg.num_layers} layers x {cfg.dim}; {flops.total / 1e12:,.1f} TFLOP per forward "
        f"({flops.layer_total / 1e12:.2f} per layer)")

    with torch.inference_mode():
        probe = build_probe(sc, device, dtype)
        result["eager_block_rel_l2_vs_fp32"] = probe.eager_err32
        head_ms: dict[str, float] = {}
        for name in variants:
            log(f"-- {name}")
            try:
                row = measure_variant(name, probe, keep, cfg, flops, n_kept, n_quant, repeats, warmup, head_ms,
                                      device)
                log(f"   block {row['block_ms']:.2f} ms, est. forward {row['est_forward_ms']:.1f} ms "
                    f"({row['est_tflops']:.1f} TFLOP/s), err vs eager {row['block_rel_l2_vs_eager']:.2e}, "
                    f"vs fp32 {row['block_rel_l2_vs_fp32']:.2e}")
            except Exception as exc:  # noqa: BLE001 - one broken variant must not cost the others' figures
                row = {"variant": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                       if str(exc).strip() else type(exc).__name__}
                log(f"   FAILED: {row['error']}")
            rows.append(row)
            release_compiled()
            progress(result)
        del probe
        release_compiled()

        if full_forward:
            by_name = {r["variant"]: r for r in rows}
            for fr in run_full_forward(sc, [r["variant"] for r in rows if "error" not in r], device, dtype,
                                       full_repeats, log):
                by_name[fr["variant"]].update(fr)
                if "full_forward_ms" in fr:
                    by_name[fr["variant"]]["full_tflops"] = flops.total / (fr["full_forward_ms"] * 1e-3) / 1e12
    return result


def run_full_forward(sc: Scenario, variants: list[str], device: torch.device, dtype: torch.dtype, repeats: int,
                     log: Callable[[str], None]) -> list[dict]:
    """Real full-depth forwards (one model's weights, every variant over them)."""
    inputs = make_inputs(sc, device, dtype)
    eager = random_dit(sc.spec.dit, device, dtype, seed=0)
    want = eager(inputs["x"], inputs["t"], text_kv=eager.encode_text(inputs["context"]))
    out = []
    for name in variants:
        log(f"-- full forward: {name}")
        out.append(full_forward_row(name, eager, inputs, want, repeats))
        log("   " + (f"{out[-1]['full_forward_ms']:.1f} ms" if "full_forward_ms" in out[-1]
                     else out[-1]["full_forward_error"]))
        release_compiled()
    return out


def full_forward_row(name: str, eager: nn.Module, inputs: dict[str, Tensor], want: Tensor, repeats: int) -> dict:
    from wan_rt.runtime.fast import optimize_dit

    x, t, context = inputs["x"], inputs["t"], inputs["context"]
    row: dict = {"variant": name}
    try:
        if name == "diffusers":
            model = diffusers_twin(eager)

            def fn() -> Tensor:
                return model(x, t, context, return_dict=False)[0]
        else:
            model = twin_dit(eager)
            if VARIANTS[name] is not None:
                optimize_dit(model, **VARIANTS[name])
            kv = model.encode_text(context)
            if name == "aoti":
                args, _ = capture_call(model.blocks[0], lambda: model(x, t, text_kv=kv))
                row["full_description"] = package_blocks(model, args)[0]

            def fn() -> Tensor:
                return model(x, t, text_kv=kv)
        start = time.perf_counter()
        got = fn()
        sync()
        row["full_warmup_s"] = time.perf_counter() - start
        row["full_rel_l2_vs_eager"] = rel_l2(got, want)
        del got
        row["full_forward_ms"] = median(time_fn(fn, repeats, warmup=0)) * 1e3
    except torch.cuda.OutOfMemoryError as e:
        row["full_forward_error"] = f"out of memory: {str(e).splitlines()[0]}"
    return row


# ---------------------------------------------------------------------------------------------

def _torch_older_than(major: int, minor: int) -> bool:
    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return found < (major, minor)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny specs on the CPU in fp32: a smoke test")
    p.add_argument("--models", default=None, help="comma list of scenario names (default: all)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=1, help="1 = one forward (the anchors); 2 = the CFG pair")
    p.add_argument("--size", default=None,
                   help="HxWxF, e.g. 480x832x81: every chosen scenario at this size instead of its own")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full-forward", default=None,
                   help="comma list of scenarios to also run at full depth (default: ti2v-5B on a GPU, all with "
                        "--tiny); A14B needs ~45 GB and minutes")
    p.add_argument("--full-repeats", type=int, default=2)
    p.add_argument("--compile", default="max-autotune", choices=("max-autotune", "default", "none"),
                   help="the fast variant's torch.compile mode (max-autotune: slowest to compile)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    skipped: dict[str, str] = {}  # variant -> why it cannot run here
    VARIANTS["fast"] = dict(VARIANTS["fast"], compile=None if args.compile == "none" else args.compile)
    AOTI_OPTIONS.update(autotune=args.compile == "max-autotune", quick=args.tiny)
    if not cuda:
        # No compile / CUDA graphs off the GPU: the fastest path there is kernels + int8 + fp8 (EMULATED).
        VARIANTS["fast"] = dict(VARIANTS["fast"], compile=None, cuda_graphs=False)
        variants = [v for v in variants if v != "kernels+int8+fp8"]
        if "aoti" in variants and _torch_older_than(2, 13):
            # The package's FP8 linears scale weights per channel; a CPU _scaled_mm takes that from 2.13.
            skipped["aoti"] = (f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only (FP8 "
                               "per-channel weight scales need torch >= 2.13 on a CPU; CUDA has them)")
            print(f"aoti skipped: {skipped['aoti']}")
            variants.remove("aoti")
    if not cuda and not args.tiny:
        p.error("real sizes need a CUDA GPU; use --tiny on a CPU")
    chosen = scenarios(args.tiny, args.batch)
    if args.models:
        names = set(args.models.split(","))
        chosen = [s for s in chosen if s.name in names]
    if args.size:
        try:
            height, width, frames = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            p.error(f"--size {args.size!r}: expected HxWxF, e.g. 480x832x81")
        chosen = [dataclasses.replace(s, height=height, width=width, frames=frames) for s in chosen]
    full = set(s.name for s in chosen) if args.tiny else \
        set((args.full_forward if args.full_forward is not None else "ti2v-5B").split(","))
    repeats = 1 if args.tiny else args.repeats

    results: list[dict] = []

    def save(done: list[dict], partial: bool) -> None:
        # Rewritten after every variant, so a run cut short (a time limit) still leaves its rows.
        write_json(args.json, {"benchmark": "dit_step", "environment": environment(), "command": " ".join(sys.argv),
                               "device": str(device), "dtype": str(dtype), "h100_peak_tflops": H100_PEAK_TFLOPS,
                               "variants": {n: VARIANTS[n] for n in variants}, "partial": partial,
                               "skipped": skipped, "scenarios": done}, quiet=partial)

    for sc in chosen:
        # Each timed function already ran once for the error check; CUDA graphs record on a later call.
        results.append(run_scenario(sc, variants, device, dtype, repeats, 2 if cuda else 0, sc.name in full,
                                    1 if args.tiny else args.full_repeats, log=print,
                                    progress=lambda res: save(results + [res], partial=True)))

    for res in results:
        print(f"\n{res['name']}: {res['tokens']} tokens, {res['flops']['total'] / 1e12:,.1f} TFLOP/forward; "
              f"eager {str(dtype).split('.')[-1]} block error vs fp32 {res['eager_block_rel_l2_vs_fp32']:.2e}; "
              f"fp8 keeps {res['kept_blocks_fp8']} of {res['num_layers']} blocks in {str(dtype).split('.')[-1]}")
        shown = [{k: f"{v:.2e}" if isinstance(v, float) and ("rel_l2" in k or k.startswith("ratio")) else v
                  for k, v in r.items()} for r in res["rows"]]  # errors in scientific notation
        print_table(shown, ["variant", "est_forward_ms", "est_tflops", "frac_bf16_peak", "frac_fp8_peak",
                                  "block_ms", "block_kept_ms", "embed_head_ms", "full_forward_ms",
                                  "block_rel_l2_vs_eager", "block_rel_l2_vs_fp32", "ratio_vs_eager_bf16",
                                  "forward_rel_l2_vs_eager", "full_rel_l2_vs_eager", "warmup_s", "error"])
    if not cuda:
        print("\nCPU run (fp32, Triton interpreter, FP8 EMULATED): timings and peak fractions mean nothing here.")
    save(results, partial=False)
    return 1 if any("error" in r for res in results for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
