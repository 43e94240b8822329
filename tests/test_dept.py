"""DePT (Koorye/DePT) on CoOp and PromptSRC: cwT + linear head, loss, label-space switch, recipes, a toy run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.templates import PROMPTSRC_TEMPLATES
from benchsuite.engine.recipe import HARNESS_DEFAULTS
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, LabelSpace, SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.dept import DePTCoOp, DePTPromptSRC
from benchsuite_plugins.promptsrc import PromptSRC
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin"]
PROTOCOLS = ["base2new", "cross_dataset", "domain_generalization", "few_shot"]


def recipe(name: str, protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method(name))
    return {**HARNESS_DEFAULTS, **pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)}


def setup(cls, backbone, classnames=CLASSNAMES, protocol="base2new", **overrides):
    method = cls()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset="caltech101",
                       template="a photo of a {}.", recipe={**recipe(cls.name, protocol), **overrides},
                       protocol=load_protocol(protocol), shots=16, seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx)


@pytest.fixture
def few_templates(monkeypatch):
    """PromptSRC's anchors from 3 templates: the DePT tests need not encode all 60."""
    import benchsuite_plugins.promptsrc as plugin

    full = plugin.template_anchors
    monkeypatch.setattr(plugin, "template_anchors", lambda b, c: full(b, c, PROMPTSRC_TEMPLATES[:3]))


