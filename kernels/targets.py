"""The GPUs wan_rt's Triton kernels claim, what each allows a kernel, and which configs fit.

`TARGETS` is the claim (compute capability -> shared memory a block may use, the opt-in maximum).
Each kernel module lists its GPU configs and `aot_variants()`: representative specializations.
`compile_for(...)` compiles one of them in one config for a named target with no GPU present
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`): shared memory from the
metadata, registers and spills from the log of the ptxas run Triton makes (`-v`).
bench/aot_targets.py does that for every variant x config x target and writes
kernels/aot_targets.json; `pruner(...)` is the autotuners' `early_config_prune`: it keeps the
configs whose measurements fit the launch's GPU (shared memory, scaled for a smaller head dim,
and at most MAX_SPILL_BYTES of spills), before autotuning benchmarks any. Each dtype a kernel
runs in has its own measured variant (fp32 tiles spill where bf16 ones do not: no scaling sees that). tests/kernels/test_aot_targets.py
checks the table against fresh compiles and that every kernel keeps a config on every target.

Nothing here imports triton at module level (`wan_rt.kernels` stays importable without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

# compute capability -> max shared memory per block in KB (opt-in): A100, RTX 30xx / A10, RTX 40xx /
# L40, H100 / H200, B200, RTX 50xx / RTX PRO 6000.
TARGETS = {80: 163, 86: 99, 89: 99, 90: 227, 100: 227, 120: 99}
# A kept config may spill at most this much (bytes per thread, stores): a few spilled registers
# around the softmax are cheap, a spilled tile is not.
MAX_SPILL_BYTES = 64


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


TABLE = Path(__file__).with_name("aot_targets.json")   # written by bench/aot_targets.py --write


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel specialization compiled ahead of time: the kernel, its runtime argument types,
    its fixed constexprs and the configs (constexprs, num_warps, num_stages) it may launch with."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    configs: list[tuple[dict[str, Any], int, int]]


def runtime_signature(fn: Any, **types: str) -> dict[str, str]:
    """`fn`'s non-constexpr arguments typed 'i32' (strides, sizes) unless named in `types`."""
    names = [n for i, n in enumerate(fn.arg_names) if i not in fn.constexprs]
    return {n: types.get(n, "i32") for n in names}


def config_name(kwargs: dict[str, Any], num_warps: int, num_stages: int) -> str:
    return ",".join([*(f"{k}={v}" for k, v in sorted(kwargs.items())), f"warps={num_warps}", f"stages={num_stages}"])


def table_target(capability: int) -> int:
    """The listed target whose measurements stand for a GPU of this capability (major * 10 +
    minor): itself, else the closest listed one below it (sm87 -> sm86, sm121 -> sm120)."""
    listed = [cc for cc in sorted(TARGETS) if cc <= capability]
    if not listed:
        raise RuntimeError(f"wan_rt's Triton kernels target sm80 and newer, not sm{capability}")
    return listed[-1]


@functools.lru_cache(maxsize=None)
def measured() -> dict:
    """{variant: {target: {config name: {"shared", "registers", "spill_bytes"}}}} from TABLE."""
    return json.loads(TABLE.read_text())["variants"]


def fits(measure: dict, capability: int, shared_scale: float = 1.0) -> bool:
    """A compiled config fits sm<capability>: its shared memory (scaled from the measured
    variant's, e.g. x0.5 for head dim 64) within the target's, and no spills past MAX_SPILL_BYTES."""
    return measure["shared"] * shared_scale <= TARGETS[capability] * 1024 and measure["spill_bytes"] <= MAX_SPILL_BYTES


def kept_configs(variant: str, configs: list, capability: int, shared_scale: float = 1.0) -> list:
    """The triton.Config entries of `configs` measured for `variant` that fit this GPU (a config
    not measured for it is not one of its configs: the fp32-only tiles for a bf16 launch); an
    error if none does."""
    target = table_target(capability)
    table = measured()[variant][str(target)]
    kept = [c for c in configs
            if (m := table.get(config_name(c.kwargs, c.num_warps, c.num_stages))) and fits(m, target, shared_scale)]
    if not kept:
        raise RuntimeError(f"no Triton config of {variant} fits sm{capability} (checked as sm{target})")
    return kept


def pruner(variant_of: Callable[[dict], tuple[str, float]],
           prefer: Callable[[list, dict], list] = lambda configs, args: configs) -> Callable[..., list]:
    """`early_config_prune` for triton.autotune: `variant_of(args)` names the measured variant a
    launch stands for (its dtype's) and the shared-memory scale from it; the configs that fit the GPU of the
    launch survive, before autotuning benchmarks any (of those, `prefer`'s when it keeps some)."""
    def prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        import torch

        args = {**named_args, **kwargs}
        variant, scale = variant_of(args)
        kept = kept_configs(variant, configs, device_capability(torch.cuda.current_device()), scale)
        return prefer(kept, args) or kept
    return prune


def element_size(dtype: Any) -> int:
    """Bytes per element of a torch dtype or a Triton pointer type."""
    text = str(getattr(dtype, "element_ty", dtype)).replace("torch.", "")
    sizes = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1, "i8": 1}
    return sizes[text]


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a named target (tests and bench; needs triton, no GPU)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    shared: int   # bytes of shared memory per block (Triton's metadata)
    registers: int
    spill_bytes: int   # spill stores, bytes per thread (ptxas -v)


def compile_for(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], capability: int,
                num_warps: int, num_stages: int) -> Compiled:
    """Compile `fn` (a @triton.jit function) for sm_<capability> with no GPU. `signature` types
    the runtime arguments ('*bf16', 'i32', 'fp32'); the constexprs are added to it here. Registers
    and spills come from the log of the ptxas run Triton itself makes (its own flags), so the
    compile bypasses Triton's cache."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    signature = {name: signature[name] for name in fn.arg_names}  # the kernel's argument order
    log = io.StringIO()
    with _environment(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas -v report in Triton's compile log: {log.getvalue()[-300:]!r}")
    return Compiled(int(kernel.metadata.shared), int(registers.group(1)), int(spills.group(1)))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
