"""Every command the README and the documentation pages show runs as written.

Fenced blocks preceded by the line ``<!-- runnable -->`` are meant to be copied and run:

- in a ``bash`` block, every ``benchsuite`` command is parsed by the real parser of
  benchsuite/cli.py (nothing is executed, so the two-minute toy grid costs nothing here), the quick
  read-only ones (``list``, ``cache ls``, ``--help``, ``--version``) are also run, and every other
  command must be one this test knows how to check (a script that exists, pip, pytest, mkdocs);
- a ``python`` block is a method plugin: it is imported and run through one job of a protocol on
  the generated fixture data, as `benchsuite run` runs an installed plugin;
- a ``toml`` block is a plugin's pyproject.toml: it parses and declares a ``benchsuite`` entry point.

Every other ``bash`` block, and every inline code span that starts with ``benchsuite ``, may hold
placeholders (``...``, ``R``), so only its subcommand and ``--options`` are checked against the parser.
Standalone ``--option`` spans (the option tables) must name an option of some command.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import benchsuite.methods as methods_module
from benchsuite.cli import build_parser, main
from benchsuite.hookspecs import Method
from benchsuite.methods import MethodEntry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = "<!-- runnable -->"
#: subcommands quick and harmless enough to run for real (read-only, seconds)
RUN_FOR_REAL = {("list",), ("cache", "ls"), ("--help",), ("--version",)}
#: options of other programs that documentation pages name in inline code
FOREIGN_OPTIONS = {"--official", "--anchor", "--n", "--signal", "--strict", "--no-deps", "--no-build-isolation"}
CONTROL = {";", "&", "&&", "|", "||", "(", ")"}
SHELL_WORDS = {"do", "done", "then", "fi", "time", "wait"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    runnable: bool

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start = opening.group(1), opening.group(2), i
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        found.append(Block(path, start + 1, lang, "\n".join(body), before == MARKER))
        i += 1
    return found


def prose(path: Path) -> str:
    """The page without its fenced blocks."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell snippet, each as its words (comments, continuation lines,
    loops, `;`/`&`/`|` lists and leading VAR=value assignments handled)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in CONTROL:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    simple = []
    for words in commands:
        while words and (words[0] in SHELL_WORDS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0])):
            words = words[1:]
        if words and words[0] not in {"for", "while", "if"}:
            simple.append(words)
    return simple


def test_shell_commands_splits_like_a_shell():
    script = ('for p in a b; do\n  benchsuite run --protocol $p --quiet; done\n'
              'CUDA_VISIBLE_DEVICES=$r benchsuite run --shard $r/4 & done; wait\n'
              'benchsuite run --x \\\n    --y  # a comment\n# benchsuite: output shown as a comment\n')
    assert shell_commands(script) == [["benchsuite", "run", "--protocol", "$p", "--quiet"],
                                      ["benchsuite", "run", "--shard", "$r/4"], ["benchsuite", "run", "--x", "--y"]]


def benchsuite_argv(words: list[str]) -> list[str] | None:
    """The arguments of the benchsuite call in one simple command (also under srun), or None."""
    return words[words.index("benchsuite") + 1:] if "benchsuite" in words else None


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
RUNNABLE_SHELL = [(block, words) for block in BLOCKS if block.runnable and block.lang in ("bash", "sh", "shell")
                  for words in shell_commands(block.text)]
RUNNABLE_PYTHON = [block for block in BLOCKS if block.runnable and block.lang == "python"]
RUNNABLE_TOML = [block for block in BLOCKS if block.runnable and block.lang == "toml"]


def _id(item) -> str:
    block, words = item if isinstance(item, tuple) else (item, [])
    return f"{block}:{' '.join(words)[:60]}"


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()  # with the plugins' subcommands, as `benchsuite` builds it for them


def _commands(parser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_readme_keeps_the_commands_ci_runs():
    """.ci/run installs and tests exactly as the README says: these two lines, in a runnable block."""
    blocks = [b for b in fenced_blocks(README) if b.runnable and b.lang == "bash"]
    assert any(b.text.splitlines() == ['python -m pip install -e ".[test]"', "python -m pytest"] for b in blocks)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'python -m pip install -e ".[test]"' in ci and "python -m pytest" in ci


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_the_pages_have_runnable_blocks():
    """The marker is found: the first toy run and a method are runnable from the README alone."""
    readme = [words for block, words in RUNNABLE_SHELL if block.path == README]
    assert ["benchsuite", "run", "--protocol", "base2new"] in readme
    assert any(block.path == README for block in RUNNABLE_PYTHON)
    assert len({block.path for block, _ in RUNNABLE_SHELL}) >= 5


@pytest.mark.parametrize("item", RUNNABLE_SHELL, ids=_id)
def test_runnable_command_is_valid_as_written(item, parser, capsys):
    block, words = item
    argv = benchsuite_argv(words)
    if argv is None:
        _check_other_command(block, words)
        return
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        err = capsys.readouterr().err
        assert exc.code == 0 and argv[:1] in (["--help"], ["--version"]) or "--help" in argv, \
            f"{block}: `benchsuite {' '.join(argv)}` does not parse:\n{err}"
    except Exception as exc:  # noqa: BLE001 - a choice refused while parsing (OneOf) is a BenchsuiteError
        pytest.fail(f"{block}: `benchsuite {' '.join(argv)}` does not parse: {exc}")


def _check_other_command(block: Block, words: list[str]) -> None:
    """A command other than benchsuite in a runnable block: a form this test knows to be valid."""
    where = f"{block}: `{' '.join(words)}`"
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "pip"]:
        assert words[3] == "install", where
        for target in words[words.index("-e") + 1:words.index("-e") + 2] if "-e" in words else []:
            if not target.startswith("my-"):  # a plugin folder the reader creates (Writing a method)
                extra = re.fullmatch(r"(.*?)(\[([\w,-]+)\])?", target)
                assert (ROOT / extra.group(1)).exists(), where
                pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
                for name in (extra.group(3) or "").split(","):
                    assert not name or name in pyproject["project"]["optional-dependencies"], where
    elif words[0] in ("python", "python3") and words[1:3] == ["-m", "pytest"]:
        assert all((ROOT / arg).exists() for arg in words[3:] if not arg.startswith("-")), where
    elif words[0] in ("python", "python3"):
        assert (ROOT / words[1]).is_file(), f"{where}: no such script"
    elif words[0] == "mkdocs":
        assert words[1] in ("build", "serve") and (ROOT / "mkdocs.yml").is_file(), where
    else:
        pytest.fail(f"{where}: a command this test cannot check; add it to _check_other_command")


