"""Compile one component graph (runtime.graphs) into an AOTInductor package, weights kept apart.

    compile_aoti(module, gspec, profile, path, *, compute_dtype, device, fast=False, cache_dir=None)
        -> ["model.pt2", "weights.safetensors"(, "weights.json", "weights/0-<checkpoint file>", ...)]

`torch.export.export` (non-strict) with dynamic shapes stated from the contract, then
`torch._inductor.aoti_compile_and_package`: C++ for the CPU, Triton kernels embedded for CUDA.

Dynamic shapes. Every contract symbol whose profile min < max is one `torch.export.Dim` over
[min, max]; "k*h" is the derived dim `k * Dim("h")`; a symbol with min == max (the text length S:
the pipeline pads to one length) is static. The example inputs are `graphs.example_sizes`: the
smallest the profile allows with every dynamic dim >= 2 (a size-1 example would be specialised)
and distinct from the others (batch 2), so an export costs one small forward whatever the
profile's max. Two DiT-specific points (`graphs.patch_multiples`, `compiled_profile`,
`at_least_two_patches`):
* the DiT step graph splits latent h, w into 2x2 patches; a plain Dim("h") fails export (the
  reshape's `h % 2 == 0` cannot be stated on it), so h is declared `2 * Dim("h_over_2")`;
* one token per axis (the profile's min: h = 2 latents) cannot be exported: the contiguity
  checks ask `tokens != 1` and pin the axis. The package is compiled for >= 2 tokens per axis
  (h, w >= 4 latents, 32 px on A14B) and records that range; the runner refuses smaller sizes.
  torch's `backed_size_oblivious` lets export through, but AOTInductor then compiled the batch
  as a constant, silently (wrong output shape at B=1; torch 2.13), so it is not used.
TI2V's per-token timestep length L = T*(h/2)*(w/2) is not linear in one dim, which torch.export
cannot state: L is its own Dim over the profile's [min, max]. The graph reads one timestep per
frame (`timestep.reshape(B, T, -1)[:, :, 0]`), so a consistent L is the caller's contract.

What the package holds, and why (`INDUCTOR_CONFIGS`):
* code only: `aot_inductor.package_constants_in_so=False` keeps the weights out of the .so;
  they go to `weights.safetensors` beside it (every constant the package names, by module FQN),
  and the runner hands them over with `load_constants(check_full_update=True)`. A constant that
  is a checkpoint file's own bytes (built in the dtype it is stored in) is not copied: it is
  pointed at from `weights.json`, through a hard link where the disk allows (write_weights).
  Tensors the forward creates (the RoPE frequency tables) are declared non-persistent buffers first, so they
  keep their FQN instead of becoming `_tensor_constant<i>`, which no weights file could supply;
* `always_keep_tensor_constants=True`: by default inductor inlines small weights (an 8-channel
  conv bias, scalars) as literals into the generated C++, so the package would keep the weights
  it was compiled with whatever is loaded later. `joint_graph_constant_folding=False` likewise:
  nothing is computed from weight values at compile time;
* `layout_optimization=False`: with it, inductor runs the CPU convs channels-last and fixes their
  output strides at compile time; at batch 1 ATen's conv picks another layout at run time and
  the compiled code read it with the wrong strides (the VAE encoder step graph was garbage at
  B=1, right at B=2; torch 2.13). Without it the convs are contiguous at every batch;
* hence a package depends only on the architecture, the shapes and the options, and one compiled
  package serves every checkpoint of that architecture (the two A14B experts; T2V's and I2V's
  umT5, VAE and DiT text graphs). `cache_dir` keeps packages by a key over the exported graph
  (ops, shapes, strides, dtypes, devices, FQNs of the inputs it reads; no values), the options,
  torch and the device; a hit copies the package instead of compiling;
* `aot_inductor.metadata` records the contract's inputs, outputs and the compiled ranges
  (architecture-level only: a component name would split the cache), which the runner checks.

Compile time is what limits this backend on a CPU: measured on the 2-core machine (CPU seconds,
default options): tiny DiT step ~55 s, tiny VAE chunk 75-125 s, umT5 ~20 s, DiT text ~12 s; two
thirds of it inductor's own Python (re-tracing, symbolic index simplification, C++ generation),
the rest g++. `fast=True` (tests; never implied) adds `FAST_CONFIGS`: scalar C++ kernels
(`cpp.simdlen=1`: no vectorisation analysis, ~40% less on VAE graphs) and -O0 for the wrapper;
the kernels are slower, the ops the same (the tests hold them to 1e-4 of eager). Loading a
`fast` package logs torch's "Device information mismatch for AOTI_CPU_ISA" warning: the
package was built for no vector ISA, which runs on any CPU.

NOT VERIFIED on a GPU (none on any machine this was written on): the CUDA / Triton path, bf16
and fp16 packages, `load_constants` with device tensors, torch 2.11 (the GPU image's; only
APIs that exist there are used, the `user_managed` flag only where present).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from wan_rt.export.checkpoint_links import link_files
from wan_rt.models.checkpoint import file_regions
from wan_rt.runtime.backends.aoti import (PACKAGE_FILE, REF_DTYPES, WEIGHT_REFS_FILE, WEIGHTS_FILE, device_key,
                                          load_package, unavailable_reason)
from wan_rt.runtime.graphs import (GraphSpec, ShapeProfile, example_sizes, parse_dim, patch_multiples,
                                   sample_inputs, torch_dtype)

# Bump when what goes into a cached package changes in a way the key does not see.
CACHE_FORMAT = 1

INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "always_keep_tensor_constants": True,
    "joint_graph_constant_folding": False,
    "layout_optimization": False,
}
FAST_CONFIGS: dict[str, Any] = {
    "cpp.simdlen": 1,
    "aot_inductor.compile_wrapper_opt_level": "O0",
}
METADATA_KEY = "wan_rt.contract"
# wan_rt's Triton kernels enter a package as custom ops, called through AOTInductor's proxy
# executor; the loader must register them (import their modules) before the package loads.
CUSTOM_OPS_KEY = "wan_rt.custom_ops"


class AotiExportError(RuntimeError):
    """The graph cannot be exported or compiled as the contract says; the message says where."""


# ------------------------------------------------------------------------------------ export
def compiled_profile(module: nn.Module, profile: ShapeProfile) -> ShapeProfile:
    """The profile the package is compiled for: a DiT step graph needs two tokens per latent
    axis at least (h, w >= 2 * patch; at_least_two_patches)."""
    return at_least_two_patches(profile, patch_multiples(module))


def dynamic_shapes(module: nn.Module, gspec: GraphSpec, profile: ShapeProfile) -> tuple:
    """`dynamic_shapes` for torch.export: one Dim per symbol with min < max (`k * Dim` for a
    symbol in `patch_multiples`), `j * that` for "j*sym", that Dim itself for "sym/k" (tokens
    per axis), None (static) for the rest; shaped like `module.forward`'s parameters (the VAE
    chunk takes its caches as *args, which torch.export wants as one nested tuple)."""
    multiples = patch_multiples(module)
    bases: dict[str, Any] = {}

    def axis(d: str):
        sym, num, den = parse_dim(d)
        lo, hi = profile.min[sym], profile.max[sym]
        if lo == hi:
            return None
        k = multiples.get(sym, 1)
        if sym not in bases:
            if lo % k or hi % k:
                raise AotiExportError(f"{sym} range [{lo}, {hi}] is not in multiples of {k}")
            bases[sym] = torch.export.Dim(sym if k == 1 else f"{sym}_over_{k}", min=lo // k, max=hi // k)
        if num * k % den:
            raise AotiExportError(f"{d}: not a whole multiple of {sym}'s base dim ({sym} = {k} * Dim)")
        coefficient = num * k // den  # sym = k * base
        return bases[sym] if coefficient == 1 else coefficient * bases[sym]

    per_input = []
    for t in gspec.inputs:
        axes = {}
        for i, d in enumerate(t.dims):
            if not isinstance(d, int) and (a := axis(d)) is not None:
                axes[i] = a
        per_input.append(axes or None)
    params = list(inspect.signature(module.forward).parameters.values())
    fixed = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return (*per_input[:fixed], tuple(per_input[fixed:]))
    return tuple(per_input)


def export_graph(module: nn.Module, gspec: GraphSpec, profile: ShapeProfile, *, compute_dtype: torch.dtype,
                 device: torch.device | str) -> torch.export.ExportedProgram:
    """torch.export at graphs.example_sizes (small, batch 2), every dynamic dim stated over the
    profile's [min, max] (`profile` as compiled_profile gives it)."""
    where = f"{gspec.component}/{gspec.graph}"
    inputs = sample_inputs(gspec, example_sizes(profile, patch_multiples(module)), compute_dtype, device=device)
    args = tuple(inputs[n] for n in gspec.input_names)
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(module, gspec, profile), strict=False)
    except Exception as exc:  # torch.export's errors are long; keep them, say which graph
        raise AotiExportError(f"{where}: torch.export failed: {exc}") from exc
    _check_outputs(ep, gspec, compute_dtype)
    _constants_as_buffers(ep)
    return ep


