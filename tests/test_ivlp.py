"""IVLP (methods.md 4.6): prompt sets per layer, where they enter, how deep they reach, recipe, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.prompts import context_from_words
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.ivlp import IVLP

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin"]


def recipe(protocol: str, dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("ivlp"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def setup_ivlp(backbone, protocol="base2new", classnames=CLASSNAMES, **overrides):
    method = IVLP()
    r = {**recipe(protocol), **overrides}
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="caltech101", template="a photo of a {}.",
                       recipe=r, protocol=load_protocol(protocol), shots=16, seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx)


@pytest.fixture(scope="module")
def vit_b16():
    from benchsuite.clip.backbone import load_backbone

    return load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")


def n_trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_parameter_count_on_vit_b16(vit_b16):
    _, module = setup_ivlp(vit_b16, classnames=["cat", "dog"])
    assert n_trainable(module) == 46_080 == 9 * 4 * 512 + 9 * 4 * 768  # methods.md 4.6
    _, transfer = setup_ivlp(vit_b16, "cross_dataset", classnames=["cat", "dog"])
    assert n_trainable(transfer) == 3 * 4 * (512 + 768)


def test_recipes_per_protocol():
    b2n, xd, dg, fs = recipe("base2new"), recipe("cross_dataset", "imagenet"), \
        recipe("domain_generalization", "imagenet"), recipe("few_shot", "dtd", 1)
    for r in (b2n, xd, dg, fs):
        assert (r["batch_size"], r["lr"], r["n_ctx_text"], r["n_ctx_vision"], r["ctx_init"]) == (
            4, 0.0025, 4, 4, "a photo of a")
    assert (b2n["epochs"], b2n["prompt_depth_text"], b2n["prompt_depth_vision"]) == (20, 9, 9)
    assert xd == dg and (xd["epochs"], xd["prompt_depth_text"], xd["prompt_depth_vision"]) == (20, 3, 3)
    assert (fs["epochs"], fs["prompt_depth_text"]) == (50, 9)


def test_text_context_is_the_init_words_and_the_prompt_their_text(tiny_backbone):
    """With T = 4 from "a photo of a" the shallow text prompt IS "a photo of a <class>."."""
    _, module = setup_ivlp(tiny_backbone, prompt_depth_text=1, prompt_depth_vision=0)
    assert torch.equal(module.text.input.detach(), context_from_words(tiny_backbone, "a photo of a", 4))
    tokens = tiny_backbone.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
    with torch.no_grad():
        reference = tiny_backbone.model.encode_text(tokens)
        torch.testing.assert_close(module.text_features(), reference, atol=1e-5, rtol=0)
    # more than 4 tokens: random init and "X .." as prompt text, as the original
    _, random_init = setup_ivlp(tiny_backbone, n_ctx_text=6)
    assert random_init.prompts.prefix_text == "X X X X X X"


def capture_block_io(transformer):
    """Inputs and outputs of every block of a transformer, recorded by hooks."""
    inputs, outputs, handles = {}, {}, []
    for i, block in enumerate(transformer.resblocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kw, i=i: inputs.__setitem__(i, (args[0] if args else kw["q_x"]).detach().clone()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach().clone())))
    return inputs, outputs, handles


@pytest.mark.parametrize("depth", [1, 2])
def test_vision_prompts_at_depth_d_reach_block_d_and_no_deeper(tiny_backbone, depth):
    b = tiny_backbone  # 2 vision blocks
    torch.manual_seed(0)
    _, module = setup_ivlp(b, prompt_depth_vision=depth, prompt_depth_text=1)
    assert module.vision.depth == depth
    visual = b.model.visual
    inputs, outputs, handles = capture_block_io(visual.transformer)
    images = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            module.image_features(images)
    finally:
        for h in handles:
            h.remove()
    V = 4
    assert inputs[0].shape[1] == 1 + b.patch_count + V  # the input set appended after the image tokens
    # the input set went through ln_pre with the image tokens
    torch.testing.assert_close(inputs[0][:, -V:], visual.ln_pre(module.vision.input.detach()).expand(2, -1, -1))
    for i in range(1, b.vision_layers):
        if i < depth:  # replaced by set i
            torch.testing.assert_close(inputs[i][:, -V:], module.vision.sets[i].detach().expand(2, -1, -1))
        else:  # what block i-1 produced
            torch.testing.assert_close(inputs[i][:, -V:], outputs[i - 1][:, -V:])
        torch.testing.assert_close(inputs[i][:, :-V], outputs[i - 1][:, :-V])  # image tokens untouched


@pytest.mark.parametrize("depth", [1, 2])
def test_text_prompts_at_depth_d_reach_block_d_and_no_deeper(tiny_backbone, depth):
    b = tiny_backbone
    torch.manual_seed(0)
    _, module = setup_ivlp(b, prompt_depth_text=depth, prompt_depth_vision=0)
    inputs, outputs, handles = capture_block_io(b.model.transformer)
    try:
        with torch.no_grad():
            module.text_features()
    finally:
        for h in handles:
            h.remove()
    T = 4
    positional = b.model.positional_embedding[1:1 + T]
    torch.testing.assert_close(inputs[0][:, 1:1 + T], (module.text.input.detach() + positional).expand(len(CLASSNAMES), -1, -1))
    for i in range(1, b.text_layers):
        expected = module.text.sets[i].detach().expand(len(CLASSNAMES), -1, -1) if i < depth \
            else outputs[i - 1][:, 1:1 + T]
        torch.testing.assert_close(inputs[i][:, 1:1 + T], expected)
        torch.testing.assert_close(inputs[i][:, 1 + T:], outputs[i - 1][:, 1 + T:])  # SOS-free rest untouched
        torch.testing.assert_close(inputs[i][:, :1], outputs[i - 1][:, :1])


def test_depth_beyond_the_model_prompts_every_block(tiny_backbone):
    _, module = setup_ivlp(tiny_backbone)  # depth 9 on 2 + 2 blocks
    assert (module.text.depth, module.vision.depth) == (tiny_backbone.text_layers, tiny_backbone.vision_layers)


def test_training_reaches_every_prompt_set_and_nothing_else(tiny_backbone):
    torch.manual_seed(0)
    method, module = setup_ivlp(tiny_backbone)
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % len(CLASSNAMES)
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == 4  # 2 text + 2 vision sets
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        out = method.train_step(TrainBatch(images, labels), 0)
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in tiny_backbone.model.parameters())  # CLIP stays frozen
    assert set(module.state_dict()) == {"text.sets.0", "text.sets.1", "vision.sets.0", "vision.sets.1"}


def test_eval_logits_are_fp32_scaled_cosines_of_the_prompted_features(tiny_backbone):
    torch.manual_seed(0)
    method, module = setup_ivlp(tiny_backbone)
    new = ["dog", "tree", "sea_horse"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        method.prepare_eval(new, "x", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=torch.zeros(3, dtype=torch.long), images=images))
        image = F.normalize(module.image_features(images), dim=-1)
        text = F.normalize(module.text_features(), dim=-1)
    assert logits.dtype == torch.float32 and logits.shape == (3, len(new))
    torch.testing.assert_close(logits, tiny_backbone.logit_scale * image @ text.t())
