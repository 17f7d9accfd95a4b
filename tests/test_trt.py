"""TensorRT backend, unit level: the library seam (trt_lib.py), the build side's pure parts
(export/trt_build.py) and the run side's bookkeeping (trt_engine.py). Real engine builds with
TensorRT for RTX are in tests/test_trt_build.py.

What is real and what is a stand-in:
* mypy checks the four TensorRT modules against stubs generated from the installed tensorrt_rtx
  (and the shared code again against tensorrt-stubs), with wrong snippets proving both bite;
* targets, precision refusals, the layer report and parse errors use the real tensorrt_rtx
  (Builder, OnnxParser, networks: none of these needs a GPU);
* the runtime needs a deserialized engine, which needs a CUDA driver: `ICudaEngine` and
  `IExecutionContext` are stand-ins (`_FakeEngine`), everything around them (enums, the library
  seam, the runtime cache, weight swapping through DiTComponent and the residency manager) real.
"""

from __future__ import annotations

import ctypes
import types
from pathlib import Path

import pytest
import torch

import wan_rt.export
import wan_rt.runtime.backends as backends
from wan_rt.config import get_spec
from wan_rt.runtime.backends import trt as trt_backend
from wan_rt.runtime.backends import trt_lib
from wan_rt.runtime.graphs import GraphSpec, ShapeProfile, TensorSpec, _shape_only_vae, graph_spec, shape_profile

SPEC = "tiny-t2v-A14B"
TRT_MODULES = [Path(wan_rt.export.__file__).with_name("trt_build.py"),
               *(Path(backends.__file__).with_name(f) for f in ("trt_lib.py", "trt.py", "trt_engine.py"))]

needs_rtx = pytest.mark.skipif(trt_lib.load_library("tensorrt_rtx") is None,
                               reason="needs tensorrt_rtx (pip install 'wan-rt[trt-rtx]')")


@pytest.fixture
def rtx(monkeypatch):
    """TensorRT for RTX as the active library, whatever this machine would pick."""
    lib = trt_lib.load_library("tensorrt_rtx")
    if lib is None:
        pytest.skip("needs tensorrt_rtx (pip install 'wan-rt[trt-rtx]')")
    monkeypatch.setattr(trt_lib, "active", lambda: lib)
    return lib


# ------------------------------------------------------------------------------------ mypy
@pytest.mark.parametrize("against", ["tensorrt_rtx", "tensorrt"])
def test_trt_modules_type_check(trt_mypy, against):
    report, status = trt_mypy(*TRT_MODULES, against=against)
    assert status == 0, report


def test_trt_type_check_has_teeth(trt_mypy, tmp_path):
    """Wrong calls are caught against tensorrt_rtx, and shared code that uses an RTX-only API is
    caught by the second pass against tensorrt-stubs."""
    bad = tmp_path / "bad_use.py"
    bad.write_text(
        "import tensorrt_rtx as trt\n\n\n"
        "def run(context: trt.IExecutionContext, stream: int) -> bool:\n"
        "    return context.execute_async_v4(stream)\n\n\n"
        "def flags(config: trt.IBuilderConfig) -> None:\n"
        "    config.set_flag(trt.BuilderFlag.REFITTABLE)\n"
        "    config.set_compute_capability('sm89', 0)\n"
    )
    report, status = trt_mypy(bad)
    assert status == 1 and "execute_async_v4" in report and "REFITTABLE" in report, report
    assert "set_compute_capability" in report, report
    shared = tmp_path / "shared_use.py"
    shared.write_text(
        "from wan_rt.runtime.backends.trt_lib import trt\n\n\n"
        "def unload(engine: trt.ICudaEngine) -> bool:\n"
        "    return engine.unload_weights()\n"
    )
    ok, status_rtx = trt_mypy(shared, Path(backends.__file__).with_name("trt_lib.py"))
    report, status = trt_mypy(shared, Path(backends.__file__).with_name("trt_lib.py"), against="tensorrt")
    assert status_rtx == 0, ok
    assert status == 1 and "unload_weights" in report, report


