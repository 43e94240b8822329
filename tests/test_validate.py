"""A result is checked against the schema and then against its frozen protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    from results_factory import DELETE, make_result, metric
except ImportError:  # tests/ imported as a package
    from tests.results_factory import DELETE, make_result, metric

from benchsuite.protocols import load_protocol
from benchsuite.results.validate import validate_files, validate_result


@pytest.mark.parametrize(
    ("pid", "dataset", "shots"),
    [("base2new", "dtd", 16), ("cross_dataset", "imagenet", 16),
     ("domain_generalization", "imagenet", 16), ("few_shot", "eurosat", 1), ("few_shot", "imagenet", 8)],
)
def test_consistent_results_pass(pid: str, dataset: str, shots: int) -> None:
    assert validate_result(make_result(pid, "coop", dataset, 3, shots=shots)) == []


def test_unknown_protocol() -> None:
    result = make_result("base2new", "coop", "dtd", 1, job__protocol__id="base3new")
    (problem,) = validate_result(result)
    assert problem.startswith("$.job.protocol.id:") and "unknown protocol 'base3new'" in problem


def test_protocol_hash_and_version_must_match_the_shipped_protocol() -> None:
    shipped = load_protocol("base2new")
    problems = validate_result(make_result("base2new", "coop", "dtd", 1, job__protocol__hash="0" * 64))
    assert len(problems) == 1
    assert problems[0].startswith("$.job.protocol.hash:")
    assert shipped.hash[:12] in problems[0] and "incomparable" in problems[0]
    problems = validate_result(make_result("base2new", "coop", "dtd", 1, job__protocol__version=2))
    assert len(problems) == 1 and problems[0].startswith("$.job.protocol.version:")
    assert "v2" in problems[0] and "v1" in problems[0] and "incomparable" in problems[0]


@pytest.mark.parametrize(
    ("pid", "dataset", "seed", "shots", "where"),
    [
        ("base2new", "imagenet_a", 1, 16, "$.job.dataset:"),  # a DG target is not a base2new dataset
        ("cross_dataset", "caltech101", 1, 16, "$.job.dataset:"),  # transfer trains on the source only
        ("base2new", "dtd", 4, 16, "$.job.seed:"),
        ("base2new", "dtd", 1, 8, "$.job.shots:"),
        ("few_shot", "dtd", 1, 3, "$.job.shots:"),
    ],
)
def test_job_fields_must_belong_to_the_protocol(pid: str, dataset: str, seed: int, shots: int, where: str) -> None:
    problems = validate_result(make_result(pid, "coop", dataset, seed, shots=shots))
    assert len(problems) == 1 and problems[0].startswith(where), problems


def test_metric_keys_must_be_exactly_the_protocols() -> None:
    result = make_result("base2new", "coop", "dtd", 1, metrics={"base": 80.0, "novel": 60.0})
    problems = validate_result(result)
    assert len(problems) == 1
    assert problems[0].startswith("$.metrics:")
    assert "missing 'new'" in problems[0] and "unexpected 'novel'" in problems[0]
    transfer = make_result("cross_dataset", "coop", "imagenet", 1)
    del transfer["metrics"]["eurosat"], transfer["data"]["evals"]["eurosat"]
    assert validate_result(transfer) == [
        "$.metrics: keys must be exactly "
        + ", ".join(repr(n) for n in sorted(load_protocol("cross_dataset").eval_names))
        + " for cross_dataset: missing 'eurosat'"
    ]


def test_evals_keys_must_equal_metrics_keys() -> None:
    result = make_result("few_shot", "coop", "dtd", 1, shots=2)
    result["data"]["evals"]["extra"] = dict(result["data"]["evals"]["test"])
    (problem,) = validate_result(result)
    assert problem.startswith("$.data.evals:") and "'extra'" in problem


def test_correct_cannot_exceed_total() -> None:
    result = make_result("few_shot", "coop", "dtd", 1, shots=2,
                         metrics={"test": {"accuracy": 100.0, "correct": 11, "total": 10}},
                         data__evals__test__n_images=10)
    problems = validate_result(result)
    assert "$.metrics.test: correct 11 > total 10" in problems


def test_accuracy_must_follow_from_the_counts() -> None:
    ok = make_result("few_shot", "coop", "dtd", 1, shots=2, metrics={"test": metric(66.67, total=3)})
    assert ok["metrics"]["test"]["correct"] == 2 and validate_result(ok) == []
    near = make_result("few_shot", "coop", "dtd", 1, shots=2,
                       metrics={"test": {"accuracy": 200 / 3 + 5e-7, "correct": 2, "total": 3}},
                       data__evals__test__n_images=3)
    assert validate_result(near) == []
    off = make_result("few_shot", "coop", "dtd", 1, shots=2,
                      metrics={"test": {"accuracy": 66.67, "correct": 2, "total": 3}},
                      data__evals__test__n_images=3)
    (problem,) = validate_result(off)
    assert problem.startswith("$.metrics.test.accuracy: 66.67 != 100*correct/total")


def test_eval_must_cover_its_test_set() -> None:
    result = make_result("few_shot", "coop", "dtd", 1, shots=2, data__evals__test__n_images=12345)
    (problem,) = validate_result(result)
    assert problem.startswith("$.metrics.test.total:") and "12345" in problem


def test_method_and_train_dataset_must_match_the_job() -> None:
    problems = validate_result(make_result("base2new", "coop", "dtd", 1, method__name="cocoop",
                                           data__train__dataset="eurosat"))
    assert [p.split(":")[0] for p in problems] == ["$.method.name", "$.data.train.dataset"]


def test_schema_problems_come_first_and_protocol_checks_do_not_crash() -> None:
    result = make_result("base2new", "coop", "dtd", 7, job__protocol__hash="nothex", data__evals=DELETE)
    del result["metrics"]
    problems = validate_result(result)
    assert problems[:3] == [
        "$: 'metrics' is a required property",
        "$.data: 'evals' is a required property",
        "$.job.protocol.hash: 'nothex' does not match '^[0-9a-f]{64}$'",
    ]
    assert any(p.startswith("$.job.seed: 7 is not a seed") for p in problems[3:])
    assert validate_result({"job": 3})[0].startswith("$: ")


def test_validate_files(tmp_path: Path) -> None:
    good, bad_json, not_object, wrong = (tmp_path / n for n in ("good.json", "bad.json", "list.json", "wrong.json"))
    good.write_text(json.dumps(make_result("base2new", "coop", "dtd", 1)), encoding="utf-8")
    bad_json.write_text('{\n  "job": {,\n}', encoding="utf-8")
    not_object.write_text("[]", encoding="utf-8")
    wrong.write_text(json.dumps(make_result("base2new", "coop", "dtd", 9)), encoding="utf-8")
    report = validate_files([good, bad_json, not_object, wrong])
    assert report[good] == []
    (message,) = report[bad_json]
    assert "not valid JSON" in message and "line 2 column 11" in message
    assert report[not_object] == ["file holds a JSON list, not an object"]
    assert len(report[wrong]) == 1 and report[wrong][0].startswith("$.job.seed:")
