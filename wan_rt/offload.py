"""Low VRAM: which weights live where, and the cheapest plan that fits a memory budget.

Plans, cheapest first; `choose_plan` takes the first whose weights fit the budget less an
activation reserve (a fifth of it):

1. "resident": every component on the GPU; experts never move.
2. "swap": one A14B expert resident at a time; the next is staged in host memory during the
   last steps of the first and swapped in at the switch (runtime/residency.py).
3. "blocks": block offload (eager / Triton experts only): each expert's transformer blocks live
   in pinned host memory; while block i runs, block i+1 is copied to the GPU on a side stream
   and block i-1 is dropped. Resident: the embeddings, the head and two blocks.

The text encoder and the VAE can run on the CPU instead (`cpu_components`); then they take no
GPU memory. Sizes come from the checkpoint's tensor headers (`weight_bytes`), so the plan is
chosen before anything is loaded. On a CPU "host" and "device" are both the CPU: block offload
then copies each block before it runs and drops the copy after (the same hooks, in the same
order, no streams), which is how the tests check that every plan gives the same video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from wan_rt.config import ModelSpec

PLANS = ("resident", "swap", "blocks")
RESERVE_FRACTION = 0.2  # of the budget, kept for activations (A14B at 720p: several GiB)
_GIB = 2**30


@dataclass(frozen=True)
class ComponentBytes:
    """Weight bytes of one component at its run dtype; `block` is a DiT's largest block."""

    total: int
    block: int = 0
    blocks: int = 0  # number of transformer blocks


@dataclass(frozen=True)
class MemoryPlan:
    name: str                      # one of PLANS
    needed: int                    # bytes of weights on the GPU under this plan
    budget: int                    # bytes allowed for weights (the budget less the reserve)
    expert_budget: Optional[int]   # for runtime.residency.ExpertResidency (None: no limit)

    def describe(self) -> str:
        return f"{self.name} ({self.needed / _GIB:.2f} GiB of weights on the GPU, {self.budget / _GIB:.2f} GiB allowed)"


def weight_bytes(resolved: Any, dtype: torch.dtype) -> dict[str, ComponentBytes]:
    """Per component, from the checkpoint's headers (memory-mapped, nothing read): DiTs at
    `dtype`, the VAE in float32 (as it runs), the text encoder at `dtype`."""
    from wan_rt.models.single_file import read_file  # a folder or one file (safetensors, .pth, GGUF)

    files, spec = resolved.files, resolved.spec
    size = torch.tensor([], dtype=dtype).element_size()
    out = {}
    for name in spec.dit_components:
        sd = read_file(files.dits[name])
        per_block: dict[str, int] = {}
        for key, t in sd.items():
            parts = key.split(".")
            if "blocks" in parts:
                index = parts[parts.index("blocks") + 1]
                per_block[index] = per_block.get(index, 0) + t.numel() * size
        total = sum(t.numel() for t in sd.values()) * size
        out[name] = ComponentBytes(total, max(per_block.values(), default=0), len(per_block))
    out["text_encoder"] = ComponentBytes(sum(t.numel() for t in read_file(files.text_encoder).values()) * size)
    vae = sum(t.numel() for t in read_file(files.vae).values()) * 4
    out["vae_encoder"] = out["vae_decoder"] = ComponentBytes(vae)
    return out


def plan_needs(spec: ModelSpec, sizes: Mapping[str, ComponentBytes], cpu_components: Iterable[str] = ()) -> dict[str, int]:
    """GPU weight bytes of each plan the model can use (no "swap" with one expert)."""
    on_cpu = set(cpu_components)
    # vae_encoder and vae_decoder are one model, placed with the decoder.
    others = sum(sizes[c].total for c in ("text_encoder", "vae_decoder") if c not in on_cpu)
    experts = [sizes[c] for c in spec.dit_components]
    needs = {"resident": others + sum(e.total for e in experts), "swap": others + max(e.total for e in experts),
             "blocks": others + max(e.total - e.block * e.blocks + 2 * e.block for e in experts)}
    if len(experts) < 2:
        del needs["swap"]
    return needs


def choose_plan(spec: ModelSpec, sizes: Mapping[str, ComponentBytes], budget_bytes: int,
                cpu_components: Iterable[str] = (), engines: bool = False) -> MemoryPlan:
    """The cheapest plan whose GPU weights fit `budget_bytes` less the activation reserve;
    ValueError (one line, with the smallest budget that would do) when none does. `engines`:
    the experts are compiled engines, which cannot stream blocks."""
    budget = int(budget_bytes * (1 - RESERVE_FRACTION))
    needs = plan_needs(spec, sizes, cpu_components)
    candidates = [p for p in needs if not (engines and p == "blocks")]
    others = needs["resident"] - sum(sizes[c].total for c in spec.dit_components)
    for name in candidates:
        if needs[name] <= budget:
            expert_budget = None if name != "swap" else budget - others
            return MemoryPlan(name, needs[name], budget, expert_budget)
    least = min(needs[p] for p in candidates)
    hint = "" if not engines else "; block offload needs eager experts (--backend eager)"
    raise ValueError(f"--memory-budget {budget_bytes / _GIB:.2f} GiB is too small for {spec.name}: the cheapest plan "
                     f"needs {least / _GIB:.2f} GiB of weights plus a {RESERVE_FRACTION:.0%} activation reserve, "
                     f"i.e. a budget of {least / (1 - RESERVE_FRACTION) / _GIB:.2f} GiB{hint}")