# ------------------------------------------------------------------------------------ profiles
def test_profile_shapes_of_the_dit_and_text_encoder():
    from wan_rt.export.trt_build import profile_shapes

    spec = get_spec(SPEC)
    profile = shape_profile(spec, height=32, width=32, frames=9)  # latent 3 x 4 x 4
    d = spec.dit
    shapes = profile_shapes(graph_spec(spec, "dit_high_noise", "main"), profile)
    assert list(shapes) == ["latents", "timestep", "text_kv"]
    assert shapes["latents"] == ((1, 16, 1, 2, 2), (1, 16, 3, 4, 4), (2, 16, 3, 4, 4))
    assert shapes["timestep"] == ((1,), (1,), (2,))
    kv = (d.num_layers, 2, d.text_len, d.dim)
    assert shapes["text_kv"] == tuple((kv[0], 2, b, kv[2], kv[3]) for b in (1, 1, 2))
    text = profile_shapes(graph_spec(spec, "text_encoder"), profile)
    assert text["input_ids"] == ((1, d.text_len), (1, d.text_len), (2, d.text_len))


def test_profile_shapes_of_the_vae_caches_match_the_vae():
    """k*h / k*w cache dims, resolved from the profile's latent sizes, are the VAE's own cache shapes."""
    from wan_rt.export.trt_build import profile_shapes

    spec = get_spec(SPEC)
    profile = shape_profile(spec, height=32, width=48, frames=9)
    vae = _shape_only_vae(spec)
    shapes = profile_shapes(graph_spec(spec, "vae_decoder", "step"), profile)
    caches = [n for n in shapes if n.startswith("cache_in_")]
    assert caches and len(caches) == len(vae.decoder_cache_shapes(1, 1))
    for k, which in enumerate(("min", "opt", "max")):
        sizes = getattr(profile, which)
        want = vae.decoder_cache_shapes(sizes["h"], sizes["w"])
        for name, slot in zip(caches, want):
            assert shapes[name][k] == (sizes["B"], *slot), (name, which)
    assert shapes["latents"][2] == (2, spec.vae.z_dim, 1, 4, 6)


def test_profile_shapes_refuse_an_inverted_profile():
    from wan_rt.export.trt_build import profile_shapes

    gspec = GraphSpec("dit", "main", (TensorSpec("x", "compute", ("B", "L")),), ())
    bad = ShapeProfile(min={"B": 1, "L": 8}, opt={"B": 1, "L": 4}, max={"B": 2, "L": 8})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes(gspec, bad)


# ------------------------------------------------------------------------------------ libraries and targets
def test_parse_targets():
    assert trt_lib.parse_targets("sm120, SM89,89,8.9") == ("sm89", "sm120")
    for bad in ("ampere", ","):
        with pytest.raises(ValueError, match="--trt-targets"):
            trt_lib.parse_targets(bad)


