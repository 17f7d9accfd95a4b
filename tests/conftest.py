"""Shared fixtures. Tiny checkpoints made here with diffusers' and transformers' own classes are
the external oracle: wan_rt loads the same files and must reproduce diffusers' numbers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Tiny presets are generated on first use; keep them out of the user's cache during tests.
os.environ.setdefault("WAN_RT_CACHE", tempfile.mkdtemp(prefix="wan_rt_test_cache_"))


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def write_diffusers_checkpoint(spec_name: str, folder: Path) -> Path:
    """A tiny checkpoint in the diffusers layout, written by diffusers/transformers classes."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline,
                           WanPipeline, WanTransformer3DModel)
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from wan_rt.config import get_spec
    from wan_rt.models import hf_config
    from wan_rt.tiny import _write_tokenizer

    spec = get_spec(spec_name)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(1234)
    experts = []
    for i, _ in enumerate(spec.stages):
        dit = WanTransformer3DModel(**strip(hf_config.dit_to_diffusers(spec.dit)))
        _perturb(dit, 100 + i)
        experts.append(dit.eval())
    vae = AutoencoderKLWan(**strip(hf_config.vae_to_diffusers(spec.vae)))
    _perturb(vae, 200)
    text_encoder = UMT5EncoderModel(UMT5Config(**hf_config.text_encoder_to_hf(spec.text_encoder)))
    _perturb(text_encoder, 300)
    tok_dir = folder / SPIECE_DIR
    _write_tokenizer(tok_dir, spec.text_encoder.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # diffusers saves tokenizer.json only; the sentencepiece model it came from stays beside the
    # checkpoint, the source that prompt_ids_check holds the checkpoint's tokenizer to.
    assert len(tokenizer) == _sentencepiece(tok_dir / "spiece.model").get_piece_size()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=spec.sample_shift, solver_order=2, solver_type="bh2",
                                        final_sigmas_type="zero", lower_order_final=True)
    cls = WanImageToVideoPipeline if spec.task == "i2v" else WanPipeline
    kwargs = dict(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                  transformer=experts[0], transformer_2=experts[1] if len(experts) > 1 else None,
                  boundary_ratio=spec.boundary, expand_timesteps=spec.dit.per_token_timestep)
    if cls is WanImageToVideoPipeline:
        kwargs.update(image_encoder=None, image_processor=None)
    pipe = cls(**kwargs)
    # A small shard size makes the transformer sharded with an index json, like real checkpoints.
    pipe.save_pretrained(folder / "ckpt", max_shard_size="200KB", safe_serialization=True)
    return folder / "ckpt"


SPIECE_DIR = "_tok"  # beside write_diffusers_checkpoint's "ckpt": the tokenizer's spiece.model


def _sentencepiece(model_file: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_file))


def sentencepiece_ids(model_file: Path, prompts: list[str], length: int) -> torch.Tensor:
    """What Wan's tokenization must give, from sentencepiece itself: each cleaned prompt's
    pieces, EOS (id 1), then padding (id 0) to `length`."""
    from wan_rt.models.text_encoder import clean_prompt

    sp = _sentencepiece(model_file)
    assert (sp.eos_id(), sp.pad_id()) == (1, 0)
    rows = []
    for prompt in prompts:
        ids = sp.encode(clean_prompt(prompt)) + [sp.eos_id()]
        assert len(ids) <= length, f"test prompt {prompt!r} is meant to fit in {length} tokens"
        rows.append(ids + [sp.pad_id()] * (length - len(ids)))
    return torch.tensor(rows)


@pytest.fixture(scope="session")
def prompt_ids_check():
    """prompt_ids_check(tokenizer, spiece_model, prompts, length) -> ids, after asserting that
    Wan's tokenization of `prompts` gives sentencepiece's own ids and that no two prompts share
    ids: tests comparing two sides that share a tokenizer check it against its source this way,
    and a tokenizer mapping every word to one id fails them."""
    from wan_rt.models.text_encoder import tokenize

    def check(tokenizer, spiece_model: Path, prompts: list[str], length: int) -> torch.Tensor:
        ids, mask = tokenize(tokenizer, prompts, max_sequence_length=length)
        want = sentencepiece_ids(spiece_model, prompts, length)
        assert torch.equal(ids, want), f"tokenizer ids {ids.tolist()} != sentencepiece's {want.tolist()}"
        assert torch.equal(mask, (want != 0).long())
        assert len({tuple(row) for row in ids.tolist()}) == len(prompts), f"prompts share ids: {ids.tolist()}"
        return ids

    return check


