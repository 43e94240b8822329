"""The core never imports the toy world or a plugin: they register through public entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import benchsuite

CORE = Path(benchsuite.__file__).resolve().parent
FORBIDDEN = ("benchsuite.toy", "benchsuite_plugins")


def _imports(path: Path) -> list[str]:
    """Absolute names of every module a file imports (relative imports resolved against the package)."""
    package = ".".join(("benchsuite", *path.relative_to(CORE).parent.parts))
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_core_modules_import_neither_toy_nor_plugins():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path.relative_to(CORE).parts[0] == "toy":
            continue
        offenders += [f"{path.relative_to(CORE)}: {name}" for name in _imports(path)
                      if name.startswith(FORBIDDEN)]
    assert offenders == []


def test_the_toy_world_registers_through_the_entry_point_group():
    from importlib.metadata import entry_points

    toy = [ep for ep in entry_points(group="benchsuite") if ep.value == "benchsuite.toy.plugin"]
    assert len(toy) == 1
    from benchsuite.data.registry import get_dataset
    from benchsuite.methods import contributions

    names = {spec.name for plugin, spec in contributions("benchsuite_datasets") if plugin.name == toy[0].name}
    assert "toy_objects" in names and get_dataset("toy_objects").default_root is not None
    models = [spec for plugin, spec in contributions("benchsuite_models") if plugin.name == toy[0].name]
    assert [m.name for m in models] == ["bs-toy-clip"] and all(p.is_file() for p in models[0].checkpoints.values())
