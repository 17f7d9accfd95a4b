"""Every Triton kernel and GPU config of wan_rt.kernels compiled ahead of time for every claimed
target (kernels/targets.py: TARGETS), with no GPU: shared memory (Triton's metadata), registers
and spills (ptxas -v, the run Triton makes itself).

    python bench/aot_targets.py --write   # compile all (minutes on 2 cores; results cached), write
                                          # kernels/aot_targets.json + the table in bench/RESULTS.md

kernels/aot_targets.json is what the kernels' autotuners prune by at run time (a config that
does not fit the GPU's shared memory or spills past MAX_SPILL_BYTES is dropped for that GPU);
tests/kernels/test_aot_targets.py checks it against fresh compiles. Results are cached by the
kernel's source key, signature, config, target and Triton version (~/.cache/wan_rt/aot-targets).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- aot_targets: begin -->", "<!-- aot_targets: end -->"


def variants() -> list:
    """Every kernel in every dtype and layout it launches with (each module's aot_variants)."""
    from wan_rt.kernels import causal_conv, fused_norms, rope3d_attn

    return [v for module in (rope3d_attn, causal_conv, fused_norms) for v in module.aot_variants()]


def jobs() -> list[tuple]:
    """(variant name, config name, target) for everything to compile."""
    from wan_rt.kernels.targets import TARGETS, config_name

    return [(v.name, config_name(*c), cc) for v in variants() for cc in TARGETS for c in v.configs]


def _cache_dir() -> Path:
    root = Path(os.environ.get("WAN_RT_CACHE") or Path.home() / ".cache" / "wan_rt")
    return root / "aot-targets"


def _key(variant, config: tuple, target: int) -> str:
    import triton

    text = json.dumps([variant.fn.cache_key, variant.signature, variant.constexprs, config, target,
                       triton.__version__], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compile_one(job: tuple, use_cache: bool = True) -> dict:
    """Compile one (variant, config, target), through the result cache unless `use_cache` is off."""
    import dataclasses

    from wan_rt.kernels.targets import compile_for, config_name

    name, cfg_name, target = job
    variant = next(v for v in variants() if v.name == name)
    config = next(c for c in variant.configs if config_name(*c) == cfg_name)
    path = _cache_dir() / f"{_key(variant, config, target)}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    kwargs, warps, stages = config
    compiled = compile_for(variant.fn, variant.signature, {**variant.constexprs, **kwargs}, target, warps, stages)
    result = dataclasses.asdict(compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def compile_all(job_list: list[tuple], workers: int, use_cache: bool = True) -> dict:
    """{variant: {target: {config: measures}}} for the jobs, `workers` compiles at a time."""
    table: dict = {}
    n = len(job_list)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for job, result in zip(job_list, pool.map(compile_one, job_list, [use_cache] * n)):
            name, cfg_name, target = job
            table.setdefault(name, {}).setdefault(str(target), {})[cfg_name] = result
    return table


def markdown(table: dict) -> str:
    """kernel x target: configs kept / measured, max shared KB, max registers, spills (of the kept)."""
    from wan_rt.kernels.targets import MAX_SPILL_BYTES, TARGETS, fits

    lines = [f"| kernel | {' | '.join(f'sm{cc} ({kb} KB)' for cc, kb in TARGETS.items())} |",
             f"|---|{'---|' * len(TARGETS)}"]
    for name, per_target in table.items():
        cells = []
        for cc in TARGETS:
            measures = per_target[str(cc)]
            kept = [m for m in measures.values() if fits(m, cc)]
            if not kept:
                cells.append(f"**0/{len(measures)}**")
                continue
            cells.append(f"{len(kept)}/{len(measures)}: {max(m['shared'] for m in kept) / 1024:.0f} KB, "
                         f"{max(m['registers'] for m in kept)} regs, {max(m['spill_bytes'] for m in kept)} B spilled")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + f"\n\nKept: shared memory within the target's and at most {MAX_SPILL_BYTES} B of spill stores."


def write(table: dict) -> None:
    import triton

    from wan_rt.kernels.targets import TABLE

    TABLE.write_text(json.dumps({"triton": triton.__version__, "kernels": {v.name: v.fn.cache_key for v in variants()
                                                                             if v.name in table},
                                 "variants": table}, indent=1, sort_keys=True) + "\n")
    text = RESULTS.read_text()
    section = f"{BEGIN}\n{markdown(table)}\n{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text += f"\n## Triton kernels compiled ahead of time for every claimed GPU (issue 22)\n\n{section}\n"
    RESULTS.write_text(text)


def check(full: bool, workers: int) -> dict:
    """What tests/kernels/test_aot_targets.py asserts, as lists of problems (empty: all good):
    `coverage`: (variant, target, config) missing from kernels/aot_targets.json, or a kernel
    changed since it was written; `no_config`: a variant that keeps no config on a target;
    `compiled`: fresh compiles that disagree with the table (same Triton) or that the pruning
    keeps although they do not fit. The table is checked for every variant (fp32 and flattened-K
    included); without `full` one target per variant is compiled afresh (each target by some
    variant), its kept configs; with `full` everything."""
    import triton

    from wan_rt.kernels.targets import TABLE, TARGETS, config_name, fits

    stored = json.loads(TABLE.read_text())
    same_triton = stored["triton"] == triton.__version__
    table = stored["variants"]
    report: dict = {"coverage": [], "no_config": [], "compiled": [], "checked": [], "triton_matches_table": same_triton}
    chosen = variants()
    for v in chosen:
        if same_triton and stored["kernels"].get(v.name) != v.fn.cache_key:
            report["coverage"].append(f"{v.name}: the kernel changed since kernels/aot_targets.json was written")
        for cc in TARGETS:
            measures = table.get(v.name, {}).get(str(cc), {})
            missing = [config_name(*c) for c in v.configs if config_name(*c) not in measures]
            report["coverage"] += [f"{v.name} sm{cc} {name}: not in kernels/aot_targets.json" for name in missing]
            if not any(fits(m, cc) for m in measures.values()):
                report["no_config"].append(f"{v.name}: no config fits sm{cc}")
    targets = list(TARGETS)
    todo = []
    for i, v in enumerate(chosen):
        for cc in (targets if full else [targets[i % len(targets)]]):
            measures = table.get(v.name, {}).get(str(cc), {})
            todo += [(v.name, config_name(*c), cc) for c in v.configs
                     if full or fits(measures.get(config_name(*c), {"shared": 1 << 30, "spill_bytes": 0}), cc)]
    fresh = compile_all(todo, workers, use_cache=False)  # the compiler's word, not the cache's
    for name, cfg_name, cc in todo:
        got = fresh[name][str(cc)][cfg_name]
        report["checked"].append([name, cfg_name, cc, got])
        want = table.get(name, {}).get(str(cc), {}).get(cfg_name)
        if same_triton and want is not None and want != got:
            report["compiled"].append(f"{name} sm{cc} {cfg_name}: compiled {got}, kernels/aot_targets.json says {want}")
        if want is not None and fits(want, cc) and not fits(got, cc):
            report["compiled"].append(f"{name} sm{cc} {cfg_name}: kept, but compiled it does not fit: {got}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write kernels/aot_targets.json and bench/RESULTS.md")
    parser.add_argument("--check", metavar="REPORT.json", help="write the test's report (see check()) instead")
    parser.add_argument("--all", action="store_true", help="with --check: every variant, target and config")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.check:
        Path(args.check).write_text(json.dumps(check(args.all, args.workers), indent=1))
        return 0
    table = compile_all(jobs(), args.workers)
    print(markdown(table))
    if args.write:
        write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