# ---------------------------------------------------------------------------- block offload
class BlockOffload:
    """A DiT expert component whose transformer blocks stream host -> device around each use.

    Wraps an eager DiT component (runtime.engine_component.EagerDiTComponent) built on the host:
    its non-block parameters go to `device` on load(); each block's parameters point at host
    copies (pinned on a CUDA machine) except while the block runs, and the next block is copied
    ahead on a side stream. Hooks sit on every block's forward and on its cross-attention's
    `text_kv` (the per-prompt text graph calls that directly). `loads` counts copies per block."""

    def __init__(self, component: Any, device: torch.device):
        self.inner, self.device = component, torch.device(device)
        dit: nn.Module = component.module
        self.blocks: list[nn.Module] = list(dit.blocks)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda and torch.cuda.is_available()
        self._host: list[dict[str, Tensor]] = []
        for block in self.blocks:
            host = {}
            for name, p in block.named_parameters():
                p.data = p.data.to("cpu").pin_memory() if pin else p.data.to("cpu")
                host[name] = p.data
            self._host.append(host)
        self._events: dict[int, Any] = {}
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.loads = [0] * len(self.blocks)
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))
            attn = block.attn2
            attn.text_kv = self._around(i, attn.text_kv)  # instance attribute: this DiT only
        component.device = self.device  # inputs go to the GPU; the module is on the host
        self._non_block_to(self.device)

    def __getattr__(self, item: str) -> Any:  # run_graph, text_kv, module, name, specs ...
        return getattr(self.inner, item)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        return self.inner(**inputs)

    # residency: only the non-block parameters move with the expert
    @property
    def nbytes(self) -> int:
        block = max((sum(t.numel() * t.element_size() for t in host.values()) for host in self._host), default=0)
        streamed = sum(t.numel() * t.element_size() for host in self._host for t in host.values())
        return int(self.inner.nbytes) - streamed + 2 * block

    def load(self) -> None:
        self._non_block_to(self.device)

    def unload(self) -> None:
        if self.cuda:
            self._non_block_to(torch.device("cpu"))
        self.inner.text_kv.clear()

    def stage(self) -> None:
        pass

    def remove(self) -> None:
        """Undo: hooks off, every block back on the device."""
        for h in self._hooks:
            h.remove()
        for i, block in enumerate(self.blocks):
            del block.attn2.text_kv
            for name, p in block.named_parameters():
                p.data = self._host[i][name].to(self.device)

    # ------------------------------------------------------------------ the stream
    def _non_block_to(self, device: torch.device) -> None:
        block_params = {id(p) for b in self.blocks for p in b.parameters()}
        for p in self.inner.module.parameters():
            if id(p) not in block_params:
                p.data = p.data.to(device)

    def _issue(self, i: int) -> None:
        """Start copying block i to the device (side stream on a GPU)."""
        if i in self._events:
            return
        block = self.blocks[i]
        self.loads[i] += 1
        if self._copy_stream is None:  # CPU: a real copy, so the path is the same
            for name, p in block.named_parameters():
                p.data = self._host[i][name].clone()
            self._events[i] = None
            return
        with torch.cuda.stream(self._copy_stream):
            for name, p in block.named_parameters():
                p.data = self._host[i][name].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        self._events[i] = event

    def _before(self, i: int) -> None:
        self._issue(i)
        event = self._events[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for p in self.blocks[i].parameters():  # freed only once the compute stream is done with them
                p.data.record_stream(compute)
        self._issue((i + 1) % len(self.blocks))

    def _after(self, i: int) -> None:
        for name, p in self.blocks[i].named_parameters():
            p.data = self._host[i][name]
        self._events.pop(i, None)

    def _around(self, i: int, fn):
        def call(*args, **kwargs):
            self._before(i)
            try:
                return fn(*args, **kwargs)
            finally:
                self._after(i)
        return call


def apply_plan(components: Mapping[str, Any], spec: ModelSpec, plan: MemoryPlan, device: torch.device) -> dict[str, Any]:
    """`components` under `plan`: with "blocks", every eager expert streams its blocks."""
    out = dict(components)
    if plan.name == "blocks":
        for name in spec.dit_components:
            if getattr(out[name], "module", None) is None:
                raise ValueError(f"block offload needs eager experts; {name} is a compiled engine (--backend eager)")
            out[name] = BlockOffload(out[name], device)
    return out
