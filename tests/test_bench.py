"""`benchsuite bench` produces every measurement it reports (values are not asserted: speed targets
live in the benchmark suite and the README, never in timed unit tests)."""

from __future__ import annotations

import json

import pytest

from benchsuite.bench import format_report, run_bench
from benchsuite.cli import main
from benchsuite.errors import BenchsuiteError

from conftest import TINY_MODEL


def test_bench_reports_floor_training_evaluation_and_data(tiny_backbone):
    report = run_bench(tiny_backbone, "coop", "base2new", warmup=0, iters=1, eval_images=20)
    assert report["batch_size"] == 32 and report["n_classes"] == 50  # CoOp's recipe, Caltech101 base half
    for key in ("floor_ms_per_image", "train_ms_per_image", "train_straightforward_ms_per_image",
                "eval_images_per_second", "eval_floor_images_per_second", "eval_cached_images_per_second",
                "data_images_per_second", "peak_memory_bytes"):
        assert report[key] > 0, key
    assert tiny_backbone.truncate_text  # restored after timing the straightforward path
    text = format_report(report)
    assert "train step, fast path" in text and "second method (cached features)" in text


def test_bench_of_a_method_that_does_not_train_has_no_training_rows(tiny_backbone):
    report = run_bench(tiny_backbone, "zeroshot_clip", "few_shot", warmup=0, iters=1, eval_images=10)
    assert "train_ms_per_image" not in report and report["n_classes"] == 100
    assert "train step" not in format_report(report)


