"""Real size on this machine: write real-size random-weight checkpoints, run wan-rt on them, and
record what each command owns.

    python bench/real_size.py --root /data/real --models ti2v-5B --commands run-bf16,run-auto

1. Checkpoints: TI2V-5B, T2V-A14B, I2V-A14B in the diffusers layout, built with diffusers' and
   transformers' own classes on the meta device and written shard by shard (a shard's random
   tensors are the only weights ever in RAM), bf16 or fp32. An A14B checkpoint hard-links one
   expert as both, and every checkpoint hard-links one umT5 (same shapes for all three), so the
   three take ~51 GB at bf16. The tokenizer is the tiny preset's (its ids are valid for umT5).
2. Each command runs in a subprocess while /proc is sampled every 50 ms over the whole process
   tree: peak anonymous RSS (RssAnon: memory the processes own) and peak file-mapped RSS
   (RssFile: memory-mapped weights, page cache the kernel can drop), wall time, output bytes.

Random weights: memory, time and sizes are those of the real models; quality is not measured.
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

GIB = 2**30
SHARD_BYTES = 5 * 10**9  # diffusers' default max_shard_size


def _random_like(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Weights that keep activations finite: unit norms, small matrices, zero biases."""
    if len(shape) == 1 and ("norm" in name or name.endswith(".scale") or name.endswith("gamma")):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    out = torch.empty(shape, dtype=torch.float32)
    out.normal_(0.0, 1.0 / math.sqrt(max(fan_in, 1)), generator=gen)
    return out.to(dtype)


def write_sharded(module: torch.nn.Module, folder: Path, stem: str, dtype: torch.dtype, skip=()) -> int:
    """`module` (on the meta device) as random safetensors shards + index; returns bytes written."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    entries = [(k, tuple(v.shape)) for k, v in module.state_dict().items() if k not in skip]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else f"{stem}.safetensors"
        tensors = {k: _random_like(k, s, dtype, gen) for k, s in shard}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    if len(shards) > 1:
        (folder / f"{stem}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def write_checkpoint(name: str, root: Path, dtype: torch.dtype) -> Path:
    """A real-size diffusers-layout checkpoint of preset `name` under root; reuses what exists."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from wan_rt.config import get_spec
    from wan_rt.models import hf_config
    from wan_rt.resolve import resolve_checkpoint

    spec = get_spec(name)
    tag = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    folder = root / f"{name}-{tag}"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = root / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tiny = resolve_checkpoint(f"tiny-{name}").files.root
    shutil.copytree(tiny / "tokenizer", tmp / "tokenizer")
    shutil.copytree(tiny / "scheduler", tmp / "scheduler")
    index = json.loads((tiny / "model_index.json").read_text())
    index.pop("wan_rt_preset", None)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))

    shared_te = root / f"umt5-{tag}"  # one umT5 for every checkpoint, hard-linked
    if not (shared_te / "config.json").is_file():
        te_tmp = root / f".umt5-{tag}.partial"
        shutil.rmtree(te_tmp, ignore_errors=True)
        te_tmp.mkdir()
        config = UMT5Config(**hf_config.text_encoder_to_hf(spec.text_encoder))
        with torch.device("meta"):
            encoder = UMT5EncoderModel(config)
        write_sharded(encoder, te_tmp, "model", dtype, skip={"encoder.embed_tokens.weight"})
        config.save_pretrained(te_tmp)
        os.replace(te_tmp, shared_te)
    _link_tree(shared_te, tmp / "text_encoder")

    dit_cfg = hf_config.dit_to_diffusers(spec.dit)
    with torch.device("meta"):
        dit = WanTransformer3DModel.from_config(dit_cfg)
    (tmp / "transformer").mkdir()
    write_sharded(dit, tmp / "transformer", "diffusion_pytorch_model", dtype)
    (tmp / "transformer" / "config.json").write_text(json.dumps(dit_cfg, indent=1))
    if len(spec.stages) > 1:  # the second expert: same shapes, hard-linked (disk, not RAM, is short)
        _link_tree(tmp / "transformer", tmp / "transformer_2")

    vae_cfg = hf_config.vae_to_diffusers(spec.vae)
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(vae_cfg)
    (tmp / "vae").mkdir()
    write_sharded(vae, tmp / "vae", "diffusion_pytorch_model", torch.float32)  # published VAEs are fp32
    (tmp / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=1))
    os.replace(tmp, folder)
    return folder


