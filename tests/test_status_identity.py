"""`benchsuite status` matches jobs by their recipe identity: results of a `--set` run never make the
default grid look complete, and `status --set` asks about the grid of those overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchsuite.results.status import record_grid
from benchsuite.results.store import ResultStore
from results_factory import default_recipe, make_result
from test_run import result_files, run_quiet

PROTOCOL, DATASET, SHOTS, SEEDS = "toy_few_shot", "toy_textures", 1, (1, 2, 3)
CELLS = [(PROTOCOL, m, DATASET, SHOTS, s) for m in ("coop", "zeroshot_clip") for s in SEEDS]


def _write_results(results: Path, coop_epochs: int | None) -> None:
    """zeroshot_clip at its default recipe; coop at `coop_epochs` (None: its default recipe)."""
    store = ResultStore(results)
    for seed in SEEDS:
        store.write(make_result(PROTOCOL, "zeroshot_clip", DATASET, seed, shots=SHOTS))
        if coop_epochs is None:
            store.write(make_result(PROTOCOL, "coop", DATASET, seed, shots=SHOTS))
            continue
        recipe = {**default_recipe(PROTOCOL, "coop", DATASET, SHOTS), "epochs": coop_epochs}
        store.write(make_result(PROTOCOL, "coop", DATASET, seed, shots=SHOTS, method__recipe=recipe,
                                method__default_recipe=False, method__overrides={"epochs": coop_epochs}))


_ROW = re.compile(rf"^{PROTOCOL}\s+(?P<label>.+?)(?P<counts>(\s+\d+){{5}})$")


def _row(out: str, label: str) -> list[str]:
    """done running failed missing total of the status row labelled exactly `label`."""
    rows = {m["label"]: m["counts"].split() for m in map(_ROW.match, out.splitlines()) if m}
    assert label in rows, out
    return rows[label]


def test_results_of_a_set_run_do_not_complete_the_default_grid(tmp_path):
    assert default_recipe(PROTOCOL, "coop", DATASET, SHOTS)["epochs"] != 2
    results = tmp_path / "results"
    record_grid(results, CELLS)  # the default grid (or one recorded before overrides were)
    _write_results(results, coop_epochs=2)
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 1, out + err
    assert out.splitlines()[-1] == "incomplete"
    assert _row(out, "coop") == ["0", "0", "0", "3", "3"]
    assert _row(out, "zeroshot_clip") == ["3", "0", "0", "0", "3"]
    for seed in SEEDS:
        assert f"missing: {PROTOCOL}/coop/{DATASET}/{SHOTS}shot/seed{seed}" in out
    assert "`benchsuite status --set coop.epochs=2`" in out  # what the results that exist were run with
    code, out, err = run_quiet(["status", "--results", str(results), "--set", "coop.epochs=2"])
    assert code == 0 and out.splitlines()[-1] == "complete", out + err


def test_the_set_grid_and_the_default_grid_are_reported_apart(tmp_path):
    results = tmp_path / "results"
    record_grid(results, CELLS, {"coop": {"epochs": 2}})
    _write_results(results, coop_epochs=2)
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 0 and "coop [epochs=2]" in out, out + err  # only the --set grid was recorded: it is complete
    record_grid(results, CELLS)  # now the default grid is asked for too
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 1, out + err
    assert _row(out, "coop [epochs=2]") == ["3", "0", "0", "0", "3"]
    assert _row(out, "coop") == ["0", "0", "0", "3", "3"]
    code, out, err = run_quiet(["status", "--results", str(results), "--set", "coop.epochs=2"])
    assert code == 0 and "coop [epochs=2]" in out, out + err
    _write_results(results, coop_epochs=None)
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 0 and out.splitlines()[-1] == "complete", out + err


def test_a_claim_of_another_recipe_is_not_this_jobs_run(tmp_path):
    results = tmp_path / "results"
    record_grid(results, CELLS[:1])
    info = {"label": "x", "protocol": PROTOCOL, "method": "coop", "dataset": DATASET, "shots": SHOTS, "seed": 1}
    store = ResultStore(results)
    with store.claim("b" * 64, {**info, "config_hash": "0" * 64}) as held:
        assert held
        code, out, _ = run_quiet(["status", "--results", str(results)])
    assert code == 1 and _row(out, "coop") == ["0", "0", "0", "1", "1"]
    with store.claim("c" * 64, info) as held:  # a claim that records no hash (older runs): trusted
        assert held
        code, out, _ = run_quiet(["status", "--results", str(results)])
    assert _row(out, "coop") == ["0", "1", "0", "0", "1"]


def test_a_result_of_another_plugin_version_is_not_done(tmp_path):
    from benchsuite.methods import discover

    results = tmp_path / "results"
    record_grid(results, CELLS[:1])
    installed = discover()["coop"].version
    ResultStore(results).write(make_result(PROTOCOL, "coop", DATASET, 1, shots=SHOTS, method__version="0.0.0-old"))
    code, out, _ = run_quiet(["status", "--results", str(results)])
    assert code == 1 and _row(out, "coop") == ["0", "0", "0", "1", "1"], out
    assert "builtin 0.0.0-old" in out and f"installed builtin {installed}" in out
    ResultStore(results).write(make_result(PROTOCOL, "coop", DATASET, 1, shots=SHOTS, method__version=installed))
    code, out, _ = run_quiet(["status", "--results", str(results)])
    assert code == 0, out


def test_status_set_is_checked_like_run_set(tmp_path):
    results = tmp_path / "results"
    record_grid(results, CELLS)
    code, out, err = run_quiet(["status", "--results", str(results), "--set", "coop.epoch=2"])
    assert code == 2 and "Traceback" not in err
    assert "'epoch'" in err and "did you mean 'epochs'" in err


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from benchsuite.toy.datasets import materialize

    return materialize(tmp_path_factory.mktemp("toy") / "world", scale=0.2)


def test_status_agrees_with_what_run_computed(tmp_path, toy_root):
    results = tmp_path / "results"
    grid = ["--protocol", PROTOCOL, "--method", "coop", "zeroshot_clip", "--dataset", DATASET, "--shots", str(SHOTS),
            "--seeds", "1", "--data-root", str(toy_root), "--results", str(results), "--quiet",
            "--feature-cache", str(tmp_path / "features")]
    code, out, err = run_quiet(["run", *grid, "--set", "coop.epochs=2"])
    assert code == 0 and len(result_files(results)) == 2, out + err
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 0 and "coop [epochs=2]" in out, out + err
    code, out, err = run_quiet(["run", *grid, "--method", "zeroshot_clip"])  # a default grid, zero-shot only
    assert code == 0 and "0 computed, 1 reused" in out, out + err  # --set coop.epochs leaves zero-shot alone
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 0 and out.splitlines()[-1] == "complete", out + err
    record_grid(results, [(PROTOCOL, "coop", DATASET, SHOTS, 1)])  # the default coop job is asked for too
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 1 and _row(out, "coop") == ["0", "0", "0", "1", "1"], out + err