def test_tensorrt_stubs_alone_are_not_a_tensorrt_library():
    """tensorrt-stubs installs an empty `tensorrt` namespace package: `import tensorrt` works."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("needs tensorrt-stubs (the test extra) installed without TensorRT")
    module = importlib.import_module("tensorrt")
    if hasattr(module, "Builder"):
        pytest.skip("a real TensorRT is installed here")
    assert trt_lib.load_library("tensorrt") is None


@needs_rtx
def test_rtx_targets_are_its_compute_capabilities():
    lib = trt_lib.load_library("tensorrt_rtx")
    assert lib.targets == ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")  # TensorRT for RTX 1.7
    assert lib.build_targets(("sm89", "sm120"), gpu=None) == ("sm89", "sm120")
    assert lib.build_targets((), gpu="sm89") == ("sm89",)
    with pytest.raises(ValueError, match=r"^--trt-targets is required without a GPU: .*sm89,sm120"):
        lib.build_targets((), gpu=None)
    with pytest.raises(ValueError, match=r"cannot build for sm90: .*SM75-SM121 except SM90/SM100"):
        lib.build_targets(("sm90",), gpu=None)
    assert not lib.runs_on("sm90") and not lib.runs_on("sm100") and lib.runs_on("sm120")


def test_tensorrt_builds_for_the_gpu_present_only():
    lib = trt_lib.TensorRT(types.SimpleNamespace(__version__="10.13.0.35"))
    assert lib.build_targets((), gpu="sm90") == ("sm90",)
    with pytest.raises(ValueError, match="this machine has none; TensorRT for RTX builds without one"):
        lib.build_targets((), gpu=None)
    with pytest.raises(ValueError, match=r"for the GPU present \(sm90\), not --trt-targets sm89"):
        lib.build_targets(("sm89",), gpu="sm90")


def test_library_choice(monkeypatch, request):
    request.addfinalizer(trt_lib.active.cache_clear)  # the next test sees this machine's choice
    rtx_lib = trt_lib.TensorRTForRTX(types.SimpleNamespace(
        __version__="1.7", ComputeCapability=types.SimpleNamespace(__members__={"SM89": 0, "SM120": 1})))
    dc_lib = trt_lib.TensorRT(types.SimpleNamespace(__version__="10.13"))
    libs = {"tensorrt_rtx": rtx_lib, "tensorrt": dc_lib}
    monkeypatch.setattr(trt_lib, "load_library", lambda name: libs.get(name))
    monkeypatch.delenv(trt_lib.LIBRARY_ENV, raising=False)
    for gpu, want in ((None, rtx_lib), ("sm89", rtx_lib), ("sm90", dc_lib)):
        monkeypatch.setattr(trt_lib, "gpu_target", lambda gpu=gpu: gpu)
        trt_lib.active.cache_clear()
        assert trt_lib.active() is want, gpu
    monkeypatch.setenv(trt_lib.LIBRARY_ENV, "tensorrt")
    trt_lib.active.cache_clear()
    assert trt_lib.active() is dc_lib
    libs.pop("tensorrt")
    trt_lib.active.cache_clear()
    with pytest.raises(ValueError, match="WAN_RT_TRT_LIBRARY=tensorrt, but tensorrt cannot be imported"):
        trt_lib.active()


def test_build_config_goes_to_the_manifest():
    from wan_rt.export.trt_build import BuildConfig

    args = BuildConfig(targets=("sm89",), opt_level=5, refittable=True, weight_streaming=True).manifest_args()
    assert args == {"trt": {"targets": ["sm89"], "opt_level": 5, "refittable": True, "weight_streaming": True,
                            "workspace_gib": None, "keep_onnx": False}}
    with pytest.raises(ValueError, match="opt_level"):
        BuildConfig(opt_level=6)


@pytest.mark.parametrize("precision,targets,dtypes,quantized,refusal", [
    ("fp8", ("sm86",), {"dit_high_noise": torch.bfloat16}, ["dit_high_noise"],
     "--precision fp8 cannot target sm86: dit_high_noise has fp8 GEMMs, which TensorRT for RTX runs on sm89"),
    ("fp8", ("sm89", "sm80"), {"dit_high_noise": torch.bfloat16}, ["dit_high_noise"],
     "--precision fp8 cannot target sm80"),
    ("fp16", ("sm75",), {"dit": torch.float16, "text_encoder": torch.float32}, [],
     "--precision fp16 cannot target sm75: text_encoder has fp32 GEMMs, which TensorRT for RTX runs on sm80"),
    ("int8", ("sm75",), {"dit": torch.bfloat16}, ["dit"], "--precision int8 cannot target sm75: dit has bf16"),
])
def test_precision_a_target_cannot_run_is_refused(rtx, precision, targets, dtypes, quantized, refusal):
    from wan_rt.export.trt_build import BuildConfig

    with pytest.raises(ValueError) as err:
        BuildConfig(targets=targets).for_build(precision, dtypes, quantized)
    assert str(err.value).startswith(refusal) and "\n" not in str(err.value), str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check (no GPU)")
def test_refittable_plans_without_a_gpu_are_refused_before_building(rtx):
    """TensorRT for RTX 1.7.1 fails inside its compiler on any refittable build with no GPU
    (measured: every dtype, REFIT and REFIT_INDIVIDUAL); wan_rt says so up front."""
    from wan_rt.export.trt_build import BuildConfig

    with pytest.raises(ValueError, match=r"^--refittable: TensorRT for RTX .* cannot build refittable plans without a "
                                         r"GPU"):
        BuildConfig(targets=("sm89",), refittable=True).for_build("bf16", {"dit": torch.bfloat16})
    assert BuildConfig(targets=("sm89",), weight_streaming=True).for_build("bf16", {"dit": torch.bfloat16}).targets


def test_what_each_target_runs(rtx):
    from wan_rt.export.trt_build import BuildConfig

    for precision, targets in (("fp8", ("sm89", "sm120", "sm121")), ("int8", ("sm80", "sm86")),
                               ("fp16", ("sm75",))):
        dtypes = {"dit": torch.bfloat16} if precision != "fp16" else {"dit": torch.float16}
        got = BuildConfig(targets=targets).for_build(precision, dtypes, ["dit"] if precision in ("fp8", "int8") else [])
        assert got.targets == targets


# ------------------------------------------------------------------------------------ availability
def test_build_and_run_availability_differ_here():
    """On this machine (no GPU) TensorRT for RTX can build but not run; both are said plainly."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    if trt_lib.active() is None:
        assert not trt_backend.can_build() and "no TensorRT library is installed" in trt_backend.build_unavailable_reason()
        return
    lib = trt_lib.active()
    assert trt_backend.can_build() == lib.builds_without_gpu
    assert not trt_backend.is_available()
    assert trt_backend.unavailable_reason() == f"{lib.title} engines need {lib.gpus}, and this machine has no CUDA GPU"
    from wan_rt.build import best_backend

    assert best_backend() == "ort", "never pick a backend that cannot run here"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check (no GPU)")
