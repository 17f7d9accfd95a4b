"""Host RAM is checked before anything loads (wan_rt/host_memory.py): a run that cannot fit is
refused in one line naming what would fit, and a dtype left open on the CPU becomes one that fits.

The budget is set through $WAN_RT_HOST_MEMORY_GB, the same knob a service sharing its box uses;
the thresholds come from the module's own accounting of the checkpoint on disk, so the tests
check both the decision and that the CLI acts on it.
"""

import pytest
import torch
from safetensors.torch import load_file

from wan_rt.build import _fit_build
from wan_rt.cli import main
from wan_rt.host_memory import (BASE_BYTES, TRT_BUILD_FACTOR, HostMemoryError, build_need,
                                choose_host_dtype, host_need)
from wan_rt.precision import component_dtype
from wan_rt.resolve import resolve_checkpoint

GIB = 2**30
SIZE = (32, 32, 5)


def _names(spec):
    return ["text_encoder", *spec.dit_components, "vae_encoder", "vae_decoder"]


def test_weights_used_as_stored_stay_mapped_converted_ones_are_owned(tiny_t2v_bf16):
    r = resolve_checkpoint(str(tiny_t2v_bf16))
    dits = list(r.spec.dit_components)
    as_stored = host_need(r.spec, r.files, dits, torch.bfloat16)
    converted = host_need(r.spec, r.files, dits, torch.float32)
    numel = sum(t.numel() for d in dits for t in load_file(r.files.dits[d] / "diffusion_pytorch_model.safetensors").values())
    assert as_stored.converted_weights == 0 and as_stored.mapped_weights == 2 * numel
    assert converted.converted_weights == 4 * numel and converted.mapped_weights == 0
    assert as_stored.activations == 0  # no size: weights only
    assert host_need(r.spec, r.files, dits, torch.bfloat16, SIZE).activations > 0


