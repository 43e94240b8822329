"""Tip-Adapter and Tip-Adapter-F: the official recipe, cache model, search grid and selective use of
the cache (new classes and other datasets score as zero-shot CLIP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.hookspecs import LabelSpace
from benchsuite.protocols import load_protocol
from benchsuite_plugins.tip_adapter import TipAdapter, TipAdapterF, cache_logits, search_grid
from test_run import load_results, run_quiet


def test_recipes_follow_the_official_configs():
    fs = load_protocol("few_shot")
    assert TipAdapter().recipe(fs, "dtd", 16) == {"epochs": 0, "init_beta": 1.0, "init_alpha": 2.0,
                                                  "search_scale": [13.0, 13.0], "search_hp": True}
    f = TipAdapterF().recipe(fs, "eurosat", 16)
    assert (f["epochs"], f["batch_size"], f["lr"], f["optimizer"], f["eps"], f["weight_decay"]) == \
        (100, 256, 0.001, "adamw", 1e-4, 0.01)
    assert f["lr_schedule"] == "cosine_per_iteration" and f["warmup_epochs"] == 0
    assert TipAdapterF().recipe(fs, "oxford_flowers", 4)["init_alpha"] == 10.0
    assert TipAdapter.fit_views == 10


def test_search_grid_is_the_official_one():
    grid = search_grid(13.0, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1) and grid[-1] == pytest.approx(199 * 12.9 / 200 + 0.1)


class _Backbone:
    logit_scale = torch.tensor(100.0)

    def fp32(self):
        import contextlib
        return contextlib.nullcontext()

    def encode_text(self, texts):
        torch.manual_seed(len(texts))
        return torch.randn(len(texts), 8)

    from benchsuite.clip.backbone import Backbone
    template_classifier = Backbone.template_classifier  # the real one, on this fake encoder


def _fitted(views: int = 3):
    method = TipAdapter()
    method.backbone = _Backbone()
    method.recipe_ = {"epochs": 0, "search_hp": False, "init_beta": 1.0, "init_alpha": 2.0}
    method.classnames, method.template = ["cat", "dog"], "a photo of a {}."
    method.beta, method.alpha = 1.0, 2.0
    torch.manual_seed(0)
    features, labels = torch.randn(views, 4, 8), torch.tensor([0, 0, 1, 1])
    method.fit_features(features, labels, None, None)
    return method, features, labels


def test_cache_keys_are_the_normalised_mean_of_the_raw_views():
    method, features, labels = _fitted()
    assert torch.allclose(method.keys, F.normalize(features.mean(0), dim=-1))
    assert torch.equal(method.values_for(["cat", "dog"]), F.one_hot(labels).float())
    # the evaluated order decides the columns; a class not evaluated has none
    assert torch.equal(method.values_for(["dog", "bird"]), torch.tensor([[0., 0.], [0., 0.], [1., 0.], [1., 0.]]))


def test_logits_are_zero_shot_plus_the_cache_term_and_new_classes_are_zero_shot():
    method, features, labels = _fitted()
    test = torch.randn(5, 8)
    from benchsuite.hookspecs import EvalBatch

    method.prepare_eval(["cat", "dog"], "pets", "a photo of a {}.", LabelSpace.of("pets", ["cat", "dog"], "pets",
                                                                                   ["cat", "dog"]))
    got = method.predict(EvalBatch(labels=torch.zeros(5), image_features=test))
    f = F.normalize(test, dim=-1)
    w = method.zero_shot_weights(["cat", "dog"], "a photo of a {}.")
    expected = 100 * f @ w.t() + 2.0 * cache_logits(f @ method.keys.t(), F.one_hot(labels).float(), 1.0)
    assert torch.allclose(got, expected)
    method.prepare_eval(["bird", "fish"], "pets", "a photo of a {}.", LabelSpace.of("pets", ["cat", "dog"], "pets",
                                                                                     ["bird", "fish"]))
    new = method.predict(EvalBatch(labels=torch.zeros(5), image_features=test))
    assert torch.allclose(new, 100 * f @ method.zero_shot_weights(["bird", "fish"], "a photo of a {}.").t())


def _run(tmp_path, tiny_checkpoint, data_root, *methods: str):
    code, out, err = run_quiet(["run", "--protocol", "base2new", "--method", *methods, "--dataset", "eurosat",
                                "--seeds", "1", "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint),
                                "--data-root", str(data_root), "--results", str(tmp_path / "r"),
                                "--feature-cache", str(tmp_path / "f"), "--quiet", "--set", "tip_adapter_f.epochs=2"])
    assert code == 0, out + err
    return {key[0]: result for key, result in load_results(tmp_path / "r").items()}


def test_both_run_base_to_new_and_score_new_classes_as_zero_shot(tmp_path, tiny_checkpoint, data_root):
    results = _run(tmp_path, tiny_checkpoint, data_root, "tip_adapter", "tip_adapter_f", "zeroshot_clip")
    zero_shot = results["zeroshot_clip"]["metrics"]["new"]["accuracy"]
    for name in ("tip_adapter", "tip_adapter_f"):
        assert results[name]["metrics"]["new"]["accuracy"] == zero_shot
    tip, tipf = results["tip_adapter"], results["tip_adapter_f"]
    assert tip["method"]["trainable_params"] == 0 and tip["timing"]["train_images"] == 0
    assert tip["timing"]["fit_seconds"] > 0 and "fit_seconds" not in results["zeroshot_clip"]["timing"]
    n, width = tipf["data"]["train"]["n_images"], 32  # bs-tiny-test's embedding width
    assert tipf["method"]["trainable_params"] == n * width  # the cache keys, nothing else
    assert tipf["method"]["recipe"]["optimizer"] == "adamw"
