"""TensorRT backend: build (export/trt_build.py) and runtime (runtime/backends/trt*.py).

TensorRT cannot be installed on any machine this project has used, so what runs here is:
* mypy over the three modules against tensorrt-stubs, with a broken snippet proving the check bites;
* the pure parts: optimization-profile shapes (incl. the VAE's k*h cache dims, checked against
  the VAE's own cache shapes), BuildConfig, version/GPU refusal through the engines loader;
* the orchestration against a stand-in `tensorrt` module (what build_engine asks the builder
  for; how engines share one memory block, bind buffers, rebind after it grows, report
  profile errors), so the logic is tested even though TensorRT is not;
* `test_real_tensorrt_engine`, which builds and runs real engines, skipped here.
"""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import wan_rt.export
import wan_rt.runtime.backends as backends
from wan_rt.config import get_spec
from wan_rt.runtime.backends import trt as trt_backend
from wan_rt.runtime.graphs import GraphSpec, ShapeProfile, TensorSpec, _shape_only_vae, graph_spec, shape_profile

SPEC = "tiny-t2v-A14B"
TRT_MODULES = [Path(wan_rt.export.__file__).with_name("trt_build.py"),
               Path(backends.__file__).with_name("trt.py"), Path(backends.__file__).with_name("trt_engine.py")]


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


# ------------------------------------------------------------------------------------ mypy
def test_trt_modules_type_check_against_tensorrt_stubs(trt_mypy):
    report, status = trt_mypy(*TRT_MODULES)
    assert status == 0, report


def test_trt_type_check_has_teeth(trt_mypy, tmp_path):
    bad = tmp_path / "bad_runtime_use.py"
    bad.write_text(
        "import tensorrt as trt\n\n\n"
        "def run(context: trt.IExecutionContext, stream: int) -> bool:\n"
        "    return context.execute_async_v4(stream)\n\n\n"
        "def flags(config: trt.IBuilderConfig) -> None:\n"
        "    config.set_flag(trt.BuilderFlag.REFITTABLE)\n"
    )
    report, status = trt_mypy(bad)
    assert status == 1 and "execute_async_v4" in report and "REFITTABLE" in report, report


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


def test_build_config_validates_and_goes_to_the_manifest():
    from wan_rt.export.trt_build import BuildConfig

    args = BuildConfig(opt_level=5, refittable=True, weight_streaming=True).manifest_args()
    assert args == {"trt": {"opt_level": 5, "refittable": True, "weight_streaming": True, "workspace_gib": None,
                            "keep_onnx": False}}
    with pytest.raises(ValueError, match="opt_level"):
        BuildConfig(opt_level=6)


# ------------------------------------------------------------------------------------ versions
@pytest.fixture
def trt_manifest(tmp_path):
    """An engines-dir folder whose manifest says TensorRT 10.13.0.35 on an H100, plan present."""
    from wan_rt.runtime.engines_dir import expected_manifest
    from wan_rt.resolve import resolve_checkpoint

    resolved = resolve_checkpoint(SPEC)
    profile = shape_profile(resolved.spec, height=32, width=32, frames=9)
    m = expected_manifest(resolved, SPEC, "dit_high_noise", "trt", "bf16", profile, torch.device("cpu"))
    m.tool_versions = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3 (sm90)", "torch": "2.11"}
    folder = tmp_path / "dit_high_noise"
    for g in m.graphs:
        (folder / g).mkdir(parents=True)
        (folder / g / "model.plan").write_bytes(b"plan")
        m.graphs[g]["files"] = [f"{g}/model.plan"]
    m.write(folder)
    return folder, resolved


