"""The published numbers under leaderboard/reference/: schema, protocol consistency, one-line errors."""

import copy
import json
import statistics
from pathlib import Path

import pytest

from benchsuite.report.reference import ReferenceError, load_references, problems

FOLDER = Path(__file__).resolve().parents[1] / "leaderboard" / "reference"
TEN = {"zeroshot_clip", "coop", "cocoop", "prograd", "kgcoop", "proda", "maple", "ivlp", "promptsrc", "gopro"}


def test_shipped_references_cover_the_ten_methods_and_validate():
    rows = load_references(FOLDER)
    assert TEN <= {r.method for r in rows}  # the adapter family adds its own
    for path in FOLDER.glob("*.json"):
        assert problems(json.loads(path.read_text())) == [], path.name
    # the spec's UNCONFIRMED numbers are carried with their flag
    prograd = next(r for r in rows if r.method == "prograd" and r.protocol == "base2new")
    assert "imagenet" in prograd.unconfirmed and "average" not in prograd.unconfirmed
    kg_dg = next(r for r in rows if r.method == "kgcoop" and r.protocol == "domain_generalization")
    assert "average" in kg_dg.unconfirmed


def test_published_averages_follow_from_the_per_dataset_rows():
    for r in load_references(FOLDER):
        cells = {k: v for k, v in r.values.items() if k != "average"}
        if r.protocol == "base2new" and len(cells) == 11:
            for key in ("base", "new"):
                assert statistics.fmean(v[key] for v in cells.values()) == pytest.approx(r.values["average"][key], abs=0.02), (r.label, key)
        if r.protocol != "base2new":
            targets = [v["accuracy"] for k, v in cells.items() if k != "imagenet"]
            assert statistics.fmean(targets) == pytest.approx(r.values["average"]["accuracy"], abs=0.02), r.label


def test_a_bad_reference_file_is_one_line_naming_file_and_field(tmp_path):
    doc = json.loads((FOLDER / "coop.json").read_text())
    bad = copy.deepcopy(doc)
    bad["entries"][0]["values"]["dtd"]["hm"] = 99.0
    (tmp_path / "coop.json").write_text(json.dumps(bad))
    with pytest.raises(ReferenceError, match=r"coop\.json: \$\.entries\[0\]\.values\.dtd\.hm: 99\.0 is not HM"):
        load_references(tmp_path)
    bad = copy.deepcopy(doc)
    bad["entries"][0]["values"]["mnist"] = {"base": 1.0, "new": 1.0, "hm": 1.0}
    assert any("values.mnist: not a dataset of base2new" in p for p in problems(bad))
    del bad["entries"][0]["source"]
    assert any("'source' is a required property" in p for p in problems(bad))
    assert load_references(tmp_path / "missing") == []