@pytest.mark.parametrize("item", [i for i in RUNNABLE_SHELL if (benchsuite_argv(i[1]) or [None])[0] is not None
                                  and any(tuple(benchsuite_argv(i[1])[:len(k)]) == k for k in RUN_FOR_REAL)],
                         ids=_id)
def test_quick_command_runs(item, tmp_path, monkeypatch, capsys):
    block, words = item
    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        code = main(benchsuite_argv(words))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, f"{block}: `{' '.join(words)}` exited {code}:\n{out.err}"
    assert out.out.strip()


def _inline_commands() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        found += [(page, span) for span in re.findall(r"`(benchsuite [^`]+)`", prose(page))]
    for block in BLOCKS:
        if block.lang in ("bash", "sh", "shell"):
            found += [(block.path, " ".join(words)) for words in shell_commands(block.text) if "benchsuite" in words]
    return found


def _option_names(parser) -> set[str]:
    return set(parser._option_string_actions)


def test_every_shown_command_names_real_subcommands_and_options(parser):
    """Commands with placeholders cannot be parsed, but their subcommand and options must exist."""
    commands = _commands(parser)
    problems = []
    for page, command in _inline_commands():
        words = command.split()
        argv = words[words.index("benchsuite") + 1:]
        name = next((w for w in argv if not w.startswith("-")), None)
        if argv and argv[0] in ("--help", "-h", "--version"):
            known = _option_names(parser)
        elif name is not None and name.isupper():  # a placeholder, `benchsuite COMMAND --help`
            known = set().union(*(_option_names(p) for p in commands.values()))
        elif name not in commands:
            problems.append(f"{page.relative_to(ROOT)}: `{command}`: no subcommand {name!r}")
            continue
        else:
            known = _option_names(commands[name])
        for word in argv:
            option = re.sub(r"[\].,;:)]+$", "", word.lstrip("[(")).split("=")[0]
            if option.startswith("--") and option not in known:
                problems.append(f"{page.relative_to(ROOT)}: `{command}`: `benchsuite {name}` has no option {option}")
    assert not problems, "\n".join(problems)


def test_every_option_named_in_the_pages_exists(parser):
    """An inline `--option ...` span (the option tables) names an option of some benchsuite command."""
    known = _option_names(parser).union(*(_option_names(p) for p in _commands(parser).values()))
    problems = []
    for page in PAGES:
        for span in re.findall(r"`(--[a-z][a-z0-9-]*)[^`]*`", prose(page)):
            if span not in known and span not in FOREIGN_OPTIONS:
                problems.append(f"{page.relative_to(ROOT)}: `{span}` is no option of benchsuite")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", RUNNABLE_PYTHON, ids=str)
def test_method_example_runs_a_job(block, tmp_path, monkeypatch, capsys, tiny_checkpoint, data_root):
    """The example plugin, as printed, imports and runs one base-to-new job through the real CLI."""
    from benchsuite.results.validate import validate_result

    module_path = tmp_path / "docs_example_method.py"
    module_path.write_text(block.text + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("docs_example_method", module_path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    classes = module.benchsuite_methods()
    assert classes and all(isinstance(c, type) and issubclass(c, Method) for c in classes), block
    found = {c.name: MethodEntry(c.name, c, "docs-example", "0.1.0", spec.name) for c in classes}
    monkeypatch.setattr(methods_module, "discover", lambda: found)
    results = tmp_path / "results"
    for cls in classes:
        code = main(["run", "--protocol", "base2new", "--method", cls.name, "--dataset", "eurosat", "--seeds", "1",
                     "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint), "--data-root", str(data_root),
                     "--results", str(results), "--feature-cache", str(tmp_path / "features"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 0, f"{block}: the example method {cls.name!r} failed:\n{err}"
        files = list((results / "base2new" / cls.name / "eurosat").glob("*.json"))
        assert len(files) == 1
        import json

        result = json.loads(files[0].read_text(encoding="utf-8"))
        assert validate_result(result) == []
        assert result["method"]["trainable_params"] >= 1 and result["timing"]["train_images"] > 0


@pytest.mark.parametrize("block", RUNNABLE_TOML, ids=str)
def test_plugin_pyproject_declares_an_entry_point(block):
    project = tomllib.loads(block.text)["project"]
    entry_points = project["entry-points"]["benchsuite"]
    modules = tomllib.loads(block.text).get("tool", {}).get("setuptools", {}).get("py-modules", [])
    assert entry_points and all(target.split(":")[0] in modules for target in entry_points.values()), block


def _github_slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_readme_links_resolve():
    """README is not part of the site (which checks its own links): its links and anchors, here."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            headings = re.findall(r"^#+\s+(.*)$", prose(file), flags=re.M)
            if anchor not in {_github_slug(h) for h in headings}:
                problems.append(f"{target}: no heading with that anchor in {path}")
    assert not problems, "\n".join(problems)
