"""CoOp prompt assembly, recipe and training on the tiny backbone (methods.md 1.2, 4.2).

References are open_clip's own `model.encode_text` on the tokenised text that a prompt layout
corresponds to: with a word-initialised context, CoOp's "end" prompt IS the embedding of
"a photo of a <class>.", "middle" is "a photo <class> of a." and "front" is "<class> a photo of a.".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.encoders import encode_image_prompted
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.coop import CoOp, PromptLearner

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
INIT = "a photo of a"


def clean(name: str) -> str:
    return name.replace("_", " ")


def embed(backbone, texts):
    tokens = backbone.tokenize(texts)
    return backbone.embed_tokens(tokens), tokens


def learner_for(backbone, *, n_ctx=4, init=INIT, csc=False, position="end", classnames=CLASSNAMES):
    learner = PromptLearner(backbone, n_ctx, init, csc, position, len(classnames))
    learner.set_classnames(classnames)
    return learner


def name_len(backbone, name: str) -> int:
    return len(backbone.tokenizer.encode(clean(name)))


# --------------------------------------------------------------------------------------------------
# word-initialised context: the prompt is exactly a text


LAYOUT_TEXTS = {
    "end": lambda c: f"a photo of a {c}.",
    "middle": lambda c: f"a photo {c} of a.",   # split at M // 2 = 2
    "front": lambda c: f"{c} a photo of a.",
}


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_word_init_prompt_is_the_text_embedding(tiny_backbone, position):
    learner = learner_for(tiny_backbone, position=position)
    assert learner.n_ctx == 4 and tuple(learner.ctx.shape) == (4, tiny_backbone.text_width)
    expected, tokens = embed(tiny_backbone, [LAYOUT_TEXTS[position](clean(c)) for c in CLASSNAMES])
    prompts = learner()
    assert prompts.shape == expected.shape == (len(CLASSNAMES), 77, tiny_backbone.text_width)
    assert torch.equal(prompts, expected)
    assert torch.equal(learner.eot, tokens.argmax(dim=-1))

    with torch.no_grad():
        ours = tiny_backbone.encode_embeddings(prompts, learner.eot)
        reference = tiny_backbone.model.encode_text(tokens)
    assert ours.shape == (len(CLASSNAMES), tiny_backbone.embed_dim)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_word_init_context_is_the_init_words(tiny_backbone):
    learner = learner_for(tiny_backbone)
    words, _ = embed(tiny_backbone, [INIT])
    assert torch.equal(learner.ctx.data, words[0, 1:5].float())
    assert learner.ctx.requires_grad


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_truncated_and_full_text_encoder_agree(tiny_backbone, monkeypatch, position):
    learner = learner_for(tiny_backbone, position=position)
    _, tokens = embed(tiny_backbone, [LAYOUT_TEXTS[position](clean(c)) for c in CLASSNAMES])
    with torch.no_grad():
        reference = tiny_backbone.model.encode_text(tokens)
        assert tiny_backbone.truncate_text is True
        truncated = tiny_backbone.encode_embeddings(learner(), learner.eot)
        monkeypatch.setattr(tiny_backbone, "truncate_text", False)
        full = tiny_backbone.encode_embeddings(learner(), learner.eot)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(truncated, full, atol=1e-5, rtol=0)


def test_backbone_encode_text_equals_open_clip(tiny_backbone):
    texts = ["a photo of a cat.", "a centered satellite photo of Annual Crop Land.", "x"]
    with torch.no_grad():
        reference = tiny_backbone.model.encode_text(tiny_backbone.tokenize(texts))
    torch.testing.assert_close(tiny_backbone.encode_text(texts), reference, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# random context: the layout, position by position


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("n_ctx", [3, 4])
def test_random_context_layout(tiny_backbone, position, n_ctx):
    torch.manual_seed(0)
    learner = learner_for(tiny_backbone, n_ctx=n_ctx, init="", position=position)
    ctx = learner.ctx.data
    assert tuple(ctx.shape) == (n_ctx, tiny_backbone.text_width)
    prompts = learner()
    half = n_ctx // 2
    for i, name in enumerate(CLASSNAMES):
        plain, _ = embed(tiny_backbone, [f"{clean(name)}."])  # [SOS] class tokens [.] [EOT] padding
        plain = plain[0]
        n = name_len(tiny_backbone, name)
        sos, cls, rest = plain[:1], plain[1:1 + n], plain[1 + n:77 - n_ctx]  # rest starts with "." then EOT
        layout = {
            "end": [sos, ctx, cls, rest],
            "middle": [sos, ctx[:half], cls, ctx[half:], rest],
            "front": [sos, cls, ctx, rest],
        }[position]
        expected = torch.cat(layout, dim=0)
        assert torch.equal(prompts[i], expected), (position, name)
        assert int(learner.eot[i]) == 1 + n_ctx + n + 1  # SOS, ctx, class, "." then EOT
        dot, _ = embed(tiny_backbone, ["."])
        assert torch.equal(prompts[i, learner.eot[i] - 1], dot[0, 1])  # "." just before EOT
        assert torch.equal(prompts[i, learner.eot[i]], plain[1 + n + 1])  # EOT


def test_random_init_statistics_and_csc_shapes(tiny_backbone):
    torch.manual_seed(0)
    generic = learner_for(tiny_backbone, n_ctx=16, init="")
    assert tuple(generic.ctx.shape) == (16, tiny_backbone.text_width)
    csc = learner_for(tiny_backbone, n_ctx=16, init="", csc=True)
    assert csc.csc is True
    assert tuple(csc.ctx.shape) == (len(CLASSNAMES), 16, tiny_backbone.text_width)
    for ctx in (generic.ctx.data, csc.ctx.data):
        assert ctx.dtype == torch.float32
        assert abs(float(ctx.std()) - 0.02) < 0.002
        assert abs(float(ctx.mean())) < 0.002
    prompts = csc()
    for i in range(len(CLASSNAMES)):
        assert torch.equal(prompts[i, 1:17], csc.ctx.data[i])  # each class gets its own context
    prompts = generic()
    assert all(torch.equal(prompts[i, 1:17], generic.ctx.data) for i in range(len(CLASSNAMES)))


def test_csc_is_ignored_with_a_word_init(tiny_backbone):
    learner = learner_for(tiny_backbone, csc=True)
    assert learner.csc is False and tuple(learner.ctx.shape) == (4, tiny_backbone.text_width)


def test_only_the_context_is_state(tiny_backbone):
    """Class-dependent prefix/suffix are non-persistent: a trained context can meet new classes."""
    learner = learner_for(tiny_backbone)
    assert list(learner.state_dict()) == ["ctx"]
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    learner.set_classnames(["dog", "tractor"])  # generic context: any class set
    assert learner().shape[0] == 2


def test_csc_refuses_a_different_class_set(tiny_backbone):
    learner = learner_for(tiny_backbone, n_ctx=4, init="", csc=True)
    with pytest.raises(BenchsuiteError, match="csc"):
        learner.set_classnames(CLASSNAMES[:3])


def test_csc_refuses_a_different_class_set_of_the_same_size(tiny_backbone):
    learner = learner_for(tiny_backbone, n_ctx=4, init="", csc=True)
    other = ["dog", "tractor", "apple pie", "bengal", "forest"]
    assert len(other) == len(CLASSNAMES)
    with pytest.raises(BenchsuiteError, match="csc"):
        learner.set_classnames(other)


def test_unknown_position_is_refused(tiny_backbone):
    with pytest.raises(BenchsuiteError, match="class_token_position"):
        PromptLearner(tiny_backbone, 4, INIT, False, "start", 3)


# --------------------------------------------------------------------------------------------------
# recipe


def recipe(protocol: str, dataset: str, shots: int) -> dict:
    pm, _ = job_manager(get_method("coop"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def test_recipe_base2new():
    for dataset, epochs in (("caltech101", 200), ("oxford_pets", 200), ("imagenet", 50)):
        r = recipe("base2new", dataset, 16)
        assert r["epochs"] == epochs
        assert (r["n_ctx"], r["ctx_init"], r["csc"], r["class_token_position"]) == (4, "a photo of a", False, "end")
        assert (r["batch_size"], r["lr"]) == (32, 0.002)


@pytest.mark.parametrize("shots,epochs", [(1, 50), (2, 100), (4, 100), (8, 200), (16, 200)])
def test_recipe_few_shot(shots, epochs):
    r = recipe("few_shot", "dtd", shots)
    assert r["epochs"] == epochs
    assert (r["n_ctx"], r["ctx_init"], r["csc"], r["class_token_position"]) == (16, "", False, "end")
    assert (r["batch_size"], r["lr"]) == (32, 0.002)
    assert recipe("few_shot", "imagenet", shots)["epochs"] == 50


@pytest.mark.parametrize("protocol", ["cross_dataset", "domain_generalization"])
def test_recipe_transfer(protocol):
    r = recipe(protocol, "imagenet", 16)
    assert r["epochs"] == 50 and r["n_ctx"] == 4 and r["ctx_init"] == "a photo of a"
    assert recipe(protocol, "caltech101", 16)["epochs"] == 50  # by task: any transfer source uses ep50


def test_recipe_harness_defaults():
    from benchsuite.engine.recipe import resolve_recipe

    resolved, changed = resolve_recipe("coop", recipe("base2new", "dtd", 16), {}, {})
    assert changed == {}
    assert (resolved["momentum"], resolved["weight_decay"], resolved["warmup_epochs"], resolved["warmup_lr"]) == (
        0.9, 5e-4, 1, 1e-5)
    assert resolved["model_selection"] == "last_epoch"


# --------------------------------------------------------------------------------------------------
# the method: setup, training steps, evaluation


def setup_coop(backbone, classnames=CLASSNAMES, **overrides):
    method = CoOp()
    r = {**recipe("base2new", "caltech101", 16), **overrides}
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="caltech101", template="a photo of a {}.",
                       recipe=r, protocol=load_protocol("base2new"), shots=16, seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx)


def test_training_steps_reduce_the_loss(tiny_backbone):
    torch.manual_seed(0)
    method, module = setup_coop(tiny_backbone)
    images = torch.randn(10, 3, 32, 32)
    labels = torch.arange(10) % len(CLASSNAMES)
    with torch.no_grad():
        features = tiny_backbone.encode_image(images)
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == 1 and params[0] is module.ctx
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9)
    start = module.ctx.detach().clone()
    losses = []
    for _ in range(10):
        out = method.train_step(TrainBatch(images, labels, features), 0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(module.ctx.detach(), start)
    assert all(p.grad is None for p in tiny_backbone.model.parameters())  # CLIP stays frozen


def test_logits_are_scaled_cosines(tiny_backbone):
    method, _ = setup_coop(tiny_backbone)
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        features = tiny_backbone.encode_image(torch.randn(4, 3, 32, 32))
        from benchsuite.hookspecs import EvalBatch

        logits = method.predict(EvalBatch(labels=torch.zeros(4, dtype=torch.long), image_features=features))
        tokens = tiny_backbone.tokenize([f"a photo of a {clean(c)}." for c in CLASSNAMES])
        text = F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1)
        expected = tiny_backbone.model.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


def test_prepare_eval_with_csc_and_other_classes_is_refused(tiny_backbone):
    method, _ = setup_coop(tiny_backbone, n_ctx=4, ctx_init="", csc=True)
    with pytest.raises(BenchsuiteError, match="csc"):
        method.prepare_eval(["dog", "tractor"], "caltech101", "a photo of a {}.")


# --------------------------------------------------------------------------------------------------
# the prompted image encoder without prompts


def test_encode_image_block_tokens_without_prompts(tiny_backbone):
    visual = tiny_backbone.model.visual
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    captured = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for block in visual.transformer.resblocks]
    try:
        with torch.no_grad():
            reference = visual(images)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        plain = encode_image_prompted(visual, images)
        pooled, blocks = encode_image_prompted(visual, images, return_block_tokens=True)
    assert torch.equal(plain, reference)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=0)
    n_blocks = len(visual.transformer.resblocks)
    assert tuple(blocks.shape) == (n_blocks, 3, 1 + (32 // 8) ** 2, 64)
    for i in range(n_blocks):
        torch.testing.assert_close(blocks[i], captured[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_backbone.encode_image(images), reference, atol=1e-6, rtol=0)


def test_word_init_with_a_conflicting_context_length_is_refused(tiny_backbone):
    with pytest.raises(BenchsuiteError, match=r"has 4 words.*n_ctx is 16"):
        learner_for(tiny_backbone, n_ctx=16, init=INIT)