@pytest.mark.parametrize("here,refusal", [
    ({"tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3 (sm90)"},
     "built with tensorrt 10.13.0.35, this machine has 10.9.0.34"),
    ({"tensorrt": "10.13.0.35", "gpu": "NVIDIA A100-SXM4-80GB (sm80)"},
     "built with gpu NVIDIA H100 80GB HBM3 (sm90), this machine has NVIDIA A100-SXM4-80GB (sm80)"),
    ({"tensorrt": trt_backend.NO_TENSORRT, "gpu": trt_backend.NO_GPU},
     f"built with tensorrt 10.13.0.35, this machine has {trt_backend.NO_TENSORRT}"),
])
def test_engine_for_another_tensorrt_or_gpu_is_refused(trt_manifest, monkeypatch, here, refusal):
    from wan_rt.runtime.engines_dir import verify
    from wan_rt.runtime.engines_dir import StaleEngineError

    folder, resolved = trt_manifest
    monkeypatch.setattr(trt_backend, "versions", lambda: {**here, "torch": "2.13"})
    with pytest.raises(StaleEngineError) as err:
        verify(folder, resolved, SPEC, trt_backend)
    line = str(err.value)
    assert "\n" not in line and line.startswith("engine for dit_high_noise cannot run here: ")
    assert refusal in line and "re-run `wan-rt build" in line


def test_engine_for_this_tensorrt_and_gpu_verifies(trt_manifest, monkeypatch):
    from wan_rt.runtime.engines_dir import verify

    folder, resolved = trt_manifest
    monkeypatch.setattr(trt_backend, "versions", lambda: {"tensorrt": "10.13.0.35", "torch": "2.13",
                                                          "gpu": "NVIDIA H100 80GB HBM3 (sm90)"})
    assert verify(folder, resolved, SPEC, trt_backend).component == "dit_high_noise"


@pytest.mark.skipif(_has_tensorrt() and torch.cuda.is_available(), reason="TensorRT runs here")
def test_missing_tensorrt_is_reported_not_crashed(tmp_path):
    from wan_rt.build import best_backend, build_engines

    assert not trt_backend.is_available() and trt_backend.unavailable_reason()
    assert best_backend() == "ort"
    with pytest.raises(ValueError, match="backend 'trt' is not available on this machine: "):
        build_engines(SPEC, "trt", tmp_path, log=lambda s: None)


