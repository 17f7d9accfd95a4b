"""Read Wan 2.2 checkpoints of either layout into modules that use diffusers / transformers names.

Loading follows gpt-fast `generate.py:_load_model`: build the module without memory (meta device),
read tensors memory-mapped (safetensors `safe_open`, `torch.load(mmap=True, weights_only=True)`),
then `load_state_dict(assign=True)`, so a 57 GB expert is never copied into RAM a second time.

Official (Wan2.2 repo) parameter names are translated by one template table per component
(spec §7.3-7.5; the sglang `param_names_mapping` idea, written so the same table also gives the
inverse, which tests use to write official-layout files from tiny diffusers models).

Typical use:

    with meta_parameters():                      # parameters on meta, buffers real (RoPE tables)
        dit = WanTransformer3DModel(**cfg)
    sd = map_keys(read_state_dict(path), official_dit_to_diffusers, source=path)
    load_into(dit, sd, source=path, dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

Layout = Literal["diffusers", "official"]


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message is one line naming the file (and key)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # torch's weights_only refusal is a multi-line essay; the useful line names the object.
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# --------------------------------------------------------------------------------------------
# 1. Reading tensors (always memory-mapped)
# --------------------------------------------------------------------------------------------

# Preferred weight files inside a component folder, in order (diffusers, transformers names).
_PREFERRED = (
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "model.safetensors",
)


def find_weights(folder: str | Path) -> Path:
    """The one weights file in `folder`: a sharded index, else a .safetensors, else a .pth/.pt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    for name in _PREFERRED:
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.pth", "*.pt"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{folder}: ambiguous weights, {len(found)} files match {pattern}: "
                                  f"{_first(p.name for p in found)}")
    raise CheckpointError(f"{folder}: no weights (*.safetensors[.index.json], *.pth or *.pt)")


def _read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        # safe_open maps the file (torch.UntypedStorage.from_file); get_tensor returns views of
        # that mapping, so pages are read lazily and nothing is copied.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            if keys is not None and (absent := [k for k in keys if k not in present]):
                raise CheckpointError(f"{path}: {len(absent)} keys named in the index are missing "
                                      f"from this shard: {_first(absent)}")
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError (truncated, bad header), OSError
        raise CheckpointError(f"{path}: cannot read safetensors: {_one_line(e)}") from e


