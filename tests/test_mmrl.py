"""MMRL (yunncheng/MMRL): representation tokens in both towers, the loss, decoupled inference, recipes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchsuite.engine.recipe import HARNESS_DEFAULTS
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, LabelSpace, SetupContext, TrainBatch
from benchsuite.protocols import load_protocol
from benchsuite_plugins.mmrl import MMRL, choose_head, fit_rep_layers, mmrl_loss
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
PHOTO = "a photo of a {}."


def recipe(protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    return {**HARNESS_DEFAULTS, **MMRL().recipe(load_protocol(protocol), dataset, shots)}


def setup_mmrl(backbone, classnames=CLASSNAMES, dataset="caltech101", template=PHOTO, **overrides):
    torch.manual_seed(0)
    method = MMRL()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset=dataset, template=template,
                       recipe={**recipe(dataset=dataset), **overrides}, protocol=load_protocol("base2new"), shots=16,
                       seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx)


def images(backbone, n: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=gen)


# ---- shapes and parameters ---------------------------------------------------------------------
def test_parameter_count_on_vit_b16_shapes():
    from benchsuite.clip.backbone import load_backbone

    vit = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module = setup_mmrl(vit, classnames=["cat", "dog"])
    assert module.layers == list(range(6, 13))  # used as given on 12 + 12 blocks
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert shapes["tokens"] == (5, 512) and shapes["proj_rep"] == (768, 512)
    assert shapes["to_vision.6.weight"] == (768, 512) and shapes["to_text.6.weight"] == (512, 512)
    assert len(shapes) == 2 + 2 * 2 * 7
    total = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert total == 5 * 512 + 7 * (512 * 768 + 768) + 7 * (512 * 512 + 512) + 768 * 512 == 4_992_256
    assert set(module.state_dict()) == set(shapes)  # no frozen weight or class-set buffer is saved
    # the official _get_clones: every layer's projection starts as the same Linear
    for projections in (module.to_vision, module.to_text):
        assert all(torch.equal(projections[0].weight, m.weight) and torch.equal(projections[0].bias, m.bias)
                   for m in projections)
    assert abs(float(module.proj_rep.detach().std()) - 768 ** -0.5) < 2e-3
    assert abs(float(module.tokens.detach().std()) - 0.02) < 2e-3
    _, eurosat = setup_mmrl(vit, classnames=["cat", "dog"], dataset="eurosat")
    assert sum(p.numel() for p in eurosat.parameters()) == 18_762_496  # rep_dim 2048 (trainers/config.py)


def test_rep_layers_fit_the_model_depth():
    assert fit_rep_layers(range(6, 13), 12) == list(range(6, 13))
    assert fit_rep_layers([6, 7, 8, 9, 10, 11, 12], 4) == [2, 3, 4]  # ceil(l * 4 / 12)
    assert fit_rep_layers([6, 7, 8, 9, 10, 11, 12], 2) == [1, 2]
    assert fit_rep_layers([3, 1], 4) == [1, 3]  # within the model: as given (sorted)
    assert fit_rep_layers(range(6, 13), 24) == list(range(6, 13))  # a deeper model: as the official code
    for bad in ([], [0, 2], [13], "x"):
        with pytest.raises(BenchsuiteError, match="mmrl: rep_layers"):
            fit_rep_layers(bad, 4)


# ---- the encoders, against an independent forward ----------------------------------------------
def manual_text(model, texts, tokenizer, reps: dict[int, torch.Tensor]):
    """Full 77-token forward, block by block, with a causal mask rebuilt for the current length."""
    tokens = tokenizer(texts)
    x = model.token_embedding(tokens) + model.positional_embedding
    k = 0
    for i, block in enumerate(model.transformer.resblocks):
        if i in reps:
            r = reps[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], r, x[:, 1 + k:]], dim=1)
            k = r.shape[1]
        n = x.shape[1]
        x = block(x, attn_mask=torch.full((n, n), float("-inf")).triu(1))
    x = model.ln_final(x)
    return x[torch.arange(len(texts)), tokens.argmax(-1) + k] @ model.text_projection


def manual_image(visual, batch, reps: dict[int, torch.Tensor]):
    x = visual._embeds(batch)
    k = 0
    for i, block in enumerate(visual.transformer.resblocks):
        if i in reps:
            r = reps[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], r, x[:, 1 + k:]], dim=1)
            k = r.shape[1]
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj, visual.ln_post(x[:, 1:1 + k]).mean(1)


@pytest.mark.parametrize("blocks", [(1,), (0, 1), (0,)])
def test_representation_tokens_in_both_encoders_match_an_independent_forward(tiny_backbone, blocks):
    from benchsuite.clip.encoders import encode_image_prompted, encode_text_embeddings

    torch.manual_seed(0)
    model = tiny_backbone.model
    text_reps = {i: torch.randn(3, tiny_backbone.text_width) for i in blocks}
    vision_reps = {i: torch.randn(3, tiny_backbone.vision_width) for i in blocks}
    per_block = lambda reps: [reps.get(i) for i in range(2)]  # noqa: E731
    texts = ["a photo of a cat.", "a photo of a 1993 geo metro convertible, a type of car."]
    tokens = tiny_backbone.tokenize(texts)
    with torch.no_grad():
        mine = encode_text_embeddings(model, model.token_embedding(tokens), tokens.argmax(-1),
                                      rep_tokens=per_block(text_reps))
        expected = manual_text(model, texts, tiny_backbone.tokenize, text_reps)
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
        plain = encode_text_embeddings(model, model.token_embedding(tokens), tokens.argmax(-1))
        assert (mine - plain).abs().max() > 1e-3  # the tokens change the features
        batch = images(tiny_backbone, 3)
        pooled, rep = encode_image_prompted(model.visual, batch, rep_tokens=per_block(vision_reps))
        expected_pooled, expected_rep = manual_image(model.visual, batch, vision_reps)
        torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rep, expected_rep, atol=1e-5, rtol=1e-5)


def test_method_features_are_the_encoders_with_the_projected_tokens(tiny_backbone):
    method, module = setup_mmrl(tiny_backbone)
    assert module.layers == [1, 2]  # [6..12] on the 2-block test model
    batch = images(tiny_backbone)
    with torch.no_grad():
        image, rep = method.image_features(batch)
        reps = {i: module.to_vision[j](module.tokens) for j, i in enumerate((0, 1))}
        pooled, rep_tokens = manual_image(tiny_backbone.model.visual, batch, reps)
        torch.testing.assert_close(image, F.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rep, F.normalize(rep_tokens @ module.proj_rep, dim=-1), atol=1e-5, rtol=1e-5)
        text = method.text_features()
        treps = {i: module.to_text[j](module.tokens) for j, i in enumerate((0, 1))}
        texts = [PHOTO.format(c.replace("_", " ")) for c in CLASSNAMES]
        expected = manual_text(tiny_backbone.model, texts, tiny_backbone.tokenize, treps)
        torch.testing.assert_close(text, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


# ---- the loss --------------------------------------------------------------------------------
def test_loss_against_an_independent_computation():
    torch.manual_seed(0)
    image, frozen, rep = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    text, anchor = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0, 2, 1, 2])
    logits, logits_rep = 100 * image @ text.t(), 100 * rep @ text.t()
    out = mmrl_loss(logits, logits_rep, image, frozen, text, anchor, labels, alpha=0.7, reg_weight=6.0)

    def nll(z):
        return -sum(z[b, labels[b]] - math.log(sum(math.exp(v) for v in z[b].tolist())) for b in range(4)) / 4

    ce, ce_rep = nll(logits.double()), nll(logits_rep.double())
    reg_image = 1 - sum(float(image[b] @ frozen[b]) for b in range(4)) / 4
    reg_text = 1 - sum(float(text[c] @ anchor[c]) for c in range(3)) / 3
    expected = 0.7 * ce + 0.3 * ce_rep + 6.0 * reg_image + 6.0 * reg_text
    for key, value in (("ce", ce), ("ce_rep", ce_rep), ("reg_image", reg_image), ("reg_text", reg_text),
                       ("loss", expected)):
        assert abs(float(out[key]) - float(value)) < 1e-4, key


def test_train_step_uses_the_harness_frozen_features_and_trains_only_the_space(tiny_backbone):
    method, module = setup_mmrl(tiny_backbone, reg_weight=2.0)
    batch = images(tiny_backbone)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        frozen = tiny_backbone.encode_image(batch)
        texts = [PHOTO.format(c.replace("_", " ")) for c in CLASSNAMES]
        anchors = F.normalize(tiny_backbone.encode_text(texts), dim=-1)
    torch.testing.assert_close(method.anchors, anchors, atol=1e-6, rtol=0)
    out = method.train_step(TrainBatch(batch, labels, frozen), 0)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], 0.7 * out["ce"] + 0.3 * out["ce_rep"]
                               + 2.0 * (out["reg_image"] + out["reg_text"]))
    image, _ = method.image_features(batch)
    expected = 1 - F.cosine_similarity(image, F.normalize(frozen, dim=-1), dim=1).mean()
    torch.testing.assert_close(out["reg_image"], expected, atol=1e-6, rtol=0)
    other = method.train_step(TrainBatch(batch, labels, frozen.flip(0)), 0)  # the harness's features are used
    assert abs(float(other["reg_image"] - out["reg_image"])) > 1e-4
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


# ---- decoupled inference -----------------------------------------------------------------------
def test_the_head_follows_the_label_space():
    base = LabelSpace.of("caltech101", ["a", "b"], "caltech101", ["a", "b"])
    new = LabelSpace.of("caltech101", ["a", "b"], "caltech101", ["c", "d"])
    everything = LabelSpace.of("caltech101", ["a", "b"], "caltech101", ["a", "b", "c"])
    source = LabelSpace.of("imagenet", ["a", "b"], "imagenet", ["a", "b"])
    target = LabelSpace.of("imagenet", ["a", "b"], "dtd", ["x", "y"])
    variant = LabelSpace.of("imagenet", ["a", "b"], "imagenet_r", ["b"])  # a subset, another dataset
    assert [choose_head(s) for s in (base, new, everything, source, target, variant)] == \
        ["fused", "class", "class", "fused", "class", "class"]
    assert choose_head(new, "fused") == "fused" and choose_head(base, "rep") == "rep"


def test_predict_switches_between_fused_and_class_token_logits(tiny_backbone):
    method, module = setup_mmrl(tiny_backbone)
    batch = EvalBatch(labels=torch.zeros(4, dtype=torch.long), images=images(tiny_backbone))
    module.eval()
    with torch.no_grad():
        image, rep = method.image_features(batch.images)

        def logits_for(classes, space):
            method.prepare_eval(classes, "caltech101", PHOTO, space)
            return method.predict(batch), method.text_features()

        fused, text = logits_for(CLASSNAMES, LabelSpace.of("caltech101", CLASSNAMES, "caltech101", CLASSNAMES))
        torch.testing.assert_close(fused, 0.7 * 100 * image @ text.t() + 0.3 * 100 * rep @ text.t())
        new = ["tractor", "kite"]
        plain, text = logits_for(new, LabelSpace.of("caltech101", CLASSNAMES, "caltech101", new))
        assert plain.shape == (4, 2) and plain.dtype == torch.float32
        torch.testing.assert_close(plain, 100 * image @ text.t())


def test_a_bad_inference_choice_is_one_line(tiny_backbone):
    with pytest.raises(BenchsuiteError, match="mmrl: inference"):
        setup_mmrl(tiny_backbone, inference="both")


# ---- recipes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol, dataset, expected", [
    ("base2new", "dtd", (10, 4, 1, 6.0, 512)),
    ("base2new", "eurosat", (10, 4, 1, 0.01, 2048)),
    ("base2new", "imagenet", (5, 32, 1, 0.5, 512)),
    ("base2new", "toy_objects", (10, 4, 1, 1.0, 512)),
    ("cross_dataset", "imagenet", (1, 32, 0, 0.2, 512)),
    ("domain_generalization", "imagenet", (1, 32, 0, 0.2, 512)),
    ("toy_cross_dataset", "toy_objects", (1, 32, 0, 0.2, 512)),
    ("few_shot", "stanford_cars", (50, 32, 1, 7.0, 512)),
    ("few_shot", "eurosat", (50, 32, 1, 0.01, 2048)),
    ("few_shot", "imagenet", (5, 32, 1, 0.5, 512)),
    ("few_shot", "toy_objects", (50, 32, 1, 0.5, 512)),
])
def test_recipe_is_the_official_config(protocol, dataset, expected):
    r = recipe(protocol, dataset)
    assert (r["epochs"], r["batch_size"], r["warmup_epochs"], r["reg_weight"], r["rep_dim"]) == expected
    assert (r["optimizer"], r["lr"], r["betas"], r["eps"], r["weight_decay"], r["warmup_lr"]) == \
        ("adamw", 0.001, [0.9, 0.999], 1e-8, 5e-4, 1e-5)
    assert (r["alpha"], r["n_rep_tokens"], r["rep_layers"], r["inference"]) == (0.7, 5, list(range(6, 13)), "auto")


def test_base2new_job_through_the_cli(tmp_path, tiny_checkpoint, tiny_backbone, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "mmrl",
                                        "--dataset", "dtd", "--seeds", "1", "--set", "epochs=2", "--quiet"))
    assert code == 0, out + err  # a job that changed the shared backbone would have its result refused
    (result,) = load_results(results).values()
    t, v, e = tiny_backbone.text_width, tiny_backbone.vision_width, tiny_backbone.embed_dim
    assert result["method"]["trainable_params"] == 5 * 512 + 2 * (512 * v + v) + 2 * (512 * t + t) + v * e
    assert set(result["metrics"]) == {"base", "new"}
    assert result["method"]["recipe"]["reg_weight"] == 6.0 and result["method"]["recipe"]["optimizer"] == "adamw"
    assert {"ce", "ce_rep", "reg_image", "reg_text"} <= set(result["training"]["loss_per_epoch"])
