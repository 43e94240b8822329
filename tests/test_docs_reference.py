"""The documentation's generated reference pages (docs/hooks/reference.py) leave nothing out.

The generator reads the contract from benchsuite/hookspecs.py and the schemas from their JSON files
when the site is built; these tests find what is declared independently of it (the hookspec
decorators in the source, the pluggy registry, the dataclass fields, every node of each schema) and
check each one has its place on the page, so a hook, attribute or field added later cannot be
dropped silently. The strict site build itself is run last, when MkDocs is installed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pluggy
import pytest

from benchsuite import hookspecs

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "docs" / "hooks" / "reference.py"


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("docs_reference_generator", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hooks_page(reference) -> str:
    return reference.hooks_page(hookspecs)


def _declared_hooks(source: str) -> dict[str, str]:
    """Every function decorated with `@hookspec` or `@hookspec(...)` in the source: name -> class."""
    hooks = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and any(
                        (d.func if isinstance(d, ast.Call) else d).id == "hookspec"
                        for d in item.decorator_list if isinstance(d.func if isinstance(d, ast.Call) else d, ast.Name)):
                    hooks[item.name] = node.name
    return hooks


def test_every_hookspec_has_its_section(hooks_page):
    declared = _declared_hooks(Path(hookspecs.__file__).read_text(encoding="utf-8"))
    # the source scan agrees with pluggy's own view of the spec classes
    registered = set()
    for cls_name in set(declared.values()):
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(getattr(hookspecs, cls_name))
        registered |= {name for name in vars(pm.hook) if not name.startswith("_")}
    assert registered == set(declared)
    assert {"recipe", "setup", "train_step", "predict", "benchsuite_methods"} <= set(declared)
    for name, cls_name in declared.items():
        assert f"### `{name}` {{#" in hooks_page, f"hook {name} ({cls_name}) has no section in the reference"
        section = hooks_page.split(f"### `{name}` {{#", 1)[1].split("\n### ", 1)[0]
        assert f"def {name}(" in section, f"hook {name}: no signature"
        doc = getattr(getattr(hookspecs, cls_name), name).__doc__
        first_line = doc.strip().splitlines()[0].replace("``", "`")
        assert first_line.split(":func:")[0].split(":class:")[0][:40] in section, f"hook {name}: no docstring"
    for cls_name in set(declared.values()):
        assert f"## `{cls_name}`" in hooks_page


def test_method_attributes_and_dataclass_fields_are_documented(hooks_page):
    for name in hookspecs.Method.__annotations__:
        heading = f"### `Method.{name}`"
        assert heading in hooks_page, f"Method.{name} is not in the reference"
        section = hooks_page.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        assert "Not described" not in section, f"Method.{name} has no entry in the Method docstring's Attributes"
    for cls in (v for v in vars(hookspecs).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
                and v.__module__ == hookspecs.__name__):
        assert f"## `{cls.__name__}`" in hooks_page
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in hooks_page, f"{cls.__name__}.{field.name} is not in the reference"
    # the #: comments of SetupContext are its field descriptions: every one is carried
    assert "training class names, index = label" in hooks_page
    assert "| `REQUIRED_HOOKS` |" in hooks_page


def test_a_hook_added_to_the_contract_appears_without_touching_the_generator(reference, tmp_path):
    """The generator lists what the module declares, not a list of its own."""
    source = '''"""A contract."""
import pluggy
from dataclasses import dataclass
PROJECT = "benchsuite"
hookspec = pluggy.HookspecMarker(PROJECT)


class Method:
    """A method.

    Attributes
    ----------
    colour:
        Its colour.
    """

    colour: str = "blue"


@dataclass
class Context:
    """What setup gets."""

    size: int  #: how big


class NewSpec:
    """Hooks of tomorrow."""

    @hookspec(firstresult=True)
    def brand_new_hook(self, x: int) -> int:
        """Does something new with ``x``."""
'''
    module = types.ModuleType("fake_hookspecs")
    path = tmp_path / "fake_hookspecs.py"
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    try:
        path.write_text(source, encoding="utf-8")
        exec(compile(source, str(path), "exec"), module.__dict__)
        page = reference.hooks_page(module)
    finally:
        del sys.modules[module.__name__]
    assert "### `brand_new_hook` {#brand-new-hook}" in page
    assert "def brand_new_hook(self, x: int) -> int" in page and "Does something new with `x`." in page
    assert "### `Method.colour`" in page and "Its colour." in page
    assert "| `size` | `int` | required | how big |" in page


def _schema_paths(schema: dict, path: str = "") -> set[str]:
    paths = {path} if path else set()
    for name, sub in schema.get("properties", {}).items():
        paths |= _schema_paths(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("additionalProperties"), dict):
        paths |= _schema_paths(schema["additionalProperties"], f"{path}.<name>" if path else "<name>")
    if isinstance(schema.get("items"), dict):
        paths |= _schema_paths(schema["items"], f"{path}[]")
    for key in ("oneOf", "anyOf", "allOf"):
        for i, sub in enumerate(schema.get(key, ()), 1):
            paths |= _schema_paths(sub, f"{path} ({key} {i})")
    return paths


@pytest.mark.parametrize("schema_file", ["benchsuite/results/result.schema.json",
                                         "benchsuite/report/reference.schema.json"])
def test_every_schema_field_is_documented(reference, schema_file):
    schema = json.loads((ROOT / schema_file).read_text(encoding="utf-8"))
    page = reference.schema_page(schema, "T", schema_file, "intro")
    missing = [p for p in sorted(_schema_paths(schema)) if f"| `{p}` |" not in page]
    assert not missing, f"{schema_file}: fields missing from the reference: {missing}"
    assert len(_schema_paths(schema)) > 20
    for node in _walk(schema):
        if node.get("description"):
            assert " ".join(node["description"].split()) in page
    if "if" in schema:  # the conditional requirements are spelled out
        assert "these are required too" in page


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_cli_reference_has_every_command(reference):
    from benchsuite.cli import build_parser

    parser = build_parser()
    page = reference.cli_page(parser)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        assert f"## `benchsuite {name}`" in page
        for option in command._option_string_actions:
            assert option in page, f"benchsuite {name} {option} is not in the command-line reference"


def test_the_site_builds_strictly(tmp_path):
    """What .ci/run runs: a broken link or anchor, a page missing from the navigation or a generator
    error fails the build."""
    pytest.importorskip("mkdocs", reason='MkDocs is not installed: python -m pip install -e ".[docs]"')
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "reference" / "hooks" / "index.html").is_file()
    assert (tmp_path / "site" / "leaderboard" / "toy" / "index.html").is_file()