@pytest.fixture(scope="session")
def diffusers_checkpoint(tmp_path_factory):
    """diffusers_checkpoint("tiny-t2v-A14B") -> folder (made once per session)."""
    made: dict[str, Path] = {}

    def make(spec_name: str) -> Path:
        if spec_name not in made:
            made[spec_name] = write_diffusers_checkpoint(spec_name, tmp_path_factory.mktemp(spec_name))
        return made[spec_name]

    return make


# ---- shared fixtures ---------------------------------------------------------------------------
def _tests_file(name: str):
    """A file of tests/ as a module, loaded by path: the tests folder stays off sys.path (its
    kernels/ would shadow a package of that name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"wan_rt_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def single_files():
    """tests/single_files.py (writers of ComfyUI / fp8 scaled / GGUF component files), loaded by path."""
    return _tests_file("single_files")


@pytest.fixture(scope="session")
def engine_checks():
    """tests/engine_checks.py: the checks every engine backend's tests share."""
    return _tests_file("engine_checks")


@pytest.fixture(scope="session")
def serve_helpers():
    """tests/test_serve.py's `wan-rt serve` process (Server) and HTTP helpers, for the other
    service tests."""
    return _tests_file("test_serve")


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """The folder of wan_rt's C++ build (wan-rt-cpp, run_graph, wan-rt-cpp-probe), built once per
    session (`wan_rt.cpp.build`, cached by sources). A failing build fails the test; only a machine
    without cmake skips (.ci/run installs it and the libraries the build needs)."""
    import shutil

    if shutil.which("cmake") is None:
        pytest.skip("needs cmake and the C++ dependencies (.ci/run installs them)")
    from wan_rt.cpp import build

    return build().parent


@pytest.fixture
def spy_launches(monkeypatch):
    """Count launches of a module's @triton.jit kernel: `counts = spy(module, "_kernel_name")`,
    then `counts["_kernel_name"]`. Replaces the module global with a proxy whose
    `kernel[grid](...)` records and forwards, so a test can assert the Triton kernel itself ran
    (not a torch fallback). Callers set TRITON_INTERPRET before the kernel modules import."""
    from collections import Counter

    import triton

    counts: Counter = Counter()

    def spy(module: object, name: str) -> Counter:
        kernel = getattr(module, name)
        assert isinstance(kernel, triton.runtime.jit.KernelInterface), f"{name} is not a Triton kernel"

        class _Proxy:
            def __getitem__(self, grid):
                counts[name] += 1
                return kernel[grid]

        monkeypatch.setattr(module, name, _Proxy())
        return counts

    return spy


# ---- mypy against TensorRT's APIs (tests/test_trt.py, tests/kernels/test_trt_plugin.py) ----------
@pytest.fixture(scope="session")
def trt_mypy(tmp_path_factory):
    """trt_mypy(*paths, against="tensorrt_rtx") -> (report, exit status) of mypy
    --disallow-untyped-defs over `paths`, with `import tensorrt_rtx` resolved to stubs generated
    (mypy's stubgen) from the installed TensorRT for RTX bindings, and `import tensorrt` to the
    installed tensorrt-stubs (TensorRT itself cannot be installed here). `against="tensorrt"`
    checks wan_rt's shared TensorRT code (trt_lib.trt) against tensorrt-stubs instead.

    tensorrt-stubs 10.13 does not parse as shipped (a parameter named `in`, a non-default
    parameter after defaults) and has no py.typed marker, so mypy reads a copy with those two
    mechanical repairs; the bindings of tensorrt_rtx ship no stubs at all. Both go on mypy_path,
    errors inside them silenced. Everything else (torch, wan_rt outside `paths`) is skipped,
    i.e. Any: only TensorRT's types are checked. Each caller also runs a deliberately wrong
    snippet, so a pass means the stubs were really in use."""
    from importlib import metadata
    import re
    import shutil

    mypy_api = pytest.importorskip("mypy.api", reason="needs mypy (the test extra)")
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("needs tensorrt-stubs (the test extra)")
    src = Path(str(dist.locate_file("tensorrt"))).parent
    root = tmp_path_factory.mktemp("trt_stubs")
    stubs = root / "stubs"
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(src / pkg, stubs / pkg)
    pyi = stubs / "tensorrt_bindings" / "tensorrt.pyi"
    text = pyi.read_text()
    text, n_in = re.subn(r"([(,]\s*)in:", r"\1in_:", text)  # `in` is a keyword
    text, n_def = re.subn(r"(= None, channel_axis: int)\)", r"\1 = ...)", text)  # add_scale_nd
    assert n_in + n_def > 0, "tensorrt-stubs changed: revisit the repairs"
    pyi.write_text(text)
    has_rtx = _generate_rtx_stubs(stubs)
    cfg = root / "mypy.ini"
    cfg.write_text(
        "[mypy]\n"
        "follow_imports = skip\n"  # torch & co. are Any: only TensorRT's types matter here
        f"mypy_path = {stubs}\n"
        f"cache_dir = {root / 'cache'}\n"
        "warn_unused_ignores = False\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*,"
        "tensorrt_rtx,tensorrt_rtx.*,tensorrt_rtx_bindings,tensorrt_rtx_bindings.*]\n"
        "follow_imports = normal\n"
        "ignore_errors = True\n"
        "[mypy-tensorrt_libs,tensorrt_rtx_libs]\n"
        "ignore_missing_imports = True\n"
        # export/ and kernels/ install as wan_rt.export / wan_rt.kernels through a path mapping
        # mypy cannot see; they are skipped (Any) like every other non-tensorrt import anyway.
        "[mypy-wan_rt.export.*,wan_rt.kernels.*]\n"
        "ignore_missing_imports = True\n"
    )

    def run(*paths: Path, against: str = "tensorrt_rtx") -> tuple[str, int]:
        if not has_rtx and any("tensorrt_rtx" in Path(p).read_text() for p in paths):
            pytest.skip("needs tensorrt_rtx (pip install 'wan-rt[trt-rtx]') to generate its stubs")
        flags = [f"--always-{'true' if against == 'tensorrt' else 'false'}=TYPECHECK_WITH_TENSORRT"]
        out, err, status = mypy_api.run(["--config-file", str(cfg), "--disallow-untyped-defs",
                                         "--no-incremental", *flags, *map(str, paths)])
        return out + err, status

    return run