def test_build_refusals_before_anything_is_written(tmp_path, rtx, capsys):
    """fp8 for sm86, no targets without a GPU, a target TensorRT for RTX lacks: one line, exit 2,
    no engines dir."""
    from wan_rt.cli import main

    cases = [(["--precision", "fp8", "--trt-targets", "sm86"], "--precision fp8 cannot target sm86"),
             ([], "--trt-targets is required without a GPU"),
             (["--trt-targets", "sm90"], "cannot build for sm90")]
    for args, message in cases:
        out = tmp_path / "engines"
        assert main(["build", "--backend", "trt", "--engines-dir", str(out), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wan-rt build: error: ") and message in lines[0], lines
        assert not out.exists()


# ------------------------------------------------------------------------------------ real builder, no GPU
def _qdq_matmul_onnx(path: Path, qtype: int) -> None:
    """x [4, 64] bf16 -> Q/DQ -> MatMul with a DQ'd constant weight, as export/quantize.py writes it."""
    import onnx
    from onnx import TensorProto, helper

    bf16 = TensorProto.BFLOAT16
    inits = [helper.make_tensor("x_scale", bf16, [], [0.1]),
             helper.make_tensor("x_zero", qtype, [], bytes(1), raw=True),
             helper.make_tensor("w_q", qtype, [64, 32], bytes(64 * 32), raw=True),
             helper.make_tensor("w_scale", bf16, [32], [0.01] * 32),
             helper.make_tensor("b_keep", bf16, [32, 8], [0.5] * (32 * 8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wd"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["h"], name="quantized_matmul"),
             helper.make_node("MatMul", ["h", "b_keep"], ["y"], name="kept_matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", bf16, ["B", 64])],
                              [helper.make_tensor_value_info("y", bf16, ["B", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


@pytest.mark.parametrize("quantized", ["fp8", "int8"])
def test_layer_report_of_a_qdq_network(rtx, tmp_path, quantized):
    from onnx import TensorProto

    from wan_rt.export.trt_build import layer_report

    trt = rtx.module
    _qdq_matmul_onnx(tmp_path / "m.onnx", TensorProto.FLOAT8E4M3FN if quantized == "fp8" else TensorProto.INT8)
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(tmp_path / "m.onnx"))
    report = layer_report(network, {"w_q": "blocks.1.ffn.net.2", "b_keep": "proj_out"})
    gemms = {row["name"]: row for row in report["layers"] if row["type"] == "MATRIX_MULTIPLY"}
    assert gemms["quantized_matmul"]["precision"] == quantized
    assert gemms["quantized_matmul"]["module"] == "blocks.1.ffn.net.2" and gemms["quantized_matmul"]["weight"] == "w_q"
    assert gemms["kept_matmul"]["precision"] == "bf16" and gemms["kept_matmul"]["module"] == "proj_out"
    assert report["gemms"] == {quantized: 1, "bf16": 1}


def test_build_flags_reach_a_real_build(rtx, tmp_path):
    """TensorRT for RTX accepts what BuildConfig sets (weight streaming, optimization level,
    workspace, several targets; refit where a GPU is present) and builds; the flags are read back
    from its builder config."""
    from onnx import TensorProto

    from wan_rt.export.trt_build import BuildConfig, build_engine

    _qdq_matmul_onnx(tmp_path / "m.onnx", TensorProto.INT8)
    gspec = GraphSpec("dit", "main", (TensorSpec("x", "compute", ("B", 64)),), (TensorSpec("y", "compute", ("B", 8)),))
    profile = ShapeProfile(min={"B": 1}, opt={"B": 1}, max={"B": 2})
    configs = [BuildConfig(targets=("sm86", "sm120"), opt_level=2, weight_streaming=True, workspace_gib=0.5),
               BuildConfig(targets=("sm89",))]
    if torch.cuda.is_available():  # refittable plans need a GPU to build (test below)
        configs.append(BuildConfig(targets=(trt_lib.gpu_target(),), refittable=True))
    for config in configs:
        info = build_engine(tmp_path / "m.onnx", gspec, profile, tmp_path / "m.plan", config=config)
        assert (tmp_path / "m.plan").stat().st_size == info["plan_bytes"] > 0 and (tmp_path / "layers.json").is_file()
        assert info["builder"] == {"opt_level": config.opt_level, "refit": config.refittable,
                                   "weight_streaming": config.weight_streaming}


def test_rtx_targets_reach_the_builder_config(rtx):
    trt = rtx.module
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    rtx.set_targets(config, ("sm86", "sm120"))
    assert [config.get_compute_capability(i) for i in range(config.num_compute_capabilities)] == \
        [trt.ComputeCapability.SM86, trt.ComputeCapability.SM120]


def test_unparseable_graph_is_one_error_with_the_parsers_words(rtx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from wan_rt.export.trt_build import BuildConfig, TrtBuildError, build_engine

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="odd", domain="wan.test")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("wan.test", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    gspec = GraphSpec("dit", "main", (TensorSpec("x", "float32", (2,)),), (TensorSpec("y", "float32", (2,)),))
    with pytest.raises(TrtBuildError, match=r"(?s)dit/main: TensorRT could not parse .*m.onnx:\n  .*NoSuchOp"):
        build_engine(tmp_path / "m.onnx", gspec, ShapeProfile(min={}, opt={}, max={}), tmp_path / "m.plan",
                     config=BuildConfig(targets=("sm89",)))
    assert not (tmp_path / "m.plan").exists()


# ------------------------------------------------------------------------------------ runtime with stand-in engines
class _FakeRuntimeCache:
    def __init__(self, store: dict):
        self.store = store

    def deserialize(self, blob):
        self.store["loaded"] = bytes(blob)
        return True

    def serialize(self):
        self.store["saves"] = self.store.get("saves", 0) + 1
        return b"kernels:%d" % self.store["saves"]


class _FakeRuntimeConfig:
    def __init__(self, engine):
        self.engine = engine

    def set_execution_context_allocation_strategy(self, strategy):
        self.engine.strategy = strategy

    def create_runtime_cache(self):
        return _FakeRuntimeCache(self.engine.cache_store)

    def set_runtime_cache(self, cache):
        self.engine.runtime_cache = cache
        return True


class _FakeEngine:
    """An ICudaEngine stand-in (a real one needs a CUDA driver): input x [B, L] float32 in
    profile [1..2, 1..8], output y = x; weights that can be unloaded and loaded (deferred)."""

    def __init__(self, memory: int):
        trt = trt_lib.require().module
        self.device_memory_size_v2, self.streamable_weights_size = memory, 0
        self.io = {"x": trt.TensorIOMode.INPUT, "y": trt.TensorIOMode.OUTPUT}
        self.contexts: list = []
        self.cache_store: dict = {}
        self.weights_loaded, self.weight_events = True, []

    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return self.io[name]

    def get_tensor_dtype(self, name):
        return trt_lib.require().module.DataType.FLOAT

    def get_tensor_profile_shape(self, name, index):
        return [(1, 1), (1, 4), (2, 8)]

    def create_runtime_config(self):
        return _FakeRuntimeConfig(self)

    def create_execution_context(self, config):
        assert self.strategy == trt_lib.require().module.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts.append(_FakeContext(self))
        return self.contexts[-1]

    def unload_weights(self):
        self.weight_events.append("unload")
        self.weights_loaded = False
        return True

    def load_weights(self, blob):
        self.weight_events.append(("load", bytes(blob)))
        self.weights_loaded = True
        return True


class _FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.memory: list[tuple[int, int]] = []  # every set_device_memory call
        self.addresses: dict[str, int] = {}
        self.shape: tuple[int, ...] = ()

    def set_device_memory(self, ptr, size):
        self.memory.append((ptr, size))

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return 1 <= shape[0] <= 2 and 1 <= shape[1] <= 8

    def get_tensor_shape(self, name):
        return self.shape

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        assert self.memory, "ran before its device memory was set"
        assert self.engine.weights_loaded, "ran without its weights"
        nbytes = 4 * self.shape[0] * self.shape[1]
        ctypes.memmove(self.addresses["y"], self.addresses["x"], nbytes)  # y = x, through the bound addresses
        return True


_XY = GraphSpec("dit_high_noise", "main", (TensorSpec("x", "float32", ("B", "L")),),
                (TensorSpec("y", "float32", ("B", "L")),))


def test_engines_share_one_memory_block_and_rebind_when_it_grows(rtx):
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner

    memory = SharedDeviceMemory(torch.device("cpu"))
    high = TrtEngine(_FakeEngine(1000), "cpu", memory=memory, name="high")
    low = TrtEngine(_FakeEngine(3000), "cpu", memory=memory, name="low")
    assert memory.size == 3000 and memory.generation == 2, "sized by the max over engines, not the sum"
    x = torch.randn(1, 4)
    assert torch.equal(TrtRunner(high, _XY, torch.float32)({"x": x})["y"], x)
    assert torch.equal(TrtRunner(low, _XY, torch.float32)({"x": x})["y"], x)
    first = (memory.ptr, 3000)
    assert high.context.memory == [first] and low.context.memory == [first]

    TrtEngine(_FakeEngine(5000), "cpu", memory=memory, name="vae")  # a bigger engine arrives
    assert memory.size == 5000 and memory.generation == 3
    out = TrtRunner(high, _XY, torch.float32)({"x": 2 * x})["y"]
    assert torch.equal(out, 2 * x) and high.context.memory == [first, (memory.ptr, 5000)], "rebound once"

    runner = TrtRunner(high, _XY, torch.float32)
    before = dict(high.context.addresses)
    y = torch.randn(2, 8)
    assert torch.equal(runner({"x": y})["y"], y) and high.context.addresses != before, "new shapes, new buffers"
    with pytest.raises(ValueError, match=r"x of shape \[2, 9\] is outside the engine's profile \(min \[1, 1\], "
                                         r"max \[2, 8\]\)"):
        runner({"x": torch.randn(2, 9)})
    with pytest.raises(TypeError, match="x is torch.float16, the graph takes torch.float32"):
        runner({"x": y.half()})


def test_runner_refuses_an_engine_with_other_io(rtx):
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner

    engine = TrtEngine(_FakeEngine(10), "cpu", memory=SharedDeviceMemory(torch.device("cpu")))
    gspec = graph_spec(get_spec(SPEC), "dit_high_noise", "main")
    with pytest.raises(ValueError, match="is not the contract's"):
        TrtRunner(engine, gspec, torch.float32)


def test_runtime_cache_is_shared_loaded_and_saved_after_new_shapes(rtx, tmp_path):
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner

    (tmp_path / trt_lib.RUNTIME_CACHE).write_bytes(b"kernels from the last run")
    cache = rtx.open_runtime_cache(tmp_path)
    assert cache is rtx.open_runtime_cache(tmp_path), "one cache per engines dir"
    memory = SharedDeviceMemory(torch.device("cpu"))
    first, second = _FakeEngine(10), _FakeEngine(10)
    runner = TrtRunner(TrtEngine(first, "cpu", memory=memory, runtime_cache=cache), _XY, torch.float32)
    TrtEngine(second, "cpu", memory=memory, runtime_cache=cache)
    assert first.cache_store["loaded"] == b"kernels from the last run" and cache.loaded
    assert second.runtime_cache is first.runtime_cache, "every context shares the one IRuntimeCache"
    runner({"x": torch.randn(1, 4)})
    runner({"x": torch.randn(1, 4)})
    assert (tmp_path / trt_lib.RUNTIME_CACHE).read_bytes() == b"kernels:1", "saved once for the new shapes"
    runner({"x": torch.randn(2, 3)})
    assert (tmp_path / trt_lib.RUNTIME_CACHE).read_bytes() == b"kernels:2"
    trt_lib.RuntimeCache._open.clear()


def test_experts_swap_weights_not_engines_when_they_do_not_fit(rtx, tmp_path):
    """Residency over two TensorRT experts that do not fit together: the second is staged (its
    plan read) during the first's last steps, and at the switch the first's weights are
    unloaded and the second's loaded; engines and contexts are made once."""
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner
    from wan_rt.runtime.engine_component import DiTComponent
    from wan_rt.runtime.residency import ExpertResidency

    memory = SharedDeviceMemory(torch.device("cpu"))
    text = GraphSpec("dit_high_noise", "text", (TensorSpec("x", "float32", ("B", "L")),),
                     (TensorSpec("y", "float32", ("B", "L")),))
    made: dict[str, int] = {}
    engines: dict[str, list] = {}

    def expert(name: str) -> DiTComponent:
        plans = {g: tmp_path / f"{name}-{g}.plan" for g in ("text", "main")}
        for g, plan in plans.items():
            plan.write_bytes(f"{name}/{g} weights".encode())

        def factory():
            made[name] = made.get(name, 0) + 1
            fakes = [_FakeEngine(10), _FakeEngine(10)]
            engines[name] = fakes
            run = [TrtRunner(TrtEngine(f, "cpu", memory=memory, lib=rtx, plan_path=plans[g], weights_deferred=True),
                             spec, torch.float32) for f, g, spec in zip(fakes, ("text", "main"), (text, _XY))]
            return {"text": run[0], "main": run[1]}

        return DiTComponent(name, None, {"text": text, "main": _XY}, torch.float32, torch.device("cpu"),
                            factory=factory, nbytes=100)

    comps = {"dit_high_noise": expert("dit_high_noise"), "dit_low_noise": expert("dit_low_noise")}
    residency = ExpertResidency(comps, list(comps), budget_bytes=150, prefetch_steps=1)
    for name in comps:  # first generation: made on first use
        residency.enter(name)
        residency.leave(name)
    residency.finish()
    for _ in range(2):  # later generations: weights move, engines stay
        residency.enter("dit_high_noise")
        residency.progress("dit_high_noise", steps_left=1, upcoming="dit_low_noise")
        residency.leave("dit_high_noise")
        residency.enter("dit_low_noise")
        residency.leave("dit_low_noise")
        residency.finish()
    assert made == {"dit_high_noise": 1, "dit_low_noise": 1}
    high_main, low_main = engines["dit_high_noise"][1], engines["dit_low_noise"][1]
    assert high_main.weight_events == ["unload", ("load", b"dit_high_noise/main weights"), "unload",
                                       ("load", b"dit_high_noise/main weights"), "unload"]
    assert low_main.weight_events == ["unload", ("load", b"dit_low_noise/main weights"), "unload",
                                      ("load", b"dit_low_noise/main weights"), "unload"]
    assert ("stage", "dit_low_noise") in residency.events
    low = comps["dit_low_noise"]
    low.load()  # what DiTComponent.__call__ does first: the weights come back, the engine runs
    assert torch.equal(low.runners["main"]({"x": torch.ones(1, 2)})["y"], torch.ones(1, 2)) and low_main.weights_loaded


def test_libraries_without_weight_swapping_drop_and_remake_the_engine(rtx, tmp_path, monkeypatch):
    """TensorRT (no deferred weights): unload drops the expert's engines, load makes them again."""
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner
    from wan_rt.runtime.engine_component import DiTComponent

    memory, made = SharedDeviceMemory(torch.device("cpu")), []

    def factory():
        made.append(1)
        return {g: TrtRunner(TrtEngine(_FakeEngine(10), "cpu", memory=memory), _XY, torch.float32)
                for g in ("text", "main")}

    dit = DiTComponent("dit", None, {"text": _XY, "main": _XY}, torch.float32, torch.device("cpu"), factory=factory)
    dit.load()
    assert not dit.runners["main"].swaps_weights
    dit.unload()
    assert dit.runners is None
    dit.load()
    assert len(made) == 2


# ------------------------------------------------------------------------------------ manifests at load
def _manifest(tmp_path, tool_versions: dict, targets: list[str]):
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.engines_dir import expected_manifest

    resolved = resolve_checkpoint(SPEC)
    profile = shape_profile(resolved.spec, height=32, width=32, frames=9)
    m = expected_manifest(resolved, SPEC, "dit_high_noise", "trt", "bf16", profile, torch.device("cpu"))
    m.tool_versions = {**tool_versions, "torch": "2.13"}
    m.build_args = {"trt": {"targets": targets}}
    folder = tmp_path / "dit_high_noise"
    for g in m.graphs:
        (folder / g).mkdir(parents=True)
        (folder / g / "model.plan").write_bytes(b"plan")
        m.graphs[g]["files"] = [f"{g}/model.plan"]
    m.write(folder)
    return folder, resolved


RTX_17 = {"trt_library": "tensorrt_rtx", "trt_version": "1.7.1.116"}


@pytest.mark.parametrize("built,targets,here,gpu,refusal", [
    (RTX_17, ["sm89"], RTX_17, None,
     "needs an RTX GPU (SM75-SM121 except SM90/SM100): its plans are for sm89 (trt_targets), and this machine "
     "has no CUDA GPU"),
    (RTX_17, ["sm89", "sm120"], RTX_17, ("sm86", "NVIDIA GeForce RTX 3090 (sm86)"),
     "its plans are for sm89,sm120 (trt_targets), and this GPU is NVIDIA GeForce RTX 3090 (sm86); "
     "rebuild with --trt-targets sm86"),
    (RTX_17, ["sm89"], {**RTX_17, "trt_version": "1.8.0.1"}, ("sm89", "NVIDIA GeForce RTX 4090 (sm89)"),
     "built with trt_version 1.7.1.116, this machine has 1.8.0.1; re-run `wan-rt build"),
    (RTX_17, ["sm89"], {"trt_library": "tensorrt", "trt_version": "10.13.0.35"},
     ("sm89", "NVIDIA GeForce RTX 4090 (sm89)"), "built with trt_library tensorrt_rtx, this machine has tensorrt"),
])
def test_plan_another_library_version_or_gpu_cannot_run_is_refused(tmp_path, monkeypatch, built, targets, here, gpu,
                                                                      refusal):
    from wan_rt.runtime.engines_dir import StaleEngineError, verify

    folder, resolved = _manifest(tmp_path, built, targets)
    monkeypatch.setattr(trt_backend, "versions", lambda: {**here, "torch": "2.13"})
    monkeypatch.setattr(trt_lib, "gpu_target", lambda device=None: gpu and gpu[0])
    monkeypatch.setattr(trt_lib, "gpu_identity", lambda device=None: gpu and gpu[1])
    with pytest.raises(StaleEngineError) as err:
        verify(folder, resolved, SPEC, trt_backend)
    line = str(err.value)
    assert "\n" not in line and line.startswith("engine for dit_high_noise cannot run here: "), line
    assert refusal in line, line


def test_plan_for_this_library_and_gpu_verifies(tmp_path, monkeypatch):
    from wan_rt.runtime.engines_dir import verify

    folder, resolved = _manifest(tmp_path, RTX_17, ["sm89", "sm120"])
    monkeypatch.setattr(trt_backend, "versions", lambda: {**RTX_17, "torch": "2.13"})
    monkeypatch.setattr(trt_lib, "gpu_target", lambda device=None: "sm120")
    assert verify(folder, resolved, SPEC, trt_backend).component == "dit_high_noise"
