"""The package's layers, as the README's Layout section states them: imports only go down.

core < lake < vision < ml < pipeline < stages < serving < cli. A module may import its own layer
and those below it; a stage never imports another stage (its own package's modules aside); no
import cycle, whether the import is at the top of a module or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imageiq_spark"
LAYERS = ["core", "lake", "vision", "ml", "pipeline", "stages", "serving", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every imageiq_spark module `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("imageiq_spark")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imageiq_spark"):
            for alias in node.names:  # `from pkg import module` names a module; `from module import x` not
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _exists(candidate) else node.module)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_every_module_lives_in_a_layer():
    entry = ("imageiq_spark", "imageiq_spark.__main__")
    loose = sorted(m for m in GRAPH if layer(m) is None and m not in entry)
    assert loose == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_own_layer_and_those_below(module):
    mine = layer(module)
    upward = sorted(t for t in GRAPH[module] if mine is not None and (layer(t) or 0) > mine)
    assert upward == [], f"{module} imports a higher layer"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if stage(m)))
def test_a_stage_never_imports_another_stage(module):
    others = sorted(t for t in GRAPH[module] if stage(t) and stage(t) != stage(module))
    assert others == []


def test_no_import_cycle():
    def cycle_from(start: str) -> list[str] | None:
        path, seen = [start], set()

        def visit(node: str) -> list[str] | None:
            for target in sorted(GRAPH.get(node, ())):
                if target == start:
                    return [*path, start]
                if target in seen or target not in GRAPH:
                    continue
                seen.add(target)
                path.append(target)
                if found := visit(target):
                    return found
                path.pop()
            return None

        return visit(start)

    cycles = [c for m in sorted(GRAPH) if (c := cycle_from(m))]
    assert cycles == []



def readme_tree() -> list[str]:
    """The files the README's Layout section lists in its tree (four spaces a level, a name, then
    what it holds)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme.split("## Layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    paths, folders = [], []
    for line in filter(str.strip, tree.splitlines()):
        depth, name = (len(line) - len(line.lstrip(" "))) // 4, line.split()[0]
        folders[depth:] = [name.rstrip("/")] if name.endswith("/") else []
        if name.endswith(".py"):
            paths.append("/".join([*folders[:depth], name]))
    return paths


def holds_code(path: Path) -> bool:
    """A module with more than a docstring (a layer's `__init__` holds only its description)."""
    return len(ast.parse(path.read_text()).body) > 1


def test_the_readme_layout_lists_every_module_once_and_nothing_else():
    modules = [p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py") if holds_code(p)]
    assert sorted(readme_tree()) == sorted(modules)
