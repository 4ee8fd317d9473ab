"""The package layers: shiq_data (bottom) <- shiq_train <- shiq_eval (top).

Every module of the three packages is read with ``ast`` (nothing is imported): an import of a higher
layer anywhere in a module (at the top or inside a function) fails, and so does any cycle among the
project's modules, counting imports inside functions too (a lazy import is never a way around a
circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"shiq_data": 0, "shiq_train": 1, "shiq_eval": 2}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module that ``name`` refers to (the longest known prefix), or None if not ours."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, at module level)`` for every import statement in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    top_level = {id(n) for n in tree.body}
    # statements directly under `if`/`try` at module level are module-level too
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            for child in ast.walk(node):
                if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    top_level.add(id(child))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg_parts = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                base = ".".join(pkg_parts + ([base] if base else []))
            # `from pkg import sub` names a submodule when `pkg.sub` is one of ours
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            target = _resolve(n)
            if target is not None and target != module:
                out.append((target, node.lineno, id(node) in top_level))
    return out


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_package_is_found():
    for pkg in LAYERS:
        assert any(m.split(".")[0] == pkg for m in MODULES), pkg
    assert len(MODULES) > 30


def test_no_upward_imports():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
        for m in MODULES
        for target, line, _ in imports_of(m)
        if _layer(target) > _layer(m)
    ]
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_the_library_never_imports_a_recipe():
    """Recipes (shiq_eval.recipes) compose the library; nothing outside them may import one."""
    assert any(m.startswith("shiq_eval.recipes.") for m in MODULES)
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
        for m in MODULES
        if not (m == "shiq_eval.recipes" or m.startswith("shiq_eval.recipes."))
        for target, line, _ in imports_of(m)
        if target == "shiq_eval.recipes" or target.startswith("shiq_eval.recipes.")
    ]
    assert not bad, "library modules that import a recipe:\n" + "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, top in imports_of(m):
            # a package's __init__ is imported with any of its submodules: not an edge of the cycle check
            if target == m.rsplit(".", 1)[0] and MODULES[target].name == "__init__.py":
                continue
            if top or not module_level_only:
                edges[m].add(target)
    return edges


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "with-function-imports"])
def test_no_import_cycles(module_level_only):
    cycles = _cycles(_graph(module_level_only))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_what_it_must(tmp_path):
    """The resolver finds relative, `from pkg import module` and function-level imports (so the two
    checks above cannot pass by missing an import)."""
    edges = _graph(module_level_only=False)
    assert "shiq_data.io" in edges["shiq_data.buffer"]
    assert any(_layer(t) < _layer("shiq_eval.cli") for t in edges["shiq_eval.cli"])
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_readme_names_every_module():
    """README's "Where things live" names every module of its package's row (subpackages' modules too)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(shiq_\w+)`[^|]*\| (.*) \|$", table, re.M)}
    assert set(rows) == set(LAYERS)
    missing = [
        name
        for name, path in _modules().items()
        if path.stem not in ("__init__", "__main__")
        and not re.search(rf"(?<![\w.]){re.escape(path.stem)}(?![\w])", rows[name.split(".")[0]])
    ]
    assert not missing, f"README's 'Where things live' does not name {missing}"
