"""Generates the reference pages of the documentation site from the code, at build time.

An MkDocs hook (``hooks:`` in mkdocs.yml): ``on_files`` adds pages that exist only in the build,
never as committed copies, so they cannot drift from what they describe:

- ``reference/hooks.md``: the plugin contract, from ``benchsuite/hookspecs.py`` (module docstring,
  every hookspec of every spec class with its signature and docstring, the ``Method`` attributes,
  the dataclasses' fields with their ``#:`` comments, the harness defaults and the constants);
- ``reference/result-schema.md`` and ``reference/reference-schema.md``: every field of the result
  JSON Schema and of the published-numbers schema, then each schema verbatim;
- ``reference/cli.md``: ``benchsuite --help`` and every subcommand's ``--help``, from the real parser;
- ``leaderboard/index.md``, ``leaderboard/toy.md`` and their plots: the committed leaderboards.

The functions take the module, schema or parser they describe, so tests (tests/test_docs_reference.py)
check that nothing declared is left out. The build imports benchsuite: install it first.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
RESULT_SCHEMA = ROOT / "benchsuite" / "results" / "result.schema.json"
REFERENCE_SCHEMA = ROOT / "benchsuite" / "report" / "reference.schema.json"
LEADERBOARDS = {"leaderboard/index.md": ROOT / "leaderboard" / "README.md",
                "leaderboard/toy.md": ROOT / "leaderboard" / "toy.md"}
GENERATED_NOTE = ("_Generated when the documentation is built, from {source}; edit that file, not this page._")
HELP_COLUMNS = "100"


# --------------------------------------------------------------------------------------------------
# docstrings (reStructuredText as written in hookspecs.py) to Markdown


def slug(name: str) -> str:
    """The anchor a generated heading carries: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def rst_to_markdown(text: str, anchors: dict[str, str] | None = None) -> str:
    """The reStructuredText of a docstring as Markdown: ``code`` spans, :role:`name` references
    (a link when `anchors` names a heading of the page), ``::`` literal blocks as fenced blocks."""
    anchors = anchors or {}

    def role(match: re.Match) -> str:
        target = match.group(2).lstrip("~")
        short = target.rsplit(".", 1)[-1]
        return f"[`{short}`](#{anchors[short]})" if short in anchors else f"`{short}`"

    lines = inspect.cleandoc(text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(_inline(line.rstrip()[:-2].rstrip() + ":", role))
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            indent = min(len(b) - len(b.lstrip()) for b in block if b.strip()) if block else 0
            out += ["", "```text", *[b[indent:] for b in block], "```", ""]
            continue
        out.append(_inline(line, role))
        i += 1
    return "\n".join(out).strip() + "\n"


def _inline(line: str, role) -> str:
    line = re.sub(r":(class|func|meth|attr|mod|data|obj):`([^`]+)`", role, line)
    return re.sub(r"``(.+?)``", r"`\1`", line)


def _numpy_sections(doc: str) -> tuple[str, dict[str, str]]:
    """A numpydoc docstring's text before its "Attributes" section, and that section's entries."""
    doc = inspect.cleandoc(doc)
    match = re.search(r"^Attributes\n-+\n", doc, flags=re.M)
    if not match:
        return doc, {}
    entries: dict[str, list[str]] = {}
    current = None
    for line in doc[match.end():].splitlines():
        head = re.fullmatch(r"(\w+)\s*:\s*(.*)", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            entries[current] = [head.group(2)] if head.group(2) else []
        elif current is not None:
            entries[current].append(line)
    return doc[:match.start()].rstrip(), {k: inspect.cleandoc("\n".join(v)) for k, v in entries.items()}


def _field_comments(source: str, class_name: str) -> dict[str, str]:
    """The ``#:`` comments of a class's annotated fields (on the line itself or just above it)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    comments = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            comments[item.target.id] = _comment_of(lines, item.lineno)
    return comments


def _comment_of(lines: list[str], lineno: int) -> str:
    trailing = lines[lineno - 1].split("#:", 1)
    above = []
    j = lineno - 2
    while j >= 0 and lines[j].strip().startswith("#:"):
        above.insert(0, lines[j].strip()[2:].strip())
        j -= 1
    parts = above + ([trailing[1].strip()] if len(trailing) == 2 else [])
    return " ".join(p for p in parts if p)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped outside code spans (inside them
    Python-Markdown's tables keep a pipe as it is, and an escaping backslash would show)."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    return "".join(part if part.startswith("`") else part.replace("|", "\\|") for part in parts)


# --------------------------------------------------------------------------------------------------
# the plugin contract


def hookspecs_of(module) -> Iterator[tuple[type, str, Any]]:
    """(spec class, hook name, function) for every hookspec of the module, in source order."""
    marker = f"{module.PROJECT}_spec"
    for cls in _classes(module):
        for name, value in vars(cls).items():
            if callable(value) and hasattr(value, marker):
                yield cls, name, value


def _classes(module) -> list[type]:
    found = [v for v in vars(module).values() if inspect.isclass(v) and v.__module__ == module.__name__]
    return sorted(found, key=lambda c: inspect.getsourcelines(c)[1])


def _signature(function) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = tree.body[0]
    node.decorator_list = []
    node.body = [ast.Expr(ast.Constant(...))]
    return ast.unparse(node).splitlines()[0].rstrip(":")


def hooks_page(module) -> str:
    """The reference page of the plugin contract declared in `module` (benchsuite.hookspecs)."""
    source = inspect.getsource(module)
    specs = list(hookspecs_of(module))
    spec_classes = list(dict.fromkeys(cls for cls, _, _ in specs))
    data_classes = [c for c in _classes(module) if dataclasses.is_dataclass(c)]
    method_cls = module.Method
    defaults = {name for cls in _classes(module) if cls.__name__ == "HarnessDefaults"
                for name, value in vars(cls).items() if callable(value) and hasattr(value, f"{module.PROJECT}_impl")}
    anchors = {name: slug(name) for _, name, _ in specs}
    anchors.update({c.__name__: slug(c.__name__) for c in [method_cls, *spec_classes, *data_classes]})
    required = set(getattr(module, "REQUIRED_HOOKS", ()))
    training = set(getattr(module, "TRAINING_HOOKS", ()))

    out = ["# Hook and contract reference", "",
           GENERATED_NOTE.format(source="`benchsuite/hookspecs.py`"), "",
           "Writing a method, step by step: [Writing a method](../writing-a-method.md).", "",
           rst_to_markdown(module.__doc__, anchors)]

    intro, attributes = _numpy_sections(method_cls.__doc__)
    out += [f"## `Method` {{#{anchors['Method']}}}", "", rst_to_markdown(intro, anchors)]
    for name, kind in method_cls.__annotations__.items():
        default = getattr(method_cls, name, None)
        out += [f"### `Method.{name}` {{#method-{slug(name)}}}", "",
                f"Type `{kind}`, default `{default!r}`.", "",
                rst_to_markdown(attributes.get(name, ""), anchors) if attributes.get(name) else
                "_Not described in the `Method` docstring._", ""]

    for cls in data_classes:
        comments = _field_comments(source, cls.__name__)
        out += [f"## `{cls.__name__}` {{#{anchors[cls.__name__]}}}", "", rst_to_markdown(cls.__doc__ or "", anchors),
                "| field | type | default | description |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"`{f.default!r}`"
            elif f.default_factory is not dataclasses.MISSING:
                default = f"`{f.default_factory.__name__}()`"
            else:
                default = "required"
            description = rst_to_markdown(comments[f.name], anchors) if comments.get(f.name) else ""
            out.append(f"| `{f.name}` | `{_cell(f.type)}` | {default} | {_cell(description)} |")
        out.append("")

    for cls in spec_classes:
        out += [f"## `{cls.__name__}` {{#{anchors[cls.__name__]}}}", "", rst_to_markdown(cls.__doc__ or "", anchors)]
        for owner, name, function in specs:
            if owner is not cls:
                continue
            options = getattr(function, f"{module.PROJECT}_spec") or {}
            facts = ["first result wins: the method's answer, else the harness default" if options.get("firstresult")
                     else "every implementation is called"]
            if name in required:
                facts.append("**required** of every method")
            elif name in training:
                facts.append("**required** when the recipe trains (epochs > 0)")
            if name in defaults:
                facts.append("harness default in `HarnessDefaults`")
            out += [f"### `{name}` {{#{anchors[name]}}}", "", "```python", _signature(function), "```", "",
                    "; ".join(facts) + ".", "", rst_to_markdown(function.__doc__ or "(no docstring)", anchors)]

    constants = [(node.targets[0].id, _comment_of(source.splitlines(), node.lineno))
                 for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                 and _comment_of(source.splitlines(), node.lineno)]
    if constants:
        out += ["## Constants", "", "| name | value | meaning |", "|---|---|---|"]
        out += [f"| `{name}` | `{_cell(repr(getattr(module, name)))}` | {_cell(rst_to_markdown(doc, anchors))} |"
                for name, doc in constants]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# JSON Schemas

_CONSTRAINTS = ("const", "enum", "pattern", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
                "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def schema_rows(schema: dict, root: dict | None = None, path: str = "", required: bool = True) -> Iterator[tuple]:
    """(path, type, required, constraints, description) for every node of `schema` below the root,
    depth first: object properties as `a.b`, a map's values (additionalProperties) as `a.<name>`,
    array items as `a[]`, alternatives as `a (form N)`."""
    root = root if root is not None else schema
    if path:
        yield path, _type_of(schema), required, _constraints(schema), schema.get("description", "")
    if "$ref" in schema and not any(k in schema for k in ("properties", "items", "additionalProperties")):
        return
    needed = set(schema.get("required", ()))
    for name, sub in schema.get("properties", {}).items():
        yield from schema_rows(sub, root, f"{path}.{name}" if path else name, name in needed)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from schema_rows(extra, root, f"{path}.<name>" if path else "<name>", False)
    if isinstance(schema.get("items"), dict):
        yield from schema_rows(schema["items"], root, f"{path}[]", False)
    for key in ("oneOf", "anyOf", "allOf"):
        for i, alternative in enumerate(schema.get(key, ()), 1):
            yield from schema_rows(alternative, root, f"{path} ({key} {i})", True)


def _type_of(schema: dict) -> str:
    if "$ref" in schema:
        return f"see `{schema['$ref'].removeprefix('#/')}`"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind:
        return kind
    if "const" in schema or "enum" in schema:
        return "a listed value"
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return f"{key.replace('Of', ' of')} {len(schema[key])} forms"
    return "any"


def _constraints(schema: dict) -> str:
    parts = [f"{key} `{json.dumps(schema[key], ensure_ascii=False)}`" for key in _CONSTRAINTS if key in schema]
    if schema.get("additionalProperties") is False:
        parts.append("no other keys")
    if "propertyNames" in schema:
        parts.append(f"keys: `{json.dumps(schema['propertyNames'], ensure_ascii=False)}`")
    return ", ".join(parts)


def _conditions(schema: dict) -> list[str]:
    """Each if/then of the schema as one sentence: when ..., these fields are required."""
    sentences = []
    for node in ([schema] + schema.get("allOf", [])):
        if "if" not in node or "then" not in node:
            continue
        when = ", ".join(f"`{p}` is `{json.dumps(s.get('const', s.get('enum')))}`"
                         for p, s in _walk(node["if"]) if "const" in s or "enum" in s) or \
            f"`{json.dumps(node['if'])}` holds"
        needs = [f"`{p + '.' if p else ''}{name}`" for p, s in _walk(node["then"]) for name in s.get("required", ())]
        sentences.append(f"When {when}, these are required too: {', '.join(needs)}.")
    return sentences


def _walk(schema: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}.<name>" if path else "<name>")


def schema_page(schema: dict, title: str, source: str, intro: str) -> str:
    """The reference page of one JSON Schema: every field in a table, the conditions, the file."""
    out = [f"# {title}", "", GENERATED_NOTE.format(source=f"`{source}`"), "", intro, "",
           f"Schema title: _{schema.get('title', '')}_ (`{schema.get('$schema', '')}`).", ""]
    if schema.get("required"):
        out += ["Required at the top level: " + ", ".join(f"`{k}`" for k in schema["required"]) + ".", ""]
    out += [f"- {sentence}" for sentence in _conditions(schema)]
    out += ["", "| field | type | required | constraints | description |", "|---|---|---|---|---|"]
    for path, kind, needed, constraints, description in schema_rows(schema):
        out.append(f"| `{_cell(path)}` | {_cell(kind)} | {'yes' if needed else ''} | {_cell(constraints)} | "
                   f"{_cell(description)} |")
    for name, sub in schema.get("$defs", {}).items():
        out += ["", f"Definition `$defs/{name}`: {_type_of(sub)}, {_constraints(sub) or 'no constraints'}."]
    out += ["", "## The schema file", "", f"`{source}`, as shipped in the package:", "", "```json",
            json.dumps(schema, indent=2, ensure_ascii=False), "```"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# the command line


def cli_page(parser) -> str:
    """`benchsuite --help` and every subcommand's `--help`, as the installed parser prints them."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS  # argparse wraps to this width
    try:
        out = ["# Command-line reference", "", GENERATED_NOTE.format(source="the parser of `benchsuite/cli.py` "
                                                                               "(and the plugins' commands)"), "",
               "Every option with its meaning, task by task: [Running and scaling](../running.md).", "",
               "## `benchsuite`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, command in sub.choices.items():
            out += [f"## `benchsuite {name}` {{#{slug(name)}}}", "", "```text", command.format_help().rstrip(), "```", ""]
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# the MkDocs hook


def generated_pages() -> dict[str, str]:
    """Every generated page: path in the site's docs tree -> Markdown."""
    from benchsuite import hookspecs
    from benchsuite.cli import build_parser

    pages = {
        "reference/hooks.md": hooks_page(hookspecs),
        "reference/result-schema.md": schema_page(
            json.loads(RESULT_SCHEMA.read_text(encoding="utf-8")), "Result file schema",
            "benchsuite/results/result.schema.json",
            "Every job writes one result file of this shape, validated before it is written and again by "
            "`benchsuite validate` and `benchsuite leaderboard` ([Results and the leaderboard](../results.md))."),
        "reference/reference-schema.md": schema_page(
            json.loads(REFERENCE_SCHEMA.read_text(encoding="utf-8")), "Published-numbers schema",
            "benchsuite/report/reference.schema.json",
            "The files `leaderboard/reference/<method>.json` that carry a method's published numbers "
            "([Results and the leaderboard](../results.md#reported-numbers))."),
        "reference/cli.md": cli_page(build_parser()),
    }
    for page, source in LEADERBOARDS.items():
        pages[page] = source.read_text(encoding="utf-8")
    return pages


def leaderboard_plots() -> dict[str, Path]:
    """The plots the committed leaderboards embed: path in the site's docs tree -> file."""
    plots = ROOT / "leaderboard" / "plots"
    return {f"leaderboard/plots/{p.relative_to(plots).as_posix()}": p for p in sorted(plots.rglob("*.png"))}


def on_files(files, config):
    from mkdocs.structure.files import File

    for page, text in generated_pages().items():
        files.append(File.generated(config, page, content=text))
    for page, path in leaderboard_plots().items():
        files.append(File.generated(config, page, abs_src_path=str(path)))
    return files
