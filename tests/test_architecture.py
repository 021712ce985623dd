"""The package's shape, read from its source: no import cycle, no module reaching into another
module's private names, no function too long to read on one screen, and no heavy import when
the package or the magics load."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nexa_nb"
LONGEST_FUNCTION = 100  # lines, docstring included


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imports(name: str) -> list[tuple[str, str | None, ast.AST]]:
    """(module imported, name taken from it or None, node) for every nexa_nb import in module `name`,
    at the top or inside a function."""
    found = []
    package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node) for alias in node.names if alias.name.startswith("nexa_nb")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("nexa_nb"):
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    found.append((submodule, None, node) if submodule in MODULES else (base, alias.name, node))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the nexa_nb modules it imports. An import of one of its own packages (``from nexa_nb
    import __version__``) is left out: importing any module runs its packages' ``__init__`` first anyway."""
    return {
        name: {
            target
            for target, _, _ in imports(name)
            if target in MODULES and target != name and not name.startswith(target + ".")
        }
        for name in MODULES
    }


def test_no_import_cycle():
    edges = graph()
    cycles = []

    def visit(node, path, on_path):
        for target in sorted(edges[node]):
            if target in on_path:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target, path + [target], on_path | {target})
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_imports_another_modules_private_names():
    leaks = [
        f"{name} imports {taken} from {source}"
        for name in MODULES
        for source, taken, _ in imports(name)
        if taken and taken.startswith("_") and not taken.startswith("__") and source != name
    ]
    for name, tree in TREES.items():
        aliases = {
            alias.asname or alias.name.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
            if f"{getattr(node, 'module', '') or ''}.{alias.name}".strip(".") in MODULES or alias.name in MODULES
        }
        leaks += [
            f"{name} uses {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
    assert not leaks


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_over_100_lines(name):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(TREES[name])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long


def test_text_imports_nothing_of_nexa_nb():
    assert imports("nexa_nb.text") == []


def test_the_form_does_not_import_the_magics():
    assert "nexa_nb.magics" not in graph()["nexa_nb.widgets_form"]


@pytest.mark.parametrize(
    "module", ["nexa_nb", "nexa_nb.magics", "nexa_nb.widgets_form", "nexa_nb.settings", "nexa_nb.engine.checkpoints"]
)
def test_importing_loads_neither_torch_nor_deepspeed(module):
    code = f"import sys, {module}; print([m for m in ('torch', 'deepspeed') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
