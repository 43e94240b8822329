"""MaPLe (methods.md 4.7): leftover init words, vision prompts as projections of text prompts, couplings,
parameter count, recipes and a run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.maple import MaPLe

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin"]


def recipe(protocol: str, dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("maple"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def setup_maple(backbone, protocol="base2new", classnames=CLASSNAMES, **overrides):
    method = MaPLe()
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="caltech101", template="a photo of a {}.",
                       recipe={**recipe(protocol), **overrides}, protocol=load_protocol(protocol), shots=16, seed=1,
                       device=torch.device("cpu"))
    return method, method.setup(ctx)


def n_trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def vit_b16():
    from benchsuite.clip.backbone import load_backbone

    return load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")


def test_parameter_count_on_vit_b16(vit_b16):
    _, module = setup_maple(vit_b16, classnames=["cat", "dog"])
    assert n_trainable(module) == 3_555_072  # methods.md 4.7
    coupled = 2 * 512 + (512 * 768 + 768)    # one text prompt set and its coupling
    _, transfer = setup_maple(vit_b16, "cross_dataset", classnames=["cat", "dog"])
    assert n_trainable(transfer) == 3 * coupled


def test_deep_couplings_are_copies_of_one_layer(vit_b16):
    """Official `_get_clones`: the 8 deep couplings start identical, distinct modules; the shallow one differs."""
    _, module = setup_maple(vit_b16, classnames=["cat"])
    first = module.deep_proj[0]
    assert len(module.deep_proj) == 8
    for layer in module.deep_proj[1:]:
        assert layer is not first and layer.weight is not first.weight
        torch.testing.assert_close(layer.weight, first.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, first.bias, rtol=0, atol=0)
    assert not torch.equal(module.proj.weight, first.weight)


def test_recipes_per_protocol():
    b2n, xd, dg, fs = recipe("base2new"), recipe("cross_dataset", "imagenet"), \
        recipe("domain_generalization", "imagenet"), recipe("few_shot", "dtd", 1)
    for r in (b2n, xd, dg, fs):
        assert (r["batch_size"], r["n_ctx"], r["ctx_init"]) == (4, 2, "a photo of a")
    assert b2n == fs and (b2n["epochs"], b2n["lr"], b2n["prompt_depth"]) == (5, 0.0035, 9)
    assert xd == dg and (xd["epochs"], xd["lr"], xd["prompt_depth"]) == (2, 0.0026, 3)


def test_leftover_init_words_stay_frozen_in_the_prompt(tiny_backbone):
    """2 learned vectors from "a", "photo"; "of a" stays: the prompt IS the text "a photo of a <class>."."""
    _, module = setup_maple(tiny_backbone)
    names = [c.replace("_", " ") for c in CLASSNAMES]
    tokens = tiny_backbone.tokenize([f"a photo of a {c}." for c in names])
    expected = tiny_backbone.embed_tokens(tokens)
    assembled = module.prompts.assemble(module.ctx, cut=False)
    torch.testing.assert_close(assembled, expected, rtol=0, atol=0)
    assert tuple(module.ctx.shape) == (2, tiny_backbone.text_width)
    torch.testing.assert_close(module.ctx.detach(), expected[0, 1:3])


def test_depth_is_clamped_to_the_model(tiny_backbone):
    _, module = setup_maple(tiny_backbone)  # depth 9 on a 2-layer model
    assert module.depth == tiny_backbone.text_layers == 2 and len(module.deep_text) == len(module.deep_proj) == 1
    _, module = setup_maple(tiny_backbone, prompt_depth=1)
    assert module.text.deep() is None and module.vision_prompts()[1] is None


def test_vision_prompts_change_when_only_the_text_prompts_change(tiny_backbone):
    """The coupling: editing a text prompt (and nothing else) moves the vision prompts and the image features."""
    method, module = setup_maple(tiny_backbone)
    images = torch.randn(3, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    with torch.no_grad():
        shallow, deep = module.vision_prompts()
        before = module.image_features(tiny_backbone, images)
        coupling_state = {k: v.clone() for k, v in module.state_dict().items() if "proj" in k}
        module.deep_text[0].add_(0.5)
        shallow2, deep2 = module.vision_prompts()
        torch.testing.assert_close(shallow2, shallow, rtol=0, atol=0)     # ctx untouched
        assert not torch.allclose(deep2[1], deep[1])
        torch.testing.assert_close(deep2[1], module.deep_proj[0](module.deep_text[0]))
        after = module.image_features(tiny_backbone, images)
        assert not torch.allclose(after, before)
        module.ctx.add_(0.5)
        assert not torch.allclose(module.vision_prompts()[0], shallow)
    for k, v in coupling_state.items():
        torch.testing.assert_close(module.state_dict()[k], v, rtol=0, atol=0)
    # no free vision parameter: text prompts and coupling Linears only
    names = {name.split(".")[0] for name, _ in module.named_parameters()}
    assert names == {"text", "proj", "deep_proj"}
    assert module.text.sets[0] is module.ctx and list(module.text.sets[1:]) == module.deep_text


def test_parameters_are_drawn_in_the_official_order(tiny_backbone):
    """Seeded like the official builder: word-initialised ctx (no draw), proj, deep text prompts, one coupling."""
    from torch import nn

    from benchsuite.clip.prompts import random_context

    torch.manual_seed(3)
    _, module = setup_maple(tiny_backbone)
    torch.manual_seed(3)
    proj = nn.Linear(tiny_backbone.text_width, tiny_backbone.vision_width)
    deep = [random_context(2, tiny_backbone.text_width) for _ in range(module.depth - 1)]
    single = nn.Linear(tiny_backbone.text_width, tiny_backbone.vision_width)
    torch.testing.assert_close(module.proj.weight.detach(), proj.weight.detach(), rtol=0, atol=0)
    for got, want in zip(module.deep_text, deep):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    for layer in module.deep_proj:
        torch.testing.assert_close(layer.weight.detach(), single.weight.detach(), rtol=0, atol=0)


def test_image_loss_trains_the_text_prompts(tiny_backbone):
    """Gradients of an image-only loss reach ctx and the deep text prompts through the couplings."""
    method, module = setup_maple(tiny_backbone)
    images = torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    module.image_features(tiny_backbone, images).square().sum().backward()
    assert module.ctx.grad is not None and module.ctx.grad.abs().sum() > 0
    assert module.deep_text[0].grad.abs().sum() > 0


def test_train_step_and_predict_match_the_definition(tiny_backbone):
    method, module = setup_maple(tiny_backbone)
    images = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    labels = torch.tensor([0, 1, 2, 3])
    image = module.image_features(tiny_backbone, images)
    text = module.text_features()
    expected = tiny_backbone.logit_scale * torch.nn.functional.normalize(image, dim=-1) @ \
        torch.nn.functional.normalize(text, dim=-1).t()
    loss = method.train_step(TrainBatch(images=images, labels=labels), 0)["loss"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(expected, labels))
    with torch.no_grad():
        method.prepare_eval(["cat", "dog"], "oxford_pets", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=labels, images=images))
    assert logits.dtype == torch.float32 and logits.shape == (4, 2)


def test_maple_runs_end_to_end(tmp_path, tiny_checkpoint, data_root):
    from test_run import assert_valid, run_args, run_quiet

    results = tmp_path / "results"
    argv = run_args("base2new", tiny_checkpoint, data_root, results, "--method", "maple", "--dataset",
                    "oxford_pets", "--seeds", "1", "--set", "epochs=1", "warmup_epochs=0")
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    (result,) = [json.loads(p.read_text()) for p in (results / "base2new" / "maple" / "oxford_pets").glob("*.json")]
    assert_valid(result)
    assert set(result["metrics"]) == {"base", "new"}
    assert result["method"]["trainable_params"] == 2 * (2 * 64 + 64 * 64 + 64)
