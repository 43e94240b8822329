"""CLIP-Adapter (gaopengcuhk/CLIP-Adapter `clip_adapter.py`): architecture, residual mixing, recipe and a run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.engine.recipe import HARNESS_DEFAULTS
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.protocols import load_protocol
from benchsuite.results.validate import validate_result
from benchsuite_plugins.clip_adapter import Adapter, CLIPAdapter, mix
from benchsuite_plugins.zeroshot_clip import ZeroshotCLIP
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
PET = "a photo of a {}, a type of pet."


def recipe(protocol: str = "few_shot", dataset: str = "caltech101", shots: int = 16) -> dict:
    return {**HARNESS_DEFAULTS, **CLIPAdapter().recipe(load_protocol(protocol), dataset, shots)}


def setup_adapter(backbone, classnames=CLASSNAMES, template=PET, **overrides):
    method = CLIPAdapter()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset="oxford_pets", template=template,
                       recipe={**recipe(), **overrides}, protocol=load_protocol("few_shot"), shots=16, seed=1,
                       device=torch.device("cpu"))
    return method, method.setup(ctx)


def features(backbone, n: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return backbone.encode_image(torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen))


@pytest.mark.parametrize("protocol,dataset,shots,epochs", [
    ("few_shot", "caltech101", 1, 50), ("few_shot", "caltech101", 2, 100), ("few_shot", "dtd", 4, 100),
    ("few_shot", "eurosat", 8, 200), ("few_shot", "ucf101", 16, 200), ("few_shot", "imagenet", 16, 50),
    ("few_shot", "imagenet", 1, 50), ("base2new", "caltech101", 16, 200), ("base2new", "imagenet", 16, 50),
    ("cross_dataset", "imagenet", 16, 50), ("domain_generalization", "imagenet", 16, 50),
])
def test_recipe_is_coops_schedule(protocol, dataset, shots, epochs):
    r = recipe(protocol, dataset, shots)
    assert r["epochs"] == epochs
    assert (r["batch_size"], r["lr"], r["ratio"], r["reduction"]) == (32, 0.002, 0.2, 4)
    assert (r["momentum"], r["weight_decay"], r["warmup_epochs"], r["warmup_lr"]) == (0.9, 5e-4, 1, 1e-5)
    assert r.get("optimizer", "sgd") == "sgd" and r["model_selection"] == "last_epoch"


def test_adapter_is_the_official_bottleneck():
    adapter = Adapter(512, 4)
    layers = list(adapter.fc)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert [tuple(m.weight.shape) for m in layers[::2]] == [(128, 512), (512, 128)]
    assert all(m.bias is None for m in layers[::2])
    assert set(adapter.state_dict()) == {"fc.0.weight", "fc.2.weight"}  # the official keys
    assert sum(p.numel() for p in adapter.parameters()) == 131_072  # ViT-B/16: 512^2 / 2
    x = torch.randn(6, 512)
    assert (adapter(x) >= 0).all()  # the official adapter ends with a ReLU too


def test_logits_mix_the_raw_features_then_take_cosines(tiny_backbone):
    method, module = setup_adapter(tiny_backbone)
    f = features(tiny_backbone)
    expected_text = F.normalize(tiny_backbone.encode_text([PET.format(c.replace("_", " ")) for c in CLASSNAMES]),
                                dim=-1)
    torch.testing.assert_close(method.text_features, expected_text)
    mixed = 0.2 * module(f) + 0.8 * f  # on the raw, unnormalised features
    expected = tiny_backbone.logit_scale * F.normalize(mixed, dim=-1) @ expected_text.t()
    with torch.no_grad():
        got = method.predict(EvalBatch(labels=torch.zeros(8, dtype=torch.long), image_features=f))
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32
    torch.testing.assert_close(mix(module, f, 0.2), mixed)


def test_ratio_zero_is_zero_shot_clip(tiny_backbone):
    method, _ = setup_adapter(tiny_backbone, ratio=0.0)
    zero_shot = ZeroshotCLIP()
    zero_shot.backbone = tiny_backbone
    f = features(tiny_backbone)
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "oxford_pets", PET)
        zero_shot.prepare_eval(CLASSNAMES, "oxford_pets", PET)
        batch = EvalBatch(labels=torch.zeros(8, dtype=torch.long), image_features=f)
        torch.testing.assert_close(method.predict(batch), zero_shot.predict(batch))


def test_a_bad_ratio_is_one_line(tiny_backbone):
    from benchsuite.errors import BenchsuiteError

    with pytest.raises(BenchsuiteError, match="ratio=1.5 must lie in"):
        setup_adapter(tiny_backbone, ratio=1.5)


def test_only_the_adapter_learns_and_text_is_encoded_once(tiny_backbone, monkeypatch):
    method, module = setup_adapter(tiny_backbone)
    calls = []
    monkeypatch.setattr(type(tiny_backbone), "encode_text", lambda self, texts: calls.append(texts))
    f = features(tiny_backbone)
    labels = torch.arange(8) % len(CLASSNAMES)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        out = method.train_step(TrainBatch(torch.empty(0), labels, f), 0)
        assert set(out) == {"loss"} and out["loss"].dtype == torch.float32
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert calls == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert losses[-1] < losses[0]


def test_new_classes_get_their_own_text_classifier(tiny_backbone):
    method, _ = setup_adapter(tiny_backbone)
    new = ["chair", "water_lilly", "yin yang"]
    with torch.no_grad():
        method.prepare_eval(new, "caltech101", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=torch.zeros(8, dtype=torch.long), image_features=features(tiny_backbone)))
    assert logits.shape == (8, 3)


def test_base2new_run_on_the_fixture_world(tmp_path, tiny_checkpoint, data_root):
    results = tmp_path / "r"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "clip_adapter",
                                        "--dataset", "eurosat", "--seeds", "1", "--set", "clip_adapter.epochs=2",
                                        "--quiet"))
    assert code == 0, out + err
    ((key, result),) = load_results(results).items()
    assert validate_result(result) == []
    assert result["method"]["trainable_params"] == 32 * 32 // 2  # bs-tiny-test: 32-wide embedding
    assert result["method"]["recipe"]["ratio"] == 0.2 and result["method"]["recipe"]["epochs"] == 2
    assert set(result["metrics"]) == {"base", "new"}
    assert len(result["training"]["loss_per_epoch"]["loss"]) == 2
