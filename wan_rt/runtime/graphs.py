"""The exportable graphs of each component and their I/O contract: one source of truth read by
ONNX export, engine builds, the runtime and the tests.

A component is one graph ("main": text_encoder) or two: a DiT has "text" (context -> every
block's cross-attention K/V, run once per prompt) and "main" (one denoising step from those K/V),
or, built with `--step-cache` (the "split" layout), "text" and the step in four graphs a step
cache can run one by one: "embed" (patch + time embedding), "first_block", "rest_blocks" and
"head" (output norm, projection, unpatchify), tokens passed between them as [B, T, h/2, w/2, D].
Built with `--dit-parts N` (layout "split:N"), "rest_blocks" is N graphs, "rest_blocks_1of2" ...,
each an equal share of the blocks after the first, run in order: a builder holds one share of
the expert at a time (TensorRT's holds the plan it serializes), and a step cache still drives it;
the VAE streams chunk by chunk: "first" for frame 0, "step" for every later chunk, with the
causal-conv cache as explicit inputs `cache_in_<i>` and outputs `cache_out_<i>`. Tensor dims are ints or symbols: `B` batch
(1 or 2 for CFG), `S` text tokens, `T`/`h`/`w` latent frames/height/width, `L` DiT tokens,
`k*h` / `k*w` for sizes that are a fixed multiple of the latent size (VAE pixels, caches) and
`h/k` / `w/k` for an exact fraction of it (DiT tokens per axis).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping, Union

import torch
from torch import Tensor, nn

from wan_rt.config import ModelSpec

Dim = Union[int, str]
DType = Literal["compute", "float32", "int64"]  # "compute": the precision the engine is built in


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSpec:
    component: str
    graph: str                 # "main" | "first" | "step"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vocab_size: int | None = None  # token ids (text_encoder's input_ids) lie in [0, vocab_size)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max of every symbol a graph uses (what a TensorRT optimization profile needs)."""

    min: dict[str, int]
    opt: dict[str, int]
    max: dict[str, int]

    def shape(self, dims: tuple[Dim, ...], which: Literal["min", "opt", "max"]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, getattr(self, which)) for d in dims)


_SCALED = re.compile(r"^(\d+)\*(\w+)$")
_DIVIDED = re.compile(r"^(\w+)/(\d+)$")


def parse_dim(dim: str) -> tuple[str, int, int]:
    """A symbolic dim as (symbol, numerator, denominator): "8*h" -> ("h", 8, 1), "h/2" -> ("h", 1, 2)."""
    if m := _SCALED.match(dim):
        return m.group(2), int(m.group(1)), 1
    if m := _DIVIDED.match(dim):
        return m.group(1), 1, int(m.group(2))
    return dim, 1, 1


