"""Reading bench/gpu_check.py's stage results: each stage's verdict, summary.md, the short table
printed last, and folding a GPU run's files into bench/RESULTS.md.

Ratios are always against a reference measured in the same run: diffusers' WanTransformer3DModel
on the same random weights for the DiT stages, torch SDPA (flash backend) for the attention
kernels, eager conv3d for the causal conv, wan_rt eager for the end-to-end run. "×" > 1 means
faster than the reference.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

DIT_STAGES = ("dit_a14b", "dit_ti2v", "aoti")


# ------------------------------------------------------------------------------------ helpers
def _num(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-2)):
        return f"{v:.2e}" if abs(v) < 1e-2 else f"{v:,.0f}"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def _ratio(ref: Optional[float], value: Optional[float]) -> Optional[float]:
    """How many times faster `value` (a time) is than `ref`."""
    return ref / value if ref and value else None


def _x(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _last_error(log_tail: str) -> str:
    lines = [ln.strip() for ln in (log_tail or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or ln.startswith("FAILED"):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------------------ tests
def read_junit(path: Path) -> Optional[dict]:
    """pytest's junit XML -> counts, failures (test, first line) and skip reasons (reason: count)."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    out: dict = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            out["failed" if bad.tag == "failure" else "errors"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "").splitlines()[0][:300]
                                    if bad.get("message") else ""})
        elif skipped is not None:
            out["skipped"] += 1
            reason = (skipped.get("message") or "").removeprefix("Skipped: ")[:200]
            out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    return out


# ------------------------------------------------------------------------------------ verdicts
def judge(stage: str, result: dict, smoke: bool) -> tuple[str, str]:
    """(status, one-line note): ok | failed | timeout | skipped."""
    data = result.get("result")
    if stage == "tests":
        return _judge_tests(result, data)
    if result.get("timed_out"):
        return "timeout", f"killed at its {result['timeout_s']} s limit" + (
            "; partial results kept" if data else "")
    rows = _rows(stage, data)
    broken = [r for r in rows if "error" in r]
    if broken:
        return "failed", f"{broken[0]['variant']}: {broken[0]['error']}"
    if result.get("returncode") != 0:
        return "failed", f"exit {result.get('returncode')}: {_last_error(result.get('log_tail', ''))}"
    if data is None:
        return "failed", "wrote no JSON"
    note = NOTES[stage](data, smoke)
    if stage == "aoti" and not smoke:
        aoti = next((r for r in rows if r.get("variant") == "aoti"), {})
        if not aoti.get("cuda_graph_replays"):
            return "failed", "the packages ran, but no call was a CUDA-graph replay; " + note
    return "ok", note


def _judge_tests(result: dict, data: Optional[dict]) -> tuple[str, str]:
    if result.get("timed_out"):
        return "timeout", f"killed at its {result['timeout_s']} s limit"
    if data is None:
        return "failed", f"exit {result.get('returncode')}, no junit report: {_last_error(result.get('log_tail', ''))}"
    reasons = "; ".join(f"{n}× {r}" for r, n in data["skip_reasons"].items())
    if data["failed"] or data["errors"]:
        names = ", ".join(f["test"].rsplit("::", 1)[-1] for f in data["failures"][:4])
        return "failed", f"{data['failed']} failed, {data['errors']} errors ({names}); {data['passed']} passed"
    if not data["passed"]:
        if data["skipped"]:
            return "skipped", f"all {data['skipped']} skipped: {reasons}"
        return "failed", "no test marked gpu ran"
    return "ok", f"{data['passed']} passed, {data['skipped']} skipped" + (f" ({reasons})" if reasons else "")


def _rows(stage: str, data: Optional[dict]) -> list[dict]:
    if not data:
        return []
    if stage in DIT_STAGES:
        return [r for sc in data.get("scenarios", []) for r in sc.get("rows", [])]
    if stage == "e2e":
        return data.get("rows", [])
    return []


def _cpu(smoke: bool) -> str:
    return " (CPU smoke: numbers mean nothing)" if smoke else ""


def _note_machine(data: dict, smoke: bool) -> str:
    c = data.get("ceilings", {})
    gpu = data.get("environment", {}).get("gpu") or "no GPU"
    return f"{gpu}: copy {_num(c.get('copy_gbps'), 0)} GB/s, GEMM {_num(c.get('gemm_tflops'))} TFLOP/s{_cpu(smoke)}"


