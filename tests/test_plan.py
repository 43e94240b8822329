"""`benchsuite plan` counts a grid's jobs and prices them from bench figures, before anything runs.

Figures come from fake `benchsuite bench --json` reports with round numbers, so the expected
device time is arithmetic (no timing is asserted); one test measures on the spot with the toy CLIP.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchsuite.data.fewshot import sample_fewshot, subsample_classes
from benchsuite.data.registry import load_dataset
from benchsuite.engine.jobs import Job
from benchsuite.engine.preflight import resolved_recipes
from benchsuite.plan.estimate import JobCost, wall_seconds
from benchsuite.plan.figures import Figure, Shape
from benchsuite.plan.work import _budget
from benchsuite.protocols import load_protocol
from test_run import run_quiet

PROTOCOL, DATASET = "toy_few_shot", "toy_textures"
TRAIN_MS, FLOOR_IPS, EVAL_IPS, CACHED_IPS = 2.0, 50.0, 40.0, 1000.0


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from benchsuite.toy.datasets import materialize

    return materialize(tmp_path_factory.mktemp("toy") / "world", scale=0.2)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Never the user's figures or feature cache."""
    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path / "cache"))


def fake_bench(path: Path, method: str, n_classes: int, batch_size: int = 32, **extra) -> Path:
    """A `benchsuite bench --json` report for the toy CLIP on the CPU, with round figures."""
    report = {"method": method, "protocol": PROTOCOL, "backbone": "bs-toy-clip", "pretrained": "x", "precision": "fp32",
              "device": "cpu", "batch_size": batch_size, "n_classes": n_classes, "recipe_overrides": {},
              "floor_ms_per_image": 1.0, "train_ms_per_image": TRAIN_MS, "eval_images_per_second": EVAL_IPS,
              "eval_floor_images_per_second": FLOOR_IPS, "eval_cached_images_per_second": CACHED_IPS, **extra}
    path.write_text(json.dumps(report))
    return path


def plan(toy_root: Path, tmp_path: Path, *extra: str, methods=("coop",), shots="4") -> tuple[int, str, str, dict]:
    out_json = tmp_path / "plan.json"
    code, out, err = run_quiet(["plan", "--protocol", PROTOCOL, "--method", *methods, "--dataset", DATASET,
                                "--shots", shots, "--data-root", str(toy_root), "--results", str(tmp_path / "results"),
                                "--feature-cache", str(tmp_path / "features"), "--json", str(out_json), *extra])
    return code, out, err, json.loads(out_json.read_text()) if out_json.exists() else {}


def row(out: str, method: str) -> list[str]:
    line = next(line for line in out.splitlines() if re.match(rf"^{method}\s", line))
    return line.split()[1:]


def test_plan_prices_every_job_from_the_bench_figures(toy_root, tmp_path):
    protocol = load_protocol(PROTOCOL)
    recipe = resolved_recipes([Job(protocol, "coop", DATASET, 4, 1)])["coop"][0]
    splits = load_dataset(DATASET, toy_root)
    train = sum(len(subsample_classes(sample_fewshot(splits, 4, seed), "all").train) for seed in protocol.seeds)
    tests = len(splits.test)
    n_classes = len(subsample_classes(sample_fewshot(splits, 4, 1), "all").classnames)
    bench = fake_bench(tmp_path / "coop.json", "coop", n_classes, batch_size=recipe["batch_size"])
    code, out, err, record = plan(toy_root, tmp_path, "--bench-json", str(bench))
    assert code == 0, out + err
    assert row(out, "coop")[:4] == ["3", "3", "0", "3"]  # jobs, to run, reused, trainings
    seconds = record["methods"][0]
    assert recipe["batch_size"] >= train // 3  # one batch per epoch: every image is seen each epoch
    assert seconds["train_seconds"] == pytest.approx(recipe["epochs"] * train * TRAIN_MS / 1000)
    # coop evaluates on frozen features: the test set is encoded once (the first job), then read 3 times
    assert seconds["eval_seconds"] == pytest.approx(tests / FLOOR_IPS + 3 * tests / CACHED_IPS)
    assert record["total"]["device_hours"] == pytest.approx(seconds["total_seconds"] / 3600)
    assert f"coop: 1 bench JSON {bench}" in out and "total:" in out and "device-hours" in out
    assert not (tmp_path / "results").exists()  # a plan writes nothing there


