"""Bad input gets one clear line, checked before any cost; what a new user meets (issue 11)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from benchsuite import cli, protocols
from benchsuite.cli import main
from benchsuite.data.fewshot import ManifestStore, sample_fewshot
from benchsuite.data.registry import load_dataset
from benchsuite.engine.runner import Runner
from benchsuite.engine.train import TrainStats
from benchsuite.errors import BenchsuiteError, DatasetError
from benchsuite.results.store import atomic_write_text
from fixture_data import make_data_root
from test_run import result_files, run_quiet

RUN_OPTIONS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "running.md"  # the `run` options table


class BackboneLoaded(AssertionError):
    """Raised by the patched loader: a check ran after the backbone would have been loaded."""


@pytest.fixture
def no_backbone(monkeypatch):
    """Any call to the backbone loader fails the test: every check must come before it."""
    def refuse(*args, **kwargs):
        raise BackboneLoaded("the backbone was loaded before the bad input was reported")
    monkeypatch.setattr(cli, "_load_backbone", refuse)


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("pets"), ["oxford_pets"])


def _argv(pets_root: Path, tmp_path: Path, *extra: str, results: Path | None = None) -> list[str]:
    return ["run", "--protocol", "base2new", "--method", "coop", "zeroshot_clip", "--dataset", "oxford_pets",
            "--seeds", "1", "--backbone", "bs-tiny-test", "--pretrained", "none", "--data-root", str(pets_root),
            "--results", str(results or tmp_path / "results"), "--feature-cache", str(tmp_path / "features"),
            *extra]


def _one_error(code: int, out: str, err: str) -> str:
    assert code == 2, out + err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("benchsuite: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- --set --------------------------------------------------------------------------------------------

SET_CASES = {
    "coop.n_cxt=16": ["'n_cxt'", "did you mean 'n_ctx'", "n_ctx"],
    "coop.nonexistent=3": ["'nonexistent'", "class_token_position"],
    "nonexistent=3": ["'nonexistent'", "METHOD.KEY=VALUE"],
    "epochs=abc": ["epochs=abc", "integer"],
    "epochs=2.5": ["epochs=2.5", "integer"],
    "lr=nan": ["lr=nan", "finite number"],
    "lr=NaN": ["lr=NaN", "finite number"],
    "lr=-1": ["lr=-1", "> 0"],
    "batch_size=0": ["batch_size=0", ">= 1"],
    "coop.csc=3": ["coop.csc=3", "true or false"],
    "kgcoop.w=8": ["'kgcoop'", "not part of this run"],
    "coopp.n_ctx=4": ["did you mean 'coop'"],
    "coop.=4": ["non-empty key"],
}


@pytest.mark.parametrize("pair", list(SET_CASES))
def test_bad_set_is_one_line_before_the_backbone(pair, pets_root, tmp_path, no_backbone):
    line = _one_error(*run_quiet(_argv(pets_root, tmp_path, "--set", pair)))
    for part in SET_CASES[pair]:
        assert part in line, line


def test_set_values_are_typed_like_the_default():
    from benchsuite.engine.recipe import validate_overrides

    recipes = {"coop": [{"epochs": 20, "lr": 0.002, "csc": False, "ctx_init": "a photo of a", "n_ctx": 4}],
               "zeroshot_clip": [{"epochs": 0, "lr": 0.002}]}
    typed = validate_overrides({None: {"lr": 1}, "coop": {"csc": True, "ctx_init": 5, "n_ctx": 8}}, recipes)
    assert typed == {None: {"lr": 1.0}, "coop": {"csc": True, "ctx_init": "5", "n_ctx": 8}}
    assert isinstance(typed[None]["lr"], float)
    with pytest.raises(BenchsuiteError, match="n_ctx"):
        validate_overrides({"coop": {"n_ctx": True}}, recipes)  # a bool is not an integer


# ---- names, device, folders: all before the backbone --------------------------------------------------

def _replace(argv: list[str], option: str, *values: str) -> list[str]:
    if option not in argv:
        return [*argv, option, *values]
    i = argv.index(option)
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    return [*argv[:i], option, *values, *argv[j:]]


def test_unknown_protocol_is_reported_as_typed(pets_root, tmp_path, no_backbone):
    argv = [a for a in _argv(pets_root, tmp_path) if a not in ("--backbone", "bs-tiny-test", "--data-root",
                                                             str(pets_root))]
    line = _one_error(*run_quiet(_replace(argv, "--protocol", "nope")))
    assert "'nope'" in line and "toy_nope" not in line, line
    line = _one_error(*run_quiet(_replace(argv, "--protocol", "base2nw")))
    assert "did you mean 'base2new'" in line, line


@pytest.mark.parametrize("option,value,expected", [
    ("--method", "cooop", "did you mean 'coop'"),
    ("--dataset", "oxford_pet", "did you mean 'oxford_pets'"),
    ("--device", "tpu", "--device tpu"),
])
def test_unknown_names_suggest_the_closest(option, value, expected, pets_root, tmp_path, no_backbone):
    line = _one_error(*run_quiet(_replace(_argv(pets_root, tmp_path), option, value)))
    assert expected in line, line


def test_data_root_problems_come_before_the_backbone(tmp_path, pets_root, no_backbone):
    line = _one_error(*run_quiet(_replace(_argv(pets_root, tmp_path), "--data-root", str(tmp_path / "nowhere"))))
    assert str(tmp_path / "nowhere") in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error(*run_quiet(_replace(_argv(pets_root, tmp_path), "--data-root", str(empty))))
    assert str(empty / "oxford_pets") in line


def test_results_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, pets_root, no_backbone):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _one_error(*run_quiet(_argv(pets_root, tmp_path, results=blocker / "results")))
    assert str(blocker / "results") in line and "--results" in line, line


# ---- corrupt, truncated, missing images --------------------------------------------------------------

def _damaged_copy(pets_root: Path, tmp_path: Path) -> tuple[Path, list, Path, Path]:
    root = make_data_root(tmp_path / "data", ["oxford_pets"])
    split = json.loads((root / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    truncated = root / "oxford_pets" / "images" / split["test"][3][0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    missing = root / "oxford_pets" / "images" / split["test"][5][0]
    missing.unlink()
    return root, split, truncated, missing


def test_damaged_images_are_named_with_their_split_entry_before_training(tmp_path, pets_root, no_backbone):
    root, split, truncated, missing = _damaged_copy(pets_root, tmp_path)
    code, out, err = run_quiet(_replace(_argv(pets_root, tmp_path), "--data-root", str(root)))
    line = _one_error(code, out, err)
    assert str(truncated) in line and "test[3]" in line and split["test"][3][0] in line, line
    assert "1 more" in line  # the missing one is counted too, and listed
    assert any(str(missing) in l and "test[5]" in l and "missing" in l for l in err.splitlines()), err


def test_a_damaged_image_read_during_training_is_named(tmp_path, pets_root):
    from benchsuite.data.loaders import decode

    root, split, truncated, missing = _damaged_copy(pets_root, tmp_path)
    for path in (truncated, missing):
        with pytest.raises(DatasetError, match=re.escape(str(path))):
            decode(str(path))


def test_image_check_accepts_valid_files_with_trailing_bytes(tmp_path, pets_root):
    from benchsuite.data.images import check_images, image_problem

    split = json.loads((pets_root / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    good = pets_root / "oxford_pets" / "images" / split["test"][0][0]
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(good.read_bytes() + b"trailing bytes a camera wrote")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    assert image_problem(str(good)) is None and image_problem(str(padded)) is None
    assert image_problem(str(empty)) and image_problem(str(text)) and image_problem(str(tmp_path / "none.jpg"))
    problems = check_images([("d", "test[0]", str(text)), ("d", "test[1]", str(text))])
    assert len(problems) == 1 and "test[0]" in problems[0]


# ---- split entries outside the dataset folder --------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../outside.jpg", "sub/../../outside.jpg"])
def test_split_entries_leaving_the_dataset_folder_are_refused(bad, tmp_path):
    root = make_data_root(tmp_path / "data", ["oxford_pets"])
    (tmp_path / "data" / "outside.jpg").write_bytes(b"x")
    path = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    split["train"][2][0] = bad
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"train\[2\]") as info:
        load_dataset("oxford_pets", root)
    assert bad in str(info.value) and "outside" in str(info.value)


# ---- truncated manifest and shared training ----------------------------------------------------------

def test_a_truncated_manifest_is_named_and_written_again(tmp_path, pets_root):
    split = sample_fewshot(load_dataset("oxford_pets", pets_root), 2, 1)
    store = ManifestStore(tmp_path / "_manifests")
    digest = store.record(split)
    path = store.path("oxford_pets", 2, 1)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))):
        assert store.record(split) == digest
    assert json.loads(path.read_text())["sha256"] == digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.record(split) == digest  # repaired: no warning the next time


def test_a_truncated_shared_training_is_named_removed_and_retrained(tmp_path, tiny_backbone, pets_root):
    said: list[str] = []
    runner = Runner(tiny_backbone, pets_root, tmp_path / "results", manifests_root=tmp_path / "m", echo=said.append)
    module = torch.nn.Linear(2, 2)
    runner._save_shared("k" * 64, module, "j" * 64, TrainStats(seconds=1.0, images=10))
    path = runner._shared_path("k" * 64)
    assert runner._load_shared("k" * 64, module)[:3] == (1.0, 10, "j" * 64)
    path.write_bytes(path.read_bytes()[:100])
    assert runner._load_shared("k" * 64, module) is None
    assert not path.exists() and str(path) in said[0]


# ---- orphan temporary files --------------------------------------------------------------------------

@pytest.fixture
def tempfiles():
    from benchsuite import tempfiles

    return tempfiles


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphans_of_gone_writers_are_removed_and_nothing_else(tempfiles, tmp_path, monkeypatch):
    dead, host = _dead_pid(), tempfiles.host_tag()
    root = tmp_path / "results"
    (root / "_manifests" / "d").mkdir(parents=True)
    orphan = root / "p" / f".abc.json.{host}.{dead}.x1y2.tmp"
    live = root / "p" / f".abc.json.{host}.{os.getpid()}.x1y2.tmp"
    other_host = root / "p" / f".abc.json.otherhost.{dead}.x1y2.tmp"
    legacy_old = root / "_manifests" / "d" / f"shot_1-seed_1.tmp{dead}"
    legacy_new = root / "_manifests" / "d" / f"shot_2-seed_1.tmp{dead}"
    result = root / "p" / "abc.json"
    for path in (orphan, live, other_host, legacy_old, legacy_new, result):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    old = time.time() - 2 * 3600
    os.utime(legacy_old, (old, old))
    removed = tempfiles.sweep_orphans(root)
    assert sorted(removed) == sorted([orphan, legacy_old])
    assert live.exists() and other_host.exists() and legacy_new.exists() and result.exists()


def test_every_atomic_writer_names_its_temporary_file_after_itself(tempfiles, tmp_path, monkeypatch, tiny_backbone, pets_root):
    """Kill each writer between write and rename (simulated): a later sweep removes what it left."""
    dead = _dead_pid()
    monkeypatch.setattr(tempfiles.os, "getpid", lambda: dead)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    root = tmp_path / "results"
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ManifestStore(root / "_manifests").record(sample_fewshot(load_dataset("oxford_pets", pets_root), 1, 1))
    runner = Runner(tiny_backbone, pets_root, root, manifests_root=root / "_manifests")
    with pytest.raises(KeyboardInterrupt):
        runner._save_shared("k" * 64, torch.nn.Linear(2, 2), "j" * 64, TrainStats(seconds=1.0, images=1))
    monkeypatch.undo()
    leftovers = [p for p in root.rglob("*") if p.is_file()]
    # the shared training's writer removes its own temporary file when interrupted in Python; the
    # manifest's is left as a SIGKILL would leave it, and the sweep recognises it by its name
    assert len(leftovers) == 1 and "_manifests" in leftovers[0].parts
    assert not list((root / "_trained").glob("*.tmp"))
    assert sorted(tempfiles.sweep_orphans(root)) == sorted(leftovers)


def test_result_store_temporary_names_carry_the_writer(tempfiles, tmp_path, monkeypatch):
    dead = _dead_pid()
    monkeypatch.setattr(tempfiles.os, "getpid", lambda: dead)
    seen: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_text(tmp_path / "r.json", "{}")
    assert tempfiles.is_orphan(tmp_path / seen[0])


def test_a_run_removes_orphans_in_its_results_folder(tempfiles, tmp_path, pets_root, no_backbone):
    results = tmp_path / "results"
    orphan = results / "_trained" / f".k.pt.{tempfiles.host_tag()}.{_dead_pid()}.w.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")
    with pytest.raises(BackboneLoaded):
        run_quiet(_argv(pets_root, tmp_path, results=results))
    assert not orphan.exists()


# ---- list protocols --hashes while a pin is stale ---------------------------------------------------

def test_list_protocols_hashes_works_with_a_stale_pin(tmp_path, monkeypatch, capsys):
    from test_protocols import copy_protocols

    folder = copy_protocols(tmp_path)
    monkeypatch.setattr(protocols, "_files", lambda: folder)
    spec = json.loads((folder / "few_shot.json").read_text())
    spec["description"] += " (edited)"
    (folder / "few_shot.json").write_text(json.dumps(spec))
    with pytest.raises(BenchsuiteError):  # the run refuses it and points at the listing
        protocols.load_protocol("few_shot")
    assert main(["list", "protocols", "--hashes"]) == 0
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith("few_shot "))
    assert protocols.content_hash(spec) in row and "STALE" in row
    assert "STALE" not in next(line for line in captured.out.splitlines() if line.startswith("base2new "))


# ---- the quick start does something visible ---------------------------------------------------------

def test_run_defaults_to_the_users_own_results_folder_and_says_what_it_reused(tmp_path, monkeypatch, tiny_checkpoint,
                                                                              pets_root):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--protocol", "base2new", "--method", "zeroshot_clip", "--dataset", "oxford_pets", "--seeds", "1",
            "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint), "--data-root", str(pets_root),
            "--feature-cache", str(tmp_path / "features"), "--quiet"]
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    own = tmp_path / "benchsuite-results"
    assert str(own) in out.splitlines()[0]
    assert len(result_files(own)) == 1
    assert "1 computed, 0 reused" in out
    code, out, err = run_quiet(argv)
    assert code == 0 and "0 computed, 1 reused" in out and "nothing was computed" in out, out + err


def test_leaderboard_refuses_a_results_folder_that_does_not_exist(tmp_path):
    out = tmp_path / "board.md"
    line = _one_error(*run_quiet(["leaderboard", "--results", str(tmp_path / "nope"), "--out", str(out)]))
    assert str(tmp_path / "nope") in line
    assert not out.exists()


def test_bench_follows_the_toy_protocols_backbone(monkeypatch):
    asked: list[tuple[str, str]] = []

    def record(args, model, pretrained):
        asked.append((model, pretrained))
        raise BackboneLoaded

    monkeypatch.setattr(cli, "_load_backbone", record)
    with pytest.raises(BackboneLoaded):
        main(["bench", "--method", "coop", "--protocol", "toy_base2new"])
    spec = protocols.load_protocol("toy_base2new").spec["backbone"]
    assert asked == [(spec["model"], spec["pretrained"])]
    with pytest.raises(BackboneLoaded):
        main(["bench", "--method", "coop", "--protocol", "base2new"])
    assert asked[-1] == ("ViT-B-16", "none")


# ---- help text --------------------------------------------------------------------------------------

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_text():
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in _subparsers().items()
               for a in sub._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []


def test_worker_default_in_help_and_readme_is_the_codes():
    from benchsuite.data.loaders import default_workers

    assert default_workers(torch.device("cpu")) == 0
    monkey_cpus = os.cpu_count() or 1
    assert default_workers(torch.device("cuda")) == min(8, monkey_cpus)
    run = _subparsers()["run"]
    help_text = next(a.help for a in run._actions if "--loader-workers" in a.option_strings)
    assert "0 on CPU" in help_text and "min(8, CPU count) on CUDA" in help_text
    readme_row = next(line for line in RUN_OPTIONS_PAGE.read_text().splitlines()
                      if line.startswith("| `--loader-workers"))
    assert "0 on CPU" in readme_row and "min(8, CPU count) on CUDA" in readme_row
