"""A written leaderboard records the options it was built with (an HTML comment on its first line), so
`leaderboard --check` without them checks it as it was built, and a stale verdict suggests a command
that keeps its sections; the committed boards record the options .ci/run builds them with."""

from __future__ import annotations

import shlex
from pathlib import Path

from benchsuite.results.store import ResultStore
from results_factory import make_result
from test_run import run_quiet

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("--std", "--calibration", "--cost", "--no-plots")


def _board(tmp_path: Path, *flags: str) -> tuple[list[str], Path]:
    """Results of three seeds and a board built from them with `flags`; returns (common argv, board)."""
    results, out = tmp_path / "results", tmp_path / "board.md"
    store = ResultStore(results)
    for seed in (1, 2, 3):
        store.write(make_result("base2new", "coop", "dtd", seed, metrics={"base": 80.0 + seed, "new": 60.0}))
    argv = ["leaderboard", "--results", str(results), "--out", str(out), "--reference", str(tmp_path / "none")]
    code, _, err = run_quiet([*argv, *flags])
    assert code == 0, err
    return argv, out


def test_the_board_records_its_options_and_check_uses_them(tmp_path):
    argv, out = _board(tmp_path, "--std", "--calibration", "--no-plots")
    first = out.read_text(encoding="utf-8").splitlines()[0]
    assert first == "<!-- benchsuite leaderboard options: --std --calibration --no-plots -->"
    code, stdout, err = run_quiet([*argv, "--check"])
    assert code == 0, stdout + err
    assert "checking with the options" in stdout and "up to date" in stdout
    code, _, err = run_quiet([*argv, "--no-plots"])  # rebuilt without two of its sections: said, not silent
    assert code == 0 and "was built with --std --calibration --no-plots" in err, err


def test_a_check_with_other_options_names_the_recorded_ones_and_suggests_a_complete_command(tmp_path):
    argv, out = _board(tmp_path, "--std", "--calibration", "--no-plots")
    code, _, err = run_quiet([*argv, "--check", "--std", "--no-plots"])
    assert code == 1
    assert "built with --std --calibration --no-plots" in err and "check with --std --calibration --no-plots" in err
    assert f"`benchsuite leaderboard --results {argv[2]} --out {out} --std --no-plots`" in err


def _ci_builds() -> list[tuple[Path, set[str]]]:
    """(board, content flags) of every `benchsuite leaderboard` command in .ci/run."""
    builds = []
    for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] != ["benchsuite", "leaderboard"]:
            continue
        out = words[words.index("--out") + 1] if "--out" in words else "leaderboard/README.md"
        builds.append((REPO / out, {w for w in words if w in FLAGS}))
    return builds


def test_the_committed_boards_record_the_options_ci_checks_them_with():
    from benchsuite.leaderboard import recorded_options

    builds = _ci_builds()
    assert {board.name for board, _ in builds} == {"README.md", "toy.md"}
    for board, flags in builds:
        recorded = recorded_options(board.read_text(encoding="utf-8"))
        assert recorded is not None and set(recorded.split()) == flags, (board, recorded, flags)