def _constants_as_buffers(ep: torch.export.ExportedProgram) -> None:
    """Tensors a forward creates (the DiT's RoPE frequency tables, `torch.tensor(...)`) are
    lifted as constants, which AOTInductor renames `_tensor_constant<i>`: the package would name
    constants no weights file can supply. Declared as non-persistent buffers (torch.export's own
    kind for module tensors outside the state dict; the tensors stay in `ep.constants`) they
    keep their FQN. The signature's specs are plain mutable dataclasses; done in place."""
    from torch.export.graph_signature import InputKind

    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.CONSTANT_TENSOR:
            spec.kind, spec.persistent = InputKind.BUFFER, False


def _check_outputs(ep: torch.export.ExportedProgram, gspec: GraphSpec, compute_dtype: torch.dtype) -> None:
    """Output count, dtypes, ranks and static dims as the contract says (shapes are symbolic)."""
    where = f"{gspec.component}/{gspec.graph}"
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in out_node.args[0]]
    if len(vals) != len(gspec.outputs):
        raise AotiExportError(f"{where}: module returns {len(vals)} outputs, the contract has {len(gspec.outputs)}")
    for t, v in zip(gspec.outputs, vals):
        want = torch_dtype(t, compute_dtype)
        if v is None or v.dtype != want or v.dim() != len(t.dims):
            got = "?" if v is None else f"{v.dtype} rank {v.dim()}"
            raise AotiExportError(f"{where}: output {t.name} is {got}, the contract says {want} {list(t.dims)}")
        for i, d in enumerate(t.dims):
            if isinstance(d, int) and v.shape[i] != d:
                raise AotiExportError(f"{where}: output {t.name} dim {i} is {v.shape[i]}, the contract says {d}")


