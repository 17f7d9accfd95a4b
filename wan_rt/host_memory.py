"""Host RAM: what an eager run owns, worked out before anything loads, and whether it fits.

Weights read from safetensors (and `.pth` through `torch.load(mmap=True)`) stay memory-mapped
when they are used in the dtype they are stored in: they are file pages, which the kernel drops
and re-reads under pressure, not memory the process owns. Every tensor the run converts (bf16
files run in fp32, say) becomes anonymous memory, and so do activations. A run whose anonymous
memory exceeds what the machine has is killed by the kernel with no message, so `load_components`
asks here first: an explicit dtype that cannot fit is refused in one line naming what would fit,
and a dtype left open becomes the first of fp32 / bf16 that fits (said on stderr).

On a CPU, fp32 files run at bf16/fp16 are not converted whole (wan_rt.runtime.cast_on_use): the
DiT blocks' Linear weights stay mapped and one layer's cast is owned at a time, and a text
encoder stored in fp32 runs in fp32, mapped.

Activations are estimated from the model's dimensions at the requested size (the largest live
tensors of one DiT block at CFG batch 2, every block's cross-attention K/V, the text encoder at
its padded length, one VAE decode chunk at full resolution); the factors are upper bounds
checked against measured peaks by bench/real_size.py. GPU runs are planned by wan_rt.offload
(`--memory-budget`); this module counts only what lives in host memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from wan_rt.config import ModelSpec, latent_shape
from wan_rt.models.gguf_file import QuantizedWeight
from wan_rt.models.single_file import read_file
from wan_rt.precision import keep_blocks
from wan_rt.runtime.cast_on_use import LOW_PRECISION, cast_on_use_key
from wan_rt.runtime.graphs import block_range, rest_block_graphs

_GIB = 2**30
BUDGET_ENV = "WAN_RT_HOST_MEMORY_GB"  # the RAM wan_rt may plan for (default: what the machine has free)
# Process memory besides weights and activations: the interpreter, torch, tokenizer, allocator
# slack. A real-size TI2V-5B bf16 run at 64x64x5 owned 1.3-2.4 GiB at its peak (bench/RESULTS.md).
BASE_BYTES = int(2.0 * _GIB)
# What an eager fp32 VAE pass holds at its peak per pixel of the video: one chunk's (stride_t
# frames) full-resolution features, conv workspaces and the causal cache. Measured on the real
# VAEs' decoders (bench/RESULTS.md: growth between 128, 192 and 256 px squares at 5 frames, 25-31
# KB for 2.1 and 24 KB for 2.2 over repeated runs; a 480x832x21 TI2V-5B run owned 9.9 GiB), with
# a fifth on top: the 50 ms sampler can miss a short peak, and conv workspaces vary run to run.
# The encoder is reckoned the same: conservative (the 2.2 encoder measured 6.6 KB).
VAE_BYTES_PER_PIXEL = {"2.1": 36_000, "2.2": 32_000}
# Live copies of a DiT block's token activations.
DIT_LIVE_FACTOR = 1.5
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class HostMemoryError(ValueError):
    """The run cannot fit in host RAM: one line naming what it needs and what would fit."""


@dataclass(frozen=True)
class HostNeed:
    """Bytes one eager run owns in host memory (anonymous), and what it maps from files."""

    converted_weights: int   # weights cast away from their stored dtype: owned memory
    mapped_weights: int      # weights used as stored: file pages, not owned
    activations: int

    @property
    def owned(self) -> int:
        return BASE_BYTES + self.converted_weights + self.activations

    def describe(self) -> str:
        return (f"{self.owned / _GIB:.1f} GiB (weights converted in memory {self.converted_weights / _GIB:.1f}, "
                f"activations {self.activations / _GIB:.1f}, runtime {BASE_BYTES / _GIB:.1f}; "
                f"{self.mapped_weights / _GIB:.1f} GiB more stay memory-mapped from the checkpoint)")


def available_bytes() -> int:
    """What the machine can give this process: MemAvailable, capped by the cgroup's limit;
    $WAN_RT_HOST_MEMORY_GB overrides both (a service sharing its box, or a test)."""
    if os.environ.get(BUDGET_ENV):
        try:
            return int(float(os.environ[BUDGET_ENV]) * _GIB)
        except ValueError:
            raise HostMemoryError(f"{BUDGET_ENV} must be a number of GiB; got {os.environ[BUDGET_ENV]!r}") from None
    available = _meminfo_available()
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # not Linux: nothing to check against


def _cgroup_room() -> Optional[int]:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


# One stored tensor, as far as memory goes: its dtype (None: GGUF blocks, kept quantized and
# mapped, dequantized a layer at a time), its element count, its bytes on disk, and whether it is
# a DiT blocks' Linear weight (cast on use when stored in fp32 and run at bf16/fp16 on a CPU).
_Stored = tuple[Optional[torch.dtype], int, int, bool]


def stored_tensors(spec: ModelSpec, files, names: Sequence[str]) -> dict[str, list[_Stored]]:
    """The headers of the weights `names` load ("vae" once for both VAE halves), read once:
    nothing but the headers is touched (memory-mapped)."""
    paths = {name: files.dits[name] for name in names if name in spec.dit_components}
    if "text_encoder" in names:
        paths["text_encoder"] = files.text_encoder
    if any(n in names for n in ("vae_encoder", "vae_decoder")):
        paths["vae"] = files.vae
    out = {}
    for name, path in paths.items():
        dit = name in spec.dit_components
        out[name] = [(None, t.numel(), t.data.numel() * t.data.element_size(), False) if isinstance(t, QuantizedWeight)
                     else (t.dtype, t.numel(), t.numel() * t.element_size(), dit and cast_on_use_key(k, t.shape))
                     for k, t in read_file(path).items()]
    return out


def _all_fp32(tensors: list[_Stored]) -> bool:
    floating = [s for s, *_ in tensors if s is None or s.is_floating_point]
    return bool(floating) and all(s == torch.float32 for s in floating)


def _weights(tensors: list[_Stored], dtype: torch.dtype, cast_on_use: bool = False) -> tuple[int, int]:
    """(converted, mapped) bytes of one component's weights run at `dtype` (fp8 scaled weights
    are dequantized on load, so they count as converted). cast_on_use: a CPU run, where blocks'
    Linear weights stored in fp32 stay mapped and only the largest one's cast is owned."""
    on_use = cast_on_use and dtype in LOW_PRECISION and _all_fp32([t for t in tensors if t[3]])
    converted = mapped = layer = 0
    for stored, numel, nbytes, block_linear in tensors:
        if on_use and block_linear:
            mapped += nbytes
            layer = max(layer, numel * dtype.itemsize)
        elif stored is not None and stored.is_floating_point and stored != dtype:
            converted += numel * dtype.itemsize
        else:
            mapped += nbytes
    return converted + layer, mapped


