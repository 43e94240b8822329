"""What the leaderboard adds from benchsuite.report: reported rows, deltas and their flag, seed
statistics, calibration, cost, declarations, plot data under --check, and `benchsuite compare`."""

from __future__ import annotations

import re

import json
from pathlib import Path

import pytest

try:
    from results_factory import make_result
except ImportError:  # tests/ imported as a package
    from tests.results_factory import make_result

from benchsuite.cli import main
from benchsuite.leaderboard import build_leaderboard, write_leaderboard
from benchsuite.report.markdown import Options
from benchsuite.report.reference import load_references
from benchsuite.results.store import ResultStore

REFERENCE = Path(__file__).resolve().parents[1] / "leaderboard" / "reference"


def _v2(result, ece=5.0, extra=(), transductive=False):
    result["schema_version"] = 2
    result["method"].update(extra_knowledge=list(extra), transductive=transductive)
    for m in result["metrics"].values():
        m.update(ece=ece, per_class_accuracy=[m["accuracy"]])
    return result


def _coop_dtd():
    # CoOp's published DTD cell is 79.44 / 41.18 / 54.24
    seeds = {1: (79.0, 50.0), 2: (79.5, 51.0), 3: (80.0, 52.0)}
    return [_v2(make_result("base2new", "coop", "dtd", s, metrics={"base": b, "new": n}), ece=2.0 + s)
            for s, (b, n) in seeds.items()]


def _md(results, **kw):
    return build_leaderboard([(Path(f"r{i}.json"), r) for i, r in enumerate(results)], **kw)


def test_real_leaderboard_without_measured_rows_shows_the_reported_rows_apart():
    md = _md([], references=load_references(REFERENCE))
    assert "_No measured results yet" in md
    assert "### Reported: ViT-B-16 · openai, 16 shots (published numbers, not measured by benchsuite)" in md
    assert re.search(r"\| CoOp \(CoCoOp's run\) \(reported\) +\| 76\.47 / 67\.88 / 71\.92", md)
    assert "77.02 / 66.66 / 71.46‡" in md  # ProGrad's per-dataset numbers are UNCONFIRMED in the spec
    assert re.search(r"\| 82\.48 / 70\.75 / 76\.16 +\|", md)  # ... its average is confirmed (KgCoOp README)


def test_delta_to_the_published_number_is_flagged_outside_the_seed_interval():
    md = _md(_coop_dtd(), references=load_references(REFERENCE))
    line = next(l for l in md.splitlines() if l.startswith("| coop − CoOp (CoCoOp&#39;s run)"))
    # base: mean 79.50, seeds span [79.0, 80.0] which holds 79.44 -> +0.06, no flag
    # new: mean 51.00, span [50, 52], 41.18 outside -> +9.82 flagged
    # HM of the means 2*79.5*51/130.5 = 62.138 vs 54.24 -> +7.90, outside the per-seed span -> flagged
    assert "+0.06 / +9.82⚑ / +7.90⚑" in line
    assert line.rstrip(" |").endswith("–")  # the Average needs all 11 datasets


def test_user_strings_are_escaped_in_the_report_tables():
    results = [_v2(make_result("base2new", "coop", "dtd", 1, metrics={"base": 70.0, "new": 60.0},
                               backbone__device_name="<img src=x>|cpu"))]
    md = _md(results, options=Options(cost=True))
    cost = md.split("#### Cost")[1]
    assert "<img" not in cost and "&lt;img src=x&gt;\\|cpu" in cost


def test_std_calibration_cost_and_declarations():
    results = _coop_dtd()
    results.append(_v2(make_result("base2new", "llmprompt", "dtd", 1, metrics={"base": 70.0, "new": 70.0},
                                   timing__train_shared_from="f" * 64), extra=["LLM class descriptions"]))
    md = _md(results, options=Options(std=True, calibration=True, cost=True))
    assert "| llmprompt \\[extra knowledge: LLM class descriptions\\] |" in md  # escaped like every label
    stats = next(l for l in md.splitlines() if l.startswith("| coop ") and "±" in l)
    assert "79.50 ± 0.50 / 51.00 ± 1.00 /" in stats  # sample std of (79, 79.5, 80) and (50, 51, 52)
    calib = [l for l in md.split("#### Calibration")[1].splitlines() if l.startswith("| coop ")][0]
    assert "4.00 / 4.00" in calib  # mean ECE of seeds 3, 4, 5
    cost = [l for l in md.split("#### Cost")[1].splitlines() if l.startswith("| ")]
    coop, llm = (next(l for l in cost if l.startswith(f"| {m}")) for m in ("coop", "llmprompt"))
    assert "| 2,048 " in coop and "| 3.0 " in coop  # three own trainings of 1 s
    assert "| 0.0 " in llm and "| 6.25 " in llm  # a shared training counts once, where it ran; its speed shows