# ------------------------------------------------------------------------------------ stand-in tensorrt
def _fake_tensorrt(record: dict) -> types.ModuleType:
    """Just enough of `tensorrt` for trt_build / trt_engine to run their own logic against."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.DataType = SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BF16="BF16", INT8="INT8", INT32="INT32",
                                   INT64="INT64", BOOL="BOOL", UINT8="UINT8", FP8="FP8")
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = SimpleNamespace(REFIT="REFIT", WEIGHT_STREAMING="WEIGHT_STREAMING")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.Dims = lambda shape: tuple(shape)

    class Network:
        def __init__(self, flags):
            record["network_flags"] = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            record["parsed"] = path
            if record.get("parse_error"):
                self.num_errors = 1
                return False
            self.network.inputs = list(record["inputs"])
            return True

        def get_error(self, i):
            return record["parse_error"]

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"  # each build adds timings

    class Config:
        def __init__(self):
            record["flags"], record["profiles"] = set(), []

        def set_flag(self, flag):
            record["flags"].add(flag)

        def set_memory_pool_limit(self, pool, size):
            record["workspace"] = size

        def add_optimization_profile(self, profile):
            record["profiles"].append(profile.shapes)
            return 0

        def create_timing_cache(self, data):
            record["cache_in"] = bytes(data)
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def __setattr__(self, name, value):
            record[name] = value

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return b"PLAN"

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


def test_build_engine_asks_tensorrt_for_what_the_config_says(tmp_path, monkeypatch):
    from wan_rt.export.trt_build import BuildConfig, TrtBuildError, build_engine, profile_shapes

    record: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(record))
    spec = get_spec(SPEC)
    gspec = graph_spec(spec, "dit_high_noise", "main")
    profile = shape_profile(spec, height=32, width=32, frames=9)
    record["inputs"] = gspec.input_names
    onnx_path, cache = tmp_path / "model.onnx", tmp_path / "timing.cache"
    config = BuildConfig(opt_level=5, refittable=True, weight_streaming=True, workspace_gib=2)
    info = build_engine(onnx_path, gspec, profile, tmp_path / "model.plan", config=config, timing_cache=cache)
    assert (tmp_path / "model.plan").read_bytes() == b"PLAN" and info["plan_bytes"] == 4
    assert record["network_flags"] == 1 << 1, "strongly typed network"
    assert record["parsed"] == str(onnx_path)
    assert record["builder_optimization_level"] == 5 and record["workspace"] == 2 * 2**30
    assert record["flags"] == {"REFIT", "WEIGHT_STREAMING"}
    assert record["profiles"] == [profile_shapes(gspec, profile)]
    assert record["cache_in"] == b"" and cache.read_bytes() == b"+"
    build_engine(onnx_path, gspec, profile, tmp_path / "model.plan", config=BuildConfig(), timing_cache=cache)
    assert record["cache_in"] == b"+" and cache.read_bytes() == b"++", "the timing cache is reused and merged"
    assert record["flags"] == set() and record["builder_optimization_level"] == 3

    record["parse_error"] = "In node 3 (MatMul): unsupported"
    with pytest.raises(TrtBuildError, match=r"(?s)could not parse .*model.onnx:\n  In node 3"):
        build_engine(onnx_path, gspec, profile, tmp_path / "model.plan")


class _FakeEngine:
    """An ICudaEngine stand-in: input x [B, L] float32 in profile [1..2, 1..8], output y = x."""

    def __init__(self, memory: int):
        self.device_memory_size_v2, self.streamable_weights_size = memory, 0
        self.io = {"x": "INPUT", "y": "OUTPUT"}
        self.contexts: list = []

    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return self.io[name]

    def get_tensor_dtype(self, name):
        return "FLOAT"

    def get_tensor_profile_shape(self, name, index):
        return [(1, 1), (1, 4), (2, 8)]

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        self.contexts.append(_FakeContext())
        return self.contexts[-1]


class _FakeContext:
    def __init__(self):
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
        nbytes = 4 * self.shape[0] * self.shape[1]
        ctypes.memmove(self.addresses["y"], self.addresses["x"], nbytes)  # y = x, through the bound addresses
        return True


def test_engines_share_one_memory_block_and_rebind_when_it_grows(monkeypatch):
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt({}))
    memory = SharedDeviceMemory(torch.device("cpu"))
    high = TrtEngine(_FakeEngine(1000), "cpu", memory=memory, name="high")
    low = TrtEngine(_FakeEngine(3000), "cpu", memory=memory, name="low")
    assert memory.size == 3000 and memory.generation == 2, "sized by the max over engines, not the sum"
    gspec = GraphSpec("dit_high_noise", "main", (TensorSpec("x", "float32", ("B", "L")),),
                      (TensorSpec("y", "float32", ("B", "L")),))
    x = torch.randn(1, 4)
    assert torch.equal(TrtRunner(high, gspec, torch.float32)({"x": x})["y"], x)
    assert torch.equal(TrtRunner(low, gspec, torch.float32)({"x": x})["y"], x)
    first = (memory.ptr, 3000)
    assert high.context.memory == [first] and low.context.memory == [first]

    TrtEngine(_FakeEngine(5000), "cpu", memory=memory, name="vae")  # a bigger engine arrives
    assert memory.size == 5000 and memory.generation == 3
    out = TrtRunner(high, gspec, torch.float32)({"x": 2 * x})["y"]
    assert torch.equal(out, 2 * x) and high.context.memory == [first, (memory.ptr, 5000)], "rebound once"

    runner = TrtRunner(high, gspec, torch.float32)
    before = dict(high.context.addresses)
    y = torch.randn(2, 8)
    assert torch.equal(runner({"x": y})["y"], y) and high.context.addresses != before, "new shapes, new buffers"
    with pytest.raises(ValueError, match=r"x of shape \[2, 9\] is outside the engine's profile \(min \[1, 1\], "
                                         r"max \[2, 8\]\)"):
        runner({"x": torch.randn(2, 9)})
    with pytest.raises(TypeError, match="x is torch.float16, the graph takes torch.float32"):
        runner({"x": y.half()})


def test_runner_refuses_an_engine_with_other_io(monkeypatch):
    from wan_rt.runtime.backends.trt_engine import SharedDeviceMemory, TrtEngine, TrtRunner

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt({}))
    engine = TrtEngine(_FakeEngine(10), "cpu", memory=SharedDeviceMemory(torch.device("cpu")))
    gspec = graph_spec(get_spec(SPEC), "dit_high_noise", "main")
    with pytest.raises(ValueError, match="is not the contract's"):
        TrtRunner(engine, gspec, torch.float32)


# ------------------------------------------------------------------------------------ real TensorRT
@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not (_has_tensorrt() and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_real_tensorrt_engine(tmp_path):
    """Build bf16 (and, on sm89+, fp8) engines of the tiny DiT, run them against eager, check
    shared memory, CUDA-graph replay and refit. Never run: no machine here has TensorRT."""
    from wan_rt.build import build_engines
    from wan_rt.export import trt_build
    from wan_rt.export.trt_build import BuildConfig
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.metrics import relative_error
    from wan_rt.models import load_dit
    from wan_rt.runtime.graphs import graph_module, sample_inputs
    from wan_rt.runtime.engines_dir import EngineManifest

    name = "dit_high_noise"
    engines = tmp_path / "bf16"
    build_engines(SPEC, "trt", engines, precision="bf16", height=32, width=32, frames=9, components=[name],
                  trt_config=BuildConfig(refittable=True), log=lambda s: None)
    manifest = EngineManifest.read(engines / name)
    assert manifest.tool_versions["tensorrt"] and manifest.build_args["trt"]["refittable"]
    assert (engines / "timing.cache").is_file()
    resolved, spec = resolve_checkpoint(SPEC), get_spec(SPEC)
    profile = ShapeProfile(**manifest.profile)
    dit = load_dit(resolved.files, name, dtype=torch.bfloat16, device="cuda")
    runners = {g: trt_backend.load_graph(engines / name, graph_spec(spec, name, g), manifest.graphs[g]["files"],
                                         compute_dtype=torch.bfloat16, device="cuda") for g in ("text", "main")}
    assert runners["text"].engine.memory is runners["main"].engine.memory, "one activation block per GPU"
    gspec = graph_spec(spec, name, "main")
    inputs = sample_inputs(gspec, profile.opt, torch.bfloat16, "cuda")
    want = graph_module(name, "main", dit)(*(inputs[n] for n in gspec.input_names))
    for _ in range(3):
        got = runners["main"](inputs)["noise_pred"]
    assert relative_error(got.float().cpu(), want.float().cpu()) < 3e-2
    assert runners["main"].engine.graph_replays == 2, "captured after the first run, replayed after"

    with torch.no_grad():
        dit.proj_out.bias.add_(1.0)
    trt_build.refit_from_module(runners["main"], graph_module(name, "main", dit), gspec, profile,
                                compute_dtype=torch.bfloat16)
    want = graph_module(name, "main", dit)(*(inputs[n] for n in gspec.input_names))
    got = runners["main"](inputs)["noise_pred"]
    assert relative_error(got.float().cpu(), want.float().cpu()) < 3e-2, "refit took the new weights"

    if torch.cuda.get_device_capability() >= (8, 9):
        build_engines(SPEC, "trt", tmp_path / "fp8", precision="fp8", height=32, width=32, frames=9,
                      log=lambda s: None)
        from wan_rt.parity import parity_rows

        rows = parity_rows(tmp_path / "fp8")
        assert all(r.ok for r in rows), rows