def host_need(spec: ModelSpec, files, names: Sequence[str], dtype: torch.dtype,
              size: Optional[tuple[int, int, int]] = None,
              stored: Optional[dict[str, list[_Stored]]] = None, cast_on_use: bool = True) -> HostNeed:
    """What running `names` eagerly on the CPU owns: DiTs at `dtype`, the text encoder at `dtype`
    (fp32 for fp16: umT5 overflows in fp16), the VAE in fp32 (wan_rt.eager's choices).
    cast_on_use: the run's device is the CPU, so fp32 files are not converted whole (a GPU run
    whose text encoder / experts sit on the CPU converts them as it always did).
    size: (height, width, num_frames) of the largest request; None counts weights only (a
    service loading before it knows its requests). stored: stored_tensors(...), when the
    caller weighs several dtypes."""
    stored = stored_tensors(spec, files, names) if stored is None else stored
    run = {"text_encoder": torch.float32 if dtype == torch.float16 else dtype, "vae": torch.float32}
    if cast_on_use and "text_encoder" in stored and run["text_encoder"] in LOW_PRECISION \
            and _all_fp32(stored["text_encoder"]):
        run["text_encoder"] = torch.float32  # wan_rt.eager runs it as stored
    converted = mapped = 0
    for name, tensors in stored.items():
        c, m = _weights(tensors, run.get(name, dtype), cast_on_use)
        converted, mapped = converted + c, mapped + m
    return HostNeed(converted, mapped, activation_bytes(spec, names, dtype, *size) if size else 0)


