"""Contract v3: evaluation label space, declared setting, parameter groups and optimizers, a private
backbone copy for methods that train encoder parts, and frozen training features for fit_features."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.integrity import backbone_print, changes
from benchsuite.engine.train import make_optimizer, parameter_groups, set_group_lrs
from benchsuite.errors import ContractError
from benchsuite.hookspecs import PROJECT, LabelSpace, MethodSpec, hookimpl
from benchsuite_plugins.zeroshot_clip import ZeroshotCLIP
from test_run import load_results, run_quiet




def _run(tmp_path, tiny_checkpoint, data_root, method: str, *extra: str, name: str = "r"):
    code, out, err = run_quiet(["run", "--protocol", "base2new", "--method", method, "--dataset", "eurosat",
                                "--seeds", "1", "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint),
                                "--data-root", str(data_root), "--results", str(tmp_path / name),
                                "--feature-cache", str(tmp_path / f"{name}-features"), "--quiet", *extra])
    return code, out + err, load_results(tmp_path / name)


# ---- label space ---------------------------------------------------------------------------------

@pytest.mark.parametrize("classes,kind,seen", [
    (["cat", "dog"], "base", (True, True)),
    (["dog"], "base", (True,)),
    (["car", "bus"], "new", (False, False)),
    (["Cat", "dog", "car"], "all", (True, True, False)),
    (["cat", "car"], "mixed", (True, False)),
])
def test_label_space_kinds_and_seen_mask(classes, kind, seen):
    space = LabelSpace.of("pets", ["cat", "dog"], "pets", classes)
    assert (space.kind, space.seen, space.same_dataset) == (kind, seen, True)
    assert LabelSpace.of("pets", ["cat"], "other", ["cat"]).same_dataset is False


class SpaceAware(ZeroshotCLIP):
    """Zero-shot that records the label space of every evaluation it is prepared for."""

    name = "space_aware"
    spaces: list = []

    @hookimpl
    def prepare_eval(self, classnames, dataset, template, label_space):
        type(self).spaces.append((len(classnames), label_space))
        return super().prepare_eval(classnames, dataset, template)


def test_base_and_new_evaluations_say_so(with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(SpaceAware)
    SpaceAware.spaces = []
    code, text, results = _run(tmp_path, tiny_checkpoint, data_root, "space_aware")
    assert code == 0, text
    kinds = [(n, space.kind, all(space.seen) if space.kind == "base" else any(space.seen))
             for n, space in SpaceAware.spaces]
    assert [k for _, k, _ in kinds] == ["base", "new"]
    assert all(flag is (k == "base") for _, k, flag in kinds)


# ---- declared setting ----------------------------------------------------------------------------

class External(ZeroshotCLIP):
    name = "external"
    setting = "external-text"


class BadSetting(ZeroshotCLIP):
    name = "bad_setting"
    setting = "semi-supervised"


def test_the_setting_is_recorded_and_an_unknown_one_is_refused(with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(External, BadSetting)
    code, text, results = _run(tmp_path, tiny_checkpoint, data_root, "external")
    assert code == 0, text
    (result,) = results.values()
    assert result["method"]["setting"] == "external-text"
    board = tmp_path / "board.md"
    code, out, err = run_quiet(["leaderboard", "--results", str(tmp_path / "r"), "--out", str(board), "--no-plots"])
    assert r"external \[external-text\]" in board.read_text(), out + err  # marked (markdown-escaped) on the board, never silently ranked
    code, text, _ = _run(tmp_path, tiny_checkpoint, data_root, "bad_setting", name="bad")
    assert code != 0 and "setting 'semi-supervised' is not one of inductive" in text and "Traceback" not in text


# ---- parameter groups and optimizers ---------------------------------------------------------------

class TwoGroups(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fast = torch.nn.Parameter(torch.ones(3))
        self.slow = torch.nn.Parameter(torch.ones(3))


class _Groups:
    def __init__(self, answer):
        self.answer = answer

    @hookimpl
    def param_groups(self, module):
        return self.answer(module)


def _pm(answer):
    import pluggy

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(MethodSpec)
    pm.register(_Groups(answer))
    return pm


RECIPE = {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9}


def test_parameter_groups_keep_their_own_rate_under_the_schedule():
    module = TwoGroups()
    groups = parameter_groups(_pm(lambda m: [{"params": [m.fast]}, {"params": [m.slow], "lr": 0.01}]), "m", module,
                              RECIPE)
    optimizer = make_optimizer(groups, RECIPE)
    set_group_lrs(optimizer, 0.05, RECIPE, in_warmup=False)  # the cosine at half the base rate
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, pytest.approx(0.005)]
    set_group_lrs(optimizer, 1e-5, RECIPE, in_warmup=True)  # Dassl's constant warm-up: one rate for all
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-5]


@pytest.mark.parametrize("answer,message", [
    (lambda m: [{"params": [m.fast]}], "in no group"),
    (lambda m: [{"params": [m.fast, m.slow]}, {"params": [m.slow]}], "more than one group"),
    (lambda m: [{"params": [m.fast, m.slow, torch.nn.Parameter(torch.ones(1))]}], "not a trainable parameter"),
    (lambda m: [{"params": [m.fast, m.slow], "momentum": 0.5}], "unknown keys"),
])
def test_bad_parameter_groups_are_contract_errors(answer, message):
    with pytest.raises(ContractError, match=message):
        parameter_groups(_pm(answer), "m", TwoGroups(), RECIPE)


@pytest.mark.parametrize("kind,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_the_recipe_chooses_the_optimizer_and_its_eps(kind, cls):
    optimizer = make_optimizer(list(TwoGroups().parameters()), {**RECIPE, "optimizer": kind, "eps": 1e-3})
    assert type(optimizer) is cls
    if kind != "sgd":
        assert optimizer.defaults["eps"] == 1e-3


class TunesLayerNorm(ZeroshotCLIP):
    """Trains the last LayerNorm of its private copy of the image encoder (2SFS-style stage 1), with
    Adam at its own learning rate; the shared backbone stays untouched."""

    name = "tunes_ln"
    image_input = "images"
    shared_prints: list = []

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 2, "batch_size": 8, "lr": 1e-3, "optimizer": "adamw", "eps": 1e-6, "weight_decay": 0.0,
                "warmup_epochs": 0, "template": "coop_custom"}

    @hookimpl
    def setup(self, ctx):
        type(self).shared_prints.append(backbone_print(ctx.backbone.model))
        self.backbone = ctx.private_backbone()
        self.module = torch.nn.Module()
        self.module.clip = self.backbone.model
        self.module.clip.visual.ln_post.requires_grad_(True)
        self.classnames, self.template = ctx.classnames, ctx.template
        return self.module

    @hookimpl
    def param_groups(self, module):
        return [{"params": list(module.clip.visual.ln_post.parameters()), "lr": 5e-3}]

    @hookimpl
    def train_step(self, batch, epoch):
        from benchsuite.data.registry import format_template

        text = F.normalize(self.backbone.encode_text([format_template(self.template, n)
                                                      for n in self.classnames]).float(), dim=-1)
        image = F.normalize(self.backbone.encode_image(batch.images).float(), dim=-1)
        with self.backbone.fp32():
            return {"loss": F.cross_entropy(self.backbone.logit_scale * image @ text.t(), batch.labels)}

    @hookimpl
    def predict(self, batch):
        with self.backbone.fp32():
            image = F.normalize(self.backbone.encode_image(batch.images).float(), dim=-1)
            return self.backbone.logit_scale * image @ self.text_features.t()


def test_a_method_trains_encoder_parts_on_its_private_copy(with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(TunesLayerNorm)
    TunesLayerNorm.shared_prints = []
    code, text, results = _run(tmp_path, tiny_checkpoint, data_root, "tunes_ln")
    assert code == 0, text
    (result,) = results.values()
    assert result["method"]["trainable_params"] == 2 * 64  # ln_post's weight and bias of the width-64 encoder
    assert result["method"]["recipe"]["optimizer"] == "adamw"
    assert result["training"]["loss_per_epoch"]["loss"][1] < result["training"]["loss_per_epoch"]["loss"][0]
    zs_code, zs_text, zs = _run(tmp_path, tiny_checkpoint, data_root, "zeroshot_clip", name="zs")
    assert zs_code == 0
    (zero_shot,) = zs.values()
    assert result["metrics"] != zero_shot["metrics"]  # it trained something
    first, later = TunesLayerNorm.shared_prints[0], TunesLayerNorm.shared_prints[-1]
    assert changes(first, later) == []  # the one-batch check and the job left the shared backbone alone


def test_an_unknown_optimizer_is_one_line(with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(TunesLayerNorm)
    code, text, _ = _run(tmp_path, tiny_checkpoint, data_root, "tunes_ln", "--set", "tunes_ln.optimizer=lamb")
    assert code == 2 and "optimizer='lamb' is not one of sgd, adam, adamw" in text and "Traceback" not in text


# ---- frozen training features --------------------------------------------------------------------

class Prototypes(ZeroshotCLIP):
    """Training-free: class means of the fit features (two augmented views) mixed into zero-shot."""

    name = "prototypes"
    fit_views = 2
    shapes: list = []

    @hookimpl
    def fit_features(self, features, labels):
        type(self).shapes.append((tuple(features.shape), tuple(labels.shape), torch.is_grad_enabled()))
        feats = F.normalize(features.mean(0), dim=-1)
        self.means = torch.stack([feats[labels == c].mean(0) for c in range(int(labels.max()) + 1)])

    @hookimpl
    def predict(self, batch):
        logits = super().predict(batch)
        if logits.shape[1] == self.means.shape[0]:  # base classes: add the prototype scores
            logits = logits + 10.0 * F.normalize(batch.image_features.float(), dim=-1) @ F.normalize(self.means, dim=-1).t()
        return logits


def test_fit_features_get_every_training_image_under_each_view_once_and_reproducibly(
        with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(Prototypes)
    Prototypes.shapes = []
    code, text, results = _run(tmp_path, tiny_checkpoint, data_root, "prototypes")
    assert code == 0, text
    ((shape, labels, grad),) = Prototypes.shapes
    (result,) = results.values()
    assert shape[0] == 2 and shape[1] == labels[0] == result["data"]["train"]["n_images"] and grad is False
    code, text, again = _run(tmp_path, tiny_checkpoint, data_root, "prototypes", name="again")
    assert code == 0 and next(iter(again.values()))["metrics"] == result["metrics"]


# ---- iteration budgets -----------------------------------------------------------------------------

def test_iteration_lr_is_torchs_cosine_annealing_per_step():
    from benchsuite.engine.train import iteration_lr

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 40, eta_min=1e-6)
    expected = []
    for _ in range(40):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [iteration_lr(i, 40, 2e-4, 1e-6) for i in range(40)] == pytest.approx(expected, rel=1e-12)


class CountsSteps(TunesLayerNorm):
    """An iteration budget: records the epoch of every optimizer step."""

    name = "counts_steps"
    rates: list = []

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 0, "iterations": 7, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-5, "optimizer": "adamw",
                "weight_decay": 0.0, "warmup_epochs": 0, "template": "coop_custom"}

    @hookimpl
    def setup(self, ctx):
        type(self).rates = []  # the one-batch check's instance is set up first: count the real job's steps
        return super().setup(ctx)

    @hookimpl
    def train_step(self, batch, epoch):
        out = super().train_step(batch, epoch)
        type(self).rates.append(epoch)
        return out


def test_an_iteration_budget_runs_exactly_that_many_steps_across_epochs(with_methods, tmp_path, tiny_checkpoint,
                                                                        data_root):
    with_methods(CountsSteps)
    CountsSteps.rates = []
    code, text, results = _run(tmp_path, tiny_checkpoint, data_root, "counts_steps")
    assert code == 0, text
    (result,) = results.values()
    n_images = result["data"]["train"]["n_images"]
    per_epoch = -(-n_images // 8)
    assert len(CountsSteps.rates) == 7  # exactly the budget, the last pass cut short
    assert CountsSteps.rates == [i // per_epoch for i in range(7)]
    assert result["training"]["loss_per_epoch"]["loss"] and len(result["training"]["loss_per_epoch"]["loss"]) == \
        -(-7 // per_epoch)


@pytest.mark.parametrize("setting,message", [
    ("counts_steps.epochs=3", "both epochs=3 and iterations=7"),
    ("counts_steps.warmup_epochs=1", "has no warm-up"),
    ("counts_steps.iterations=2.5", "'iterations' takes an integer"),
    ("counts_steps.iterations=-3", "must be a whole number"),
])
def test_bad_iteration_budgets_are_one_line(setting, message, with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(CountsSteps)
    code, text, _ = _run(tmp_path, tiny_checkpoint, data_root, "counts_steps", "--set", setting)
    assert code == 2 and message in text and "Traceback" not in text, text


def test_a_generic_epochs_setting_turns_an_iteration_budget_into_epochs(with_methods, tmp_path, tiny_checkpoint,
                                                                        data_root):
    """`--set epochs=2` (every trained method) trains an iteration-budget method for 2 epochs, as it
    does every other method, instead of refusing the run."""
    with_methods(CountsSteps)
    code, text, results = _run(tmp_path, tiny_checkpoint, data_root, "counts_steps", "--set", "epochs=2")
    assert code == 0, text
    (result,) = results.values()
    assert (result["method"]["recipe"]["epochs"], result["method"]["recipe"]["iterations"]) == (2, 0)
    assert len(result["training"]["loss_per_epoch"]["loss"]) == 2
