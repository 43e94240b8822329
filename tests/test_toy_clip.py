"""The shipped small CLIP and the embedded default: it loads through the public loader, reaches the
zero-shot accuracy its card reports, and `benchsuite run --protocol base2new` works with no data."""

from __future__ import annotations

import json
import math

import pytest

from benchsuite.cli import main
from benchsuite.toy.pretrain import CARD_PATH, CHECKPOINT_PATH, MODEL_NAME, zero_shot_table
from benchsuite.toy.datasets import materialize, toy_classnames


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return materialize(tmp_path_factory.mktemp("toy") / "world")


def test_the_checkpoint_is_small_and_fp16():
    import torch

    assert CHECKPOINT_PATH.stat().st_size < 10 * 2**20
    state = torch.load(CHECKPOINT_PATH, map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}


def test_checkpoint_reaches_its_reported_zero_shot_accuracy(toy_root):
    card = json.loads(CARD_PATH.read_text(encoding="utf-8"))
    measured = zero_shot_table(CHECKPOINT_PATH, toy_root)
    assert set(measured) == set(card["zero_shot"])
    for name, reported in card["zero_shot"].items():
        assert measured[name] == pytest.approx(reported, abs=0.5), name


def test_the_small_clip_knows_the_world_imperfectly():
    """Well above chance, clearly below the ceiling: room for prompt learning to help and to hurt."""
    card = json.loads(CARD_PATH.read_text(encoding="utf-8"))
    for name, accuracy in card["zero_shot"].items():
        chance = 100.0 / len(toy_classnames(name))
        assert accuracy > 1.5 * chance, name
    assert min(card["zero_shot"].values()) < 90.0
    assert sum(card["zero_shot"].values()) / len(card["zero_shot"]) < 90.0


def test_embedded_default_runs_end_to_end(tmp_path, toy_root, capsys, monkeypatch):
    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("benchsuite.toy.datasets.default_root", lambda: toy_root)
    results = tmp_path / "results"
    code = main(["run", "--protocol", "base2new", "--dataset", "toy_shapes", "--seeds", "1",
                 "--results", str(results), "--set", "epochs=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "toy_base2new" in out and "Toy base-to-new" in out  # the leaderboard printed at the end
    files = sorted(results.glob("toy_base2new/*/toy_shapes/*.json"))
    assert {f.parent.parent.name for f in files} >= {"coop", "zeroshot_clip"}
    result = json.loads(files[0].read_text(encoding="utf-8"))
    assert result["backbone"]["model"] == MODEL_NAME and result["backbone"]["pretrained"] == CHECKPOINT_PATH.name
    assert result["job"]["protocol"]["id"] == "toy_base2new"
    n_base = math.ceil(len(toy_classnames("toy_shapes")) / 2)
    assert result["data"]["evals"]["base"]["n_classes"] == n_base


def test_toy_pretrain_help_states_the_real_defaults(capsys):
    from benchsuite.toy.pretrain import PretrainSettings

    with pytest.raises(SystemExit):
        main(["toy-pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = PretrainSettings()
    for value in (f"({d.seed})", f"default {d.pairs}", f"default {d.steps}", f"default {d.batch_size}"):
        assert value in text, value
