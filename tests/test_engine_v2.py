"""Contract v2 of the engine: image input declaration, precision, epoch-indexed settings under a
profile, batches, a grid that survives its jobs, the one-batch check, loss history."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import benchsuite.engine.runner as runner_module
from benchsuite.data.batching import tail_rule
from benchsuite.engine.jobs import Job
from benchsuite.engine.recipe import HARNESS_DEFAULTS, apply_profile, resolve_recipe
from benchsuite.engine.runner import Runner
from benchsuite.errors import BenchsuiteError, ContractError
from benchsuite.hookspecs import EvalBatch, Method, hookimpl
from benchsuite.methods import MethodEntry, get_method, job_manager
from benchsuite.protocols import load_protocol


def entry(cls) -> MethodEntry:
    return MethodEntry(cls.name, cls, "tests-dist", "0.0", cls.name)


@pytest.fixture
def use_methods(monkeypatch):
    """Make the runner find test-local method classes next to the installed ones."""
    def install(*classes):
        local = {cls.name: entry(cls) for cls in classes}
        monkeypatch.setattr(runner_module, "get_method", lambda name: local.get(name) or get_method(name))
    return install


def make_runner(tmp_path, backbone, data_root, **kwargs) -> Runner:
    return Runner(backbone, data_root, tmp_path / "results", manifests_root=tmp_path / "manifests",
                  echo=lambda *_: None, **kwargs)


def read(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


class Probe(Method):
    """A small trainable method (bias on zero logits of fp32 features) that records what it is given."""

    name = "probe"
    seen: list = []
    epochs = 2

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": type(self).epochs, "batch_size": 4}

    @hookimpl
    def setup(self, ctx):
        type(self).seen.append(("setup", ctx.epoch_scale, dict(ctx.recipe)))
        self.backbone = ctx.backbone
        self.module = torch.nn.Linear(ctx.backbone.embed_dim, len(ctx.classnames))
        return self.module

    def features(self, batch):
        if batch.image_features is not None:
            return batch.image_features.float()
        with torch.no_grad():
            return self.backbone.encode_image(batch.images).float()

    @hookimpl
    def train_step(self, batch, epoch):
        type(self).seen.append(("train", batch.images is not None, batch.image_features))
        logits = self.module(self.features(batch))
        ce = F.cross_entropy(logits, batch.labels)
        return {"loss": ce + 0.0 * logits.sum(), "ce": ce, "norm": logits.pow(2).mean()}

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        self.n = len(classnames)

    @hookimpl
    def predict(self, batch):
        type(self).seen.append(("predict", batch.images is not None, batch.image_features))
        return self.module(self.features(batch))[:, : self.n].float()


# --------------------------------------------------------------------------------------------------
# 1. image input declaration


class ImagesPlusFeatures(Probe):
    name = "probe_images_features"
    image_input = "images+features"
    seen: list = []


def test_images_plus_features_gets_both_in_training_and_images_only_at_eval(tmp_path, tiny_backbone, data_root,
                                                                             use_methods):
    use_methods(ImagesPlusFeatures)
    from benchsuite.engine.feature_cache import FeatureCache

    runner = make_runner(tmp_path, tiny_backbone, data_root, feature_cache=FeatureCache(tmp_path / "cache"))
    path = runner.run_job(Job(load_protocol("base2new"), ImagesPlusFeatures.name, "oxford_pets", 16, 1))
    result = read(path)
    assert result["method"]["recipe"]["image_input"] == "images+features"
    assert result["timing"]["eval_feature_cache"] == "off"  # not a frozen-features evaluation
    trains = [s for s in ImagesPlusFeatures.seen if s[0] == "train"]
    predicts = [s for s in ImagesPlusFeatures.seen if s[0] == "predict"]
    assert trains and predicts
    for _, has_images, features in trains:
        assert has_images and features is not None and features.dtype == torch.float32
        assert not features.requires_grad
    assert all(has_images and features is None for _, has_images, features in predicts)


def test_recipe_may_override_image_input_and_bad_values_are_refused():
    protocol = load_protocol("base2new")
    recipe, changed = resolve_recipe("coop", {"epochs": 2}, protocol.profile, {"coop": {"image_input": "images"}},
                                     image_input="features")
    assert recipe["image_input"] == "images" and changed == {"image_input": "images"}
    with pytest.raises(BenchsuiteError, match="image_input='pixels' is not one of features, images, images\\+features"):
        resolve_recipe("coop", {"epochs": 2}, protocol.profile, {"coop": {"image_input": "pixels"}})


def test_list_methods_shows_the_image_input(capsys):
    from benchsuite.cli import main

    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "image input" in out and "frozen image encoder" not in out
    assert any(line.startswith("coop") and " features " in line for line in out.splitlines())


# --------------------------------------------------------------------------------------------------
# 2. precision


@pytest.fixture(scope="module")
def bf16_backbone(tiny_checkpoint):
    from benchsuite.clip.backbone import load_backbone

    return load_backbone("bs-tiny-test", str(tiny_checkpoint), precision="bf16", device="cpu")


def _one_step(backbone, method_cls, image_input="features", scaler=None, skipped=None):
    from benchsuite.engine.train import make_optimizer, train_step

    pm, method = job_manager(entry(method_cls))
    method.backbone = backbone
    method.module = torch.nn.Linear(backbone.embed_dim, 3)
    optimizer = make_optimizer(list(method.module.parameters()), {**HARNESS_DEFAULTS, "lr": 0.1})
    size = backbone.image_spec.size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    return train_step(pm, method_cls.name, method.module, optimizer, backbone, images, torch.tensor([0, 1, 2, 0]),
                      [], image_input, 0, scaler, skipped)


def test_training_features_are_fp32_even_when_the_backbone_is_not(bf16_backbone):
    Probe.seen = []
    _one_step(bf16_backbone, Probe)
    (_, _, features), = [s for s in Probe.seen if s[0] == "train"]
    assert features.dtype == torch.float32


class ItemLoss(Probe):
    name = "item_loss"

    @hookimpl
    def train_step(self, batch, epoch):
        return {"loss": F.cross_entropy(self.module(batch.image_features), batch.labels).item()}


class HalfLoss(Probe):
    name = "half_loss"

    @hookimpl
    def train_step(self, batch, epoch):
        return {"loss": F.cross_entropy(self.module(batch.image_features), batch.labels).to(torch.bfloat16)}


class VectorPart(Probe):
    name = "vector_part"

    @hookimpl
    def train_step(self, batch, epoch):
        logits = self.module(batch.image_features)
        return {"loss": F.cross_entropy(logits, batch.labels), "logits": logits}


@pytest.mark.parametrize("cls,expected", [
    (ItemLoss, "'loss' is a float, not a tensor"),
    (HalfLoss, "'loss' is torch.bfloat16, must be torch.float32"),
    (VectorPart, "'logits' must be a scalar"),
])
def test_train_step_contract_errors_say_what_was_wrong(cls, expected, tiny_backbone):
    with pytest.raises(ContractError) as info:
        _one_step(tiny_backbone, cls)
    message = str(info.value)
    assert expected in message and repr(cls.name) in message and "train_step" in message, message


def test_predict_must_return_fp32_logits(tiny_backbone):
    from benchsuite.engine.evaluate import evaluate

    class HalfLogits(Probe):
        name = "half_logits"

        @hookimpl
        def predict(self, batch):
            return torch.zeros(batch.labels.shape[0], self.n, dtype=torch.float16)

    pm, method = job_manager(entry(HalfLogits))
    batch = EvalBatch(labels=torch.tensor([0, 1]), image_features=torch.randn(2, tiny_backbone.embed_dim))
    with pytest.raises(ContractError, match="method 'half_logits', hook predict: logits are torch.float16"):
        evaluate(pm, "half_logits", torch.nn.Module(), [batch], ["a", "b"], "x", "{}", tiny_backbone)


class NanPart(Probe):
    name = "nan_part"

    @hookimpl
    def train_step(self, batch, epoch):
        logits = self.module(batch.image_features)
        return {"loss": F.cross_entropy(logits, batch.labels), "aux": logits.sum() * float("nan")}


def _train(backbone, method_cls, epochs=3, scaler=None, batches=None):
    from benchsuite.engine.train import train

    torch.manual_seed(0)
    pm, method = job_manager(entry(method_cls))
    method.backbone = backbone
    method.module = torch.nn.Linear(backbone.embed_dim, 3)
    size = backbone.image_spec.size
    gen = torch.Generator().manual_seed(1)
    batches = batches or [(torch.randn(4, 3, size, size, generator=gen), torch.tensor([0, 1, 2, 0]))
                          for _ in range(2)]
    recipe = {**HARNESS_DEFAULTS, "epochs": epochs, "lr": 0.5}
    stats = train(pm, method_cls.name, method.module, batches, recipe, backbone, "features", scaler=scaler)
    return stats, method.module, pm


def test_every_loss_part_is_checked_for_finiteness(tiny_backbone):
    from benchsuite.engine.train import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="loss part 'aux' of epoch 1/3 is nan"):
        _train(tiny_backbone, NanPart)


class RecordsScaler(Probe):
    name = "records_scaler"
    scalers: list = []

    @hookimpl
    def backward(self, outputs, model, scaler):
        RecordsScaler.scalers.append(scaler)
        (scaler.scale(outputs["loss"]) if scaler is not None else outputs["loss"]).backward()
        return True


def test_grad_scaler_path_matches_the_unscaled_training(tiny_backbone):
    RecordsScaler.scalers = []
    plain, plain_module, _ = _train(tiny_backbone, RecordsScaler)
    scaler = torch.amp.GradScaler("cpu")  # power-of-two scale: unscaling is exact
    scaled, scaled_module, _ = _train(tiny_backbone, RecordsScaler, scaler=scaler)
    assert RecordsScaler.scalers[:6] == [None] * 6 and RecordsScaler.scalers[6:] == [scaler] * 6
    assert scaled.skipped_steps == 0
    for a, b in zip(plain_module.parameters(), scaled_module.parameters()):
        torch.testing.assert_close(a, b)
    assert scaled.losses["loss"] == pytest.approx(plain.losses["loss"], rel=1e-5)


def test_grad_scaler_overflow_skips_steps_and_counts_them(tiny_backbone):
    init = 2.0 ** 127  # every scaled gradient overflows fp32 until the scale has backed off enough
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    stats, _, _ = _train(tiny_backbone, Probe, epochs=2, scaler=scaler)
    halvings = round(math.log2(init / scaler.get_scale()))  # backoff 0.5 per skipped step, no growth yet
    assert stats.skipped_steps == halvings and 1 <= halvings < 4  # 4 steps: some skipped, then trained
    assert all(math.isfinite(v) for v in stats.losses["loss"])


# --------------------------------------------------------------------------------------------------
# 3. epoch-indexed settings under a profile


TOY_PROFILE = {"epochs_scale": 0.1, "min_epochs": 2}


def test_profile_scales_every_epoch_setting_by_one_rule():
    recipe = {**HARNESS_DEFAULTS, "epochs": 50, "warmup_epochs": 2, "gpa_mean": 30, "gpa_std": 1.5, "other": 7}
    out = apply_profile(recipe, TOY_PROFILE, ("gpa_mean", "gpa_std"))
    # 50 epochs -> 5 (factor 0.1); ints rounded up, floats exact, other keys untouched
    assert (out["epochs"], out["warmup_epochs"], out["gpa_mean"], out["other"]) == (5, 1, 3, 7)
    assert out["gpa_std"] == pytest.approx(0.15)
    # min_epochs raises the factor: 10 epochs -> 2 (factor 0.2), warm-up 4 -> ceil(0.8) = 1
    short = apply_profile({**HARNESS_DEFAULTS, "epochs": 10, "warmup_epochs": 4}, TOY_PROFILE)
    assert (short["epochs"], short["warmup_epochs"]) == (2, 1)
    assert apply_profile({**HARNESS_DEFAULTS, "epochs": 10, "warmup_epochs": 0}, TOY_PROFILE)["warmup_epochs"] == 0


@pytest.mark.parametrize("epochs,warmup", [(1, 1), (2, 3)])
def test_warmup_not_shorter_than_training_is_refused(epochs, warmup):
    with pytest.raises(BenchsuiteError, match=f"warmup_epochs={warmup} is not shorter than epochs={epochs}"):
        resolve_recipe("coop", {"epochs": epochs, "warmup_epochs": warmup}, {}, {})
    with pytest.raises(BenchsuiteError, match="not shorter than epochs=1"):
        resolve_recipe("coop", {"epochs": 20}, {}, {"coop": {"epochs": 1}})  # a user override too


class Scheduled(Probe):
    name = "scheduled"
    epoch_settings = ("gpa_mean",)
    seen: list = []
    epochs = 40

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 40, "batch_size": 4, "warmup_epochs": 3, "gpa_mean": 30}


def test_setup_context_carries_the_epoch_scale(tmp_path, tiny_backbone, data_root, use_methods):
    use_methods(Scheduled)
    base = load_protocol("base2new")
    profiled = dataclasses.replace(base, spec={**base.spec, "profile": TOY_PROFILE})
    runner = make_runner(tmp_path, tiny_backbone, data_root, smoke=False)
    path = runner.run_job(Job(profiled, Scheduled.name, "oxford_pets", 16, 1))
    (_, scale, recipe), = [s for s in Scheduled.seen if s[0] == "setup"]
    assert scale == pytest.approx(0.1)
    assert (recipe["epochs"], recipe["warmup_epochs"], recipe["gpa_mean"]) == (4, 1, 3)
    result = read(path)
    assert result["training"]["epoch_scale"] == pytest.approx(0.1)
    assert len(result["training"]["loss_per_epoch"]["loss"]) == 4


# --------------------------------------------------------------------------------------------------
# 4. batches: drop_last and min_batch_size


@pytest.mark.parametrize("n,batch,drop,minimum,sizes", [
    (5, 4, False, 1, [4, 1]),
    (5, 4, False, 2, [5]),       # a trailing batch of one is merged into the one before
    (5, 4, True, 1, [4]),        # the toolbox's drop-last rule
    (3, 4, True, 1, [3]),        # ...which keeps a set smaller than one batch
    (9, 4, False, 2, [4, 5]),
    (8, 4, False, 2, [4, 4]),
])
def test_tail_rule(n, batch, drop, minimum, sizes):
    assert tail_rule(n, batch, drop, minimum) == sizes


def test_a_set_smaller_than_min_batch_size_is_refused():
    with pytest.raises(BenchsuiteError, match="1 image\\(s\\), fewer than the method's min_batch_size 2"):
        tail_rule(1, 4, False, 2)


class BatchNormProbe(Probe):
    """GOPro-like: a BatchNorm1d projector needs two samples per training batch."""

    name = "batchnorm_probe"
    min_batch_size = 2
    seen: list = []

    @hookimpl
    def setup(self, ctx):
        self.backbone = ctx.backbone
        dim = ctx.backbone.embed_dim
        self.module = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.BatchNorm1d(dim),
                                          torch.nn.Linear(dim, len(ctx.classnames)))
        return self.module

    @hookimpl
    def train_step(self, batch, epoch):
        type(self).seen.append(("train", batch.labels.shape[0], None))
        return {"loss": F.cross_entropy(self.module(batch.image_features), batch.labels)}


@pytest.mark.parametrize("drop_last,batches", [(False, [4, 1]), (True, [4])])
def test_batchnorm_method_on_one_shot_five_classes_at_batch_four(drop_last, batches, tmp_path, tiny_backbone,
                                                                 data_root, use_methods):
    BatchNormProbe.seen = []
    use_methods(BatchNormProbe)
    overrides = {BatchNormProbe.name: {"drop_last": True}} if drop_last else {}
    runner = make_runner(tmp_path, tiny_backbone, data_root, overrides=overrides, smoke=False)
    path = runner.run_job(Job(load_protocol("few_shot"), BatchNormProbe.name, "oxford_pets", 1, 1))
    result = read(path)
    assert result["data"]["train"]["n_images"] == 5 and result["method"]["recipe"]["batch_size"] == 4
    assert result["method"]["recipe"]["drop_last"] is drop_last
    assert result["training"]["min_batch_size"] == 2
    sizes = [n for kind, n, _ in BatchNormProbe.seen if kind == "train"]
    epochs = result["method"]["recipe"]["epochs"]
    expected = [5] * epochs if not drop_last else [4] * epochs  # the trailing 1 merged, or dropped
    assert sizes == expected, (batches, sizes)
    assert result["timing"]["train_images"] == sum(expected)


# --------------------------------------------------------------------------------------------------
# 5. a grid survives its jobs


class Crashes(Probe):
    name = "crashes"

    @hookimpl
    def train_step(self, batch, epoch):
        raise RuntimeError("shape mismatch in the projector")


def test_a_failing_job_does_not_stop_the_grid(tmp_path, tiny_backbone, data_root, use_methods):
    use_methods(Crashes)
    messages: list[str] = []
    runner = Runner(tiny_backbone, data_root, tmp_path / "results", manifests_root=tmp_path / "m",
                    echo=messages.append)
    protocol = load_protocol("base2new")
    jobs = [Job(protocol, "crashes", "oxford_pets", 16, 1), Job(protocol, "zeroshot_clip", "oxford_pets", 16, 1)]
    summary = runner.run(jobs)
    assert len(summary.written) == 1 and len(summary.failed) == 1
    failed = summary.failed[0]
    assert "crashes on oxford_pets, seed 1" in failed and "RuntimeError: shape mismatch in the projector" in failed
    (log,) = (tmp_path / "results" / "_logs").rglob("*.log")
    assert str(log) in failed and log.relative_to(tmp_path / "results" / "_logs").parts[:3] == (
        "base2new", "crashes", "oxford_pets")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "shape mismatch in the projector" in text
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Runner(tiny_backbone, data_root, tmp_path / "again", manifests_root=tmp_path / "m", fail_fast=True,
               echo=lambda *_: None).run(jobs)


# --------------------------------------------------------------------------------------------------
# 6. the one-batch check before a long training


class Transposed(Probe):
    name = "transposed"
    epochs = 50
    seen: list = []

    @hookimpl
    def predict(self, batch):
        return self.module(self.features(batch))[:, : self.n].float().t()


def test_transposed_logits_are_found_before_training(tmp_path, tiny_backbone, data_root, use_methods):
    Transposed.seen = []
    use_methods(Transposed)
    runner = make_runner(tmp_path, tiny_backbone, data_root)
    with pytest.raises(ContractError, match="hook predict: expected logits of shape .*one-batch check"):
        runner.run_job(Job(load_protocol("base2new"), Transposed.name, "oxford_pets", 16, 1))
    assert [s[0] for s in Transposed.seen] == ["setup", "train"]  # one step, not 50 epochs


def test_the_check_leaves_the_training_unchanged(tmp_path, tiny_backbone, data_root):
    from benchsuite.engine.recipe import parse_overrides

    job = Job(load_protocol("base2new"), "coop", "eurosat", 16, 1)
    results = []
    for smoke in (True, False):
        runner = Runner(tiny_backbone, data_root, tmp_path / f"r{smoke}", manifests_root=tmp_path / f"m{smoke}",
                        overrides=parse_overrides(["epochs=3"]), smoke=smoke, echo=lambda *_: None)
        results.append(read(runner.run_job(job)))
    with_check, without = results
    assert with_check["metrics"] == without["metrics"]
    assert with_check["training"]["loss_per_epoch"] == without["training"]["loss_per_epoch"]


# --------------------------------------------------------------------------------------------------
# 7. loss history and CPU time in the result


def test_loss_parts_per_epoch_and_cpu_time_are_recorded(tmp_path, tiny_backbone, data_root, use_methods):
    from benchsuite.results.validate import validate_result

    Probe.seen = []
    use_methods(Probe)
    result = read(make_runner(tmp_path, tiny_backbone, data_root).run_job(
        Job(load_protocol("base2new"), Probe.name, "oxford_pets", 16, 1)))
    history = result["training"]["loss_per_epoch"]
    assert set(history) == {"loss", "ce", "norm"} and all(len(v) == 2 for v in history.values())
    assert history["loss"] == pytest.approx(history["ce"])  # loss = ce + 0 * ...
    assert result["training"]["skipped_steps"] == 0
    assert result["timing"]["train_cpu_seconds"] > 0 and result["timing"]["eval_cpu_seconds"] > 0
    assert validate_result(result) == []


def test_a_refused_recipe_stops_the_grid_before_any_job(tmp_path, tiny_checkpoint, data_root, capsys):
    from benchsuite.cli import main

    results = tmp_path / "results"
    code = main(["run", "--protocol", "base2new", "--method", "zeroshot_clip", "coop", "--dataset", "eurosat",
                 "--seeds", "1", "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint),
                 "--data-root", str(data_root), "--results", str(results), "--feature-cache",
                 str(tmp_path / "features"), "--set", "epochs=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "warmup_epochs=1 is not shorter than epochs=1" in err and len(err.strip().splitlines()) == 1, err
    assert not (results / "base2new").exists()  # not even the zero-shot job ran


class UnsavableState(Probe):
    """Keeps a running statistic as a numpy scalar: a resumed job could not read it back."""
    name = "unsavable_state"
    epochs = 50
    seen: list = []

    @hookimpl
    def training_state(self):
        import numpy as np

        return {"running_mean": np.float64(0.5)}

    @hookimpl
    def load_training_state(self, state):
        pass


def test_training_state_a_checkpoint_cannot_hold_is_found_before_training(tmp_path, tiny_backbone, data_root,
                                                                          use_methods):
    UnsavableState.seen = []
    use_methods(UnsavableState)
    runner = make_runner(tmp_path, tiny_backbone, data_root)
    with pytest.raises(ContractError, match=r"hook training_state: state\['running_mean'\] is a numpy.float64.*"
                                            r"one-batch check"):
        runner.run_job(Job(load_protocol("base2new"), UnsavableState.name, "oxford_pets", 16, 1))
    assert [s[0] for s in UnsavableState.seen] == ["setup", "train"]  # one step, not the first of 50 epochs
