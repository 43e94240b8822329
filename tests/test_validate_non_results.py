"""`benchsuite validate` on the JSON files `find RESULTS -name '*.json'` also picks up: a manifest, a grid
record or a job claim is named for what it is and skipped, never reported as a corrupt result; a
damaged result is still a result and still fails."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchsuite.data.datum import Datum
from benchsuite.data.fewshot import FewShotSplit, ManifestStore
from benchsuite.results.status import record_grid
from benchsuite.results.store import ResultStore, dump_json
from results_factory import make_result
from test_run import run_quiet


def _results_tree(root: Path) -> dict[str, Path]:
    """One of each JSON file a run leaves in its results folder, written by benchsuite's own writers."""
    store = ResultStore(root)
    files = {"result": store.write(make_result("toy_few_shot", "zeroshot_clip", "toy_textures", 1, shots=1))}
    split = FewShotSplit("toy_textures", str(root), 1, 1, [Datum(str(root / "a.png"), 0, "a")], [], [], ["a"])
    ManifestStore(root / "_manifests").record(split)
    files["manifest"] = root / "_manifests" / "toy_textures" / "shot_1-seed_1.json"
    files["grid"] = record_grid(root, [("toy_few_shot", "zeroshot_clip", "toy_textures", 1, 1)])[0]
    info = {"label": "x", "protocol": "toy_few_shot", "method": "coop", "dataset": "toy_textures", "shots": 1,
            "seed": 1}
    with store.claim("a" * 64, info):
        files["claim"] = shutil.copy(store.claim_info_path("a" * 64), root / ".locks" / "kept.json")
    files["checkpoint folder"] = root / "_checkpoints" / "notes.json"
    files["checkpoint folder"].parent.mkdir()
    files["checkpoint folder"].write_text(dump_json({"anything": 1}), encoding="utf-8")
    return {k: Path(v) for k, v in files.items()}


def test_non_result_json_files_are_named_and_skipped(tmp_path):
    files = _results_tree(tmp_path / "results")
    code, out, err = run_quiet(["validate", *map(str, files.values())])
    assert code == 0, out + err
    lines = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.splitlines()}
    assert lines[str(files["result"])] == "ok"
    assert lines[str(files["manifest"])].startswith("is a few-shot manifest")
    assert lines[str(files["grid"])].startswith("is a grid record")
    assert lines[str(files["claim"])].startswith("is a job claim")
    assert "_checkpoints/" in lines[str(files["checkpoint folder"])]
    for kind in ("manifest", "grid", "claim", "checkpoint folder"):
        assert lines[str(files[kind])].endswith("not a result file; skipped"), lines[str(files[kind])]
    assert "Additional properties" not in out


def test_a_damaged_result_is_never_taken_for_a_non_result(tmp_path):
    files = _results_tree(tmp_path / "results")
    damaged = files["manifest"].parent / "damaged.json"  # even inside a non-result folder
    damaged.write_text(dump_json({"job": {"method": "coop"}, "dataset": "toy_textures", "shots": 1, "seed": 1,
                                  "train": [], "sha256": "0"}), encoding="utf-8")
    code, out, _ = run_quiet(["validate", str(files["result"]), str(damaged)])
    assert code == 1
    assert f"{damaged}: ok" not in out and "skipped" not in out
    assert any(line.startswith(f"{damaged}: $") for line in out.splitlines()), out
