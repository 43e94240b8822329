"""TCP (field-2026.md 1.2): templates, the class-aware tokens and their injection, the loss, recipe, a toy run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.protocols import load_protocol
from benchsuite_plugins.tcp import TCP, injection_layer
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
PHOTO = "a photo of a {}."


def recipe(protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    from benchsuite.engine.recipe import HARNESS_DEFAULTS

    return {**HARNESS_DEFAULTS, **TCP().recipe(load_protocol(protocol), dataset, shots)}


def setup_tcp(backbone, classnames=CLASSNAMES, dataset="caltech101", template=PHOTO, **overrides):
    method = TCP()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset=dataset, template=template,
                       recipe={**recipe(), **overrides}, protocol=load_protocol("base2new"), shots=16, seed=1,
                       device=torch.device("cpu"))
    return method, method.setup(ctx)


def plain_text_features(backbone, texts):
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(backbone.tokenize(texts)), dim=-1)


def manual_text_features(backbone, texts, ctx, tokens, layer):
    """An independent forward of the open_clip text tower over all 77 positions: the token embeddings of
    ``texts`` with positions 1..n replaced by ``ctx``, then positions 1..n replaced by each class's
    ``tokens`` before block ``layer``."""
    model = backbone.model
    ids = backbone.tokenize(texts)
    x = model.token_embedding(ids).clone()
    n = ctx.shape[0]
    x[:, 1:1 + n] = ctx
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if i == layer:
            x = torch.cat([x[:, :1], tokens, x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(texts)), ids.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def batch(backbone, n: int = 8) -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = backbone.encode_image(torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen))
    return TrainBatch(torch.empty(0), torch.arange(n) % len(CLASSNAMES), features)


def test_parameters_on_vit_b16_shapes():
    from benchsuite.clip.backbone import load_backbone

    backbone = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module = setup_tcp(backbone, CLASSNAMES[:2])
    assert [(n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad] == [
        ("ctx", (4, 512)), ("meta_net.linear1.weight", (128, 512)), ("meta_net.linear1.bias", (128,)),
        ("meta_net.linear2.weight", (2048, 128)), ("meta_net.linear2.bias", (2048,))]
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 331_904
    assert module.layer == 8  # the official blocks' layers=[8] on a 12-block text tower
    assert set(module.state_dict()) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                        "meta_net.linear2.weight", "meta_net.linear2.bias"}
    assert module.ctx.detach().std().item() == pytest.approx(0.02, rel=0.1)  # CTX_INIT False: N(0, 0.02^2)


def test_injection_layer_rule():
    assert injection_layer(8, 12) == 8
    assert injection_layer(8, 4) == 3  # shallower towers: before the last block
    assert injection_layer(1, 2) == 1
    with pytest.raises(BenchsuiteError, match="inject_layer"):
        injection_layer(0, 12)


@pytest.mark.parametrize("dataset, texts", [
    ("stanford_cars", "X X X X {}, a type of car"),  # no final period, as in the official template
    ("ucf101", "X X X X person doing {}."),
    ("oxford_pets", "X X X X {}, a type of pet."),
    ("dtd", "X X X X {} texture."),
    ("imagenet_r", "X X X X {}."),
    ("toy_objects", "X X X X {}."),
])
def test_prompt_text_is_tcps_template(tiny_backbone, dataset, texts):
    _, module = setup_tcp(tiny_backbone, dataset=dataset)
    ids = tiny_backbone.tokenize([texts.format(c.replace("_", " ")) for c in CLASSNAMES])
    expected = tiny_backbone.embed_tokens(ids)
    assert torch.equal(module.prompts.eot, ids.argmax(dim=-1))
    torch.testing.assert_close(module.prompts.token_suffix, expected[:, 5:], atol=0, rtol=0)
    torch.testing.assert_close(module.prompts.token_prefix, expected[:, :1], atol=0, rtol=0)


@pytest.mark.parametrize("dataset, template, anchor", [
    ("fgvc_aircraft", "a photo of a {}, a type of aircraft.", "a photo of an aircraft {}."),
    ("food101", "a photo of {}, a type of food.", "a photo of a {}, a type of food."),
    ("dtd", "{} texture.", "a photo of a {}, a type of texture."),
    ("eurosat", "a centered satellite photo of {}.", "a centered satellite photo of {}."),
    ("toy_objects", "a toy photo of a {}.", "a toy photo of a {}."),  # outside TCP's table: its own
])
def test_anchor_uses_tcps_hand_crafted_templates(tiny_backbone, dataset, template, anchor):
    _, module = setup_tcp(tiny_backbone, dataset=dataset, template=template)
    expected = plain_text_features(tiny_backbone, [anchor.format(c.replace("_", " ")) for c in CLASSNAMES])
    torch.testing.assert_close(module.anchor, expected, atol=1e-5, rtol=0)


def test_class_tokens_enter_at_the_injection_layer(tiny_backbone):
    """Text features equal an independent forward: context at the input, meta-net tokens before block 1."""
    torch.manual_seed(0)
    method, module = setup_tcp(tiny_backbone, dataset="oxford_pets", inject_layer=1)
    assert module.layer == 1
    anchor = module.anchor
    hidden = F.linear(anchor, module.meta_net.linear1.weight, module.meta_net.linear1.bias)
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    tokens = F.linear(hidden, module.meta_net.linear2.weight, module.meta_net.linear2.bias).view(len(CLASSNAMES), 4, -1)
    torch.testing.assert_close(module.class_tokens(), tokens)
    texts = [f"X X X X {c.replace('_', ' ')}, a type of pet." for c in CLASSNAMES]
    with torch.no_grad():
        expected = manual_text_features(tiny_backbone, texts, module.ctx, tokens, layer=1)
        torch.testing.assert_close(module.text_features(), expected, atol=1e-5, rtol=1e-5)
        # the tokens matter, and so does the context (it feeds block 0)
        without = manual_text_features(tiny_backbone, texts, module.ctx, torch.zeros_like(tokens), layer=1)
        assert (module.text_features() - without).abs().max() > 1e-3
        module.ctx.mul_(3.0)
        moved = module.text_features()
    assert (moved - expected).abs().max() > 1e-3


def test_loss_is_ce_plus_8_times_the_kg_score(tiny_backbone):
    method, module = setup_tcp(tiny_backbone)
    b = batch(tiny_backbone)
    out = method.train_step(b, 0)
    with torch.no_grad():
        text = module.text_features()
        logits = tiny_backbone.model.logit_scale.exp() * F.normalize(b.image_features, dim=-1) @ text.t()
        ce = F.cross_entropy(logits, b.labels)
        kg = 1 - torch.stack([text[c] @ module.anchor[c] for c in range(len(CLASSNAMES))]).mean()
    torch.testing.assert_close(out["ce"], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["kg"], kg, atol=1e-6, rtol=1e-5)
    assert float(kg) > 1e-3
    torch.testing.assert_close(out["loss"], out["ce"] + 8.0 * out["kg"])
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in out.values())


def test_gradients_reach_context_and_meta_net_only_and_the_anchor_is_not_recomputed(tiny_backbone, monkeypatch):
    method, module = setup_tcp(tiny_backbone)
    anchor = module.anchor.clone()
    calls = []
    monkeypatch.setattr(type(tiny_backbone), "encode_text", lambda self, texts: calls.append(texts))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.002, eps=1e-3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for _ in range(2):
        out = method.train_step(batch(tiny_backbone), 0)
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        optimizer.step()
    assert calls == []
    assert torch.equal(module.anchor, anchor)
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert all((p.detach() - before[n]).abs().max() > 0 for n, p in module.named_parameters())


def test_new_classes_get_their_own_tokens_and_templates(tiny_backbone):
    method, module = setup_tcp(tiny_backbone)
    b = batch(tiny_backbone, 4)
    new = ["dog", "tractor", "kite"]
    with torch.no_grad():
        method.prepare_eval(new, "fgvc_aircraft", "a photo of a {}, a type of aircraft.")
        logits = method.predict(EvalBatch(labels=b.labels, image_features=b.image_features))
        anchor = plain_text_features(tiny_backbone, [f"a photo of an aircraft {c}." for c in new])
        torch.testing.assert_close(module.anchor, anchor, atol=1e-5, rtol=0)
        texts = [f"X X X X {c}, a type of aircraft." for c in new]
        text = manual_text_features(tiny_backbone, texts, module.ctx, module.class_tokens(), module.layer)
        expected = tiny_backbone.model.logit_scale.exp() * F.normalize(b.image_features, dim=-1) @ text.t()
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("protocol", ["base2new", "cross_dataset", "domain_generalization", "few_shot"])
def test_recipe_is_the_published_config(protocol):
    for dataset in ("imagenet", "dtd", "sun397"):
        r = recipe(protocol, dataset, 16)
        assert (r["epochs"], r["batch_size"], r["lr"]) == (50, 32, 0.002)
        assert (r["optimizer"], r["eps"], tuple(r["betas"]), r["weight_decay"]) == ("adam", 1e-3, (0.9, 0.999), 5e-4)
        assert (r["warmup_epochs"], r["warmup_lr"], r["model_selection"]) == (1, 1e-5, "last_epoch")
        assert (r["n_ctx"], r["inject_layer"], r["w"]) == (4, 8, 8.0)


def test_base2new_job_through_the_cli(tmp_path, tiny_checkpoint, tiny_backbone, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "tcp",
                                        "--dataset", "stanford_cars", "--seeds", "1", "--set", "epochs=2", "--quiet"))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    width, embed = tiny_backbone.text_width, tiny_backbone.embed_dim
    meta_net = embed * (embed // 4) + embed // 4 + (embed // 4) * 4 * width + 4 * width
    assert result["method"]["trainable_params"] == 4 * width + meta_net
    assert set(result["metrics"]) == {"base", "new"}
    r = result["method"]["recipe"]
    assert (r["optimizer"], r["eps"], r["w"], r["inject_layer"]) == ("adam", 1e-3, 8.0, 8)