def _note_kernels(data: dict, smoke: bool) -> str:
    att = kernel_rows(data)
    if not att:
        return f"{len(data.get('records', []))} records{_cpu(smoke)}"
    big = max(att, key=lambda r: r["tokens"])
    return (f"{big['case']}: triton {_num(big['triton_tflops'])} TFLOP/s = {_x(big['vs_flash'])} flash, "
            f"int8 {_num(big['int8_tflops'])} = {_x(big['int8_vs_flash'])}{_cpu(smoke)}")


def _note_dit(data: dict, smoke: bool) -> str:
    notes = []
    for sc in data.get("scenarios", []):
        rows = dit_rows(sc)
        ref = next((r for r in rows if r["variant"] == "diffusers"), None)
        best = min((r for r in rows if r["variant"] not in ("diffusers", "eager")),
                   key=lambda r: r["est_ms"] or float("inf"), default=None)
        if best is None:
            continue
        versus = f" = {_x(best['vs_diffusers'])} diffusers ({_num(ref['est_ms'], 0)} ms)" if ref else " (no diffusers)"
        replays = f", {best['replays']} graph replays" if best.get("replays") is not None else ""
        notes.append(f"{sc['name']} {sc['tokens']} tok: {best['variant']} {_num(best['est_ms'], 0)} ms est.{versus}"
                     f"{replays}")
    notes += [f"{variant} skipped: {why}" for variant, why in data.get("skipped", {}).items()]
    return ("; ".join(notes) or "no rows") + _cpu(smoke)


def _note_e2e(data: dict, smoke: bool) -> str:
    rows = [r for r in data.get("rows", []) if "error" not in r]
    parts = [f"{r['variant']} {r['measured_total_ms'] / 1e3:.1f} s (swap stall {r['stages_ms'].get('swap_stall', 0):.0f} ms)"
             for r in rows]
    req = data.get("request", {})
    depth = f", {req.get('layers')} of {req.get('full_layers')} blocks" if req.get("layers") != req.get("full_layers") else ""
    return ", ".join(parts) + depth + _cpu(smoke)


NOTES = {"machine": _note_machine, "kernels": _note_kernels, "dit_a14b": _note_dit, "dit_ti2v": _note_dit,
         "aoti": _note_dit, "e2e": _note_e2e}


# ------------------------------------------------------------------------------------ tables
def kernel_rows(data: dict) -> list[dict]:
    """One row per attention case: every implementation side by side, ratios vs SDPA flash."""
    by_case: dict[str, dict] = {}
    for r in data.get("records", []):
        if r["kernel"] != "rope3d_attention":
            continue
        row = by_case.setdefault(r["case"], {"case": r["case"], "dtype": r["dtype"],
                                             "tokens": int(r["case"].split()[0].removeprefix("L="))})
        row[f"{r['impl']}_ms"], row[f"{r['impl']}_tflops"] = r["ms_p50"], r["tflops"]
    for row in by_case.values():
        row["triton_tflops"], row["int8_tflops"] = row.get("triton_tflops"), row.get("triton_int8_tflops")
        flash = row.get("sdpa_flash_no_rope_ms")
        row["vs_flash"] = _ratio(flash, row.get("triton_ms"))
        row["int8_vs_flash"] = _ratio(flash, row.get("triton_int8_ms"))
    return list(by_case.values())


def conv_rows(data: dict) -> list[dict]:
    by_case: dict[str, dict] = {}
    for r in data.get("records", []):
        if r["kernel"] == "causal_conv3d":
            row = by_case.setdefault(r["case"], {"case": r["case"]})
            row[f"{r['impl']}_ms"], row[f"{r['impl']}_gbps"] = r["ms_p50"], r["gbps"]
    for row in by_case.values():
        row["vs_conv3d"] = _ratio(row.get("eager_conv3d_ms"), row.get("triton_ms"))
    return list(by_case.values())


def dit_rows(scenario: dict) -> list[dict]:
    ref = next((r.get("est_forward_ms") for r in scenario.get("rows", []) if r.get("variant") == "diffusers"), None)
    out = []
    for r in scenario.get("rows", []):
        out.append({"variant": r.get("variant"), "est_ms": r.get("est_forward_ms"), "tflops": r.get("est_tflops"),
                    "vs_diffusers": _ratio(ref, r.get("est_forward_ms")), "block_ms": r.get("block_ms"),
                    "err": r.get("block_rel_l2_vs_eager"), "ratio32": r.get("ratio_vs_eager_bf16"),
                    "replays": r.get("cuda_graph_replays"), "warmup_s": r.get("warmup_s"),
                    "description": r.get("error") and f"FAILED: {r['error']}" or r.get("description", "")})
    return out


