"""`wan-rt run`: the README's main job writes a decodable mp4; bad input is one clear line."""

import os
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wan_rt.cli import main

WAN_RT = shutil.which("wan-rt")


def _read_mp4(path):
    import imageio.v3 as iio

    return iio.imread(path, plugin="pyav")  # [F, H, W, 3] uint8


@pytest.mark.skipif(WAN_RT is None, reason="the wan-rt console script is not installed")
def test_console_script_writes_mp4_of_requested_shape(tmp_path):
    out = tmp_path / "video.mp4"
    proc = subprocess.run([WAN_RT, "run", "--steps", "2", "--frames", "9", "--output", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    frames = _read_mp4(out)
    assert frames.shape == (9, 32, 32, 3)  # tiny-t2v-A14B default size 32x32
    assert frames.std() > 0
    assert not list(tmp_path.glob(".*partial*"))


def test_ti2v_image_to_video_via_cli(tmp_path):
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "ti2v.mp4"
    assert main(["run", "--model", "tiny-ti2v-5B", "--image", str(image), "--steps", "2",
                 "--output", str(out)]) == 0
    assert _read_mp4(out).shape == (5, 64, 64, 3)


@pytest.mark.parametrize("args,message", [
    (["--height", "40"], "multiples of 16"),
    (["--frames", "8"], "4k+1"),
    (["--steps", "0"], "num_inference_steps must be >= 1"),
    (["--model", "/no/such/checkpoint"], "model path not found: /no/such/checkpoint"),
    (["--model", "tiny-i2v-A14B"], "pass --image"),
    (["--image", "/no/such.png", "--model", "tiny-ti2v-5B"], "image not found"),
    (["--image", "x.png"], "text-to-video model"),
    (["--backend", "warp"], "--backend"),
    (["--steps", "two"], "--steps"),
])
def test_bad_input_is_one_line_nonzero_and_leaves_no_file(tmp_path, capsys, args, message):
    out = tmp_path / "bad.mp4"
    assert main(["run", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_output_path(tmp_path, capsys):
    assert main(["run", "--output", str(tmp_path / "video.gif")]) == 2
    assert "--output must end in .mp4" in capsys.readouterr().err
    assert main(["run", "--output", str(tmp_path / "missing" / "v.mp4")]) == 2
    assert "folder does not exist" in capsys.readouterr().err


@pytest.mark.skipif(WAN_RT is None, reason="the wan-rt console script is not installed")
def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([WAN_RT, "run", "--frames", "6", "--output", str(tmp_path / "x.mp4")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["wan-rt run: error: num_frames must be 4k+1 (1, 5, 9, ..., 81); got 6"]


def test_repo_root_is_not_importable_as_kernels():
    """transformers probes for a package named `kernels`; ours must only exist as wan_rt.kernels."""
    # transformers depends on the hub's own `kernels` package, so a top-level `kernels` may exist:
    # it must never be this repo's folder, and the repo root must not be on sys.path at all.
    code = ("import importlib.util as u, os, sys, wan_rt.kernels; s = u.find_spec('kernels'); "
            "print(s.origin if s is not None else None); print(*[os.path.realpath(p) for p in sys.path], sep='\\n')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.expanduser("~"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    origin, *path = proc.stdout.splitlines()
    repo = str(Path(__file__).resolve().parents[1])
    assert not origin.startswith(repo + os.sep), origin
    assert repo not in path, "the repo root is on sys.path: its kernels/ could shadow the hub package"


def test_help_states_each_default_once(capsys):
    """Every subcommand's --help: no "(default: None)" / "(default: False)", no "(default: X)"
    after a help that states its own default; real defaults still shown."""
    import re

    from wan_rt.cli import SUBCOMMANDS, build_parser

    parser, _ = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and set(a.choices) == set(SUBCOMMANDS))
    shown = {}
    for name, sub in subparsers.choices.items():
        assert main([name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help and action.help != "==SUPPRESS==":
                help_text = formatter._expand_help(action)
                assert len(re.findall(r"\bdefault:", help_text, re.I)) <= 1, (name, action.dest, help_text)
                shown[name, action.dest] = help_text
    assert shown["build", "trt_opt_level"].endswith("(default: 3)")
    assert shown["build", "height"] == "largest height the engines serve (default: the model's)"
    assert shown["run", "output"] == "mp4 path (default: out.mp4)"
    assert shown["run", "seed"].endswith("(default: 0)")
    assert shown["parity", "steps"].endswith("(default: 2)")
