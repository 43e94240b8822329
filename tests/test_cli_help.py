"""`benchsuite --version` and `benchsuite --help`: the version of the package, and every subcommand
(plugins' included) listed with its one-line description, on one line, however narrow the terminal."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import benchsuite
from benchsuite.cli import build_parser, main


def _commands() -> dict[str, str]:
    """Every subcommand of the full parser (plugin commands included) and its `help=` line."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in sub._choices_actions}


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"benchsuite {benchsuite.__version__}\n"


def test_version_from_the_console_entry_point():
    """The installed `benchsuite` script answers too (the one a new user types first)."""
    out = subprocess.run([sys.executable, "-m", "benchsuite.cli", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"benchsuite {benchsuite.__version__}"


@pytest.mark.parametrize("columns", ["40", "80", "200"])
def test_help_lists_every_subcommand_with_its_one_line(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)  # argparse wraps to the terminal width it reads from here
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    commands = _commands()
    assert {"list", "run", "bench", "status", "cache", "leaderboard", "compare", "validate",
            "toy-pretrain"} <= set(commands)  # built-in ones and a plugin's (the toy world's)
    for name, help_line in commands.items():
        assert help_line and "\n" not in help_line.strip(), f"subcommand {name!r} has no one-line help="
        lines = [line for line in out.splitlines() if re.match(rf"\s+{re.escape(name)}\s", line)]
        assert len(lines) == 1, f"{name!r} is not listed on exactly one line of --help:\n{out}"
        assert " ".join(help_line.split()) in lines[0], f"{name!r}: its description is not on its line:\n{out}"
    assert "--version" in out


def test_no_command_is_still_an_error_naming_what_is_missing(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", "--protocol", "base2new"], ["bench", "--method", "coop"],
                                     ["plan", "--protocol", "base2new"], ["status"]])
def test_a_repeated_set_adds_its_overrides_instead_of_replacing_the_earlier_ones(command):
    from benchsuite.cli import build_parser

    args = build_parser(plugin_commands=False).parse_args([*command, "--set", "epochs=2", "lr=0.1",
                                                           "--set", "coop.batch_size=4"])
    assert args.set == ["epochs=2", "lr=0.1", "coop.batch_size=4"]
