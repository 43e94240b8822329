"""KgCoOp (methods.md 4.5): the knowledge-guidance term, its anchor, recipe and a toy run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.prompts import context_from_words, random_context
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.protocols import load_protocol
from benchsuite_plugins.kgcoop import KgCoOp, kg_score
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
PHOTO = "a photo of a {}."


def recipe(protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    from benchsuite.engine.recipe import HARNESS_DEFAULTS

    return {**HARNESS_DEFAULTS, **KgCoOp().recipe(load_protocol(protocol), dataset, shots)}


def setup_kgcoop(backbone, classnames=CLASSNAMES, dataset="caltech101", template=PHOTO, **overrides):
    method = KgCoOp()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset=dataset, template=template,
                       recipe={**recipe(), **overrides}, protocol=load_protocol("base2new"), shots=16, seed=1,
                       device=torch.device("cpu"))
    return method, method.setup(ctx)


def plain_text_features(backbone, texts):
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(backbone.tokenize(texts)), dim=-1)


def batch(backbone, n: int = 8) -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = backbone.encode_image(torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen))
    return TrainBatch(torch.empty(0), torch.arange(n) % len(CLASSNAMES), features)


def test_parameter_count_on_vit_b16_shapes():
    from benchsuite.clip.backbone import load_backbone

    backbone = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module = setup_kgcoop(backbone)
    assert [(n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad] == [("ctx", (4, 512))]
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 2_048  # methods.md 4.5
    assert set(module.state_dict()) == {"ctx"}  # the anchor is rebuilt per class set, never saved


def test_kg_term_is_zero_when_the_context_reproduces_the_hand_crafted_prompt(tiny_backbone):
    """ctx = the embeddings of "a photo of a" makes every learned prompt the template's text."""
    method, module = setup_kgcoop(tiny_backbone)
    torch.testing.assert_close(module.ctx.detach(), context_from_words(tiny_backbone, "a photo of a", 4))
    out = method.train_step(batch(tiny_backbone), 0)
    assert abs(float(out["kg"].detach())) < 1e-6
    torch.testing.assert_close(out["loss"], out["ce"], atol=1e-5, rtol=0)
    with torch.no_grad():
        module.ctx.copy_(random_context(4, tiny_backbone.text_width))
    moved = method.train_step(batch(tiny_backbone), 0)
    assert float(moved["kg"].detach()) > 1e-3
    torch.testing.assert_close(moved["loss"], moved["ce"] + 8.0 * moved["kg"])


def test_kg_term_is_half_the_papers_squared_l2(tiny_backbone):
    torch.manual_seed(0)
    text = F.normalize(torch.randn(6, 16), dim=-1)
    anchor = F.normalize(torch.randn(6, 16), dim=-1)
    paper = ((text - anchor) ** 2).sum(-1).mean()
    torch.testing.assert_close(kg_score(text, anchor), paper / 2)
    cosines = torch.stack([text[c] @ anchor[c] for c in range(6)])
    torch.testing.assert_close(kg_score(text, anchor), 1 - cosines.mean())


def test_anchor_uses_kgcoop_templates(tiny_backbone):
    _, module = setup_kgcoop(tiny_backbone, dataset="dtd", template="{} texture.")
    expected = plain_text_features(tiny_backbone, [f"a photo of a {c.replace('_', ' ')}, a type of texture."
                                                   for c in CLASSNAMES])
    torch.testing.assert_close(module.anchor, expected, atol=1e-5, rtol=0)
    _, pets = setup_kgcoop(tiny_backbone, dataset="oxford_pets", template="a photo of a {}, a type of pet.")
    expected = plain_text_features(tiny_backbone, [f"a photo of a {c.replace('_', ' ')}, a type of pet."
                                                   for c in CLASSNAMES])
    torch.testing.assert_close(pets.anchor, expected, atol=1e-5, rtol=0)


def test_anchor_is_computed_once_not_per_step(tiny_backbone, monkeypatch):
    method, module = setup_kgcoop(tiny_backbone)
    anchor = module.anchor.clone()
    calls = []
    monkeypatch.setattr(type(tiny_backbone), "encode_text", lambda self, texts: calls.append(texts))
    optimizer = torch.optim.SGD([module.ctx], lr=0.01, momentum=0.9)
    for _ in range(3):
        out = method.train_step(batch(tiny_backbone), 0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert calls == []
    assert torch.equal(module.anchor, anchor)
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_kg_gradient_pulls_towards_the_anchor(tiny_backbone):
    """Descending on the KG term alone lowers it (its gradient reaches the context)."""
    torch.manual_seed(0)
    method, module = setup_kgcoop(tiny_backbone, ctx_init="", w=8.0)
    first = method.train_step(batch(tiny_backbone), 0)["kg"]
    first.backward()
    assert module.ctx.grad is not None and module.ctx.grad.abs().sum() > 0
    with torch.no_grad():
        module.ctx -= 0.5 * module.ctx.grad / module.ctx.grad.norm()
    assert float(method.train_step(batch(tiny_backbone), 0)["kg"]) < float(first)


def test_predict_is_coop_logits(tiny_backbone):
    method, _ = setup_kgcoop(tiny_backbone)
    b = batch(tiny_backbone, 4)
    with torch.no_grad():
        method.prepare_eval(["dog", "tractor", "kite"], "eurosat", "a centered satellite photo of {}.")
        logits = method.predict(EvalBatch(labels=b.labels, image_features=b.image_features))
        text = plain_text_features(tiny_backbone, ["a photo of a dog.", "a photo of a tractor.", "a photo of a kite."])
        expected = tiny_backbone.model.logit_scale.exp() * F.normalize(b.image_features, dim=-1) @ text.t()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("protocol", ["base2new", "cross_dataset", "domain_generalization", "few_shot"])
def test_recipe_is_the_published_config(protocol):
    for dataset in ("imagenet", "dtd"):
        r = recipe(protocol, dataset, 16)
        assert (r["epochs"], r["batch_size"], r["lr"], r["w"]) == (100, 128, 0.002, 8.0)
        assert (r["n_ctx"], r["ctx_init"]) == (4, "a photo of a")
        assert (r["momentum"], r["weight_decay"], r["warmup_epochs"], r["warmup_lr"]) == (0.9, 5e-4, 1, 1e-5)


def test_base2new_job_through_the_cli(tmp_path, tiny_checkpoint, tiny_backbone, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "kgcoop",
                                        "--dataset", "dtd", "--seeds", "1", "--set", "epochs=2", "--quiet"))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    assert result["method"]["trainable_params"] == 4 * tiny_backbone.text_width
    assert set(result["metrics"]) == {"base", "new"}
    assert result["method"]["recipe"]["w"] == 8.0