def write_ci_checkpoint(folder: Path, num_layers: int, dtype: torch.dtype) -> int:
    """The memory tests' checkpoint (a size CI affords): the tiny T2V with its two experts
    replaced by a `num_layers` x 1536 DiT stored in `dtype`, hard-linked as both. Returns the
    bytes of one expert."""
    from diffusers import WanTransformer3DModel

    from wan_rt.models import hf_config
    from wan_rt.resolve import resolve_checkpoint

    tiny = resolve_checkpoint("tiny-t2v-A14B")
    shutil.copytree(tiny.files.root, folder)
    big = dataclasses.replace(tiny.spec.dit, dim=1536, ffn_dim=6144, num_heads=12, num_layers=num_layers)
    config = hf_config.dit_to_diffusers(big)
    with torch.device("meta"):
        dit = WanTransformer3DModel.from_config(config)
    for sub in ("transformer", "transformer_2"):
        shutil.rmtree(folder / sub)
    (folder / "transformer").mkdir()
    weight_bytes = write_sharded(dit, folder / "transformer", "diffusion_pytorch_model", dtype)
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    _link_tree(folder / "transformer", folder / "transformer_2")
    return weight_bytes


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)


# ------------------------------------------------------------------------------------------ measuring

def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def measure(cmd: list[str], outputs: list[Path], timeout: float, env: dict | None = None,
            cwd: Path | None = None, echo: bool = False) -> dict:
    """Run `cmd`, sampling the process tree's RssAnon / RssFile; -> figures. echo: print each
    line the command prints as it comes, with the time and the peak owned so far."""
    for p in outputs:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    peak_anon = peak_file = 0
    lines: list[str] = []

    def read() -> None:  # a thread: the pipe must be drained while the command runs
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(f"  {time.perf_counter() - start:7.1f}s  {peak_anon / GIB:5.2f} GiB owned so far | {line.rstrip()}",
                      flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None and time.perf_counter() - start < timeout:
        anon = file = 0
        for p in _tree(proc.pid):
            a, f = _rss(p)
            anon, file = anon + a, file + f
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join()
    out = "".join(lines)
    size = sum(f.stat().st_size for p in outputs if p.exists()
               for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_anon_gb": round(peak_anon / GIB, 2), "peak_file_gb": round(peak_file / GIB, 2),
            "output_gb": round(size / GIB, 3), "last_line": out.strip().splitlines()[-1] if out.strip() else ""}


def _first_frame(path: Path) -> Path:
    """A 64x64 gradient PNG (the image-to-video runs' first frame)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                              np.full((64, 64), 128, np.uint8)], axis=-1)).save(path)
    return path


# The checkpoint's VAE decoding random latents at one size (argv: folder, height, width): frame 0,
# then one 4-frame chunk, the eager pipeline's own decode. What a VAE pass owns per pixel.
_VAE_DECODE = """
import sys, torch
from wan_rt.models import load_component
from wan_rt.resolve import resolve_checkpoint
r = resolve_checkpoint(sys.argv[1])
h, w = int(sys.argv[2]), int(sys.argv[3])
vae = load_component(r.files, "vae_decoder", dtype=torch.float32, device="cpu")
st, sh, sw = r.spec.vae.stride
with torch.inference_mode():
    video = vae.decode(torch.randn(1, r.spec.vae.z_dim, 2, h // sh, w // sw))
print("decoded", tuple(video.shape))
"""


def commands(folder: Path, work: Path) -> dict[str, tuple[list[str], list[Path]]]:
    from wan_rt.child_process import python_command

    wan = python_command("-m", "wan_rt.cli")  # the current folder (a clone's root) stays off sys.path
    small = ["--height", "64", "--width", "64", "--frames", "5", "--steps", "2"]
    if folder.name.startswith("i2v"):  # image-to-video: a first frame is required
        small += ["--image", str(_first_frame(work / "first_frame.png"))]
    mp4 = work / "out.mp4"
    dit = "dit" if folder.name.startswith("ti2v") else "dit_high_noise"
    return {
        "run-bf16": ([*wan, "run", "--model", str(folder), *small, "--dtype", "bf16", "--output", str(mp4)], [mp4]),
        "run-auto": ([*wan, "run", "--model", str(folder), *small, "--output", str(mp4)], [mp4]),
        "run-fp32": ([*wan, "run", "--model", str(folder), *small, "--dtype", "fp32", "--output", str(mp4)], [mp4]),
        # A TensorRT for RTX plan of the (first) DiT for sm89 (an RTX 4090), built on this CPU machine.
        **{f"build-trt-{p}": ([*wan, "build", "--model", str(folder), "--backend", "trt", "--precision", p,
                               "--trt-targets", "sm89", "--components", dit, "--engines-dir", str(work / f"engines-{p}"),
                               "--height", "64", "--width", "64", "--frames", "5", "--text-len", "64"],
                              [work / f"engines-{p}"]) for p in ("bf16", "fp8")},
        # The same with the DiT's blocks in N engines (`--dit-parts`): the builder holds one part's plan.
        **{f"build-trt-{p}-parts{n}": ([*wan, "build", "--model", str(folder), "--backend", "trt", "--precision", p,
                                        "--trt-targets", "sm89", "--components", dit, "--dit-parts", str(n),
                                        "--engines-dir", str(work / f"engines-{p}-parts{n}"), "--height", "64",
                                        "--width", "64", "--frames", "5", "--text-len", "64"],
                                       [work / f"engines-{p}-parts{n}"]) for p in ("bf16", "fp8") for n in (2, 3, 4)},
        # AOTInductor packages of the (first) DiT in the dtype its files hold, so its weights are
        # the checkpoint's own bytes (hard-linked, not copied: export/aoti_export.py).
        "build-aoti": ([*wan, "build", "--model", str(folder), "--backend", "aoti", "--precision",
                        "fp32" if folder.name.endswith("fp32") else "bf16", "--components", dit,
                        "--engines-dir", str(work / "engines-aoti"), "--height", "64", "--width", "64",
                        "--frames", "5", "--text-len", "64"], [work / "engines-aoti"]),
        # Every component into the same engines dir (the DiT's packages stay if up to date), then
        # the pipeline run on them.
        "build-aoti-all": ([*wan, "build", "--model", str(folder), "--backend", "aoti", "--precision",
                            "fp32" if folder.name.endswith("fp32") else "bf16", "--engines-dir", str(work / "engines-aoti"),
                            "--height", "64", "--width", "64", "--frames", "5", "--text-len", "64"], []),
        "run-aoti": ([*wan, "run", "--engines-dir", str(work / "engines-aoti"), *small, "--output", str(mp4)], [mp4]),
        # A larger video: the VAE decode is the peak (bench/RESULTS.md, about 25 KB per pixel).
        "run-480p": ([*wan, "run", "--model", str(folder), "--height", "480", "--width", "832", "--frames", "21",
                      "--steps", "2", "--dtype", "bf16", "--output", str(mp4)], [mp4]),
        **{f"vae-decode-{n}": (python_command("-c", _VAE_DECODE, str(folder), str(n), str(n)), [])
           for n in (128, 256)},
        # ONNX Runtime engines of the VAE decoder in fp32 (Wan's VAE files are fp32: the engine
        # points at them through hard links), then wan-rt parity on them.
        "build-ort-vae": ([*wan, "build", "--model", str(folder), "--backend", "ort", "--precision", "fp32",
                           "--components", "vae_decoder", "--engines-dir", str(work / "engines-ort-vae"),
                           "--height", "64", "--width", "64", "--frames", "5"], [work / "engines-ort-vae"]),
        "parity-ort-vae": ([*wan, "parity", "--engines-dir", str(work / "engines-ort-vae"), "--steps", "0",
                            "--device", "cpu"], []),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="where the checkpoints are written (~51 GB at bf16)")
    ap.add_argument("--models", default="ti2v-5B,t2v-A14B,i2v-A14B")
    ap.add_argument("--weights-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--commands", default="run-bf16,run-auto,run-fp32,build-trt-bf16,build-trt-fp8,build-aoti")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--echo", action="store_true", help="print each command's output as it comes, with its peak so far")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.weights_dtype]
    args.root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        folder = write_checkpoint(name, args.root, dtype)
        written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {written / GIB:.1f} GiB ({time.perf_counter() - t0:.0f} s to write or find)", flush=True)
        work = args.root / "work"
        work.mkdir(exist_ok=True)
        table = commands(folder, work)
        for cmd_name in args.commands.split(","):
            cmd, outputs = table[cmd_name]
            row = {"model": name, "weights": args.weights_dtype, "command": cmd_name,
                   **measure(cmd, outputs, args.timeout, echo=args.echo)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | weights | command | rc | wall s | peak owned GiB (RssAnon) | peak mapped GiB (RssFile) | output GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['command']} | {r['rc']} | {r['wall_s']} | {r['peak_anon_gb']} "
              f"| {r['peak_file_gb']} | {r['output_gb']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