def _section_kernels(data: dict) -> str:
    att = kernel_rows(data)
    text = ["## Attention and conv kernels (reference: torch SDPA, flash backend, same run)", "",
            "SDPA flash gets no RoPE (the floor the fused kernel competes with); eager = rope + SDPA as the "
            "model runs without the kernels. TFLOP/s = 4·H·L²·D / time.", "",
            _table(["case", "dtype", "triton ms", "TFLOP/s", "int8 ms", "TOPS", "flash ms", "TFLOP/s",
                    "triton vs flash", "int8 vs flash", "eager rope+SDPA ms"],
                   [[r["case"], r["dtype"], _num(r.get("triton_ms"), 2), _num(r.get("triton_tflops")),
                     _num(r.get("triton_int8_ms"), 2), _num(r.get("int8_tflops")),
                     _num(r.get("sdpa_flash_no_rope_ms"), 2), _num(r.get("sdpa_flash_no_rope_tflops")),
                     _x(r["vs_flash"]), _x(r["int8_vs_flash"]), _num(r.get("eager_rope_sdpa_ms"), 2)] for r in att])]
    conv = conv_rows(data)
    if conv:
        text += ["", _table(["causal conv case", "triton ms", "GB/s", "conv3d ms", "GB/s", "triton vs conv3d"],
                            [[r["case"], _num(r.get("triton_ms"), 3), _num(r.get("triton_gbps"), 0),
                              _num(r.get("eager_conv3d_ms"), 3), _num(r.get("eager_conv3d_gbps"), 0),
                              _x(r["vs_conv3d"])] for r in conv])]
    return "\n".join(text)


def _section_dit(title: str, data: dict) -> str:
    text = []
    for sc in data.get("scenarios", []):
        w, h, f = sc.get("size", ["?"] * 3)
        flops = sc.get("flops", {}).get("total", 0) / 1e12
        text += [f"## {title}: {sc['name']} at {w}x{h}x{f} ({sc.get('tokens')} tokens, batch {sc.get('batch')})", "",
                 f"EXTRAPOLATED: a 2-block probe at full width is timed (block 0 plays a bf16-kept block, block 1 "
                 f"a quantized one); forward = embeddings + head + {sc.get('num_layers')} × block "
                 f"({flops:,.1f} TFLOP per forward). Random weights shared by every variant; reference: diffusers "
                 f"WanTransformer3DModel in the same run. Error: relative L2 of one block's output vs wan_rt "
                 f"eager; ratio = error vs fp32 over eager bf16's own.", "",
                 _table(["variant", "est. forward ms", "TFLOP/s", "vs diffusers", "block ms", "err vs eager",
                         "ratio vs eager", "graph replays", "first call s", "what"],
                        [[r["variant"], _num(r["est_ms"], 1), _num(r["tflops"]), _x(r["vs_diffusers"]),
                          _num(r["block_ms"], 2), _num(r["err"]), _num(r["ratio32"], 2), _num(r["replays"]),
                          _num(r["warmup_s"]), r["description"]] for r in dit_rows(sc)]), ""]
    return "\n".join(text).rstrip()


def _section_e2e(data: dict) -> str:
    req, rows = data.get("request", {}), data.get("rows", [])
    spec = data.get("spec", {}).get("name", "?")
    reduced = req.get("layers") != req.get("full_layers")
    stages = list(dict.fromkeys(k for r in rows for k in r.get("stages_ms", {})))
    ref = next((r.get("measured_total_ms") for r in rows if r.get("variant") == "eager"), None)
    title = (f"## End to end: {spec} at {req.get('width')}x{req.get('height')}x{req.get('frames')} "
             f"({req.get('tokens')} tokens, CFG batch 2)"
             + (f", REDUCED DEPTH {req.get('layers')} of {req.get('full_layers')} blocks per expert" if reduced else ""))
    body = [title, "",
            f"{req.get('steps_measured')} steps measured {req.get('steps_per_stage_measured')}; "
            f"{'one expert resident at a time (the swap is forced); ' if req.get('one_expert_resident') else ''}"
            f"reference: wan_rt eager in the same run. Last column: {data.get('extrapolated', '')}.", "",
            _table(["variant", *[f"{s} ms" for s in stages], "total ms", "vs eager",
                    f"EXTRAPOLATED s ({req.get('steps_default')} steps{', full depth' if reduced else ''})", "what"],
                   [[r["variant"], *[_num(r.get("stages_ms", {}).get(s), 1) for s in stages],
                     _num(r.get("measured_total_ms"), 0), _x(_ratio(ref, r.get("measured_total_ms"))),
                     _num(r.get("extrapolated_total_s")),
                     f"FAILED: {r['error']}" if "error" in r else r.get("description", "")] for r in rows])]
    return "\n".join(body)


