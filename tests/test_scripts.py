"""The scripts under scripts/ use what exists (the suite does not run them; a moved or renamed
name must not leave one broken until someone runs it): every import of the project's own modules
resolves, and so does every ``module.name`` read from a project module a script imported."""

from __future__ import annotations

import ast
import importlib
import pathlib
import types

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).parents[1] / "scripts").glob("*.py"))
PROJECT = ("mmpo_jax", "scripts", "configs")


def _resolve(module_name: str, name: str | None):
    """The object ``from module_name import name`` (or ``import module_name``) binds."""
    module = importlib.import_module(module_name)
    if name is None or hasattr(module, name):
        return module if name is None else getattr(module, name)
    return importlib.import_module(f"{module_name}.{name}")


def _problems(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules: dict[str, types.ModuleType] = {}  # local name -> a project module
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT:
            bindings = [(node.module, alias.name, alias.asname or alias.name)
                        for alias in node.names]
        elif isinstance(node, ast.Import):
            bindings = [(alias.name, None, alias.asname) for alias in node.names
                        if alias.name.split(".")[0] in PROJECT]
        else:
            continue
        for module_name, name, local in bindings:
            try:
                bound = _resolve(module_name, name)
            except (ImportError, AttributeError) as error:
                problems.append(f"l.{node.lineno}: {module_name} {name or ''}: {error}")
                continue
            if local is not None and isinstance(bound, types.ModuleType):
                modules[local] = bound
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and not hasattr(modules[node.value.id], node.attr)):
            problems.append(f"l.{node.lineno}: {node.value.id}.{node.attr} does not exist")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_project_name_a_script_reads_exists(script):
    assert _problems(script) == []