def activation_bytes(spec: ModelSpec, names: Sequence[str], dtype: torch.dtype,
                     height: int, width: int, num_frames: int) -> int:
    """Upper bound of the activations alive at once (components run one after another)."""
    act = dtype.itemsize
    peaks = [0]
    if any(n in spec.dit_components for n in names):
        d = spec.dit
        lat_f, lat_h, lat_w = latent_shape(spec, height, width, num_frames)[1:]
        tokens = lat_f * (lat_h // d.patch_size[1]) * (lat_w // d.patch_size[2])
        # batch 2 (CFG): the fp32 residual stream and its norm, q/k/v/attention out, the FFN's
        # hidden layer before and after GELU
        block = 2 * tokens * (2 * d.dim * 4 + (4 * d.dim + 2 * d.ffn_dim) * act) * DIT_LIVE_FACTOR
        # cond + uncond K and V per block, cached by each expert for the whole run (both A14B
        # experts' caches are alive once the second runs: measured +0.84 GiB on I2V-A14B)
        experts = sum(n in spec.dit_components for n in names)
        text_kv = experts * 2 * d.num_layers * 2 * d.text_len * d.dim * act
        latents = 8 * tokens * d.out_channels * 4 * max(d.patch_size[1] * d.patch_size[2], 1)
        peaks.append(int(block + text_kv + latents))
    if "text_encoder" in names:
        t = spec.text_encoder
        peaks.append(2 * spec.dit.text_len * (t.d_ff + 6 * t.d_model) * act
                     + 2 * t.num_heads * spec.dit.text_len ** 2 * 4)
    if "vae_decoder" in names or "vae_encoder" in names:
        chunk = VAE_BYTES_PER_PIXEL[spec.vae.version] * height * width
        video = num_frames * 3 * height * width * 4 * 2  # decoded frames and their uint8/float copies
        peaks.append(chunk + video)
    return max(peaks)


def choose_host_dtype(spec: ModelSpec, files, names: Sequence[str], dtype: Optional[torch.dtype],
                      size: Optional[tuple[int, int, int]] = None,
                      budget: Optional[int] = None, cast_on_use: bool = True) -> tuple[torch.dtype, Optional[str]]:
    """-> (dtype to run at, a note to print when wan_rt chose it). `dtype` None: fp32 (the
    CPU default) if it fits, else bf16. Raises HostMemoryError when nothing asked for fits.
    cast_on_use: as host_need's (False: the run's device is a GPU)."""
    budget = available_bytes() if budget is None else budget
    wanted = [dtype] if dtype is not None else [torch.float32, torch.bfloat16]
    stored = stored_tensors(spec, files, names)  # the headers, once for every dtype weighed
    needs = {d: host_need(spec, files, names, d, size, stored, cast_on_use) for d in dict.fromkeys([*wanted, torch.bfloat16])}
    for d in wanted:
        if needs[d].owned <= budget:
            if dtype is None and d != wanted[0]:
                first = needs[wanted[0]]
                return d, (f"{spec.name} at {NAMES[wanted[0]]} needs {first.owned / _GIB:.1f} GiB of RAM and "
                           f"{budget / _GIB:.1f} GiB is available: running {NAMES[d]} "
                           f"({needs[d].owned / _GIB:.1f} GiB); pass --dtype to choose")
            return d, None
    asked = wanted[0]
    hint = []
    if asked != torch.bfloat16 and needs[torch.bfloat16].owned <= budget:
        hint.append(f"--dtype bf16 needs {needs[torch.bfloat16].owned / _GIB:.1f} GiB")
    if needs[asked].activations > needs[asked].converted_weights:
        hint.append("a smaller --height/--width/--frames")
    hint.append("a machine with more RAM, or a GPU")
    raise HostMemoryError(f"{spec.name} at {NAMES[asked]} on the CPU needs {needs[asked].describe()}; "
                          f"this machine has {budget / _GIB:.1f} GiB available. What would fit: "
                          + "; ".join(hint))


# ------------------------------------------------------------------------------------ builds
# What `wan-rt build` owns per component (components build one after another), measured with
# bench/real_size.py's sampling of the process tree's RssAnon:
# * the component loaded at its compute dtype: the weights it converts (a bf16 checkpoint built
#   in fp32 converts all of them);
# * the ONNX export holds no weights: the graph is traced without them and they are written
#   from the module one tensor at a time (export/onnx_export.py; 0.6 GiB over the process's
#   base for a 1.25 GB DiT, whose weights the TorchScript exporter used to hold 2.6 times);
# * TensorRT's builder, with the weights mapped from the ONNX external data and the plan streamed
#   to disk (export/trt_build.py), still holds the engine it serializes: 1.17x the engine's
#   weights for the real-size TI2V-5B bf16 DiT (11.7 GiB owned for 10.0 GB), 1.6x for a
#   1.25 GB one (BASE_BYTES covers a small model's extra). An fp8 plan costs the builder more
#   per byte: 18.9 GiB owned for a real-size A14B expert whose main graph's plan is 13.3 GiB
#   (1.41x), but it builds its two graphs (text, main) one at a time, so the factor over the
#   whole engine (15.6 GiB of plans) with BASE_BYTES still covers it: 21.1 GiB estimated.
# * built in parts (`--dit-parts N`, graphs.rest_block_graphs) it holds one part's plan: the
#   real-size TI2V-5B bf16 DiT in 2 parts owned 5.9 GiB (its largest plan 4.1 GB; estimated
#   7.8 GiB), an A14B expert's fp8 plan in 2 parts 9.3 GiB (estimated 11.1; whole 18.9), its bf16
#   plan in 4 parts 8.5 GiB (estimated 10.3), a 16-layer 1.25 GB DiT in 4 parts 0.49 GiB over the
#   tiny model's (0.42x its weights, against 1.58x whole).
# ONNX Runtime builds only export; AOTInductor's compile is not measured at real size.
TRT_BUILD_FACTOR = 1.25


@dataclass(frozen=True)
class BuildNeed:
    """The largest host memory one component's build owns, and the disk the build writes."""

    component: str
    owned: int
    disk: int

    def describe(self) -> str:
        return f"{self.owned / _GIB:.1f} GiB of RAM (for {self.component}) and {self.disk / _GIB:.1f} GiB of disk"


def _engine_weight_bytes(tensors: list[_Stored], dtype: torch.dtype, quantized: bool, num_layers: int) -> int:
    """An engine's weights: in a Q/DQ (fp8/int8) DiT one byte per element of the blocks it
    quantizes (the bulk) and `dtype`'s size in the blocks kept high precision (precision.
    keep_blocks: 6 of an A14B expert's 40, 15% of its weights), else `dtype`'s size."""
    numel = sum(t[1] for t in tensors)
    if not quantized:
        return numel * dtype.itemsize
    kept = len(keep_blocks(num_layers)) / num_layers
    return int(numel * (1 - kept) + numel * kept * dtype.itemsize)


def _largest_graph_bytes(tensors: list[_Stored], dtype: torch.dtype, quantized: bool, num_layers: int,
                         parts: int) -> int:
    """The weights of a DiT's largest graph: nearly all of them in one step graph, or, built in
    `parts` (graphs.rest_block_graphs), the heaviest part's blocks (the blocks hold nearly every
    weight, equally; in a Q/DQ graph, kept blocks weigh `dtype`'s size per element)."""
    if parts <= 1:
        return _engine_weight_bytes(tensors, dtype, quantized, num_layers)
    per_block = sum(t[1] for t in tensors) / num_layers
    kept = keep_blocks(num_layers) if quantized else frozenset(range(num_layers))

    def graph_bytes(graph: str) -> float:
        return sum(per_block * (dtype.itemsize if i in kept else 1) for i in range(*block_range(graph, num_layers)))

    return int(max(graph_bytes(g) for g in rest_block_graphs(parts)))


def build_need(spec: ModelSpec, files, dtypes: dict[str, torch.dtype], backend: str,
               quantized: Sequence[str] = (), stored: Optional[dict[str, list[_Stored]]] = None,
               links: bool = False, dit_parts: int = 1) -> BuildNeed:
    """What building the components in `dtypes` ({component: compute dtype}) with `backend` needs
    (see the figures above). `quantized`: components built as fp8/int8 Q/DQ graphs. stored:
    stored_tensors(...), when the caller weighs several precisions. links: the engines dir is on
    the checkpoint's disk, where AOTInductor and (unquantized) ONNX Runtime engines hard-link the
    weights they use as stored (export/checkpoint_links.py) and write only the converted ones.
    dit_parts: DiTs built with their blocks in that many graphs (`--dit-parts`): TensorRT's
    builder holds the largest graph's plan, not the whole expert's."""
    stored = stored_tensors(spec, files, list(dtypes)) if stored is None else stored
    worst, disk, staging = ("", 0), 0, 0
    for name, dtype in dtypes.items():
        tensors = stored["vae" if name.startswith("vae") else name]
        converted, _ = _weights(tensors, dtype)
        parts = dit_parts if name in spec.dit_components else 1
        graph_bytes = _largest_graph_bytes(tensors, dtype, False, spec.dit.num_layers, parts)
        engine = _engine_weight_bytes(tensors, dtype, name in quantized, spec.dit.num_layers)
        largest = _largest_graph_bytes(tensors, dtype, name in quantized, spec.dit.num_layers, parts)
        build = TRT_BUILD_FACTOR * largest if backend == "trt" else 0
        owned = int(BASE_BYTES + converted + build)
        worst = max(worst, (name, owned), key=lambda w: w[1])
        # Kept: the engine (a plan, or the ONNX itself). Staged while one builds: its exported
        # ONNX beside the plan being written; a quantized graph's weights are written once, as
        # the Q/DQ pass makes them (export_graph), so only the quantized ONNX is staged.
        linked = links and (backend == "aoti" or (backend == "ort" and name not in quantized))
        disk += converted if linked else engine
        staged = largest if name in quantized else graph_bytes
        staging = max(staging, staged if backend == "trt" else 0)
    return BuildNeed(worst[0], worst[1], disk + staging)


def return_free_heap() -> None:
    """Hand the memory freed so far back to the system before a step whose peak matters (the
    TensorRT builder's): glibc keeps freed heap pages for reuse, and they count as the process's
    own. 1.7 GiB of them were left by calibration and quantization before a real-size A14B
    expert's TensorRT build. A no-op where glibc's malloc is not the allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _existing(folder: Path) -> Path:
    """`folder`, or the nearest folder above it that exists (where it would be created)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def same_disk(paths: Sequence[Path], folder: Path) -> bool:
    """Whether every path is on the disk `folder` is (or would be created) on: hard links work."""
    device = os.stat(_existing(folder)).st_dev
    try:
        return all(os.stat(p).st_dev == device for p in paths)
    except OSError:
        return False


def free_disk_bytes(folder: Path) -> int:
    """Free space on the disk `folder` is (or would be created) on."""
    import shutil

    return shutil.disk_usage(_existing(folder)).free