def test_bench_cli_writes_json(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--method", "zeroshot_clip", "--backbone", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
                 "--warmup", "0", "--iters", "1", "--eval-images", "10", "--json", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["method"] == "zeroshot_clip"
    assert "image-encoder floor" in capsys.readouterr().out


def test_bench_set_and_compare_time_a_second_recipe(tiny_backbone):
    report = run_bench(tiny_backbone, "cocoop", "base2new", warmup=0, iters=1, eval_images=10,
                       overrides={"cocoop": {"batch_size": 4}}, compare={"cocoop": {"batched_text": False}},
                       straightforward=False)
    assert report["batch_size"] == 4 and report["recipe_overrides"] == {"batch_size": 4}
    assert report["compare_overrides"] == {"batched_text": False}
    assert report["train_compare_ms_per_image"] > 0 and "train_straightforward_ms_per_image" not in report
    assert report["train_speedup_over_compare"] == pytest.approx(
        report["train_compare_ms_per_image"] / report["train_ms_per_image"])
    assert "--compare batched_text=False" in format_report(report)


def test_bench_compare_that_changes_nothing_is_refused(tiny_backbone):
    with pytest.raises(BenchsuiteError, match="change nothing"):
        run_bench(tiny_backbone, "cocoop", "base2new", warmup=0, iters=1, eval_images=10,
                  compare={"cocoop": {"batched_text": True}})


@pytest.mark.parametrize("option, entries, message", [
    ("overrides", {"cocop": {"batch_size": 4}}, r"--set cocop\.batch_size: method 'cocop' is not part of this run "
                                                r"\(did you mean 'cocoop'\?\)"),
    ("compare", {"coop": {"batched_text": False}}, r"--compare coop\.batched_text: method 'coop' is not part"),
    ("overrides", {"cocoop": {"batch_sise": 4}}, r"--set cocoop\.batch_sise=4: method 'cocoop' has no recipe key "
                                                 r"'batch_sise' \(did you mean 'batch_size'\?\)"),
    ("compare", {"cocoop": {"batched_text": "maybe"}}, r"--compare cocoop\.batched_text=maybe: 'batched_text' "
                                                       r"takes true or false"),
])
def test_bench_overrides_are_checked_like_run_set(tiny_backbone, option, entries, message):
    """A typo'd method or key in --set/--compare is one clear error naming the flag, never silently ignored."""
    with pytest.raises(BenchsuiteError, match=message):
        run_bench(tiny_backbone, "cocoop", "base2new", warmup=0, iters=1, eval_images=10, **{option: entries})


def test_bench_of_an_image_prompting_method_reports_the_prompted_floor_and_coop(tiny_backbone):
    report = run_bench(tiny_backbone, "ivlp", "base2new", warmup=0, iters=1, eval_images=10)
    assert report["batch_size"] == 4
    for key in ("prompted_floor_ms_per_image", "coop_train_ms_per_image", "train_ratio_to_prompted_floor",
                "train_ratio_to_coop", "peak_memory_bytes"):
        assert report[key] > 0, key
    text = format_report(report)
    assert "prompted floor" in text and "vs CoOp" in text
    assert all(p.grad is None for p in tiny_backbone.model.parameters())  # the floor's backward stays off CLIP
    coop = run_bench(tiny_backbone, "coop", "base2new", warmup=0, iters=1, eval_images=10)
    assert "prompted_floor_ms_per_image" not in coop and "coop_train_ms_per_image" not in coop


def test_bench_of_an_images_and_features_method_also_times_its_step_on_shared_frozen_features(tiny_backbone,
                                                                                            monkeypatch):
    """PromptSRC in a grid reads its frozen features from the shared training features: bench times
    that step too, handing the step the features (so no unprompted forward runs inside it)."""
    import benchsuite.bench as bench

    handed: list[bool] = []
    real = bench.train_step

    def recording(pm, method, module, *args, **kwargs):
        handed.append(kwargs.get("features") is not None)
        return real(pm, method, module, *args, **kwargs)

    monkeypatch.setattr(bench, "train_step", recording)
    report = run_bench(tiny_backbone, "promptsrc", "base2new", warmup=0, iters=1, eval_images=10)
    for key in ("train_shared_features_ms_per_image", "train_shared_features_ratio_to_floor",
                "train_shared_features_ratio_to_prompted_floor"):
        assert report[key] > 0, key
    assert True in handed and False in handed  # both steps timed
    assert "frozen features shared" in format_report(report)
    ivlp = run_bench(tiny_backbone, "ivlp", "base2new", warmup=0, iters=1, eval_images=10)
    assert "train_shared_features_ms_per_image" not in ivlp


def test_every_training_path_but_the_straightforward_one_is_timed_with_the_text_truncation(tiny_backbone,
                                                                                          monkeypatch):
    """The timed calls alternate and the straightforward step switches the truncation off: the CoOp
    reference step and a --compare variant must still run the fast path (they once inherited the
    straightforward step's setting and read 3.5x too slow on ViT-B-16)."""
    import benchsuite.bench as bench

    seen: list[tuple[str, int, bool]] = []
    real = bench.train_step

    def recording(pm, method, module, *args, **kwargs):
        seen.append((method, id(module), tiny_backbone.truncate_text))
        return real(pm, method, module, *args, **kwargs)

    monkeypatch.setattr(bench, "train_step", recording)
    run_bench(tiny_backbone, "ivlp", "base2new", warmup=0, iters=2, eval_images=10)
    coop = [truncated for method, _, truncated in seen if method == "coop"]
    assert coop and all(coop)
    ivlp = [truncated for method, _, truncated in seen if method == "ivlp"]
    assert ivlp.count(False) == 2 and ivlp.count(True) == 2  # fast and straightforward, twice each
    seen.clear()
    run_bench(tiny_backbone, "cocoop", "base2new", warmup=0, iters=2, eval_images=10,
              overrides={"cocoop": {"batch_size": 2}}, compare={"cocoop": {"batched_text": False}})
    modules = list(dict.fromkeys(module for _, module, _ in seen))
    assert len(modules) == 2  # the measured instance and the --compare one
    compare = [truncated for _, module, truncated in seen if module == modules[1]]
    assert compare and all(compare)


def test_bench_times_a_method_with_a_trained_dependency_on_an_untrained_one(tiny_backbone):
    """PromptKD's setup asks for its PromptSRC teacher; bench hands it the teacher's module right
    after setup (frozen) instead of the one-line refusal `setup` outside a job gives."""
    report = run_bench(tiny_backbone, "promptkd", "base2new", warmup=0, iters=1, eval_images=10)
    assert report["train_ms_per_image"] > 0 and report["eval_images_per_second"] > 0