def test_without_the_feature_cache_every_job_encodes_its_test_set(toy_root, tmp_path):
    splits = load_dataset(DATASET, toy_root)
    n_classes = len(subsample_classes(sample_fewshot(splits, 4, 1), "all").classnames)
    bench = fake_bench(tmp_path / "coop.json", "coop", n_classes)
    _, out, _, record = plan(toy_root, tmp_path, "--bench-json", str(bench), "--no-feature-cache")
    tests = len(splits.test)
    assert record["methods"][0]["eval_seconds"] == pytest.approx(3 * (tests / FLOOR_IPS + tests / CACHED_IPS))
    assert "feature cache: off" in out


def test_a_method_without_figures_is_named_with_the_fix(toy_root, tmp_path):
    code, out, err, record = plan(toy_root, tmp_path)
    assert code == 0, out + err
    assert row(out, "coop")[4:] == ["?", "?", "?"]
    assert "coop: no figure; pass --measure" in out and "benchsuite bench --method coop" in out
    assert record["total"]["device_hours"] is None


def test_another_shape_borrows_the_nearest_figure_and_says_so(toy_root, tmp_path):
    bench = fake_bench(tmp_path / "coop.json", "coop", 50)  # bench's default shape: Caltech101's base half
    _, out, _, record = plan(toy_root, tmp_path, "--bench-json", str(bench))
    assert record["methods"][0]["train_seconds"] > 0
    assert "borrowed from the nearest shape measured" in out and "from batch 32, 50 classes" in out


def test_a_bench_json_of_another_device_is_not_used(toy_root, tmp_path):
    bench = fake_bench(tmp_path / "coop.json", "coop", 5, device="cuda:0", precision="amp")
    _, out, _, _ = plan(toy_root, tmp_path, "--bench-json", str(bench))
    assert "measured for bs-toy-clip, amp on cuda, not bs-toy-clip, fp32 on cpu; not used" in out
    assert "coop: no figure" in out


def test_results_and_cached_features_that_exist_are_reused(toy_root, tmp_path):
    """A real zero-shot job fills the results folder and the feature cache; the plan then reuses its
    result (by recipe identity, and with --exact by job id) and prices coop's evaluation without
    encoding the test set again."""
    code, out, err = run_quiet(["run", "--protocol", PROTOCOL, "--method", "zeroshot_clip", "--dataset", DATASET,
                                "--shots", "4", "--seeds", "1", "--data-root", str(toy_root), "--results",
                                str(tmp_path / "results"), "--feature-cache", str(tmp_path / "features"), "--quiet"])
    assert code == 0, out + err
    splits = load_dataset(DATASET, toy_root)
    n_classes = len(subsample_classes(sample_fewshot(splits, 4, 1), "all").classnames)
    figures = [str(fake_bench(tmp_path / f"{m}.json", m, n_classes)) for m in ("coop", "zeroshot_clip")]
    for exact in ((), ("--exact",)):
        code, out, err, record = plan(toy_root, tmp_path, "--bench-json", *figures, *exact,
                                      methods=("coop", "zeroshot_clip"))
        assert code == 0, out + err
        assert row(out, "zeroshot_clip")[:4] == ["3", "2", "1", "0"]
        assert row(out, "coop")[:4] == ["3", "3", "0", "3"]
        assert "1 of 1 test set(s)" in out  # the features zeroshot_clip computed
        coop = next(m for m in record["methods"] if m["method"] == "coop")
        assert coop["eval_seconds"] == pytest.approx(3 * len(splits.test) / CACHED_IPS)
        assert ("matched by job id" in out) == bool(exact)


def test_trainings_shared_by_transfer_protocols_are_counted_once(toy_root, tmp_path):
    bench = fake_bench(tmp_path / "coop.json", "coop", 24)
    code, out, err = run_quiet(["plan", "--protocol", "toy_cross_dataset", "toy_domain_generalization", "--method",
                                "coop", "--seeds", "1", "--data-root", str(toy_root), "--results",
                                str(tmp_path / "results"), "--bench-json", str(bench)])
    assert code == 0, out + err
    assert row(out, "coop")[:4] == ["2", "2", "0", "1"]
    assert "shared trainings: 1 job(s)" in out


def test_an_iterations_budget_counts_the_images_of_that_many_steps():
    assert _budget({"epochs": 0, "iterations": 5}, [32, 32, 8]) == (32 + 32 + 8 + 32 + 32, 2)
    assert _budget({"epochs": 3}, [32, 8]) == (120, 3)
    assert _budget({"epochs": 0}, [3]) == (0, 0)  # does not train