# ------------------------------------------------------------------------------------ compile
def contract_metadata(gspec: GraphSpec, profile: ShapeProfile) -> str:
    """What the package accepts, as JSON: inputs/outputs (name, dtype, dims) and symbol ranges."""
    used = {parse_dim(d)[0] for t in (*gspec.inputs, *gspec.outputs) for d in t.dims if isinstance(d, str)}
    return json.dumps({
        "inputs": [[t.name, t.dtype, list(t.dims)] for t in gspec.inputs],
        "outputs": [[t.name, t.dtype, list(t.dims)] for t in gspec.outputs],
        "min": {s: profile.min[s] for s in sorted(used)},
        "max": {s: profile.max[s] for s in sorted(used)},
    }, sort_keys=True)


def custom_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """The wan_rt custom ops (Triton kernels) the exported graph calls, e.g. ["rope3d_attention"]."""
    return sorted({n.target._opname for n in ep.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == "wan_rt"})


def inductor_configs(gspec: GraphSpec, profile: ShapeProfile, fast: bool = False,
                     ops: Sequence[str] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # The contract as JSON for Python, and the I/O names as plain lists for C++ (wan_rt/cpp).
    metadata = {METADATA_KEY: contract_metadata(gspec, profile), "wan_rt.input_names": ",".join(gspec.input_names),
                "wan_rt.output_names": ",".join(gspec.output_names)}
    if ops:
        metadata[CUSTOM_OPS_KEY] = ",".join(ops)
    return {**INDUCTOR_CONFIGS, **(FAST_CONFIGS if fast else {}), **(extra or {}), "aot_inductor.metadata": metadata}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}{list(value.stride())}@{value.device}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return str(value)


