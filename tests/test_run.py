"""End to end through `benchsuite.cli.main`, in process, with the tiny model and the fixture datasets."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from benchsuite.cli import main
from benchsuite.hookspecs import hookimpl
from benchsuite.protocols import load_protocol
from benchsuite.results.validate import validate_result
from fixture_data import (EXPECTED, IMAGENET_A_INDICES, IMAGENET_CLASSES, IMAGENET_R_INDICES, N_TEST, TRAIN_COUNTS,
                          VARIANT_PER_CLASS, make_data_root)

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def run_args(protocol: str, checkpoint: Path, data_root: Path, results: Path, *extra: str) -> list[str]:
    return ["run", "--protocol", protocol, "--backbone", "bs-tiny-test", "--pretrained", str(checkpoint),
            "--data-root", str(data_root), "--results", str(results),
            "--feature-cache", str(results.parent / f"{results.name}-features"), *extra]


def run_quiet(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def result_files(results: Path) -> list[Path]:
    """Result JSONs only (not manifests, locks or shared trainings)."""
    return sorted(p for p in results.rglob("*.json")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(results).parts))


def load_results(results: Path) -> dict[tuple[str, str, int, int], dict]:
    out = {}
    for path in result_files(results):
        data = json.loads(path.read_text(encoding="utf-8"))
        job = data["job"]
        out[(job["method"], job["dataset"], job["shots"], job["seed"])] = data
    return out


def all_files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def n_train(dataset: str, shots: int, labels) -> int:
    return sum(min(shots, TRAIN_COUNTS[label]) for label in labels)


def assert_valid(result: dict) -> None:
    problems = validate_result(result)
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# base2new: coop and zero-shot CLIP, one dataset, one seed

B2N_DATASET = "oxford_pets"  # 5 classes: base 3, new 2 (ceil rule on an odd count)


@pytest.fixture(scope="module")
def b2n(tmp_path_factory, tiny_checkpoint, data_root):
    results = tmp_path_factory.mktemp("b2n") / "results"
    argv = run_args("base2new", tiny_checkpoint, data_root, results, "--method", "coop", "zeroshot_clip",
                    "--dataset", B2N_DATASET, "--seeds", "1", "--set", "epochs=2")
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    return results, argv, out


def test_base2new_results(b2n):
    results, _, out = b2n
    assert "2 computed, 0 reused, 0 failed" in out
    found = load_results(results)
    assert set(found) == {("coop", B2N_DATASET, 16, 1), ("zeroshot_clip", B2N_DATASET, 16, 1)}
    n_classes = len(EXPECTED[B2N_DATASET].classnames)
    base, new = (n_classes + 1) // 2, n_classes // 2
    protocol = load_protocol("base2new")
    for (method, *_), result in found.items():
        assert_valid(result)
        assert result["job"]["protocol"] == protocol.ref()
        assert result["method"]["source"] == "builtin"
        assert set(result["metrics"]) == {"base", "new"}
        for key, count in (("base", base), ("new", new)):
            assert 0.0 <= result["metrics"][key]["accuracy"] <= 100.0
            assert result["metrics"][key]["total"] == N_TEST * count
            assert result["data"]["evals"][key]["n_classes"] == count
            assert result["data"]["evals"][key]["n_images"] == N_TEST * count
            assert HEX64.match(result["data"]["evals"][key]["fingerprint"])
        assert result["data"]["evals"]["base"]["fingerprint"] != result["data"]["evals"]["new"]["fingerprint"]
        train = result["data"]["train"]
        assert HEX64.match(train["fingerprint"]) and HEX64.match(train["manifest_sha256"])
        assert train["n_classes"] == base and train["n_images"] == n_train(B2N_DATASET, 16, range(base))
        manifest = json.loads((results / "_manifests" / B2N_DATASET / "shot_16-seed_1.json").read_text())
        assert manifest["sha256"] == train["manifest_sha256"]
        timing = result["timing"]
        assert timing["eval_seconds"] > 0 and timing["eval_images_per_second"] > 0
        assert timing["eval_images"] == N_TEST * n_classes
        assert timing["peak_memory_bytes"] > 0 and timing["train_shared_from"] is None
        backbone = result["backbone"]
        assert (backbone["model"], backbone["pretrained"], backbone["precision"]) == ("bs-tiny-test", "tiny.pt", "fp32")
        assert HEX64.match(backbone["weights_sha256"])

    coop = found[("coop", B2N_DATASET, 16, 1)]
    assert coop["method"]["recipe"]["epochs"] == 2
    assert coop["method"]["default_recipe"] is False and coop["method"]["overrides"] == {"epochs": 2}
    assert coop["method"]["trainable_params"] == 4 * 64
    timing = coop["timing"]
    assert timing["train_seconds"] > 0 and timing["train_ms_per_image"] > 0
    assert timing["train_images"] == 2 * coop["data"]["train"]["n_images"]

    zs = found[("zeroshot_clip", B2N_DATASET, 16, 1)]
    assert zs["method"]["recipe"]["epochs"] == 0
    assert zs["method"]["default_recipe"] is True  # an unqualified --set skips methods that learn nothing
    assert zs["timing"]["train_seconds"] == 0 and zs["timing"]["train_images"] == 0
    assert zs["method"]["trainable_params"] == 0


def test_base2new_resume_writes_nothing(b2n):
    results, argv, _ = b2n
    before = all_files(results)
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    assert "0 computed, 2 reused, 0 failed" in out
    assert all_files(results) == before  # same files, same bytes, not even rewritten


def test_feature_cache_is_shared_and_exact(b2n, tiny_checkpoint, data_root, tmp_path):
    results, _, _ = b2n
    found = load_results(results)
    assert found[("coop", B2N_DATASET, 16, 1)]["timing"]["eval_feature_cache"] == "miss"
    cached = found[("zeroshot_clip", B2N_DATASET, 16, 1)]
    assert cached["timing"]["eval_feature_cache"] == "hit"  # same test sets, same frozen encoder
    fresh_results = tmp_path / "fresh"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, fresh_results, "--method",
                                        "zeroshot_clip", "--dataset", B2N_DATASET, "--seeds", "1",
                                        "--no-feature-cache"))
    assert code == 0, out + err
    (fresh,) = load_results(fresh_results).values()
    assert fresh["timing"]["eval_feature_cache"] == "off"
    assert fresh["metrics"] == cached["metrics"]


# --------------------------------------------------------------------------------------------------
# an interrupted run keeps finished jobs and leaves nothing half-written


def _interrupt_coop_training(monkeypatch):
    from benchsuite_plugins.coop import CoOp

    original = CoOp.train_step

    @hookimpl
    def train_step(self, batch, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # the user presses Ctrl-C in the second epoch
        return original(self, batch, epoch)

    monkeypatch.setattr(CoOp, "train_step", train_step)
    return ["--method", "zeroshot_clip", "coop", "--seeds", "1"]  # job 1 zero-shot, job 2 coop


def _interrupt_zeroshot_evaluation(monkeypatch):
    from benchsuite_plugins.zeroshot_clip import ZeroshotCLIP

    original = ZeroshotCLIP.prepare_eval
    calls = []

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        calls.append(dataset)
        if len(calls) == 4:
            raise KeyboardInterrupt  # job 2 (seed 2) has evaluated base and is on new
        return original(self, classnames, dataset, template)

    monkeypatch.setattr(ZeroshotCLIP, "prepare_eval", prepare_eval)
    return ["--method", "zeroshot_clip", "--seeds", "1", "2"]


@pytest.mark.parametrize("interrupt", [_interrupt_coop_training, _interrupt_zeroshot_evaluation],
                         ids=["during-training", "during-evaluation"])
def test_interrupted_run_keeps_finished_jobs(interrupt, monkeypatch, tmp_path, tiny_checkpoint, data_root):
    results = tmp_path / "results"
    selection = interrupt(monkeypatch)
    argv = run_args("base2new", tiny_checkpoint, data_root, results, "--dataset", "eurosat", "--set", "epochs=2",
                    *selection)
    code, out, err = run_quiet(argv)
    assert code == 130, out + err
    assert "interrupted" in err
    files = result_files(results)
    assert len(files) == 1, files  # the first job's result only
    first = json.loads(files[0].read_text())
    assert_valid(first)
    assert first["job"]["seed"] == 1 and first["job"]["method"] == "zeroshot_clip"
    assert temp_files(results) == [] and temp_files(tmp_path) == []
    kept = files[0].read_bytes()

    monkeypatch.undo()
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    assert "1 computed, 1 reused, 0 failed" in out
    assert len(result_files(results)) == 2
    assert files[0].read_bytes() == kept
    for path in result_files(results):
        assert_valid(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------
# cross-dataset, then domain generalization reusing the ImageNet training


def test_cross_dataset_then_domain_generalization(tmp_path, tiny_checkpoint, data_root):
    results = tmp_path / "results"
    common = ["--method", "coop", "zeroshot_clip", "--seeds", "1", "--set", "epochs=2"]
    code, out, err = run_quiet(run_args("cross_dataset", tiny_checkpoint, data_root, results, *common))
    assert code == 0, out + err
    code, out, err = run_quiet(run_args("domain_generalization", tiny_checkpoint, data_root, results, *common))
    assert code == 0, out + err
    assert "reusing the training of job" in out

    def one(protocol, method):
        (path,) = sorted((results / protocol / method / "imagenet").glob("*.json"))
        return json.loads(path.read_text())

    xd, dg = one("cross_dataset", "coop"), one("domain_generalization", "coop")
    for result in (xd, dg, one("cross_dataset", "zeroshot_clip"), one("domain_generalization", "zeroshot_clip")):
        assert_valid(result)
    xd_protocol, dg_protocol = load_protocol("cross_dataset"), load_protocol("domain_generalization")
    assert set(xd["metrics"]) == {"imagenet", *xd_protocol.spec["targets"]} == set(xd_protocol.eval_names)
    assert set(dg["metrics"]) == {"imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    assert set(dg["metrics"]) == set(dg_protocol.eval_names)

    assert xd["timing"]["train_shared_from"] is None and xd["timing"]["train_images"] > 0
    assert dg["timing"]["train_shared_from"] == xd["job"]["id"]
    assert dg["job"]["id"] != xd["job"]["id"]
    assert dg["timing"]["train_seconds"] == xd["timing"]["train_seconds"]
    assert dg["timing"]["train_images"] == xd["timing"]["train_images"]
    assert dg["data"]["train"] == xd["data"]["train"]
    assert dg["metrics"]["imagenet"] == xd["metrics"]["imagenet"]  # the same trained context, same test set
    assert one("domain_generalization", "zeroshot_clip")["timing"]["train_shared_from"] is None

    n_imagenet = len(IMAGENET_CLASSES)
    assert xd["data"]["train"]["n_classes"] == n_imagenet
    assert xd["data"]["train"]["n_images"] == n_train("imagenet", 16, range(n_imagenet))
    evals = dg["data"]["evals"]
    for key, indices in (("imagenet_a", IMAGENET_A_INDICES), ("imagenet_r", IMAGENET_R_INDICES)):
        assert evals[key]["n_classes"] == len(indices) < n_imagenet  # classifier rebuilt over the subset
        assert evals[key]["n_images"] == dg["metrics"][key]["total"] == VARIANT_PER_CLASS * len(indices)
    for key in ("imagenetv2", "imagenet_sketch"):
        assert evals[key]["n_classes"] == n_imagenet
    for key in xd_protocol.spec["targets"]:
        assert xd["data"]["evals"][key]["n_classes"] == len(EXPECTED[key].classnames)
        assert xd["data"]["evals"][key]["n_images"] == EXPECTED[key].test
    assert not (results / "_trained").exists() or temp_files(results / "_trained") == []


def test_same_seed_same_training(tmp_path, tiny_checkpoint, data_root, tiny_backbone):
    """The harness seeds every RNG per job: a job rerun from scratch learns exactly the same context."""
    import torch

    states = []
    for name in ("first", "second"):
        results = tmp_path / name
        code, out, err = run_quiet(run_args("cross_dataset", tiny_checkpoint, data_root, results, "--method", "coop",
                                            "--seeds", "1", "--set", "epochs=2", "--no-feature-cache"))
        assert code == 0, out + err
        (shared,) = sorted((results / "_trained").glob("*.pt"))
        states.append(torch.load(shared, weights_only=True)["state"])
        (result,) = load_results(results).values()
        states[-1]["metrics"] = result["metrics"]
    first, second = states
    assert set(first) == {"ctx", "metrics"}
    assert torch.equal(first["ctx"], second["ctx"])
    init = tiny_backbone.embed_tokens(tiny_backbone.tokenize(["a photo of a"]))[0, 1:5]
    assert not torch.allclose(first["ctx"], init, atol=1e-6)  # training did move the context
    assert first["metrics"] == second["metrics"]


# --------------------------------------------------------------------------------------------------
# few-shot


def test_few_shot_two_shot_counts(tmp_path, tiny_checkpoint, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("few_shot", tiny_checkpoint, data_root, results, "--method", "coop",
                                        "--dataset", "dtd", "--shots", "1", "2", "--seeds", "1", "--set", "epochs=2"))
    assert code == 0, out + err
    found = load_results(results)
    assert set(found) == {("coop", "dtd", 1, 1), ("coop", "dtd", 2, 1)}
    n_classes = len(EXPECTED["dtd"].classnames)
    for (_, _, shots, _), result in found.items():
        assert_valid(result)
        assert set(result["metrics"]) == {"test"}
        assert result["data"]["train"]["n_images"] == n_train("dtd", shots, range(n_classes)) == shots * n_classes
        assert result["data"]["train"]["n_classes"] == n_classes
        assert result["data"]["evals"]["test"]["n_images"] == EXPECTED["dtd"].test
        assert result["data"]["evals"]["test"]["n_classes"] == n_classes
        recipe = result["method"]["recipe"]
        assert (recipe["n_ctx"], recipe["ctx_init"], recipe["epochs"]) == (16, "", 2)
        assert result["method"]["trainable_params"] == 16 * 64
        assert (results / "_manifests" / "dtd" / f"shot_{shots}-seed_1.json").is_file()
    assert found[("coop", "dtd", 1, 1)]["data"]["train"]["manifest_sha256"] != \
        found[("coop", "dtd", 2, 1)]["data"]["train"]["manifest_sha256"]


# --------------------------------------------------------------------------------------------------
# bad inputs: exit code 2, one message naming the bad thing, nothing written


@pytest.fixture(scope="module")
def partial_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("partial"), ["caltech101"])


def _set(key, value):
    def edit(opts, paths):
        opts[key] = value
        return value
    return edit


def _missing_data_root(opts, paths):
    del opts["--data-root"]
    return "--data-root"


def _absent_data_root(opts, paths):
    opts["--data-root"] = str(paths["missing"])
    return str(paths["missing"])


def _dataset_folder_missing(opts, paths):
    opts["--data-root"], opts["--dataset"] = str(paths["partial"]), "oxford_pets"
    return str(paths["partial"] / "oxford_pets")


def _absent_checkpoint(opts, paths):
    opts["--pretrained"] = str(paths["missing"] / "tiny.pt")
    return opts["--pretrained"]


BAD_INPUTS = {
    "unknown protocol": _set("--protocol", "base_to_novel"),
    "unknown method": _set("--method", "cooop"),
    "dataset not in protocol": _set("--dataset", "imagenet_a"),
    "unknown dataset": _set("--dataset", "eurosatt"),
    "seed not in protocol": _set("--seeds", "7"),
    "shots not in protocol": _set("--shots", "4"),
    "missing data root": _missing_data_root,
    "data root does not exist": _absent_data_root,
    "dataset folder missing": _dataset_folder_missing,
    "checkpoint does not exist": _absent_checkpoint,
    "unknown model": _set("--backbone", "ViT-Q-99"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_exit_2_naming_the_problem(case, capsys, tmp_path, tiny_checkpoint, data_root, partial_root):
    results = tmp_path / "results"
    opts = {"--protocol": "base2new", "--method": "zeroshot_clip", "--dataset": "eurosat", "--seeds": "1",
            "--backbone": "bs-tiny-test", "--pretrained": str(tiny_checkpoint), "--data-root": str(data_root),
            "--results": str(results), "--feature-cache": str(tmp_path / "features")}
    named = BAD_INPUTS[case](opts, {"missing": tmp_path / "missing", "partial": partial_root})
    argv = ["run", *[x for pair in opts.items() for x in pair]]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "benchsuite: error:" in captured.err and named in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert not results.exists() or result_files(results) == []


def test_a_rerun_after_losing_its_result_reuses_its_own_training_without_citing_itself(tmp_path, tiny_checkpoint,
                                                                                       data_root):
    results = tmp_path / "results"
    args = run_args("cross_dataset", tiny_checkpoint, data_root, results, "--method", "coop", "--seeds", "1",
                    "--set", "epochs=2")
    assert run_quiet(args)[0] == 0
    (path,) = result_files(results)
    first = json.loads(path.read_text())
    path.unlink()  # as if interrupted after the training was saved, before the result was written
    code, out, err = run_quiet(args)
    assert code == 0, out + err
    again = json.loads(path.read_text())
    assert again["job"]["id"] == first["job"]["id"]
    assert again["timing"]["train_shared_from"] is None
    assert again["metrics"] == first["metrics"]


def test_every_fast_path_switched_off_gives_the_same_results(b2n, tiny_checkpoint, data_root, tmp_path):
    """The straightforward twins (no truncation, classifier per batch, decode per step, no cache)
    reproduce the fast run's metrics exactly."""
    results, _, _ = b2n
    slow_results = tmp_path / "slow"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, slow_results, "--method", "coop",
                                        "zeroshot_clip", "--dataset", B2N_DATASET, "--seeds", "1",
                                        "--set", "epochs=2", "--no-text-truncation", "--no-class-text-once",
                                        "--no-preload", "--no-feature-cache"))
    assert code == 0, out + err
    fast, slow = load_results(results), load_results(slow_results)
    assert set(fast) == set(slow)
    for key in fast:
        assert slow[key]["timing"]["eval_feature_cache"] == "off"
        for name, metric in fast[key]["metrics"].items():
            assert slow[key]["metrics"][name]["correct"] == metric["correct"], (key, name)