def test_the_loader_adds_to_the_step_unless_its_workers_overlap_it():
    def figure(rate: float, workers: int) -> Figure:
        report = {"train_ms_per_image": 2.0, "data_images_per_second": rate, "data_workers": workers}
        return Figure(report, "cached", Shape("coop", 32, 5))

    assert figure(500.0, 0).train_ms_per_image() == pytest.approx(4.0)  # the CPU default: in the training process
    assert figure(500.0, 8).train_ms_per_image() == pytest.approx(2.0)  # workers keep up: the step sets the pace
    assert figure(100.0, 8).train_ms_per_image() == pytest.approx(10.0)  # they do not: the loader does


def test_a_pool_estimates_its_wall_clock():
    costs = [JobCost(work=None, train_s=10.0, eval_s=0.0) for _ in range(4)]  # type: ignore[arg-type]
    assert wall_seconds(costs, 1) == 40 and wall_seconds(costs, 2) == 20 and wall_seconds(costs, 8) == 10
    costs.append(JobCost(work=None, train_s=None, eval_s=None))  # type: ignore[arg-type]
    assert wall_seconds(costs, 2) is None


@pytest.mark.parametrize("argv, message", [
    (["--bench-json", "/nonexistent/bench.json"], "--bench-json /nonexistent/bench.json"),
    (["--device", "tpu"], "--device tpu: not a device benchsuite runs on"),
])
def test_bad_inputs_are_one_line(toy_root, tmp_path, argv, message):
    code, out, err, _ = plan(toy_root, tmp_path, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_measuring_for_an_absent_gpu_is_refused_with_the_fix(toy_root, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    code, out, err, _ = plan(toy_root, tmp_path, "--device", "cuda", "--measure")
    assert code == 2 and "--bench-json FILE" in err and "benchsuite bench --device cuda" in err, err


def test_measure_times_the_missing_figures_once_and_caches_them(toy_root, tmp_path):
    code, out, err, record = plan(toy_root, tmp_path, "--measure", "--seeds", "1")
    assert code == 0, out + err
    assert "coop: 1 measured now" in out and record["methods"][0]["train_seconds"] > 0
    cache = tmp_path / "cache" / "bench-figures.json"
    assert cache.is_file() and f"cached in {cache}" in out
    code, out, err, _ = plan(toy_root, tmp_path, "--measure", "--seeds", "1")  # nothing left to measure
    assert code == 0 and re.search(r"coop: 1 cached \(measured \d{4}-", out), out + err


def test_frozen_encoder_methods_share_their_training_views(toy_root, tmp_path):
    """CoOp and KgCoOp see the same views (the keyed augmentation stream): the second pays only its
    steps without the view; the grid's views cost the most epochs any one of them trains."""
    protocol = load_protocol(PROTOCOL)
    recipes = resolved_recipes([Job(protocol, m, DATASET, 4, 1) for m in ("coop", "kgcoop")])
    coop, kg = recipes["coop"][0], recipes["kgcoop"][0]
    assert coop["epochs"] >= kg["epochs"]  # coop, first in grid order, computes every view kgcoop needs
    splits = load_dataset(DATASET, toy_root)
    n = len(subsample_classes(sample_fewshot(splits, 4, 1), "all").train)
    n_classes = len(subsample_classes(sample_fewshot(splits, 4, 1), "all").classnames)
    figures = [str(fake_bench(tmp_path / f"{m}.json", m, n_classes, batch_size=r["batch_size"]))
               for m, r in (("coop", coop), ("kgcoop", kg))]
    code, out, err, record = plan(toy_root, tmp_path, "--bench-json", *figures, "--seeds", "1",
                                  methods=("coop", "kgcoop"))
    assert code == 0, out + err
    seconds = {m["method"]: m["train_seconds"] for m in record["methods"]}
    view_ms = 1.0  # the fake figures' floor: the frozen encoder per image, no loader figure
    assert seconds["kgcoop"] == pytest.approx(kg["epochs"] * n * (TRAIN_MS - view_ms) / 1000)
    assert seconds["coop"] == pytest.approx(coop["epochs"] * n * (TRAIN_MS - view_ms) / 1000
                                            + coop["epochs"] * n * view_ms / 1000)