def _generate_rtx_stubs(stubs: Path) -> bool:
    """Stubs of the installed tensorrt_rtx (and its pybind11 bindings) into `stubs`, written by
    mypy's stubgen from the real module's signatures; False if tensorrt_rtx does not import."""
    import re
    import subprocess
    import sys

    try:
        import tensorrt_rtx  # noqa: F401
    except (ImportError, OSError):
        return False
    subprocess.run([sys.executable, "-c", "from mypy.stubgen import main; main()", "-p", "tensorrt_rtx_bindings",
                    "-m", "tensorrt_rtx", "-o", str(stubs), "--quiet"], check=True)
    # The bindings' own signature has the bug tensorrt-stubs has (add_scale_nd: a required
    # parameter after defaults); the same repair.
    pyi = stubs / "tensorrt_rtx_bindings" / "tensorrt_rtx.pyi"
    text, n = re.subn(r"(= \.\.\., channel_axis: typing\.SupportsInt)\)", r"\1 = ...)", pyi.read_text())
    assert n == 1, "tensorrt_rtx's add_scale_nd signature changed: revisit the repair"
    pyi.write_text(text)
    return True


# ---- checkpoints in other storage dtypes and sizes ------------------------------------------------
def _bench_module(name: str):
    """bench/<name>.py, loaded by path (bench/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"wan_rt_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_size_bench():
    """bench/real_size.py: its checkpoint writer and process-tree memory sampler."""
    return _bench_module("real_size")


@pytest.fixture(scope="session")
def tiny_t2v_bf16(tmp_path_factory) -> Path:
    """The tiny T2V with every floating tensor stored in bf16 (as published checkpoints are; the
    presets store fp32)."""
    from safetensors.torch import load_file, save_file

    from wan_rt.resolve import resolve_checkpoint

    folder = tmp_path_factory.mktemp("bf16") / "tiny-t2v-bf16"
    shutil.copytree(resolve_checkpoint("tiny-t2v-A14B").files.root, folder)
    for f in folder.rglob("*.safetensors"):
        sd = load_file(f)
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, f)
    return folder


# ---- a deployment's shared services, private to the session --------------------------------------
@pytest.fixture(scope="session")
def local_services():
    """bench/local_services.py (a private PostgreSQL server, moto's S3 server), loaded by path."""
    return _bench_module("local_services")


@pytest.fixture(scope="session")
def postgres_url(local_services):
    """A private PostgreSQL server (wan-rt serve's shared job store), stopped at the end of the session."""
    try:
        with local_services.private_postgres() as url:
            yield url
    except local_services.Unavailable as exc:
        pytest.skip(str(exc))