def _section_tests(data: dict) -> str:
    lines = ["## Tests (pytest -m gpu)", "",
             f"{data['passed']} passed, {data['failed']} failed, {data['errors']} errors, {data['skipped']} skipped."]
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in data["failures"]]
    lines += [f"- skipped ×{n}: {r}" for r, n in data["skip_reasons"].items()]
    return "\n".join(lines)


def render_summary(record: dict) -> str:
    stages = {s["name"]: s for s in record.get("stages", [])}
    machine = (stages.get("machine") or {}).get("result") or {}
    env, ceil = machine.get("environment", {}), machine.get("ceilings", {})
    smoke = record.get("mode") == "cpu-smoke"
    out = [f"# wan_rt GPU check, {record.get('date', '')}", ""]
    if smoke:
        out += ["**CPU SMOKE RUN**: tiny models on the CPU, Triton interpreted, FP8 emulated. It checks that "
                "every stage runs; no number below means anything about speed.", ""]
    out += [f"Machine: {env.get('gpu') or 'no GPU'} ({machine.get('nvidia_smi') or 'no nvidia-smi'}); torch "
            f"{env.get('torch')}, triton {env.get('triton')}, diffusers {env.get('diffusers')}, Python "
            f"{env.get('python')}, {env.get('cpu_count')} CPUs.",
            f"Ceilings measured in this run: device copy {_num(ceil.get('copy_gbps'), 0)} GB/s (read + write), "
            f"GEMM {ceil.get('gemm', '')} {_num(ceil.get('gemm_tflops'))} TFLOP/s.",
            f"Command: `bash bench/gpu_check.sh {' '.join(record.get('argv', []))}`; budget {record.get('budget_s')} s, "
            f"wall {record.get('wall_s', 0)} s; wheels installed: {', '.join(record.get('install', {}).get('wheels', [])) or 'none'}.",
            *([f"**Wheel install FAILED** (so some stages lack what they need): "
               f"{record['install'].get('error', '').splitlines()[-1:]}"] if not record.get("install", {}).get("ok", True)
              else []),
            "", "## Stages", "",
            _table(["stage", "status", "s", "limit s", "note"],
                   [[s["name"], s["status"], _num(s.get("seconds")), s.get("timeout_s", "—"), s.get("note", "")]
                    for s in record.get("stages", [])])]
    sections = [("tests", _section_tests), ("kernels", _section_kernels),
                ("dit_a14b", lambda d: _section_dit("DiT forward", d)),
                ("dit_ti2v", lambda d: _section_dit("DiT forward", d)),
                ("aoti", lambda d: _section_dit("AOTInductor packages + CUDA-graph replay", d)),
                ("e2e", _section_e2e)]
    for name, render in sections:
        data = (stages.get(name) or {}).get("result")
        if data:
            out += ["", render(data)]
    return "\n".join(out) + "\n"


def short_table(record: dict) -> str:
    rows = [(s["name"], s["status"], f"{s.get('seconds', 0):.0f}", s.get("note", "")) for s in record["stages"]]
    head = ("stage", "status", "s", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, rows)])


# ------------------------------------------------------------------------------------ fold
def fold(folder: Path, bench: Path) -> int:
    """Append a GPU run's summary.md to bench/RESULTS.md and keep its JSON beside it."""
    src = folder / "gpu_check.json"
    if not src.is_file() or not (folder / "summary.md").is_file():
        print(f"error: {folder} holds no gpu_check.json and summary.md (the files of a gpu_check run)")
        return 2
    record = json.loads(src.read_text())
    if record.get("mode") != "gpu":
        print(f"error: {folder} holds a {record.get('mode')} run, not GPU figures: nothing to fold")
        return 2
    date = record["date"][:10]
    dest = bench / f"gpu_check_{date}.json"
    n = 2
    while dest.exists():
        dest, n = bench / f"gpu_check_{date}_{n}.json", n + 1
    shutil.copyfile(src, dest)
    summary = (folder / "summary.md").read_text().splitlines()
    body = "\n".join(("#" + ln if ln.startswith("## ") else ln) for ln in summary[1:]).strip()
    section = (f"\n## GPU check of {date} (bench/gpu_check.sh)\n\nRaw JSON: `{dest.name}`; logs were in the run's "
               f"gpu_check.log.\n\n{body}\n")
    with open(bench / "RESULTS.md", "a") as f:
        f.write(section)
    print(f"appended the {date} GPU check to {bench / 'RESULTS.md'} and copied its JSON to {dest}; "
          "now update the 'GPU figures still owed' list by hand")
    return 0