def graph_text(ep: torch.export.ExportedProgram) -> str:
    """The exported graph as text, without weight values: every node's op, target, arguments and
    output dtype/shape/strides/device, and the signature of the inputs it reads. Inputs it does
    not read are left out (export lifts every parameter of the module, used or not: the DiT text
    graph of a 36-channel I2V model would otherwise differ from T2V's by its unused patch weights)."""
    used = set()
    lines = []
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if not n.users:
                continue
            used.add(n.name)
        lines.append(f"{n.op} {n.name} {n.target} {n.args} {n.kwargs} {_describe(n.meta.get('val'))}")
    sig = ep.graph_signature
    lines += [str(spec) for spec in sig.input_specs if getattr(spec.arg, "name", None) in used]
    lines += [str(spec) for spec in sig.output_specs]
    return "\n".join(lines)


def package_key(ep: torch.export.ExportedProgram, configs: dict[str, Any], device: torch.device) -> str:
    """Identity of the compiled code: the graph without weight values, options, torch, device."""
    ranges = sorted(f"{k}: {v}" for k, v in ep.range_constraints.items())
    # device_key: the CPU's vector ISA (-march flags) and the GPU's compute capability (cubins).
    blob = json.dumps([CACHE_FORMAT, torch.__version__, device.type, device_key(), configs, graph_text(ep), ranges,
                       str(ep.call_spec)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path | None:
    """`WAN_RT_AOTI_CACHE` (a folder, or "off"), else <wan_rt cache>/aoti-packages."""
    env = os.environ.get("WAN_RT_AOTI_CACHE")
    if env is not None:
        return None if env.lower() in ("", "0", "off", "none") else Path(env)
    from wan_rt.tiny import cache_root

    return cache_root() / "aoti-packages"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive while one process compiles a key; others wait and then hit the cache."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst two processes compile the same key
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(ep: torch.export.ExportedProgram, configs: dict[str, Any], target: Path) -> None:
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")  # must end in .pt2
    try:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=configs)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def compile_package(ep: torch.export.ExportedProgram, configs: dict[str, Any], path: Path, device: torch.device,
                    cache_dir: Path | None) -> bool:
    """Write the compiled package to `path`; True when it came from the cache."""
    if cache_dir is None:
        _compile(ep, configs, path)
        return False
    key = package_key(ep, configs, device)
    cached = cache_dir / key[:40] / PACKAGE_FILE
    with _locked(cache_dir / f"{key[:40]}.lock"):
        hit = cached.is_file()
        if not hit:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _compile(ep, configs, cached)
    shutil.copyfile(cached, path)
    return hit


def write_weights(ep: torch.export.ExportedProgram, package: Path, path: Path, device: torch.device,
                  where: str = "") -> list[str]:
    """Every constant the compiled package names, by FQN, from the exported program's state:
    those whose bytes are a checkpoint file's (memory-mapped, unconverted: `file_regions`) are
    pointed at from `weights.json` (write_weight_refs), the others written to `path`. Returns
    the files written, relative to path's folder."""
    from safetensors.torch import save_file

    names = load_package(package, device).get_constant_fqns()
    known = {**ep.state_dict, **ep.constants}
    missing = [n for n in names if n not in known]
    if missing:  # e.g. a constant folded at compile time: its value would be the compile-time weights'
        raise AotiExportError(f"{where}: the compiled package needs constants the module does not have: {missing[:5]}")
    constants = {name: known[name].detach() for name in names}
    regions = {n: r for n, r in file_regions(constants).items()  # (set_ needs an element-aligned offset)
               if r[1] % constants[n].element_size() == 0 and constants[n].dtype in REF_DTYPES.values()}
    tensors, seen = {}, set()
    for name in names:
        if name in regions:
            continue
        t = constants[name].to("cpu").contiguous()
        # Tied weights share storage, which safetensors refuses; they are small enough to copy.
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone() if key in seen else t
        seen.add(key)
    save_file(tensors, str(path))
    refs = write_weight_refs({n: (constants[n], *regions[n]) for n in names if n in regions}, path.parent)
    return [path.name, *refs]


def write_weight_refs(regions: dict[str, tuple[torch.Tensor, Path, int]], folder: Path) -> list[str]:
    """`folder/weights.json` pointing at each constant's bytes in its checkpoint file ({name:
    (tensor, file, offset)}): through a hard link in folder/weights/ where the file is on the
    same disk (the engines dir keeps what it was built from, at no cost in space), else at the
    file itself. Returns the files written (relative); none for no regions."""
    if not regions:
        return []
    links = link_files((source for _, source, _ in regions.values()), folder)
    files = {source: k for k, source in enumerate(links)}
    entries = [{"path": link, "linked": True, "size": source.stat().st_size} if link is not None else
               {"path": str(source.resolve()), "linked": False, "size": source.stat().st_size}
               for source, link in links.items()]  # unlinked: point at the checkpoint's file itself
    tensors = {}
    for name, (t, source, offset) in regions.items():
        dtype = next(k for k, v in REF_DTYPES.items() if v == t.dtype)
        tensors[name] = {"file": files[source], "offset": offset, "dtype": dtype, "shape": list(t.shape)}
    (folder / WEIGHT_REFS_FILE).write_text(json.dumps({"files": entries, "tensors": tensors}, indent=1) + "\n")
    return [WEIGHT_REFS_FILE, *(e["path"] for e in entries if e["linked"])]


def weights_source(graph_dir: Path) -> dict[str, Any] | None:
    """What the manifest says of a built graph's weights: how many constants are pointed at in
    the checkpoint's files, and whether through hard links ("linked") or at the files
    themselves ("referenced"); None when every constant was written into the engine."""
    refs = graph_dir / WEIGHT_REFS_FILE
    if not refs.is_file():
        return None
    data = json.loads(refs.read_text())
    linked = {e["linked"] for e in data["files"]}
    return {"from_checkpoint": "linked" if linked == {True} else "referenced" if linked == {False} else "both",
            "tensors": len(data["tensors"]), "files": [e["path"] for e in data["files"]]}


def compile_aoti(module: nn.Module, gspec: GraphSpec, profile: ShapeProfile, path: str | os.PathLike, *,
                 compute_dtype: torch.dtype, device: torch.device | str, fast: bool = False,
                 cache_dir: str | os.PathLike | None | bool = None, stats: dict | None = None,
                 configs: dict[str, Any] | None = None) -> list[str]:
    """Export `module` (graphs.graph_module, on `device`, in its build dtype) and compile it to
    `path` (a .pt2) plus `weights.safetensors` beside it; returns the two file names.

    `fast`: FAST_CONFIGS (see the module docstring); `configs`: more inductor options (e.g.
    {"max_autotune": True} on a GPU; part of the cache key). `cache_dir`: where compiled packages are
    kept by key (None: `default_cache_dir()`; False: no cache). `stats`, if given, is filled with
    export / compile seconds, compile CPU seconds (this process and its compilers) and whether
    the package came from the cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    cache = default_cache_dir() if cache_dir is None else (None if cache_dir is False else Path(cache_dir))
    start = time.perf_counter()
    profile = compiled_profile(module, profile)
    ep = export_graph(module, gspec, profile, compute_dtype=compute_dtype, device=device)
    configs = inductor_configs(gspec, profile, fast, custom_ops(ep), configs)
    exported, cpu0 = time.perf_counter(), sum(os.times()[:4])
    try:
        hit = compile_package(ep, configs, path, device, cache)
    except AotiExportError:
        raise
    except Exception as exc:
        raise AotiExportError(f"{gspec.component}/{gspec.graph}: AOTInductor compile failed: {exc}") from exc
    if stats is not None:
        stats.update(export_s=round(exported - start, 2), compile_s=round(time.perf_counter() - exported, 2),
                     compile_cpu_s=round(sum(os.times()[:4]) - cpu0, 2), cached=hit)
    weights = path.with_name(WEIGHTS_FILE)
    return [path.name, *write_weights(ep, path, weights, device, f"{gspec.component}/{gspec.graph}")]


def at_least_two_patches(profile: ShapeProfile, patch: dict[str, int]) -> ShapeProfile:
    """`profile` with each patched axis (symbol -> patch size) raised to two patches at least:
    at one token per axis the contiguity checks inside torch.export ask `tokens != 1` and fix
    the axis at the example size. (torch's `backed_size_oblivious` gets the export through, but
    AOTInductor then compiled the batch as a constant, silently: measured on torch 2.13.)"""
    low = dict(profile.min)
    for sym, k in patch.items():
        if sym in low:
            low[sym] = min(max(low[sym], 2 * k), profile.max[sym])
    return ShapeProfile(min=low, opt=dict(profile.opt), max=dict(profile.max))


def build_profile(spec, component: str, profile: ShapeProfile) -> ShapeProfile:
    """The profile a component's packages serve (at_least_two_patches for a DiT). The build
    writes this one into the manifest, so requests below it are refused up front."""
    if component not in spec.dit_components:
        return profile
    _, ph, pw = spec.dit.patch_size
    return at_least_two_patches(profile, {"h": ph, "w": pw})


def build_graph(module: torch.nn.Module, gspec: GraphSpec, profile: ShapeProfile, out_dir: str | os.PathLike, *,
                compute_dtype: torch.dtype, device: torch.device | str, **compile_args) -> list[str]:
    """Compile one graph module into `out_dir/model.pt2` + `out_dir/weights.safetensors`;
    returns those names. `compile_args` go to compile_aoti (fast, cache_dir)."""
    why = unavailable_reason(device)
    if why:
        raise RuntimeError(f"AOTInductor backend unavailable: {why}")
    return compile_aoti(module, gspec, profile, Path(out_dir) / PACKAGE_FILE, compute_dtype=compute_dtype,
                        device=device, **compile_args)


# ------------------------------------------------------------------------------ many graphs
_MODELS: dict[tuple[str, str, torch.dtype], nn.Module] = {}


def _component_model(model: str, component: str, dtype: torch.dtype) -> nn.Module:
    """The eager model a component's graphs are made of, loaded once per process."""
    from wan_rt.models import load_component
    from wan_rt.resolve import resolve_checkpoint

    key = (model, "vae" if component.startswith("vae") else component, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_component(resolve_checkpoint(model).files, component, dtype=dtype)
    return _MODELS[key]


def _compile_task(task: tuple) -> tuple:
    """One graph, in a worker process: (model, component, graph, out_dir, profile, dtype, options)."""
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.graphs import graph_module, graph_spec

    model, component, graph, out_dir, profile, dtype, options = task
    spec = resolve_checkpoint(model).spec
    module = graph_module(component, graph, _component_model(model, component, dtype))
    stats: dict = {}
    files = compile_aoti(module, graph_spec(spec, component, graph), profile, Path(out_dir) / PACKAGE_FILE,
                         compute_dtype=dtype, device="cpu", stats=stats, **options)
    return model, component, graph, files, stats


def compile_graphs(tasks: Sequence[tuple[str, str, str]], out_root: str | os.PathLike, profiles: dict[str, ShapeProfile],
                   *, dtype: torch.dtype = torch.float32, workers: int = 2, **options) -> dict[tuple[str, str, str], dict]:
    """Compile (model, component, graph) tasks on the CPU in `workers` processes, each into
    out_root/<model>/<component>/<graph>/; `profiles` maps a model to its shape profile.

    Inductor's Python side is single-threaded and the C++ build is one compiler process at a
    time, so on an idle multi-core machine this is close to `workers` times faster than a loop.
    Tasks run in order; put graphs that share a package with an earlier one (same architecture)
    last: they wait for it and then copy it from the cache. Models resolve by name in each
    worker, so they must be paths or presets whose files exist. Returns per task
    {"dir", "files", "stats"} (stats as compile_aoti's)."""
    import multiprocessing

    root = Path(out_root)
    jobs = [(m, c, g, str(root / Path(m).name / c / g), profiles[m], dtype, options) for m, c, g in tasks]
    # spawn, not fork: the parent holds torch's thread pools, which do not survive a fork.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, min(workers, len(jobs)))) as pool:
        results = pool.map(_compile_task, jobs, chunksize=1)
    return {(m, c, g): {"dir": root / Path(m).name / c / g, "files": files, "stats": stats}
            for m, c, g, files, stats in results}
