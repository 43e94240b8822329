"""ECE and per-class accuracy against hand computations on small logit sets."""

import pytest
import torch

from benchsuite.report.calibration import CalibrationAccumulator, expected_calibration_error


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_ece_one_sample_per_bin_matches_hand_computation():
    # confidences .7 (right), .5 (wrong), .8 (right), .6 (wrong): bins 10, 7, 11, 8 of 15
    logits = _logits([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2, 2])
    expected = 100 * (abs(1 - 0.7) + abs(0 - 0.5) + abs(1 - 0.8) + abs(0 - 0.6)) / 4  # 40.0
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-4)


def test_ece_pools_a_bin_before_taking_the_gap():
    # .70 right and .68 wrong share bin (10/15, 11/15]: |1 - 1.38| / 2, not (.30 + .68) / 2
    logits = _logits([[0.70, 0.20, 0.10], [0.68, 0.22, 0.10]])
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(logits, labels) == pytest.approx(100 * abs(1 - 1.38) / 2, abs=1e-4)


def test_batches_accumulate_to_the_whole_set_and_per_class_accuracy():
    logits = _logits([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2, 2])
    acc = CalibrationAccumulator(4, torch.device("cpu"))
    acc.update(logits[:3], labels[:3])
    acc.update(logits[3:], labels[3:])
    out = acc.summary()
    assert out["ece"] == pytest.approx(40.0, abs=1e-4)
    # class 0: 1/1 right, class 1: 0/1, class 2: 1/2, class 3: no test image
    assert out["per_class_accuracy"] == [100.0, 0.0, 50.0, None]



def test_schema_v2_requires_calibration_and_declarations_while_v1_stays_valid():
    from benchsuite.results.schema import validate_schema
    from results_factory import make_result

    old = make_result("base2new", "coop", "dtd", 1)
    assert validate_schema(old) == []
    new = make_result("base2new", "coop", "dtd", 1, schema_version=2)
    problems = "\n".join(validate_schema(new))
    assert "'ece' is a required property" in problems
    assert "'transductive' is a required property" in problems
    for m in new["metrics"].values():
        m.update(ece=3.5, per_class_accuracy=[100.0, None, 0.0])
    new["method"].update(extra_knowledge=["LLM class descriptions"], transductive=False)
    assert validate_schema(new) == []


def test_evaluate_records_ece_and_per_class_accuracy_over_its_batches():
    import contextlib
    from types import SimpleNamespace

    from benchsuite.engine.evaluate import evaluate
    from benchsuite.hookspecs import EvalBatch

    logits = _logits([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2, 2])
    batches = [EvalBatch(labels=labels[:2], image_features=torch.zeros(2, 4)),
               EvalBatch(labels=labels[2:], image_features=torch.zeros(2, 4))]
    served = iter([logits[:2], logits[2:]])
    hook = SimpleNamespace(prepare_eval=lambda **kw: None, predict=lambda batch: next(served))
    backbone = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    res = evaluate(SimpleNamespace(hook=hook), "m", torch.nn.Linear(1, 1), batches, ["a", "b", "c"], "d", "{}", backbone)
    assert (res.correct, res.total) == (2, 4)
    assert res.calibration["ece"] == pytest.approx(40.0, abs=1e-4)
    assert res.calibration["per_class_accuracy"] == [100.0, 0.0, 50.0]
