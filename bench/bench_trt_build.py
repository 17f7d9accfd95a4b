"""TensorRT for RTX engine builds on a CPU (no GPU): seconds and plan size per graph.

Builds with `wan_rt.build.build_engines` exactly as `wan-rt build --backend trt --trt-targets
sm89` does, for the tiny preset and for the 6-layer x 512 two-expert config of
bench_cpu_e2e.py (128x128x17, 512 text tokens), at bf16 (every component) and fp8 (the DiTs,
after calibration). Each graph's time is split into the ONNX export (the reference, measured in
the same build: the same export the ONNX Runtime backend does) and the TensorRT part (Q/DQ
insertion for fp8, parse, build, layer report).

    python bench/bench_trt_build.py --json bench/trt_build.json
    python bench/bench_trt_build.py --tiny                      # the tiny preset only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_e2e import bench_spec  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402


def record_graph_times(graphs: list[tuple[str, float]], exports: list[float]):
    """Wrap trt_build.build_graph and onnx_export.export_onnx (looked up at call time by
    build.py and trt_build) so each graph's total and export seconds are recorded, in order."""
    import wan_rt.export.onnx_export as onnx_export
    import wan_rt.export.trt_build as trt_build

    build_graph, export_onnx = trt_build.build_graph, onnx_export.export_onnx

    def timed_build_graph(module, gspec, *args, **kwargs):
        start = time.perf_counter()
        files = build_graph(module, gspec, *args, **kwargs)
        graphs.append((f"{gspec.component}/{gspec.graph}", time.perf_counter() - start))
        return files

    def timed_export(*args, **kwargs):
        start = time.perf_counter()
        files = export_onnx(*args, **kwargs)
        exports.append(time.perf_counter() - start)
        return files

    trt_build.build_graph, onnx_export.export_onnx = timed_build_graph, timed_export
    return lambda: setattr(trt_build, "build_graph", build_graph) or setattr(onnx_export, "export_onnx", export_onnx)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny preset only")
    p.add_argument("--targets", default="sm89")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from wan_rt.build import build_engines
    from wan_rt.export.trt_build import BuildConfig
    from wan_rt.runtime.backends import trt_lib
    from wan_rt.tiny import write_tiny_checkpoint

    lib = trt_lib.require()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wan_rt_trt_bench_"))
    configs = {"tiny-t2v-A14B": ("tiny-t2v-A14B", None)}
    if not args.tiny:
        spec = bench_spec(False)
        ckpt = work / "checkpoint"
        if not (ckpt / "model_index.json").is_file():
            write_tiny_checkpoint(spec, ckpt)
        configs[spec.name] = (str(ckpt), (spec.height, spec.width, spec.num_frames))
    targets = trt_lib.parse_targets(args.targets)
    rows = []
    for label, (model, size) in configs.items():
        for precision, components in (("bf16", None), ("fp8", ["dit_high_noise", "dit_low_noise"])):
            graphs: list[tuple[str, float]] = []
            exports: list[float] = []
            restore = record_graph_times(graphs, exports)
            folder = work / f"engines-{label}-{precision}"
            height, width, frames = size or (None, None, None)
            start = time.perf_counter()
            build_engines(model, "trt", folder, precision=precision, components=components, height=height,
                          width=width, frames=frames, device="cpu", force=True,
                          trt_config=BuildConfig(targets=targets), log=lambda s: None)
            total = time.perf_counter() - start
            restore()
            for (graph, build_s), export_s in zip(graphs, exports, strict=True):
                plan = folder / graph / "model.plan"
                rows.append({"config": label, "precision": precision, "graph": graph, "build_s": build_s,
                             "export_s": export_s, "tensorrt_s": build_s - export_s,
                             "tensorrt_vs_export": (build_s - export_s) / export_s,
                             "plan_mb": plan.stat().st_size / 2**20})
            rows.append({"config": label, "precision": precision, "graph": "(all, incl. calibration)",
                         "build_s": total})
    print(f"{lib.title} {lib.version}, targets {','.join(targets)}, CPU only, torch threads {torch.get_num_threads()}")
    print_table(rows, ["config", "precision", "graph", "build_s", "export_s", "tensorrt_s", "tensorrt_vs_export",
                       "plan_mb"])
    write_json(args.json, {"benchmark": "trt_build", "environment": {**environment(), lib.name: lib.version},
                           "command": " ".join(sys.argv), "targets": list(targets), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
