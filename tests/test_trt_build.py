"""Real TensorRT engines, built by TensorRT for RTX on this machine (no GPU needed to build).

One session fixture builds each (model, precision) once, by `wan_rt.build.build_engines` as
`wan-rt build --backend trt --trt-targets sm89` does: tiny-t2v-A14B at every precision (the
DiTs at fp8 and int8, calibrated and Q/DQ-quantized like the ONNX Runtime builds), the two other
presets at bf16. Graphs another build already holds are not built twice: the VAE is float32 at
every precision and umT5 float32 at fp16, so only the bf16 builds have them.

Checked here: every graph of all three models builds; manifests record the library, its version
and the targets; TensorRT for RTX's own check finds the plans' headers well formed; the per-layer
report shows each build's precision, and the fp8/int8 DiTs hold quantized GEMMs exactly where
wan_rt/precision.py says; rebuilding is a no-op; `wan-rt run` refuses in one line without an RTX
GPU. Running the engines needs an RTX GPU: `test_built_engines_match_eager` is skipped elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wan_rt.runtime.backends import trt as trt_backend
from wan_rt.runtime.backends import trt_lib

RTX_GPU = "needs an RTX-class GPU (SM75-SM121 except SM90/SM100)"
DITS = ["dit_high_noise", "dit_low_noise"]
# (model, precision) -> components to build (None: all).
BUILDS = {
    ("tiny-t2v-A14B", "bf16"): None,
    ("tiny-t2v-A14B", "fp32"): ["text_encoder", *DITS],
    ("tiny-t2v-A14B", "fp16"): DITS,
    ("tiny-t2v-A14B", "fp8"): DITS,
    ("tiny-t2v-A14B", "int8"): DITS,
    ("tiny-i2v-A14B", "bf16"): None,
    ("tiny-ti2v-5B", "bf16"): None,
}


def _rtx_gpu() -> str | None:
    """The compute capability of an RTX GPU TensorRT for RTX runs on here, else None."""
    lib, gpu = trt_lib.load_library("tensorrt_rtx"), trt_lib.gpu_target()
    return gpu if lib is not None and gpu is not None and lib.runs_on(gpu) else None


TARGETS = (_rtx_gpu() or "sm89",)

pytestmark = pytest.mark.skipif(trt_lib.load_library("tensorrt_rtx") is None,
                                reason="needs tensorrt_rtx (pip install 'wan-rt[trt-rtx]')")


@pytest.fixture(scope="session")
def trt_engines(tmp_path_factory):
    """trt_engines(model, precision) -> engines dir, built on first use (each session its own)."""
    from wan_rt.build import build_engines
    from wan_rt.export.trt_build import BuildConfig

    built: dict[tuple[str, str], Path] = {}

    def build(model: str, precision: str) -> Path:
        key = (model, precision)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"trt-{model}-{precision}")
            build_engines(model, "trt", folder, precision=precision, components=BUILDS[key],
                          trt_config=BuildConfig(targets=TARGETS), log=lambda s: None)
            built[key] = folder
        return built[key]

    # Whatever else is installed, these are TensorRT for RTX builds.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(trt_lib.LIBRARY_ENV, "tensorrt_rtx")
        trt_lib.active.cache_clear()
        yield build
    trt_lib.active.cache_clear()


def _manifests(folder: Path) -> dict:
    from wan_rt.runtime.engines_dir import EngineManifest

    index = json.loads((folder / "engines.json").read_text())
    return {c: EngineManifest.read(folder / c) for c in index["components"]}


def _reports(folder: Path, component: str) -> dict[str, dict]:
    from wan_rt.runtime.graphs import graph_names

    return {g: json.loads((folder / component / g / "layers.json").read_text()) for g in graph_names(component)}


# ------------------------------------------------------------------------------------ builds
@pytest.mark.parametrize("model,precision", list(BUILDS))
def test_every_graph_builds(trt_engines, model, precision):
    from wan_rt.config import get_spec
    from wan_rt.runtime.graphs import components_of, graph_names

    folder = trt_engines(model, precision)
    manifests = _manifests(folder)
    assert list(manifests) == (BUILDS[model, precision] or list(components_of(get_spec(model))))
    lib = trt_lib.load_library("tensorrt_rtx")
    runtime = lib.module.Runtime(lib.module.Logger(lib.module.Logger.ERROR))
    malformed = int(lib.module.EngineInvalidityDiagnostics.MALFORMED_ENGINE)
    for name, m in manifests.items():
        assert m.backend == "trt" and m.precision == precision
        assert m.tool_versions["trt_library"] == "tensorrt_rtx" and m.tool_versions["trt_version"] == lib.version
        assert m.build_args["trt"]["targets"] == list(TARGETS)
        assert set(m.graphs) == set(graph_names(name))
        for g, entry in m.graphs.items():
            assert f"{g}/model.plan" in entry["files"] and f"{g}/layers.json" in entry["files"]
            plan = (folder / name / g / "model.plan").read_bytes()
            assert len(plan) > 100_000, (name, g, len(plan))
            # TensorRT for RTX's own plan-header check: with no GPU it cannot say VALID, but it
            # flags a malformed header (it reads the header only: a truncated body passes).
            _, diagnostics = runtime.get_engine_validity(plan)
            assert not diagnostics & malformed, (name, g)
            assert runtime.get_engine_validity(bytes(len(plan)))[1] & malformed, "the check has teeth"
    assert (folder / "timing.cache").exists() == lib.has_timing_cache  # TensorRT for RTX times nothing


@pytest.mark.parametrize("precision,dtype", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_layers_run_in_the_precision_built(trt_engines, precision, dtype):
    """The DiT blocks' GEMMs run in the build's dtype (the export's dtype reached TensorRT), and no
    layer of an unquantized build is fp8 or int8."""
    folder = trt_engines("tiny-t2v-A14B", precision)
    for component in _manifests(folder):
        for g, report in _reports(folder, component).items():
            assert not {"fp8", "int8"} & set(report["gemms"]), (component, g, report["gemms"])
            if component.startswith("dit"):
                # main: every block's linears (the time embedder stays fp32 by diffusers' policy);
                # text: the text embedder and every block's cross-attention K/V projections.
                gemms = [r for r in report["layers"] if r["type"] == "MATRIX_MULTIPLY" and "weight" in r
                         and (g == "text" or "/blocks." in r["name"])]
                assert gemms and {r["precision"] for r in gemms} == {dtype}, (component, g)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_dits_follow_the_precision_table(trt_engines, precision):
    """In TensorRT's network of each fp8/int8 DiT graph, a linear layer's GEMM is quantized
    exactly when wan_rt/precision.py does not keep it high precision; every linear of the
    expert is in one of its two graphs, so none escapes the check."""
    from wan_rt.config import get_spec
    from wan_rt.models import load_dit
    from wan_rt.precision import keep_reason
    from wan_rt.resolve import resolve_checkpoint

    spec = get_spec("tiny-t2v-A14B")
    folder = trt_engines("tiny-t2v-A14B", precision)
    dit = load_dit(resolve_checkpoint("tiny-t2v-A14B").files, "dit_high_noise", dtype=torch.float32)
    linears = {name for name, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    for component in DITS:
        seen: dict[str, str] = {}
        for g, report in _reports(folder, component).items():
            weighted = [r for r in report["layers"] if r["type"] == "MATRIX_MULTIPLY" and "weight" in r]
            assert all("module" in r for r in weighted), [r["weight"] for r in weighted if "module" not in r]
            for r in weighted:
                seen[r["module"]] = r["precision"]
        quantized = {m for m, p in seen.items() if p == precision}
        kept = {m: p for m, p in seen.items() if p != precision}
        assert quantized and kept, seen
        assert linears <= set(seen), f"linear layers in no graph: {sorted(linears - set(seen))}"
        for module in quantized:
            assert keep_reason(module, spec.dit.num_layers) is None, f"{module} is {precision}, precision.py keeps it"
        for module, p in kept.items():
            assert keep_reason(module, spec.dit.num_layers) is not None, f"{module} is {p}, not {precision}"
            assert p in ("bf16", "fp32"), (module, p)


def test_a_second_build_is_a_no_op(trt_engines):
    from wan_rt.build import build_engines
    from wan_rt.export.trt_build import BuildConfig

    folder = trt_engines("tiny-t2v-A14B", "bf16")
    plans = sorted(folder.glob("*/*/model.plan"))
    stamps = [p.stat().st_mtime_ns for p in plans]
    lines: list[str] = []
    build_engines("tiny-t2v-A14B", "trt", folder, precision="bf16", trt_config=BuildConfig(targets=TARGETS),
                  log=lines.append)
    assert lines and all("up to date" in line for line in lines), lines
    assert [p.stat().st_mtime_ns for p in plans] == stamps


# ------------------------------------------------------------------------------------ running
@pytest.mark.skipif(_rtx_gpu() is not None, reason="checks the refusal where no RTX GPU is present")
def test_run_refuses_in_one_line_without_an_rtx_gpu(trt_engines, tmp_path, capsys):
    from wan_rt.cli import main

    folder = trt_engines("tiny-t2v-A14B", "bf16")
    out = tmp_path / "out.mp4"
    assert main(["run", "--engines-dir", str(folder), "--output", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("wan-rt run: error: engine for text_encoder cannot run here: ")
    if trt_lib.gpu_target() is None:
        assert f"needs an RTX GPU (SM75-SM121 except SM90/SM100): its plans are for {TARGETS[0]} (trt_targets)" \
               in lines[0]
    assert not out.exists()
    # `wan-rt build` of the same (nothing to rebuild) does not end with "run them with".
    args = ["build", "--model", "tiny-t2v-A14B", "--backend", "trt", "--trt-targets", TARGETS[0], "--engines-dir",
            str(folder)]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "components ready" in last and "they cannot run on this machine (needs an RTX GPU" in last, last


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(_rtx_gpu() is None, reason=RTX_GPU)
def test_built_engines_match_eager(trt_engines):
    """Every graph of the bf16 tiny-t2v-A14B engines against the eager oracle, by the style rule:
    TensorRT's error against fp32 eager at most 2x plain bf16 PyTorch's (VAE: fp32 both); then
    the expert swap through unloaded weights and the runtime cache file. Written against the
    installed bindings; never run (no RTX GPU so far)."""
    from wan_rt.metrics import relative_error
    from wan_rt.models import load_component
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.engines import load_engine_components
    from wan_rt.runtime.graphs import ShapeProfile, graph_module, graph_names, graph_spec, sample_inputs

    folder = trt_engines("tiny-t2v-A14B", "bf16")
    resolved = resolve_checkpoint("tiny-t2v-A14B")
    spec, cuda = resolved.spec, torch.device("cuda")
    manifests = _manifests(folder)
    for name, m in manifests.items():
        profile = ShapeProfile(**m.profile)
        ref32 = load_component(resolved.files, name, dtype=torch.float32, device=cuda)
        low = load_component(resolved.files, name, dtype=torch.bfloat16, device=cuda) if not name.startswith("vae") \
            else ref32
        dtype = torch.float32 if name.startswith("vae") else torch.bfloat16
        for g in graph_names(name):
            gspec = graph_spec(spec, name, g)
            runner = trt_backend.load_graph(folder / name, gspec, m.graphs[g]["files"], compute_dtype=dtype,
                                            device=cuda)
            inputs = sample_inputs(gspec, profile.opt, torch.float32, cuda)
            cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
            with torch.inference_mode():
                want = graph_module(name, g, ref32)(*(inputs[n] for n in gspec.input_names))
                plain = graph_module(name, g, low)(*(cast[n] for n in gspec.input_names))
            want, plain = (want if isinstance(want, tuple) else (want,)), (plain if isinstance(plain, tuple) else (plain,))
            got = runner(cast)
            for k, out in enumerate(gspec.output_names):
                ours, base = relative_error(got[out].float(), want[k].float()), relative_error(plain[k].float(),
                                                                                             want[k].float())
                assert ours <= 2 * base + 1e-5, f"{name}/{g}/{out}: TensorRT {ours:.2e}, bf16 PyTorch {base:.2e}"
    assert (folder / trt_lib.RUNTIME_CACHE).is_file(), "kernels compiled at run time were saved"

    components = load_engine_components(folder, resolved, cuda, names=DITS)
    expert = components["dit_high_noise"]
    expert.load()
    assert expert.main.swaps_weights
    expert.unload()
    assert not expert.main.engine.weights_loaded
    expert.stage()
    expert.load()
    assert expert.main.engine.weights_loaded
