"""The layering of docs/ARCHITECTURE.md, checked on the source: no upward import, no cycle,
no file over 600 lines. Function-level (lazy) imports count: they are dependencies too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wanstudio"
MAX_LINES = 600

# docs/ARCHITECTURE.md, "Layers": the first dotted part of a module's name decides its layer.
LAYERS = {
    0: {"errors", "options", "config", "layout", "atomic", "availability"},
    1: {"weights", "gguf_file", "storage", "attention", "attention_backends", "quant"},
    2: {"model"},
    3: {"offload", "lora", "fusion", "inspector", "modes", "cache", "parallel"},
    4: {"checkpoints", "encoders", "media"},
    5: {"pipeline"},
    6: {"studio"},
    7: {"widgets", "cli", "cli_support", "bench", "__init__", "__main__", "train", "eval"},
}
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}


def _modules() -> dict[str, Path]:
    """Dotted module name (below ``wanstudio``) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Modules of wanstudio that ``name`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("wanstudio"):
                target = node.module.removeprefix("wanstudio").lstrip(".")
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" if target else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("wanstudio").lstrip(".")
                for a in node.names
                if a.name.startswith("wanstudio.")
            )
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(name, path) if d in modules and d != name}
        graph[name] = deps
    return graph


def _unit(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


def test_every_module_has_a_layer():
    missing = sorted({_unit(m) for m in _modules()} - set(LAYER_OF))
    assert not missing, f"add these to LAYERS here and to docs/ARCHITECTURE.md: {missing}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, deps in _graph().items():
        for dep in deps:
            if LAYER_OF[_unit(dep)] > LAYER_OF[_unit(module)]:
                bad.append(
                    f"{module} (layer {LAYER_OF[_unit(module)]}) imports {dep} (layer {LAYER_OF[_unit(dep)]})"
                )
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    graph.pop("", None)  # the package's __init__ re-exports everything by design
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(f"{node}.") or node.startswith(f"{dep}."):
                continue  # a package and its own submodules: re-exports, not a cycle
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines: split it by concern"