def test_best_test_epoch_keeps_the_best_scored_state():
    import torch

    from benchsuite.engine.runner import BestTestEpoch

    module = torch.nn.Linear(1, 1, bias=False)
    scores = iter([10.0, 30.0, 20.0])
    selector = BestTestEpoch(lambda: next(scores), module)
    for epoch, value in enumerate([1.0, 2.0, 3.0]):
        module.weight.data.fill_(value)
        selector.epoch_end(epoch=epoch, num_epochs=3)
    selector.train_end()
    assert float(module.weight) == 2.0 and selector.best == 30.0


def test_test_set_model_selection_is_refused_unless_allowed_and_then_marked_off_protocol(
        tmp_path, tiny_checkpoint, data_root):
    from benchsuite.leaderboard import build_leaderboard

    results = tmp_path / "results"
    args = run_args("base2new", tiny_checkpoint, data_root, results, "--method", "coop", "--dataset", B2N_DATASET,
                    "--seeds", "1", "--set", "epochs=2", "coop.model_selection=best_test_epoch")
    code, out, err = run_quiet(args)
    assert code == 2 and "--allow-model-selection" in err and not result_files(results)
    code, out, err = run_quiet(args + ["--allow-model-selection"])
    assert code == 0, out + err
    (path,) = result_files(results)
    result = json.loads(path.read_text())
    assert result["method"]["recipe"]["model_selection"] == "best_test_epoch"
    assert any("off-protocol" in p for p in validate_result(result))
    board = build_leaderboard([(path, result)], root=results)
    assert "off-protocol" in board[board.index("## Refused results"):]