def resolve_dim(dim: Dim, sizes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    sym, num, den = parse_dim(dim)
    return sizes[sym] * num // den


def torch_dtype(t: TensorSpec, compute_dtype: torch.dtype) -> torch.dtype:
    return {"compute": compute_dtype, "float32": torch.float32, "int64": torch.int64}[t.dtype]


def read_sizes(gspec: GraphSpec, inputs: Mapping[str, Tensor]) -> dict[str, int]:
    """The symbols' values read off the inputs; a shape that fits no sizes is an error here,
    rather than a confusing one from inside an engine."""
    sizes: dict[str, int] = {}
    for t in gspec.inputs:
        shape = tuple(inputs[t.name].shape)
        ok = len(shape) == len(t.dims)
        for dim, n in zip(t.dims, shape) if ok else ():
            if isinstance(dim, int):
                ok = ok and dim == n
                continue
            sym, num, den = parse_dim(dim)
            ok = ok and n * den % num == 0 and sizes.setdefault(sym, n * den // num) == n * den // num
        if not ok:
            raise ValueError(f"{gspec.component}/{gspec.graph}: {t.name} has shape {list(shape)}, which does not fit "
                             f"{list(t.dims)} (sizes from the inputs before it: {sizes})")
    return sizes


def engine_inputs(gspec: GraphSpec, inputs: Mapping[str, Tensor], compute_dtype: torch.dtype,
                  device: torch.device) -> dict[str, Tensor]:
    """The contract's inputs, in its order, each checked for presence and dtype (an engine
    does not convert) and made contiguous on `device`."""
    where = f"{gspec.component}/{gspec.graph}"
    out = {}
    for t in gspec.inputs:
        if t.name not in inputs:
            raise ValueError(f"{where}: missing input {t.name!r}")
        x, want = inputs[t.name], torch_dtype(t, compute_dtype)
        if x.dtype != want:
            raise TypeError(f"{where}: {t.name} is {x.dtype}, the graph takes {want}")
        out[t.name] = x.to(device).contiguous()
    return out


# ------------------------------------------------------------------------------------ specs
def components_of(spec: ModelSpec) -> tuple[str, ...]:
    return ("text_encoder", *spec.dit_components, "vae_encoder", "vae_decoder")


DIT_STEP_GRAPHS = ("embed", "first_block", "rest_blocks", "head")
DIT_LAYOUTS = {"whole": ("text", "main"), "split": ("text", *DIT_STEP_GRAPHS)}
_REST_PART = re.compile(r"^rest_blocks_(\d+)of(\d+)$")


def dit_layout_name(step_cache: bool = False, parts: int = 1) -> str:
    """"whole" (one step graph), "split" (a step cache's four) or "split:N" (rest_blocks in N parts)."""
    if parts < 1:
        raise ValueError(f"a DiT is built in 1 or more parts, not {parts}")
    return "whole" if not step_cache and parts == 1 else "split" if parts == 1 else f"split:{parts}"


def layout_parts(layout: str) -> int:
    """How many graphs a layout's rest_blocks is (1 for "whole" and "split")."""
    if layout in DIT_LAYOUTS:
        return 1
    kind, _, n = layout.partition(":")
    if kind != "split" or not n.isdigit() or int(n) < 2:
        raise ValueError(f"unknown DiT graph layout {layout!r}: 'whole', 'split' or 'split:N' (N >= 2)")
    return int(n)


def rest_block_graphs(parts: int) -> tuple[str, ...]:
    return ("rest_blocks",) if parts == 1 else tuple(f"rest_blocks_{i}of{parts}" for i in range(1, parts + 1))


def block_range(graph: str, num_layers: int) -> tuple[int, int]:
    """The blocks [start, stop) a blocks graph runs: first_block is block 0, rest_blocks the
    others, part i of N of them an equal share (the first parts one more where they do not divide)."""
    if graph == "first_block":
        return 0, 1
    if graph == "rest_blocks":
        return 1, num_layers
    m = _REST_PART.match(graph)
    if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise KeyError(f"not a DiT blocks graph: {graph!r}")
    i, n = int(m.group(1)), int(m.group(2))
    rest = num_layers - 1
    if n > rest:
        raise ValueError(f"{rest} blocks after the first cannot be {n} parts")
    start = 1 + (i - 1) * (rest // n) + min(i - 1, rest % n)
    return start, start + rest // n + (i <= rest % n)


def is_blocks_graph(graph: str) -> bool:
    return graph in ("first_block", "rest_blocks") or _REST_PART.match(graph) is not None


def graph_names(component: str, layout: str = "whole") -> tuple[str, ...]:
    """A component's graphs; `layout` ("whole" | "split" | "split:N", see the module docstring)
    is a DiT's."""
    if component.startswith("vae_"):
        return ("first", "step")
    if not component.startswith("dit"):
        return ("main",)
    if layout in DIT_LAYOUTS:
        return DIT_LAYOUTS[layout]
    return ("text", "embed", "first_block", *rest_block_graphs(layout_parts(layout)), "head")


def graph_spec(spec: ModelSpec, component: str, graph: str = "main") -> GraphSpec:
    if component == "text_encoder":
        return GraphSpec(component, graph,
                         (TensorSpec("input_ids", "int64", ("B", "S")), TensorSpec("attention_mask", "int64", ("B", "S"))),
                         (TensorSpec("context", "compute", ("B", "S", spec.text_encoder.d_model)),),
                         vocab_size=spec.text_encoder.vocab_size)
    if component in spec.dit_components:
        d = spec.dit
        text_kv = TensorSpec("text_kv", "compute", (d.num_layers, 2, "B", "S", d.dim))
        if graph == "text":
            return GraphSpec(component, graph, (TensorSpec("context", "compute", ("B", "S", d.text_dim)),), (text_kv,))
        latents = TensorSpec("latents", "compute", ("B", d.in_channels, "T", "h", "w"))
        timestep = TensorSpec("timestep", "float32", ("B", "L") if d.per_token_timestep else ("B",))
        noise_pred = TensorSpec("noise_pred", "compute", ("B", d.out_channels, "T", "h", "w"))
        if graph == "main":
            return GraphSpec(component, graph, (latents, timestep, text_kv), (noise_pred,))
        if graph not in DIT_STEP_GRAPHS and not is_blocks_graph(graph):
            raise KeyError(f"{component} graphs are {', '.join(DIT_LAYOUTS['whole'] + DIT_STEP_GRAPHS)}, not {graph!r}")
        pt, ph, pw = d.patch_size
        assert pt == 1, "token frames are latent frames (Wan's temporal patch is 1)"
        tokens = ("B", "T", f"h/{ph}", f"w/{pw}", d.dim)
        rows = "T" if d.per_token_timestep else 1  # modulation rows: per latent frame, or one
        hidden, temb = TensorSpec("hidden", "compute", tokens), TensorSpec("temb", "float32", ("B", rows, 6, d.dim))
        tproj = TensorSpec("tproj", "float32", ("B", rows, d.dim))
        if graph == "embed":
            return GraphSpec(component, graph, (latents, timestep), (hidden, temb, tproj))
        if graph == "head":
            return GraphSpec(component, graph, (hidden, tproj), (noise_pred,))
        return GraphSpec(component, graph, (hidden, temb, text_kv), (TensorSpec("hidden_out", "compute", tokens),))
    if component in ("vae_encoder", "vae_decoder"):
        return _vae_graph_spec(spec, component, graph)
    raise KeyError(f"{spec.name} has no component {component!r}; it has {', '.join(components_of(spec))}")


def _cache_specs(spec: ModelSpec, component: str, direction: str) -> tuple[TensorSpec, ...]:
    """Cache slot dims as multiples of the latent size: evaluate the slot shapes at a 1x1 latent."""
    vae = _shape_only_vae(spec)
    _, sh, sw = spec.vae.stride
    shapes = vae.encoder_cache_shapes(sh, sw) if component == "vae_encoder" else vae.decoder_cache_shapes(1, 1)
    return tuple(TensorSpec(f"cache_{direction}_{i}", "float32", ("B", c, t, f"{hh}*h", f"{ww}*w"))
                 for i, (c, t, hh, ww) in enumerate(shapes))


def _vae_graph_spec(spec: ModelSpec, component: str, graph: str) -> GraphSpec:
    if graph not in ("first", "step"):
        raise KeyError(f"{component} graphs are 'first' and 'step', not {graph!r}")
    z = spec.vae.z_dim
    st, sh, sw = spec.vae.stride
    frames = 1 if graph == "first" else st
    video = TensorSpec("video", "float32", ("B", 3, frames, f"{sh}*h", f"{sw}*w"))
    latents = TensorSpec("latents", "float32", ("B", z, 1, "h", "w"))
    cache_in, cache_out = _cache_specs(spec, component, "in"), _cache_specs(spec, component, "out")
    if component == "vae_encoder":
        return GraphSpec(component, graph, (video, *cache_in), (latents, *cache_out))
    return GraphSpec(component, graph, (latents, *cache_in), (video, *cache_out))


_VAE_SHAPES: dict[object, nn.Module] = {}


def _shape_only_vae(spec: ModelSpec):
    """A VAE on the meta device: enough to ask for cache slot shapes, costs no memory."""
    from wan_rt.models.vae import WanVAE

    if spec.vae not in _VAE_SHAPES:
        with torch.device("meta"):
            _VAE_SHAPES[spec.vae] = WanVAE(spec.vae)
    return _VAE_SHAPES[spec.vae]


# ------------------------------------------------------------------------------------ profiles
def shape_profile(spec: ModelSpec, *, height: int, width: int, frames: int, text_len: int | None = None,
                  min_height: int | None = None, min_width: int | None = None, min_frames: int = 1,
                  max_batch: int = 2) -> ShapeProfile:
    """Profile whose opt and max are the requested video size; min is the smallest valid one
    (one latent frame, one DiT patch per axis) unless given. `S` is fixed at the text length
    the pipeline pads to (max_sequence_length: `text_len`, default the model's, 512)."""
    st, sh, sw = spec.vae.stride
    _, ph, pw = spec.dit.patch_size
    if text_len is not None and text_len < 1:
        raise ValueError(f"the text length must be >= 1 token; got {text_len}")
    s = text_len or spec.dit.text_len

    def sizes(h: int, w: int, f: int, b: int) -> dict[str, int]:
        t = (f - 1) // st + 1
        lh, lw = h // sh, w // sw
        return {"B": b, "S": s, "T": t, "h": lh, "w": lw, "L": t * (lh // ph) * (lw // pw)}

    m = spec.spatial_multiple
    return ShapeProfile(min=sizes(min_height or m, min_width or m, min_frames, 1),
                        opt=sizes(height, width, frames, 1), max=sizes(height, width, frames, max_batch))


# The `wan-rt build` flag that sets each symbol's range (shape_profile's arguments).
BUILD_FLAGS = {"S": "--text-len", "T": "--frames", "h": "--height", "w": "--width",
               "L": "--height/--width/--frames"}


def outside_profile_hint(sym: str, n: int, lo: int, hi: int) -> str:
    """What to do about a size an engine was not built for: the `wan-rt build` flag to change,
    or for the text length (fixed at build time) the padding the engine serves."""
    if sym == "S":
        return (f"the text length is fixed when engines are built: pad prompts to {hi} tokens "
                f"(max_sequence_length={hi}), or rebuild with `wan-rt build --text-len {n}`")
    if sym == "B":
        return "engines serve batches of 1 or 2 (a prompt and its negative)"
    return f"rebuild for this size (`wan-rt build {BUILD_FLAGS.get(sym, '--height/--width/--frames')}`)"


def example_sizes(profile: ShapeProfile, multiples: Mapping[str, int] | None = None) -> dict[str, int]:
    """The sizes an export traces at: the smallest the profile allows, so that the one forward a
    trace runs is cheap (the profile's max is a 720p forward of a 14B expert), but no smaller
    than what keeps every dynamic dim general:
    * every symbol with min < max is at least 2 (batch 2: CFG's): torch.export specialises a
      size-1 example to a constant, and a trace at 1 cannot tell a dim from a broadcast one;
    * a symbol in `multiples` (a DiT step graph's latent h, w: `patch_multiples`) is a multiple
      of it, with at least two patches (one token per axis pins the axis in torch.export);
    * the symbols' values (of h, w: the patch counts, what torch.export makes symbols of) are
      pairwise different where the ranges leave room, and different from the static ones (the
      text length S): equal example sizes let a trace relate dims that are unrelated;
    * L (TI2V's per-token timestep length) is T * (h / patch) * (w / patch) at those sizes.
    Static symbols (min == max) keep their value; a range too narrow for a distinct value takes
    its smallest general one. The profile itself (min / opt / max) is what the builders serve."""
    multiples = dict(multiples or {})
    sizes = {s: n for s, n in profile.max.items() if profile.min[s] == n}
    taken = {n // multiples.get(s, 1) for s, n in sizes.items()}
    for sym in ("B", *(s for s in profile.max if s not in ("B", "L"))):
        if sym not in profile.max or sym in sizes:
            continue
        k = multiples.get(sym, 1)
        lo, hi = max(-(-profile.min[sym] // k), 2), profile.max[sym] // k  # in multiples of k
        if lo > hi:  # the range holds no general value (e.g. max 1): its largest one
            lo = hi = max(profile.max[sym] // k, 1)
        base = next((n for n in range(lo, hi + 1) if n not in taken), lo)
        taken.add(base)
        sizes[sym] = base * k
    if "L" in profile.max and "L" not in sizes:
        sizes["L"] = sizes["T"] * (sizes["h"] // multiples.get("h", 1)) * (sizes["w"] // multiples.get("w", 1))
    return sizes


def patch_multiples(module: nn.Module) -> dict[str, int]:
    """Symbols whose every value is a multiple of a factor the graph relies on: a DiT graph
    (graph_module's `dit`) splits the latent h, w into patches (h = patch * tokens). torch.export
    must be told (h = 2 * Dim), or the reshape's `h % 2 == 0` guard cannot be stated on a Dim."""
    cfg = getattr(getattr(module, "dit", None), "config", None)
    if cfg is None or not hasattr(cfg, "patch_size"):
        return {}
    _, ph, pw = cfg.patch_size
    return {"h": ph, "w": pw}


def sample_inputs(gspec: GraphSpec, sizes: dict[str, int], compute_dtype: torch.dtype,
                  device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """Random inputs of the given sizes (ids below the graph's vocabulary, at most 64 distinct;
    a ones mask; t in [0, 1000))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in gspec.inputs:
        shape = tuple(resolve_dim(d, sizes) for d in t.dims)
        if t.name == "input_ids":
            value = torch.randint(0, min(64, gspec.vocab_size or 64), shape, generator=gen)
        elif t.name == "attention_mask":
            value = torch.ones(shape, dtype=torch.int64)
        elif t.name == "timestep":
            value = torch.randint(0, 1000, shape, generator=gen).float()
        else:
            value = torch.randn(shape, generator=gen) * (0.5 if t.name.startswith("cache") else 1.0)
        out[t.name] = value.to(device=device, dtype=torch_dtype(t, compute_dtype))
    return out


# ------------------------------------------------------------------------------------ modules
class _DiTMain(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents: Tensor, timestep: Tensor, text_kv: Tensor) -> Tensor:
        return self.dit(latents, timestep, text_kv=text_kv)


class _DiTText(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, context: Tensor) -> Tensor:
        return self.dit.encode_text(context)


class _TextMain(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_encoder(input_ids, attention_mask)


class _VAEChunk(nn.Module):
    """One chunk of the streaming VAE: (x, *cache) -> (y, *new_cache); `first` fixed at build."""

    def __init__(self, vae: nn.Module, encode: bool, first: bool):
        super().__init__()
        self.vae, self.encode, self.first = vae, encode, first

    def forward(self, x: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        fn = self.vae.encode_chunk if self.encode else self.vae.decode_chunk
        y, new_cache = fn(x, cache, first_chunk=self.first)
        return (y, *new_cache)


class _DiTEmbed(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden, e, e0 = self.dit.embed(latents, timestep)
        f, h, w = self.dit.token_grid(latents)
        return hidden.reshape(hidden.shape[0], f, h, w, hidden.shape[-1]), e0, e


class _DiTBlocks(nn.Module):
    """Blocks start..stop-1 on a token grid [B, f, h, w, D]."""

    def __init__(self, dit: nn.Module, start: int, stop: int | None):
        super().__init__()
        self.dit, self.start, self.stop = dit, start, stop

    def forward(self, hidden: Tensor, temb: Tensor, text_kv: Tensor) -> Tensor:
        b, f, h, w, d = hidden.shape
        out = self.dit.run_blocks(hidden.reshape(b, f * h * w, d), temb, (f, h, w), text_kv=text_kv,
                                  start=self.start, stop=self.stop)
        return out.reshape(b, f, h, w, d)


class _DiTHead(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, hidden: Tensor, tproj: Tensor) -> Tensor:
        b, f, h, w, d = hidden.shape
        return self.dit.head(hidden.reshape(b, f * h * w, d), tproj, (f, h, w))


def _dit_graph(graph: str, dit: nn.Module) -> nn.Module:
    if graph == "text":
        return _DiTText(dit)
    if graph == "main":
        return _DiTMain(dit)
    if graph == "embed":
        return _DiTEmbed(dit)
    if graph == "head":
        return _DiTHead(dit)
    return _DiTBlocks(dit, *block_range(graph, len(dit.blocks)))


def graph_module(component: str, graph: str, model: nn.Module) -> nn.Module:
    """The nn.Module whose forward takes the graph's inputs positionally, in GraphSpec order,
    and returns its outputs (a tensor, or a tuple in GraphSpec order). `model` is the DiT, the
    TextEncoder or the WanVAE the component is made of."""
    if component == "text_encoder":
        return _TextMain(model).eval()
    if component.startswith("dit"):
        return _dit_graph(graph, model).eval()
    if component in ("vae_encoder", "vae_decoder"):
        return _VAEChunk(model, encode=component == "vae_encoder", first=graph == "first").eval()
    raise KeyError(component)