def test_open_dtype_picks_bf16_only_when_fp32_does_not_fit(tiny_t2v_bf16):
    r = resolve_checkpoint(str(tiny_t2v_bf16))
    names = _names(r.spec)
    fp32 = host_need(r.spec, r.files, names, torch.float32, SIZE).owned
    bf16 = host_need(r.spec, r.files, names, torch.bfloat16, SIZE).owned
    assert bf16 < fp32
    assert choose_host_dtype(r.spec, r.files, names, None, SIZE, budget=fp32) == (torch.float32, None)
    dtype, note = choose_host_dtype(r.spec, r.files, names, None, SIZE, budget=(fp32 + bf16) // 2)
    assert dtype == torch.bfloat16 and "running bf16" in note
    with pytest.raises(HostMemoryError, match="--dtype bf16 needs"):
        choose_host_dtype(r.spec, r.files, names, torch.float32, SIZE, budget=(fp32 + bf16) // 2)
    with pytest.raises(HostMemoryError, match="available"):
        choose_host_dtype(r.spec, r.files, names, None, SIZE, budget=bf16 - 1)


def test_cli_refuses_what_cannot_fit_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAN_RT_HOST_MEMORY_GB", str(BASE_BYTES / GIB / 2))
    out = tmp_path / "never.mp4"
    assert main(["run", "--model", "tiny-t2v-A14B", "--steps", "1", "--dtype", "fp32", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs" in err and "GiB available" in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_bf16_when_only_bf16_fits_and_says_so(tiny_t2v_bf16, tmp_path, capsys, monkeypatch):
    r = resolve_checkpoint(str(tiny_t2v_bf16))
    names = _names(r.spec)
    size = (r.spec.height, r.spec.width, 5)
    fp32 = host_need(r.spec, r.files, names, torch.float32, size).owned
    bf16 = host_need(r.spec, r.files, names, torch.bfloat16, size).owned
    monkeypatch.setenv("WAN_RT_HOST_MEMORY_GB", repr((fp32 + bf16) / 2 / GIB))
    out = tmp_path / "auto.mp4"
    assert main(["run", "--model", str(tiny_t2v_bf16), "--steps", "1", "--frames", "5", "--output", str(out)]) == 0
    assert "running bf16" in capsys.readouterr().err
    assert out.is_file()


def test_bad_budget_variable_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAN_RT_HOST_MEMORY_GB", "lots")
    assert main(["run", "--steps", "1", "--model", "tiny-t2v-A14B", "--output", str(tmp_path / "x.mp4")]) == 2
    assert "WAN_RT_HOST_MEMORY_GB must be a number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ builds
def _build_needs(r, backend, component):
    dtypes = {p: {component: component_dtype(component, p, backend, torch.device("cpu"))} for p in ("fp32", "bf16")}
    return {p: build_need(r.spec, r.files, d, backend) for p, d in dtypes.items()}


def test_build_need_counts_conversions_export_and_the_trt_builder(tiny_t2v_bf16):
    r = resolve_checkpoint(str(tiny_t2v_bf16))
    numel = sum(t.numel() for t in load_file(r.files.dits["dit_high_noise"] / "diffusion_pytorch_model.safetensors").values())
    ort, trt = _build_needs(r, "ort", "dit_high_noise"), _build_needs(r, "trt", "dit_high_noise")
    # bf16 files built in fp32 own the converted copy; the export holds no weights; TensorRT's
    # builder holds the engine it serializes.
    assert ort["bf16"].owned == BASE_BYTES and ort["fp32"].owned == BASE_BYTES + 4 * numel
    assert trt["bf16"].owned == BASE_BYTES + int(TRT_BUILD_FACTOR * 2 * numel)
    assert trt["bf16"].disk == 2 * (2 * numel)  # the staged ONNX beside the plan
    fp8 = build_need(r.spec, r.files, {"dit_high_noise": torch.bfloat16}, "trt", quantized=["dit_high_noise"])
    assert fp8.disk == numel + numel  # the Q/DQ ONNX (no bf16 copy staged), then a one-byte-per-weight plan


def test_build_that_cannot_fit_is_one_line_and_leaves_no_engines_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAN_RT_HOST_MEMORY_GB", str(BASE_BYTES / GIB / 2))
    engines = tmp_path / "engines"
    assert main(["build", "--backend", "ort", "--model", "tiny-t2v-A14B", "--components", "dit_high_noise",
                 "--engines-dir", str(engines)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs" in err[0] and "GiB of RAM available" in err[0], err
    assert not engines.exists()


def test_build_with_precision_left_open_picks_bf16_when_only_bf16_fits(tiny_t2v_bf16, tmp_path, monkeypatch):
    """aoti on a CPU defaults to fp32 (an AOTInductor compile takes minutes, so the decision is
    checked at the function the CLI calls); ort has no bf16, so nothing is chosen for it."""
    r = resolve_checkpoint(str(tiny_t2v_bf16))
    needs = _build_needs(r, "aoti", "dit_high_noise")
    monkeypatch.setenv("WAN_RT_HOST_MEMORY_GB", repr((needs["fp32"].owned + needs["bf16"].owned) / 2 / GIB))
    said = []
    cpu = torch.device("cpu")
    assert _fit_build(r, ["dit_high_noise"], "aoti", "fp32", cpu, tmp_path, False, None, said.append) == ("bf16", 1)
    assert "building bf16" in said[0]
    with pytest.raises(HostMemoryError, match="--precision bf16 needs"):  # asked for: refused, not changed
        _fit_build(r, ["dit_high_noise"], "aoti", "fp32", cpu, tmp_path, True, None, said.append)
    ort = _build_needs(r, "ort", "dit_high_noise")["fp32"]
    monkeypatch.setenv("WAN_RT_HOST_MEMORY_GB", repr((ort.owned - 1) / GIB))
    with pytest.raises(HostMemoryError) as refused:
        _fit_build(r, ["dit_high_noise"], "ort", "fp32", cpu, tmp_path, False, None, said.append)
    assert "--precision bf16" not in str(refused.value)
    assert "fewer --components" not in str(refused.value)  # one component asked for already


def test_build_short_of_disk_only_says_so(tmp_path, capsys, monkeypatch):
    """An engines dir on a disk with no room (and not the checkpoint's: on that one an fp32 ONNX
    Runtime build of these fp32 files would write no weights at all) is refused before anything
    is written."""
    import wan_rt.build

    monkeypatch.setattr(wan_rt.build, "free_disk_bytes", lambda _folder: 0)
    monkeypatch.setattr(wan_rt.build, "same_disk", lambda _paths, _folder: False)
    engines = tmp_path / "engines"
    assert main(["build", "--backend", "ort", "--model", "tiny-t2v-A14B", "--engines-dir", str(engines)]) == 2
    err = capsys.readouterr().err.strip()
    assert "0.0 GiB free under" in err and "an --engines-dir on a disk with" in err and "fewer --components" in err
    assert not engines.exists()


def test_fp32_files_at_bf16_on_a_cpu_cast_block_linears_on_use(tmp_path):
    """wan_rt/runtime/cast_on_use.py: the DiT blocks' Linear weights stay mapped with one layer's
    cast owned, the text encoder runs in fp32 as stored; a GPU run still converts everything."""
    r = resolve_checkpoint("tiny-t2v-A14B")  # the presets store fp32
    sd = load_file(r.files.dits["dit_high_noise"] / "diffusion_pytorch_model.safetensors")
    linears = {k: v for k, v in sd.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2}
    rest = sum(v.numel() for k, v in sd.items() if k not in linears and v.is_floating_point())
    on_use = host_need(r.spec, r.files, ["dit_high_noise"], torch.bfloat16)
    whole = host_need(r.spec, r.files, ["dit_high_noise"], torch.bfloat16, cast_on_use=False)
    assert whole.converted_weights == 2 * (rest + sum(v.numel() for v in linears.values()))
    assert on_use.converted_weights == 2 * rest + 2 * max(v.numel() for v in linears.values())
    assert on_use.mapped_weights == 4 * sum(v.numel() for v in linears.values())
    te_numel = sum(v.numel() for v in load_file(r.files.text_encoder / "model.safetensors").values())
    assert host_need(r.spec, r.files, ["text_encoder"], torch.bfloat16).converted_weights == 0
    assert host_need(r.spec, r.files, ["text_encoder"], torch.bfloat16, cast_on_use=False).converted_weights \
        == 2 * te_numel
    # and the decision follows: a budget between the two fits bf16 only when cast on use
    names = ["text_encoder", "dit_high_noise"]
    fits = host_need(r.spec, r.files, names, torch.bfloat16).owned
    assert choose_host_dtype(r.spec, r.files, names, torch.bfloat16, budget=fits)[0] == torch.bfloat16
    with pytest.raises(HostMemoryError):
        choose_host_dtype(r.spec, r.files, names, torch.bfloat16, budget=fits, cast_on_use=False)


@pytest.mark.parametrize("backend,stored,same,converted", [("aoti", "bf16", torch.bfloat16, torch.float32),
                                                           ("ort", "fp32", torch.float32, torch.float16)])
def test_engines_on_the_checkpoints_disk_count_only_the_weights_they_convert(tiny_t2v_bf16, tmp_path, backend,
                                                                           stored, same, converted):
    """AOTInductor and ONNX Runtime engines hard-link the weights they use as stored
    (export/checkpoint_links.py), so on the checkpoint's disk a build writes only the converted
    ones; elsewhere, all of them. (ONNX Runtime has no bf16: its case is the fp32 preset.)"""
    from wan_rt.host_memory import same_disk

    r = resolve_checkpoint(str(tiny_t2v_bf16) if stored == "bf16" else "tiny-t2v-A14B")
    numel = sum(t.numel() for t in load_file(r.files.dits["dit_high_noise"] / "diffusion_pytorch_model.safetensors").values())
    folder = tmp_path / "engines" / "not-yet" if stored == "bf16" else r.files.root / "engines-not-yet"
    assert same_disk([r.files.dits["dit_high_noise"]], folder)
    need = {(d, links): build_need(r.spec, r.files, {"dit_high_noise": d}, backend, links=links).disk
            for d in (same, converted) for links in (False, True)}
    assert need[same, True] == 0 and need[same, False] == same.itemsize * numel
    assert need[converted, True] == need[converted, False] == converted.itemsize * numel  # written
