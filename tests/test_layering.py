"""wan_rt's layers point one way (README "Layout"; ../shared/docs/architecture.md).

Every `import` of a wan_rt module counts, at module level or inside a function, under
`if TYPE_CHECKING:` too: a cycle that only closes at run time is still a cycle. The graph is read
from the source with `ast` (nothing is imported), so a test failure names the exact edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"wan_rt": ROOT / "wan_rt", "wan_rt.kernels": ROOT / "kernels", "wan_rt.export": ROOT / "export"}

# Module-name prefix -> layer; the longest matching prefix wins. A module may import from its own
# layer and the layers below it, never above.
LAYERS = {
    # 1. facts
    "wan_rt.config": 1, "wan_rt.precision": 1, "wan_rt.flops": 1, "wan_rt.video": 1, "wan_rt.metrics": 1,
    "wan_rt.child_process": 1,  # how wan_rt starts Python children (stdlib only)
    # 2. the oracle and its ops: pure models, schedulers, the Triton kernels as custom ops
    "wan_rt.models": 2, "wan_rt.scheduler": 2, "wan_rt.kernels": 2,
    # 3. checkpoint resolution and the embedded presets
    "wan_rt.resolve": 3, "wan_rt.tiny": 3,
    # 4. runtime: component and graph contracts, backends' run side, the engines dir, residency
    "wan_rt.runtime": 4, "wan_rt.host_memory": 4,
    # 5. variants applied from outside the models
    "wan_rt.kernels.integrate": 5, "wan_rt.runtime.fast": 5, "wan_rt.runtime.gguf_weights": 5, "wan_rt.eager": 5, "wan_rt.parallel": 5,
    "wan_rt.lora": 5, "wan_rt.caching": 5, "wan_rt.offload": 5,
    # 6. the denoise loop
    "wan_rt.pipeline": 6,
    # 7. assembly: from_pretrained, builds, exporters, parity
    "wan_rt.loader": 7, "wan_rt.build": 7, "wan_rt.export": 7, "wan_rt.parity": 7,
    # 8. services: CLI, C++ tooling, the server; the package root re-exports the public API
    "wan_rt.cli": 8, "wan_rt.cpp": 8, "wan_rt.service": 8, "wan_rt": 8,
}


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if pkg == "wan_rt" and parts[0] in ("kernels", "export"):
                continue  # those folders are only ever wan_rt.kernels / wan_rt.export
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else ""

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.startswith("wan_rt")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                if base.startswith("wan_rt"):
                    # `from pkg import sub` imports the submodule when there is one.
                    targets |= {owner(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else owner(base)
                                for a in node.names}
        graph[mod] = targets - {mod, ""}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> int | None:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = import_graph(module_files())
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "imports that climb the layers:\n" + "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The two checks above on a made-up package that has both faults (so they can fail)."""
    (tmp_path / "a.py").write_text("def f():\n    from wan_rt.b import g\n")
    (tmp_path / "b.py").write_text("from wan_rt import a\n")
    mods = {"wan_rt.a": tmp_path / "a.py", "wan_rt.b": tmp_path / "b.py"}
    graph = import_graph(mods)
    assert graph == {"wan_rt.a": {"wan_rt.b"}, "wan_rt.b": {"wan_rt.a"}}
    assert find_cycle(graph) == ["wan_rt.a", "wan_rt.b", "wan_rt.a"]
    assert layer_of("wan_rt.runtime.engines") == 4 and layer_of("wan_rt.runtime.fast") == 5
    assert layer_of("wan_rt.kernels.rope3d_attn") == 2 and layer_of("wan_rt.kernels.integrate") == 5


@pytest.mark.parametrize("owner,concept", [
    ("wan_rt.runtime.engines_dir", "def read_index"), ("wan_rt.runtime.engines_dir", "def verify"),
    ("wan_rt.runtime.engines_dir", "class EngineManifest"), ("wan_rt.resolve", "def resolve_checkpoint"),
])
def test_one_module_owns_each_concept(owner, concept):
    mods = module_files()
    holders = [m for m, f in mods.items() if concept + "(" in f.read_text() or concept + ":" in f.read_text()]
    assert holders == [owner], f"{concept} is defined in {holders}, expected only {owner}"