def test_changed_split_lists_make_a_new_job_instead_of_a_skip(tmp_path, tiny_checkpoint):
    data = make_data_root(tmp_path / "data", ["oxford_pets"])
    results = tmp_path / "results"
    args = run_args("base2new", tiny_checkpoint, data, results, "--method", "zeroshot_clip", "--dataset",
                    "oxford_pets", "--seeds", "1")
    assert run_quiet(args)[0] == 0
    code, out, _ = run_quiet(args)
    assert "1 reused" in out
    split_file = data / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(split_file.read_text())
    split["test"] = split["test"][:-1]  # one test image fewer: another test set
    split_file.write_text(json.dumps(split))
    code, out, err = run_quiet(args)
    assert code == 0 and "1 computed" in out, out + err
    assert len(result_files(results)) == 2


def test_test_sets_with_the_same_relative_layout_never_share_cached_features(tmp_path, tiny_backbone):
    """Toy DG targets share relative paths, labels and names (only the pixels differ): the feature
    cache must tell them apart by where the files are and what they contain."""
    import shutil

    import torch
    from PIL import Image, ImageOps

    from benchsuite.data.datum import fingerprint
    from benchsuite.data.registry import load_dataset
    from benchsuite.engine.feature_cache import FeatureCache
    from benchsuite.engine.runner import Runner
    from benchsuite.methods import get_method

    first = make_data_root(tmp_path / "a", ["oxford_pets"])
    second = tmp_path / "b"
    shutil.copytree(first, second)
    for path in (second / "oxford_pets" / "images").rglob("*.jpg"):
        ImageOps.invert(Image.open(path).convert("RGB")).save(path)
    runner = Runner(tiny_backbone, first, tmp_path / "r", manifests_root=tmp_path / "m",
                    feature_cache=FeatureCache(tmp_path / "cache"), echo=lambda *_: None)
    entry = get_method("zeroshot_clip")
    features, states = [], []
    for root in (first, second):
        split = load_dataset("oxford_pets", root)
        fp = fingerprint(split.test, split.root)
        batches, state = runner._eval_batches(entry.cls.image_input, split.test, fp, 100, "test")
        features.append(torch.cat([b.image_features for b in batches()]))
        states.append(state)
    assert fingerprint(load_dataset("oxford_pets", first).test, str(first / "oxford_pets" / "images")) == \
        fingerprint(load_dataset("oxford_pets", second).test, str(second / "oxford_pets" / "images"))
    assert states == ["miss", "miss"]
    assert not torch.allclose(features[0], features[1])
