"""kernels/trt_plugin.py: type-checked with mypy against the installed tensorrt-stubs.

TensorRT itself cannot be installed here, so the plugin has never run; this is the only check.
tensorrt-stubs 10.13 does not parse as shipped (a parameter named `in`, a non-default parameter
after defaults) and has no py.typed marker, so the test type-checks against a copy with those two
mechanical repairs, put on mypy_path, errors inside the stubs silenced. The stubs lack the
`tensorrt.plugin` namespace, so the @trtp.* parts are Any to mypy: only the network helpers and
the module's own typing are really checked. A deliberately wrong snippet proves the stubs are in
use (otherwise a pass would mean nothing).
"""

from __future__ import annotations

import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest

import wan_rt.kernels

mypy_api = pytest.importorskip("mypy.api", reason="needs mypy (the test extra)")


def _stubs_dir() -> Path:
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("needs tensorrt-stubs (the test extra)")
    return Path(str(dist.locate_file("tensorrt"))).parent


@pytest.fixture(scope="module")
def mypy_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trt_stubs")
    src = _stubs_dir()
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(src / pkg, root / "stubs" / pkg)
    pyi = root / "stubs" / "tensorrt_bindings" / "tensorrt.pyi"
    text = pyi.read_text()
    text, n_in = re.subn(r"([(,]\s*)in:", r"\1in_:", text)  # `in` is a keyword
    text, n_def = re.subn(r"(= None, channel_axis: int)\)", r"\1 = ...)", text)  # add_scale_nd
    assert n_in + n_def > 0, "tensorrt-stubs changed: revisit the repairs"
    pyi.write_text(text)
    cfg = root / "mypy.ini"
    cfg.write_text(
        "[mypy]\n"
        "follow_imports = skip\n"  # torch & co. are Any: only tensorrt's types matter here
        f"mypy_path = {root / 'stubs'}\n"
        f"cache_dir = {root / 'cache'}\n"
        "warn_unused_ignores = False\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\n"
        "follow_imports = normal\n"
        "ignore_errors = True\n"
        "[mypy-tensorrt_libs]\n"
        "ignore_missing_imports = True\n"
    )
    return cfg


def _mypy(cfg: Path, *paths: Path) -> tuple[str, int]:
    out, err, status = mypy_api.run(["--config-file", str(cfg), "--disallow-untyped-defs",
                                     "--no-incremental", *map(str, paths)])
    return out + err, status


def test_trt_plugin_type_checks_against_tensorrt_stubs(mypy_config):
    plugin = Path(wan_rt.kernels.__file__).with_name("trt_plugin.py")
    report, status = _mypy(mypy_config, plugin)
    assert status == 0, report


def test_trt_plugin_type_check_has_teeth(mypy_config, tmp_path):
    bad = tmp_path / "bad_network_use.py"
    bad.write_text(
        "import tensorrt as trt\n\n\n"
        "def f(network: trt.INetworkDefinition, x: trt.ITensor) -> trt.ITensor:\n"
        "    return network.add_plugin_v9(x)\n"
    )
    report, status = _mypy(mypy_config, bad)
    assert status == 1 and "add_plugin_v9" in report, report


def test_trt_plugin_import_is_guarded():
    """Importing the module works without TensorRT; registering names the fix."""
    from wan_rt.kernels import trt_plugin

    if trt_plugin.HAVE_TRT_PLUGIN:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(ImportError, match="TensorRT"):
        trt_plugin.register_plugins()
