"""House rule: public functions, classes and methods under wanstudio/ have docstrings.

Checked statically with ``ast`` (nothing is imported). A public method may go without its own
docstring when it is a property, or when a base class in this package defines the same method
name with a docstring (e.g. ``TransferBackend.query`` documents every backend's ``query``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wanstudio"

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_PROPERTY_DECORATORS = {"property", "cached_property"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _trees() -> dict[str, ast.Module]:
    return {_rel(p): ast.parse(p.read_text(), _rel(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_property(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for d in fn.decorator_list:
        if isinstance(d, ast.Name) and d.id in _PROPERTY_DECORATORS:
            return True
        if isinstance(d, ast.Attribute) and (
            d.attr in _PROPERTY_DECORATORS or d.attr in {"setter", "getter", "deleter"}
        ):
            return True  # functools.cached_property, @x.setter
    return False


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):  # Generic[T], Protocol[T]
        return _base_name(node.value)
    return None


def _classes(trees: dict[str, ast.Module]) -> dict[str, list[ast.ClassDef]]:
    """Every module-level class of the package (pending files too), by name."""
    out: dict[str, list[ast.ClassDef]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append(node)
    return out


def _documented_in_base(cls: ast.ClassDef, method: str, classes, seen: set[str]) -> bool:
    for base in cls.bases:
        name = _base_name(base)
        if name is None or name in seen:
            continue
        seen.add(name)
        for parent in classes.get(name, ()):
            for m in parent.body:
                if isinstance(m, _FUNCS) and m.name == method and ast.get_docstring(m):
                    return True
            if _documented_in_base(parent, method, classes, seen):
                return True
    return False


def missing_docstrings(trees: dict[str, ast.Module]) -> list[str]:
    """'path:line name' for each public function / class / method without a docstring."""
    classes = _classes(trees)
    missing = []
    for rel, tree in trees.items():
        for node in tree.body:
            if not isinstance(node, (*_FUNCS, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if not ast.get_docstring(node):
                missing.append(f"{rel}:{node.lineno} {node.name}")
            if not isinstance(node, ast.ClassDef):
                continue
            for m in node.body:
                if not isinstance(m, _FUNCS) or m.name.startswith("_") or ast.get_docstring(m):
                    continue
                if _is_property(m) or _documented_in_base(node, m.name, classes, set()):
                    continue
                missing.append(f"{rel}:{m.lineno} {node.name}.{m.name}")
    return missing


def test_public_names_have_docstrings():
    missing = missing_docstrings(_trees())
    assert not missing, "public names without a docstring (add one):\n" + "\n".join(missing)


def test_checker_catches_what_it_should():
    """The checker itself: a bare function, class and method are reported; a property, a
    documented override's undocumented subclass method and private names are not."""
    src = '''
def f(): pass
class Base:
    """Doc."""
    def run(self):
        """Documented here."""
class Sub(Base):
    """Doc."""
    def run(self): pass
    def other(self): pass
    @property
    def size(self): return 1
    def _private(self): pass
class Bare: pass
def _hidden(): pass
'''
    found = missing_docstrings({"wanstudio/example.py": ast.parse(src)})
    assert found == [
        "wanstudio/example.py:2 f",
        "wanstudio/example.py:10 Sub.other",
        "wanstudio/example.py:14 Bare",
    ]
