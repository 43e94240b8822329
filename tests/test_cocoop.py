"""CoCoOp (methods.md 4.3): the meta-net shift, per-image prompts in one batched call, recipe, a toy run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import benchsuite.clip.prompts as prompts_module
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.protocols import load_protocol
from benchsuite_plugins.cocoop import CoCoOp
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]


def recipe(protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    from benchsuite.engine.recipe import HARNESS_DEFAULTS

    return {**HARNESS_DEFAULTS, **CoCoOp().recipe(load_protocol(protocol), dataset, shots)}


def setup_cocoop(backbone, classnames=CLASSNAMES, **overrides):
    method = CoCoOp()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset="caltech101",
                       template="a photo of a {}.", recipe={**recipe(), **overrides},
                       protocol=load_protocol("base2new"), shots=16, seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx)


def image_features(backbone, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return backbone.encode_image(torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen))


@pytest.fixture(scope="module")
def vit_b16():
    from benchsuite.clip.backbone import load_backbone

    return load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")


def test_parameter_count_on_vit_b16_shapes(vit_b16):
    torch.manual_seed(0)
    _, module = setup_cocoop(vit_b16)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters() if p.requires_grad}
    assert shapes == {"ctx": (4, 512), "meta_net.linear1.weight": (32, 512), "meta_net.linear1.bias": (32,),
                      "meta_net.linear2.weight": (512, 32), "meta_net.linear2.bias": (512,)}
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 35_360  # methods.md 4.3


def test_meta_net_widths_follow_the_backbone(tiny_backbone):
    _, module = setup_cocoop(tiny_backbone)
    e, d = tiny_backbone.embed_dim, tiny_backbone.text_width
    assert module.meta_net.linear1.in_features == e and module.meta_net.linear1.out_features == e // 16
    assert module.meta_net.linear2.out_features == d


def test_meta_net_shifts_every_context_token_by_the_same_vector(tiny_backbone):
    torch.manual_seed(0)
    _, module = setup_cocoop(tiny_backbone)
    f = F.normalize(image_features(tiny_backbone, 3), dim=-1)
    contexts = module.contexts(f)
    assert contexts.shape == (3, 4, tiny_backbone.text_width)
    shift = contexts - module.ctx.unsqueeze(0)
    expected = module.meta_net.linear2(torch.relu(module.meta_net.linear1(f)))
    for m in range(4):
        torch.testing.assert_close(shift[:, m], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(shift[0], shift[1])  # the shift depends on the image


def test_zero_shift_with_word_init_is_zero_shot_clip(tiny_backbone):
    """With the meta-net's output forced to zero, every image's prompt is "a photo of a <class>."."""
    method, module = setup_cocoop(tiny_backbone)
    with torch.no_grad():
        module.meta_net.linear2.weight.zero_()
        module.meta_net.linear2.bias.zero_()
        features = image_features(tiny_backbone, 4)
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=torch.zeros(4, dtype=torch.long), image_features=features))
        tokens = tiny_backbone.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
        text = F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1)
        expected = tiny_backbone.model.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


def count_text_calls(monkeypatch, backbone) -> list[int]:
    """Sequences per text-encoder call, recorded while the test runs."""
    calls: list[int] = []
    original = type(backbone).encode_embeddings

    def spy(self, embeddings, *args, **kwargs):
        calls.append(embeddings.shape[0])
        return original(self, embeddings, *args, **kwargs)

    monkeypatch.setattr(type(backbone), "encode_embeddings", spy)
    return calls


def test_batched_logits_equal_the_per_image_loop_with_one_call(tiny_backbone, monkeypatch):
    torch.manual_seed(0)
    method, module = setup_cocoop(tiny_backbone)
    torch.nn.init.normal_(module.meta_net.linear2.weight, std=0.5)  # a visible per-image shift
    features = image_features(tiny_backbone, 6)
    labels = torch.arange(6) % len(CLASSNAMES)
    calls = count_text_calls(monkeypatch, tiny_backbone)
    batched = method.train_step(TrainBatch(torch.empty(0), labels, features), 0)["loss"]
    assert calls == [6 * len(CLASSNAMES)]  # one call serves every image of the step
    grads = torch.autograd.grad(batched, [module.ctx, module.meta_net.linear1.weight])

    calls.clear()
    method.batched = False  # the official per-image loop (benchmark switch)
    looped = method.train_step(TrainBatch(torch.empty(0), labels, features), 0)["loss"]
    assert calls == [len(CLASSNAMES)] * 6
    loop_grads = torch.autograd.grad(looped, [module.ctx, module.meta_net.linear1.weight])
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, loop_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        method.batched = True
        calls.clear()
        fast = method.predict(EvalBatch(labels=labels, image_features=features))
        assert calls == [6 * len(CLASSNAMES)]
        method.batched = False
        slow = method.predict(EvalBatch(labels=labels, image_features=features))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-6)
    image = F.normalize(features, dim=-1)
    text = torch.stack([F.normalize(module.prompts.encode(c), dim=-1) for c in module.contexts(image)]).detach()
    manual = tiny_backbone.logit_scale * torch.stack([image[i] @ text[i].t() for i in range(6)])
    torch.testing.assert_close(fast, manual, atol=1e-4, rtol=1e-5)


def test_large_class_sets_are_chunked_at_evaluation(tiny_backbone, monkeypatch):
    method, _ = setup_cocoop(tiny_backbone)
    names = [f"class {i}" for i in range(30)]
    features = image_features(tiny_backbone, 7)
    with torch.no_grad():
        method.prepare_eval(names, "caltech101", "a photo of a {}.")
        whole = method.predict(EvalBatch(labels=torch.zeros(7, dtype=torch.long), image_features=features))
        monkeypatch.setattr(prompts_module, "EVAL_CHUNK", 64)
        calls = count_text_calls(monkeypatch, tiny_backbone)
        chunked = method.predict(EvalBatch(labels=torch.zeros(7, dtype=torch.long), image_features=features))
    assert len(calls) == math.ceil(7 * 30 / 64) and max(calls) <= 64
    assert whole.shape == (7, 30)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-6)


def test_training_updates_context_and_meta_net_only(tiny_backbone):
    torch.manual_seed(0)
    method, module = setup_cocoop(tiny_backbone)
    features = image_features(tiny_backbone, 10)
    labels = torch.arange(10) % len(CLASSNAMES)
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == 5
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    start = [p.detach().clone() for p in params]
    losses = []
    for _ in range(10):
        out = method.train_step(TrainBatch(torch.empty(0), labels, features), 0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(p.detach(), s) for p, s in zip(params, start))
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert set(module.state_dict()) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                        "meta_net.linear2.weight", "meta_net.linear2.bias"}


@pytest.mark.parametrize("protocol", ["base2new", "cross_dataset", "domain_generalization", "few_shot"])
def test_recipe_is_the_published_config(protocol):
    r = recipe(protocol, "imagenet" if protocol != "base2new" else "caltech101", 16)
    assert (r["epochs"], r["batch_size"], r["lr"], r["n_ctx"], r["ctx_init"]) == (10, 1, 0.002, 4, "a photo of a")
    assert (r["momentum"], r["weight_decay"], r["warmup_epochs"], r["warmup_lr"]) == (0.9, 5e-4, 1, 1e-5)
    assert r["batched_text"] is True


def test_base2new_job_through_the_cli(tmp_path, tiny_checkpoint, tiny_backbone, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "cocoop",
                                        "--dataset", "eurosat", "--seeds", "1", "--set", "epochs=2", "--quiet"))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    e, d = tiny_backbone.embed_dim, tiny_backbone.text_width
    assert result["method"]["trainable_params"] == 4 * d + (e * (e // 16) + e // 16) + (e // 16 * d + d)
    assert set(result["metrics"]) == {"base", "new"}
    assert result["method"]["recipe"]["batch_size"] == 1