def test_plot_data_is_what_check_compares(tmp_path):
    store = ResultStore(tmp_path / "results")
    for r in _coop_dtd():
        store.write(r)
    out = tmp_path / "board" / "README.md"
    write_leaderboard(tmp_path / "results", out, reference_dir=REFERENCE, plots=True)
    folder = out.parent / "plots" / "README"
    assert (folder / "base2new-base-new.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Base-to-new generalization: base vs new accuracy](plots/README/base2new-base-new.png)" in out.read_text()
    assert write_leaderboard(tmp_path / "results", out, check=True, reference_dir=REFERENCE, plots=True) == []
    data = json.loads((folder / "base2new-base-new.json").read_text())
    dtd = next(p for p in data["panels"] if p["title"] == "DescribableTextures")
    measured = next(s for s in dtd["series"] if not s["reported"])
    assert measured["points"] == [[79.5, 51.0]]
    measured["points"] = [[79.5, 55.0]]
    (folder / "base2new-base-new.json").write_text(json.dumps(data))
    problems = write_leaderboard(tmp_path / "results", out, check=True, reference_dir=REFERENCE, plots=True)
    assert problems and "base2new-base-new.json" in problems[0] and "55.0" in problems[0]
    assert write_leaderboard(tmp_path / "results", out, check=True, tolerance=5.0, reference_dir=REFERENCE,
                             plots=True) == []


def test_cost_plot_timings_are_skipped_by_a_tolerant_check_only(tmp_path):
    from benchsuite.report.plots import data_differences

    committed = {"machine_dependent": ["x"], "panels": [{"series": [{"points": [[12.0, 70.0]], "band": []}]}]}
    regenerated = {"machine_dependent": ["x"], "panels": [{"series": [{"points": [[30.0, 71.0]], "band": []}]}]}
    assert data_differences(committed, regenerated, 2.5, "cost") == []
    assert len(data_differences(committed, regenerated, 0.0, "cost")) == 2


def _xd(method, per_seed):
    return [make_result("toy_cross_dataset", method, "toy_objects", s,
                        metrics={"toy_objects": 80.0, **dict(zip(["toy_shapes", "toy_colors", "toy_textures", "toy_counts"], v))})
            for s, v in per_seed.items()]


def test_compare_pairs_seeds_counts_wins_and_bootstraps_the_headline(tmp_path, capsys):
    store = ResultStore(tmp_path)
    for r in _xd("a", {1: [70, 60, 50, 40], 2: [72, 61, 50, 41], 3: [74, 62, 50, 42]}) + \
             _xd("b", {1: [68, 61, 50, 39], 2: [69, 62, 50, 40], 3: [70, 63, 50, 41]}):
        store.write(r)
    assert main(["compare", "a", "b", "--protocol", "toy_cross_dataset", "--results", str(tmp_path), "--json"]) == 0
    (c,) = json.loads(capsys.readouterr().out)
    by = {d["dataset"]: d for d in c["datasets"]}
    assert by["toy_shapes"]["paired"] == {"1": 2.0, "2": 3.0, "3": 4.0}
    assert by["toy_colors"]["difference"] == pytest.approx(-1.0)
    assert (c["a_wins"], c["b_wins"], c["ties"], c["datasets_compared"]) == (2, 1, 1, 4)  # source not counted
    # averages per seed: a 55, 56, 57; b 54.5, 55.25, 56 -> differences .5, .75, 1; the joint
    # bootstrap's 2.5% / 97.5% points are the all-seed-1 and all-seed-3 resamples
    assert c["headline"]["difference"] == pytest.approx(0.75)
    assert c["headline"]["interval95"] == pytest.approx([0.5, 1.0])
    assert main(["compare", "a", "b", "--protocol", "toy_cross_dataset", "--results", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "a beats b on 2 of 4 datasets (1 the other way, 1 ties)" in text
    assert "difference +0.75 (95% joint seed-bootstrap interval [+0.50, +1.00]" in text


def test_compare_names_a_missing_method_in_one_line(tmp_path, capsys):
    ResultStore(tmp_path).write(_xd("a", {1: [1, 2, 3, 4]})[0])
    assert main(["compare", "a", "zzz", "--protocol", "toy_cross_dataset", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results of 'zzz'" in err[0] and "rows there: a" in err[0]