def perturb_head(module, seed: int = 0) -> None:
    """Move cwT off the identity, so a test would notice it applied to the wrong features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for film in (module.head.film_text, module.head.film_image):
            film.scale.copy_(1 + 0.5 * torch.randn(film.scale.shape, generator=gen))
            film.bias.copy_(0.1 * torch.randn(film.bias.shape, generator=gen))


def features_batch(backbone, n: int = 6) -> TrainBatch:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen)
    with torch.no_grad():
        features = backbone.encode_image(images)
    return TrainBatch(images, torch.arange(n) % len(CLASSNAMES), features)


def space(train, classnames, dataset="caltech101") -> LabelSpace:
    return LabelSpace.of("caltech101", list(train), dataset, list(classnames))


def by_hand_linear(head, text, image, labels):
    """The official head on raw features: cwT per channel, text rows of the labels first, then the images."""
    t = text * head.film_text.scale + head.film_text.bias
    i = image * head.film_image.scale + head.film_image.bias
    samples = torch.cat([t[labels], i])
    return samples @ head.linear.weight.t() + head.linear.bias, torch.cat([labels, labels])


@pytest.fixture(scope="module")
def vit_b16():
    from benchsuite.clip.backbone import load_backbone

    return load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")


def test_parameters_on_vit_b16_shapes(vit_b16, few_templates):
    _, module = setup(DePTCoOp, vit_b16)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    assert shapes == {"prompts.ctx": (16, 512), "head.film_text.scale": (512,), "head.film_text.bias": (512,),
                      "head.film_image.scale": (512,), "head.film_image.bias": (512,),
                      "head.linear.weight": (4, 512), "head.linear.bias": (4,)}
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 10_240 + 513 * 4
    assert set(module.state_dict()) == set(shapes)  # prompt prefix/suffix are rebuilt, never saved
    _, module = setup(DePTPromptSRC, vit_b16, classnames=["cat", "dog"])
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 46_080 + 2_048 + 513 * 2


def test_cwt_starts_as_identity_and_head_is_torch_linear(tiny_backbone):
    torch.manual_seed(0)
    _, module = setup(DePTCoOp, tiny_backbone)
    head = module.head
    assert torch.equal(head.film_text.scale, torch.ones(tiny_backbone.embed_dim))
    assert torch.equal(head.film_image.bias, torch.zeros(tiny_backbone.embed_dim))
    bound = 1 / tiny_backbone.embed_dim ** 0.5  # nn.Linear's default init
    assert float(head.linear.weight.detach().abs().max()) <= bound
    assert float(head.linear.bias.detach().abs().max()) <= bound
    assert head.linear.weight.dtype == torch.float32


def test_dept_coop_loss_against_a_hand_computation(tiny_backbone):
    torch.manual_seed(0)
    method, module = setup(DePTCoOp, tiny_backbone)
    perturb_head(module)
    batch = features_batch(tiny_backbone)
    out = method.train_step(batch, 0)
    with torch.no_grad():
        text = module.prompts.text_features()
        sim = tiny_backbone.logit_scale * F.normalize(batch.image_features, dim=-1) @ F.normalize(text, dim=-1).t()
        ce = F.cross_entropy(sim, batch.labels)
        logits, targets = by_hand_linear(module.head, text, batch.image_features, batch.labels)
        ce_linear = F.cross_entropy(logits, targets)
    torch.testing.assert_close(out["ce"].detach(), ce)
    torch.testing.assert_close(out["ce_linear"].detach(), ce_linear)
    torch.testing.assert_close(out["loss"].detach(), 0.3 * ce + 0.7 * ce_linear)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_dept_promptsrc_adds_the_head_to_promptsrcs_terms(tiny_backbone, few_templates):
    torch.manual_seed(0)
    method, module = setup(DePTPromptSRC, tiny_backbone)
    perturb_head(module)
    batch = features_batch(tiny_backbone, 4)
    out = method.train_step(batch, 0)
    assert set(out) == {"loss", "ce", "ce_linear", "scl_text", "scl_image", "scl_kl"}
    with torch.no_grad():
        text, image = module.prompts.text_features(), module.prompts.image_features(batch.images)
        logits, targets = by_hand_linear(module.head, text, image, batch.labels)
        torch.testing.assert_close(out["ce_linear"].detach(), F.cross_entropy(logits, targets))
        sim = tiny_backbone.logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
        torch.testing.assert_close(out["ce"].detach(), F.cross_entropy(sim, batch.labels))
    expected = 0.3 * out["ce"] + 0.7 * out["ce_linear"] + out["scl_text"] + out["scl_image"] + out["scl_kl"]
    torch.testing.assert_close(out["loss"], expected)
    # the consistency terms are PromptSRC's, untouched
    plain, _ = setup(PromptSRC, tiny_backbone)
    with torch.no_grad():
        for p, q in zip(plain.learner.parameters(), module.prompts.parameters()):
            p.copy_(q)
    reference = plain.train_step(batch, 0)
    for key in ("ce", "scl_text", "scl_image", "scl_kl"):
        torch.testing.assert_close(out[key], reference[key])
    # the Gaussian aggregation covers prompts, cwT and head
    assert {id(p) for p in method.gpa.params} == {id(p) for p in module.parameters()}


def test_label_space_switch(tiny_backbone):
    torch.manual_seed(0)
    method, module = setup(DePTCoOp, tiny_backbone)
    perturb_head(module)
    with torch.no_grad():
        module.head.linear.weight.mul_(20)  # head logits large enough to change the ranking
    batch = features_batch(tiny_backbone)
    image = batch.image_features

    def logits(classnames, label_space):
        with torch.no_grad():
            method.prepare_eval(list(classnames), "caltech101", "a photo of a {}.", label_space)
            return method.predict(EvalBatch(labels=batch.labels, image_features=image))

    def similarity(classnames):
        with torch.no_grad():
            module.prompts.set_classnames(list(classnames))
            text = F.normalize(module.prompts.text_features(), dim=-1)
            return tiny_backbone.logit_scale * F.normalize(image, dim=-1) @ text.t()

    with torch.no_grad():
        linear = module.head.image_logits(image)
    # base: every class trained -> (1 - w) sim + w linear
    fused = logits(CLASSNAMES, space(CLASSNAMES, CLASSNAMES))
    torch.testing.assert_close(fused, 0.3 * similarity(CLASSNAMES) + 0.7 * linear)
    # a reordered subset of the training classes (an ImageNet-A-like variant): head rows by name
    subset = ["airplane cabin", "Golden_Retriever"]
    torch.testing.assert_close(logits(subset, space(CLASSNAMES, subset, "imagenet_a")),
                               0.3 * similarity(subset) + 0.7 * linear[:, [3, 0]])
    # new, all (superset) and mixed: the similarity head only
    for classnames in (["tractor", "kite"], CLASSNAMES + ["kite"], ["cat", "kite"]):
        ls = space(CLASSNAMES, classnames, "dtd")
        assert ls.kind in ("new", "all", "mixed")
        torch.testing.assert_close(logits(classnames, ls), similarity(classnames))
    assert not torch.allclose(fused, similarity(CLASSNAMES))


def test_param_groups_give_the_head_6_5_times_the_lr(tiny_backbone):
    method, module = setup(DePTCoOp, tiny_backbone)
    prompts, head = method.param_groups(module)
    assert "lr" not in prompts and [id(p) for p in prompts["params"]] == [id(module.prompts.ctx)]
    assert head["lr"] == pytest.approx(0.0035 * 6.5)
    assert {id(p) for p in head["params"]} == {id(p) for p in module.head.parameters()}
    method, module = setup(DePTCoOp, tiny_backbone, lr=0.01, head_lr_mult=2.0)
    assert method.param_groups(module)[1]["lr"] == pytest.approx(0.02)
    with pytest.raises(BenchsuiteError, match="linear_weight"):
        setup(DePTCoOp, tiny_backbone, linear_weight=1.5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recipes_per_protocol(protocol):
    for dataset in ("imagenet", "dtd"):
        r = recipe("dept_coop", protocol, dataset)
        assert (r["epochs"], r["batch_size"], r["lr"], r["n_ctx"], r["ctx_init"]) == (10, 4, 0.0035, 16, "")
        assert (r["linear_weight"], r["head_lr_mult"], r["csc"], r["class_token_position"]) == (0.7, 6.5, False, "end")
        assert (r["momentum"], r["weight_decay"], r["warmup_epochs"], r["warmup_lr"]) == (0.9, 5e-4, 1, 1e-5)
        src = recipe("dept_promptsrc", protocol, dataset)
        assert src == {**recipe("promptsrc", protocol, dataset), "linear_weight": 0.7, "head_lr_mult": 6.5}
    assert DePTPromptSRC.epoch_settings == ("gpa_mean", "gpa_std")
    assert DePTPromptSRC.image_input == "images+features" and DePTCoOp.image_input == "features"


def test_base2new_job_through_the_cli(tmp_path, tiny_checkpoint, tiny_backbone, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "dept_coop",
                                        "--dataset", "dtd", "--seeds", "1", "--set", "epochs=2", "--quiet"))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    head = result["method"]["trainable_params"] - 16 * tiny_backbone.text_width - 4 * tiny_backbone.embed_dim
    assert head > 0 and head % (tiny_backbone.embed_dim + 1) == 0  # the linear head: (D + 1) per base class
    assert set(result["metrics"]) == {"base", "new"}
    losses = result["training"]["loss_per_epoch"]
    assert set(losses) == {"loss", "ce", "ce_linear"} and len(losses["loss"]) == 2
    assert result["method"]["recipe"]["head_lr_mult"] == 6.5