def _read_index(path: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception as e:
        raise CheckpointError(f"{path}: not a sharded-safetensors index ({_one_line(e)})") from e
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    sd: dict[str, Tensor] = {}
    for shard, keys in by_shard.items():
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard named in {path.name} is missing "
                                  f"({len(keys)} keys, e.g. {_first(keys, 1)})")
        sd.update(_read_safetensors(shard_path, keys))
    return sd


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        # weights_only refuses arbitrary pickled objects; mmap keeps storages on disk.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError, zip errors on truncated files, legacy format
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True, mmap=True): "
                              f"{_one_line(e)}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{path}: key {k!r} holds {type(v).__name__}, not a tensor "
                                  "(expected a flat state dict)")
    return sd


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint, memory-mapped, under the names stored in it.

    `path`: a .safetensors file, a `*.safetensors.index.json` (shards beside it), a .pth/.pt, or a
    folder holding one of these (see `find_weights`).
    """
    path = Path(path)
    if path.is_dir():
        path = find_weights(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".safetensors.index.json"):
        return _read_index(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pth", ".pt"):
        return _read_pickle(path)
    raise CheckpointError(f"{path}: unknown checkpoint format (want .safetensors, "
                          ".safetensors.index.json, .pth or .pt)")


def file_regions(tensors: Mapping[str, Tensor]) -> dict[str, tuple[Path, int]]:
    """{name: (file, byte offset)} for the tensors whose bytes are a checkpoint file's, read
    memory-mapped (above) and still equal to the file there: an engine can then point at the
    checkpoint instead of writing a copy. A tensor that was converted, copied, or written to
    (a private map keeps a changed page to itself) is left out. Linux (/proc/self/maps); none
    elsewhere."""
    import bisect
    import mmap

    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return {}
    maps = []  # (start, end, file offset, path) of file-backed mappings
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            maps.append((start, end, int(parts[2], 16), parts[5]))
    maps.sort()
    starts = [m[0] for m in maps]
    files: dict[str, mmap.mmap] = {}
    out: dict[str, tuple[Path, int]] = {}
    try:
        for name, t in tensors.items():
            if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
                continue
            ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
            k = bisect.bisect_right(starts, ptr) - 1
            if k < 0 or ptr + nbytes > maps[k][1]:
                continue
            start, _, offset, path = maps[k]
            where = offset + ptr - start
            if path not in files:
                try:
                    with open(path, "rb") as f:
                        files[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # deleted since mapped, or empty
                    continue
            mapped = memoryview(files[path])[where:where + nbytes]
            # The same page-cache pages unless the tensor's were written to: a memcmp, no reads.
            if len(mapped) == nbytes and mapped == memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()):
                out[name] = (Path(path), where)
            mapped.release()
    finally:
        for m in files.values():
            m.close()
    return out


# --------------------------------------------------------------------------------------------
# 2. Key maps: official <-> diffusers / transformers names
# --------------------------------------------------------------------------------------------
#
# A map is a list of stages; a stage is a table of (official, ours) templates over whole keys,
# tried in order, first match wins. A key that no rule matches is kept as is, so load_into reports
# it as unexpected instead of it vanishing. `{slot}` matches the pattern in _SLOTS; a slot keeps
# its value across the rule, so each table reads both ways (the inverse runs the stages reversed).

_SLOTS = {
    "n": r"\d+", "j": r"\d+", "qkv": r"[qkv]", "qkvo": r"[qkvo]", "qk": r"[qk]",
    "coder": r"encoder|decoder", "rest": r".+", "pre": r".+",
}
_Rule = tuple[str, str]


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_SLOTS[p]})"
                              for i, p in enumerate(parts)))


class _KeyMap:
    def __init__(self, *stages: tuple[_Rule, ...]):
        for official, ours in (r for s in stages for r in s):
            assert set(re.findall(r"\{(\w+)\}", official)) == set(re.findall(r"\{(\w+)\}", ours)), (official, ours)
        self._forward = [[(_compile(o), d) for o, d in stage] for stage in stages]
        self._inverse = [[(_compile(d), o) for o, d in stage] for stage in reversed(stages)]

    @staticmethod
    def _apply(stages, key: str) -> str:
        for stage in stages:
            for pattern, template in stage:
                if m := pattern.fullmatch(key):
                    key = template.format(**m.groupdict())
                    break
        return key

    def to_ours(self, key: str) -> str:
        return self._apply(self._forward, key)

    def to_official(self, key: str) -> str:
        return self._apply(self._inverse, key)


# Spec §7.3. Shapes are identical on both sides.
_DIT = _KeyMap((
    ("head.modulation", "scale_shift_table"),  # before the per-block modulation rule
    ("head.head.{rest}", "proj_out.{rest}"),
    ("text_embedding.0.{rest}", "condition_embedder.text_embedder.linear_1.{rest}"),
    ("text_embedding.2.{rest}", "condition_embedder.text_embedder.linear_2.{rest}"),
    ("time_embedding.0.{rest}", "condition_embedder.time_embedder.linear_1.{rest}"),
    ("time_embedding.2.{rest}", "condition_embedder.time_embedder.linear_2.{rest}"),
    ("time_projection.1.{rest}", "condition_embedder.time_proj.{rest}"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.self_attn.{qkv}.{rest}", "blocks.{n}.attn1.to_{qkv}.{rest}"),
    ("blocks.{n}.self_attn.o.{rest}", "blocks.{n}.attn1.to_out.0.{rest}"),
    ("blocks.{n}.self_attn.norm_{qk}.weight", "blocks.{n}.attn1.norm_{qk}.weight"),
    ("blocks.{n}.cross_attn.{qkv}.{rest}", "blocks.{n}.attn2.to_{qkv}.{rest}"),
    ("blocks.{n}.cross_attn.o.{rest}", "blocks.{n}.attn2.to_out.0.{rest}"),
    ("blocks.{n}.cross_attn.norm_{qk}.weight", "blocks.{n}.attn2.norm_{qk}.weight"),
    # The cross-attention LayerNorm is official norm3 / diffusers norm2. The other norms have no
    # parameters; the reverse rule still exists so the swap is a bijection and a stray official
    # norm2 parameter lands on our parameter-free norm3 (reported unexpected), never on norm2.
    ("blocks.{n}.norm3.{rest}", "blocks.{n}.norm2.{rest}"),
    ("blocks.{n}.norm2.{rest}", "blocks.{n}.norm3.{rest}"),
    ("blocks.{n}.ffn.0.{rest}", "blocks.{n}.ffn.net.0.proj.{rest}"),
    ("blocks.{n}.ffn.2.{rest}", "blocks.{n}.ffn.net.2.{rest}"),
    # Wan 2.1 I2V / FLF2V CLIP image branch (absent from every Wan 2.2 checkpoint).
    ("blocks.{n}.cross_attn.k_img.{rest}", "blocks.{n}.attn2.add_k_proj.{rest}"),
    ("blocks.{n}.cross_attn.v_img.{rest}", "blocks.{n}.attn2.add_v_proj.{rest}"),
    ("blocks.{n}.cross_attn.norm_k_img.weight", "blocks.{n}.attn2.norm_added_k.weight"),
    ("img_emb.proj.0.{rest}", "condition_embedder.image_embedder.norm1.{rest}"),
    ("img_emb.proj.1.{rest}", "condition_embedder.image_embedder.ff.net.0.proj.{rest}"),
    ("img_emb.proj.3.{rest}", "condition_embedder.image_embedder.ff.net.2.{rest}"),
    ("img_emb.proj.4.{rest}", "condition_embedder.image_embedder.norm2.{rest}"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
))

_COMFYUI_PREFIX = "model.diffusion_model."


def official_dit_to_diffusers(key: str) -> str:
    return _DIT.to_ours(key.removeprefix(_COMFYUI_PREFIX))


def diffusers_dit_to_official(key: str) -> str:
    return _DIT.to_official(key)


# Spec §5 / §7.5. The official file has one embedding; HF ties shared.weight and
# encoder.embed_tokens.weight (load_into fills the alias). encoder.embed_tokens.weight has no
# official name, so hf_t5_to_official keeps it unchanged: drop it when writing official files.
_T5 = _KeyMap((
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{n}.norm1.weight", "encoder.block.{n}.layer.0.layer_norm.weight"),
    ("blocks.{n}.attn.{qkvo}.weight", "encoder.block.{n}.layer.0.SelfAttention.{qkvo}.weight"),
    ("blocks.{n}.pos_embedding.embedding.weight",
     "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{n}.norm2.weight", "encoder.block.{n}.layer.1.layer_norm.weight"),
    ("blocks.{n}.ffn.gate.0.weight", "encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight"),  # GELU branch
    ("blocks.{n}.ffn.fc1.weight", "encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight"),  # linear branch
    ("blocks.{n}.ffn.fc2.weight", "encoder.block.{n}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
))


def official_t5_to_hf(key: str) -> str:
    return _T5.to_ours(key)


def hf_t5_to_official(key: str) -> str:
    return _T5.to_official(key)


# Spec §7.4. Stage 1 renames the containers, stage 2 the layers inside residual blocks.
_VAE_COMMON = (
    ("conv1.{rest}", "quant_conv.{rest}"),
    ("conv2.{rest}", "post_quant_conv.{rest}"),
    ("{coder}.conv1.{rest}", "{coder}.conv_in.{rest}"),
    ("{coder}.middle.0.{rest}", "{coder}.mid_block.resnets.0.{rest}"),
    ("{coder}.middle.1.{rest}", "{coder}.mid_block.attentions.0.{rest}"),
    ("{coder}.middle.2.{rest}", "{coder}.mid_block.resnets.1.{rest}"),
    ("{coder}.head.0.gamma", "{coder}.norm_out.gamma"),
    ("{coder}.head.2.{rest}", "{coder}.conv_out.{rest}"),
)
_VAE_RESIDUAL = (
    ("{pre}.residual.0.gamma", "{pre}.norm1.gamma"),
    ("{pre}.residual.2.{rest}", "{pre}.conv1.{rest}"),
    ("{pre}.residual.3.gamma", "{pre}.norm2.gamma"),
    ("{pre}.residual.6.{rest}", "{pre}.conv2.{rest}"),
    ("{pre}.shortcut.{rest}", "{pre}.conv_shortcut.{rest}"),
)
_VAE_LEVELS = 4  # len(dim_mult) in every Wan VAE


@functools.lru_cache(maxsize=None)
def _vae(version: str, num_res_blocks: int) -> _KeyMap:
    if version == "2.1":
        # The 2.1 decoder is one flat list: per level num_res_blocks+1 resnets, then an upsampler.
        per_level = num_res_blocks + 2
        decoder = tuple(
            (f"decoder.upsamples.{n}.{{rest}}",
             f"decoder.up_blocks.{n // per_level}."
             + ("upsamplers.0" if n % per_level == per_level - 1 else f"resnets.{n % per_level}")
             + ".{rest}")
            for n in range(_VAE_LEVELS * per_level))
        structure = (("encoder.downsamples.{n}.{rest}", "encoder.down_blocks.{n}.{rest}"),) + decoder
    elif version == "2.2":
        # Nested lists: the resampler follows the resnets (literal index first, first match wins).
        structure = (
            (f"encoder.downsamples.{{n}}.downsamples.{num_res_blocks}.{{rest}}", "encoder.down_blocks.{n}.downsampler.{rest}"),
            ("encoder.downsamples.{n}.downsamples.{j}.{rest}", "encoder.down_blocks.{n}.resnets.{j}.{rest}"),
            (f"decoder.upsamples.{{n}}.upsamples.{num_res_blocks + 1}.{{rest}}", "decoder.up_blocks.{n}.upsampler.{rest}"),
            ("decoder.upsamples.{n}.upsamples.{j}.{rest}", "decoder.up_blocks.{n}.resnets.{j}.{rest}"),
        )
    else:
        raise ValueError(f"unknown VAE version {version!r} (want '2.1' or '2.2')")
    return _KeyMap(_VAE_COMMON + structure, _VAE_RESIDUAL)


def official_vae_to_diffusers(key: str, version: Literal["2.1", "2.2"], num_res_blocks: int = 2) -> str:
    """`num_res_blocks` is 2 in the real VAEs; the tiny test VAEs use 1."""
    return _vae(version, num_res_blocks).to_ours(key)


def diffusers_vae_to_official(key: str, version: Literal["2.1", "2.2"], num_res_blocks: int = 2) -> str:
    return _vae(version, num_res_blocks).to_official(key)


def map_keys(state_dict: Mapping[str, Tensor], key_map: Callable[[str], str], *, source: str | Path) -> dict[str, Tensor]:
    """Rename every key; two keys landing on one name is an error (a wrong map, not a tie)."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = key_map(key)
        if new in out:
            raise CheckpointError(f"{source}: keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new], origin[new] = value, key
    return out


# --------------------------------------------------------------------------------------------
# 3. Loading into a module built without memory
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with parameters on the meta device but real buffers.

    Use this instead of `torch.device("meta")` for modules with non-persistent buffers (the DiT's
    RoPE tables `rope.freqs_cos/sin`): those are computed in `__init__`, never stored in a
    checkpoint, so under `torch.device("meta")` they would stay empty. Each parameter is moved to
    meta as it is registered, before `reset_parameters` runs, so the `torch.empty` behind it is
    never touched (no RAM, no init cost). Same idea as accelerate's
    `init_empty_weights(include_buffers=False)`.
    """
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names sharing one Parameter object (UMT5: shared.weight / encoder.embed_tokens.weight)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _set(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner), attr, value)


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str | Path,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Assign `state_dict` (names already in our layout) to `module`; returns it in eval mode.

    `module` is built under `meta_parameters()` or `torch.device("meta")`. The tensors become the
    parameters (`assign=True`): with dtype/device left None, a memory-mapped checkpoint stays
    memory-mapped. Otherwise floating tensors are cast to `dtype` and all moved to `device`.
    Tied parameters need only one of their names in the checkpoint and stay tied. Parameters get
    requires_grad=False: this is an inference runtime.
    """
    sd = dict(state_dict)
    ties = _tied_groups(module)
    for names in ties:
        present = [n for n in names if n in sd]
        for other in present[1:]:
            if sd[other] is not sd[present[0]] and not torch.equal(sd[other], sd[present[0]]):
                raise CheckpointError(f"{source}: tied weights {present[0]} and {other} differ")
        for name in names:
            if present:
                sd[name] = sd[present[0]]

    expected = module.state_dict(keep_vars=True)
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    misshaped = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
                 if k in sd and sd[k].shape != v.shape}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped keys: "
                        + ", ".join(f"{k} {got} != {want}" for k, (got, want) in sorted(misshaped.items())[:3]))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))

    converted: dict[int, Tensor] = {}  # by id, so tied entries stay one tensor after conversion

    def convert(t: Tensor) -> Tensor:
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return converted[id(t)]

    module.load_state_dict({k: convert(v) for k, v in sd.items()}, strict=True, assign=True)
    for names in ties:  # assign=True wraps each name in its own Parameter; re-tie them
        tied = module.get_parameter(names[0])
        for name in names[1:]:
            _set(module, name, tied)

    for sub in module.modules():  # non-persistent buffers were not in the checkpoint
        for name, buf in sub._buffers.items():
            if buf is not None and device is not None and not buf.is_meta:
                sub._buffers[name] = buf.to(device)
    still_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: {len(still_meta)} tensors are still on the meta device after "
                              f"loading: {_first(still_meta)} (non-persistent buffers: build the module "
                              "under wan_rt.models.checkpoint.meta_parameters(), not torch.device('meta'))")
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# 4. Checkpoint folders
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointFiles:
    """Where each part of one checkpoint is.

    `dits` maps a stage component ("dit_high_noise", "dit_low_noise" for A14B, "dit" for TI2V-5B)
    to a folder holding config.json plus weights (`read_state_dict(folder)`).
    diffusers: `vae` and `text_encoder` are folders with config.json + weights.
    official: `vae` is Wan2.1_VAE.pth / Wan2.2_VAE.pth, `text_encoder` is the umT5 .pth (their
    numbers come from the spec), and `model_index` / `scheduler` are None.
    """

    layout: Layout
    root: Path
    dits: dict[str, Path]
    vae: Path
    text_encoder: Path
    tokenizer: Path
    model_index: Path | None = None
    scheduler: Path | None = None


OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"
_OFFICIAL_MARKERS = ("high_noise_model", "low_noise_model", OFFICIAL_T5, "Wan2.1_VAE.pth", "Wan2.2_VAE.pth")


def detect_layout(folder: str | Path) -> Layout:
    """diffusers if model_index.json is present, official if any official file is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if any((folder / m).exists() for m in _OFFICIAL_MARKERS):
        return "official"
    raise CheckpointError(f"{folder}: neither a diffusers checkpoint (model_index.json) nor an official "
                          f"Wan2.2 one ({', '.join(_OFFICIAL_MARKERS)})")


def _model_folder(folder: Path) -> Path:
    """A folder with config.json and weights (checked for presence only; nothing is opened)."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: missing config.json")
    find_weights(folder)
    return folder


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: missing {what}")
    return path


def locate_checkpoint(folder: str | Path) -> CheckpointFiles:
    folder = Path(folder)
    layout = detect_layout(folder)
    if layout == "diffusers":
        index_path = folder / "model_index.json"
        try:
            index = json.loads(index_path.read_text())
            assert isinstance(index, dict)
        except Exception as e:
            raise CheckpointError(f"{index_path}: not a JSON object ({_one_line(e)})") from e
        # model_index lists transformer_2 as null (TI2V-5B) or [library, class] (A14B).
        if any(index.get("transformer_2") or ()):  # [null, null] when absent
            dits = {"dit_high_noise": _model_folder(folder / "transformer"),
                    "dit_low_noise": _model_folder(folder / "transformer_2")}
        else:
            dits = {"dit": _model_folder(folder / "transformer")}
        scheduler = folder / "scheduler"
        return CheckpointFiles(
            layout=layout, root=folder, dits=dits, vae=_model_folder(folder / "vae"),
            text_encoder=_model_folder(folder / "text_encoder"),
            tokenizer=_existing(folder / "tokenizer", "tokenizer folder"),
            model_index=index_path, scheduler=scheduler if scheduler.is_dir() else None,
        )

    high, low = folder / "high_noise_model", folder / "low_noise_model"
    if high.exists() or low.exists():  # A14B: two experts, Wan 2.1 VAE
        dits = {"dit_high_noise": _model_folder(_existing(high, "high-noise expert folder")),
                "dit_low_noise": _model_folder(_existing(low, "low-noise expert folder"))}
        vae = _existing(folder / "Wan2.1_VAE.pth", "Wan 2.1 VAE (A14B models use it)")
    else:  # TI2V-5B: one DiT at the root, Wan 2.2 VAE
        dits = {"dit": _model_folder(folder)}
        vae = _existing(folder / "Wan2.2_VAE.pth", "Wan 2.2 VAE (TI2V-5B, no high_noise_model/)")
    return CheckpointFiles(
        layout=layout, root=folder, dits=dits, vae=vae,
        text_encoder=_existing(folder / OFFICIAL_T5, "umT5 text encoder"),
        tokenizer=_existing(folder / OFFICIAL_TOKENIZER, "umT5 tokenizer folder"),
    )
