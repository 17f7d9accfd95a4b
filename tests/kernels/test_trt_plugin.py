"""kernels/trt_plugin.py: type-checked with mypy against the installed tensorrt-stubs.

TensorRT itself cannot be installed here, so the plugin has never run; this is the only check.
tensorrt-stubs 10.13 does not parse as shipped (a parameter named `in`, a non-default parameter
after defaults) and has no py.typed marker, so the test type-checks against a copy with those two
mechanical repairs (the `trt_mypy` fixture in tests/conftest.py, shared with tests/test_trt.py).
The stubs lack the `tensorrt.plugin` namespace, so the @trtp.* parts are Any to mypy: only the
network helpers and the module's own typing are really checked. A deliberately wrong snippet proves the stubs are in
use (otherwise a pass would mean nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import wan_rt.kernels


def test_trt_plugin_type_checks_against_tensorrt_stubs(trt_mypy):
    plugin = Path(wan_rt.kernels.__file__).with_name("trt_plugin.py")
    report, status = trt_mypy(plugin)
    assert status == 0, report


def test_trt_plugin_type_check_has_teeth(trt_mypy, tmp_path):
    bad = tmp_path / "bad_network_use.py"
    bad.write_text(
        "import tensorrt as trt\n\n\n"
        "def f(network: trt.INetworkDefinition, x: trt.ITensor) -> trt.ITensor:\n"
        "    return network.add_plugin_v9(x)\n"
    )
    report, status = trt_mypy(bad)
    assert status == 1 and "add_plugin_v9" in report, report


def test_trt_plugin_import_is_guarded():
    """Importing the module works without TensorRT; registering names the fix."""
    from wan_rt.kernels import trt_plugin

    if trt_plugin.HAVE_TRT_PLUGIN:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(ImportError, match="TensorRT"):
        trt_plugin.register_plugins()
