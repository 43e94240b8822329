"""CLIP-LoRA and the shared LoRA machinery (benchsuite.clip.lora): explicit attention equal to
nn.MultiheadAttention, the LoRA branch's math, what trains, the recipe, a run through the CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.clip.integrity import backbone_print, changes
from benchsuite.clip.lora import ExplicitAttention, LoRABranch, apply_lora, lora_parameters, lora_scaling
from benchsuite.engine.recipe import resolve_recipe
from benchsuite.engine.train import make_optimizer
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, TrainBatch
from benchsuite_plugins.clip_lora import ClipLoRA
from method_setup import build, default_recipe
from test_run import load_results, run_quiet

CLASSNAMES = ["annual_crop", "forest", "highway"]


def recipe(protocol: str = "few_shot", dataset: str = "dtd", shots: int = 16) -> dict:
    return default_recipe("clip_lora", protocol, dataset, shots)


def setup_method(backbone, classnames=CLASSNAMES, **overrides):
    return build(ClipLoRA, backbone, classnames, **overrides)


# ---- explicit attention -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal_float", "causal_bool"])
@pytest.mark.parametrize("training", [False, True])
def test_explicit_attention_with_zero_lora_equals_multihead_attention(batch_first, mask, training):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first)
    explicit = ExplicitAttention(copy.deepcopy(mha))
    explicit.add_lora("qkvo", r=2, scaling=lora_scaling(1, 2), dropout=0.25)  # B = 0: no change
    mha.train(training), explicit.train(training)
    x = torch.randn(3, 9, 64) if batch_first else torch.randn(9, 3, 64)
    attn_mask = {"none": None, "causal_float": torch.full((9, 9), float("-inf")).triu(1),
                 "causal_bool": torch.ones(9, 9, dtype=torch.bool).triu(1)}[mask]
    with torch.set_grad_enabled(training):
        want = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = explicit(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_explicit_attention_handles_separate_key_value_and_padding():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    explicit = ExplicitAttention(copy.deepcopy(mha)).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    want = mha(q, kv, kv, need_weights=False, key_padding_mask=padding)[0]
    torch.testing.assert_close(explicit(q, kv, kv, key_padding_mask=padding)[0], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(BenchsuiteError, match="attention weights"):
        explicit(q, q, q, need_weights=True)


def test_adapted_encoders_equal_the_frozen_ones_until_b_moves(tiny_backbone):
    private = tiny_backbone.private_copy()
    adapted = apply_lora(private.model, r=2, alpha=1, dropout=0.25)
    assert len(adapted) == tiny_backbone.text_layers + tiny_backbone.vision_layers
    assert all(isinstance(b.attn, ExplicitAttention) for b in private.model.transformer.resblocks)
    images = torch.randn(2, 3, 32, 32)
    texts = ["a photo of a cat.", "a photo of a sea lion."]
    private.model.train()  # dropout on the branches: still nothing while B = 0
    # equal up to round-off: the explicit attention sums in another order than torch's fused kernel
    # (8e-6 relative on one element on an AMD EPYC host), the project's 1e-5 parity tolerance
    torch.testing.assert_close(private.encode_image(images), tiny_backbone.encode_image(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(private.encode_text(texts), tiny_backbone.encode_text(texts), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        adapted[0].lora["v"].lora_B.normal_()
    assert not torch.allclose(private.encode_text(texts), tiny_backbone.encode_text(texts))


def test_the_branch_is_the_merged_weight_and_dropout_only_feeds_it():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    explicit = ExplicitAttention(copy.deepcopy(mha))
    explicit.add_lora("qv", r=2, scaling=lora_scaling(1, 2), dropout=0.5)
    with torch.no_grad():
        for branch in explicit.lora.values():
            branch.lora_B.normal_()
    assert explicit.lora["q"].scaling == pytest.approx(1 / math.sqrt(2))  # CLIP-LoRA: alpha / sqrt(r)
    assert lora_scaling(1, 2, "linear") == 0.5
    x = torch.randn(2, 6, 32)
    merged = copy.deepcopy(mha).eval()  # eval: the official code merges scaling * B A into the weight
    with torch.no_grad():
        merged.in_proj_weight[:32] += explicit.lora["q"].delta()
        merged.in_proj_weight[64:] += explicit.lora["v"].delta()
    explicit.eval()
    torch.testing.assert_close(explicit(x, x, x)[0], merged(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)

    explicit.train()  # dropout: the frozen projection sees x, each branch its own dropped copy
    seen = []

    class Drop(nn.Module):
        def forward(self, t):
            seen.append(t)
            return torch.zeros_like(t)

    for branch in explicit.lora.values():
        branch.dropout = Drop()
    torch.testing.assert_close(explicit(x, x, x)[0], mha.train()(x, x, x, need_weights=False)[0])
    assert len(seen) == 2 and all(t is x for t in seen)


def test_lora_init_is_kaiming_a_and_zero_b():
    torch.manual_seed(3)
    branch = LoRABranch(256, 128, r=4, scaling=0.5, dropout=0.25)
    assert branch.lora_A.shape == (4, 256) and branch.lora_B.shape == (128, 4)
    assert branch.lora_A.abs().max() <= 1 / math.sqrt(256) and branch.lora_A.std() > 0
    assert torch.count_nonzero(branch.lora_B) == 0
    with pytest.raises(BenchsuiteError, match="dropout"):
        LoRABranch(4, 4, 2, 1.0, dropout=1.0)


def test_blocks_without_multihead_attention_are_refused():
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.resblocks = nn.ModuleList([nn.Module()])
    model.transformer.resblocks[0].attn = nn.Linear(4, 4)
    with pytest.raises(BenchsuiteError, match="no nn.MultiheadAttention"):
        apply_lora(model, r=2, alpha=1, towers=("text",))


# ---- the method ---------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol,dataset,shots", [("few_shot", "dtd", 1), ("few_shot", "imagenet", 4),
                                                    ("base2new", "eurosat", 16), ("cross_dataset", "imagenet", 16),
                                                    ("domain_generalization", "imagenet", 16)])
def test_recipe_is_the_official_fixed_one(protocol, dataset, shots):
    r = recipe(protocol, dataset, shots)
    assert r["iterations"] == 500 * shots and r["epochs"] == 0 and r["warmup_epochs"] == 0
    assert (r["optimizer"], r["lr"], r["min_lr"], r["betas"], r["eps"], r["weight_decay"], r["batch_size"]) == (
        "adamw", 2e-4, 1e-6, [0.9, 0.999], 1e-8, 1e-2, 32)
    assert (r["r"], r["alpha"], r["dropout"], r["targets"], r["encoders"], r["scaling"]) == (
        2, 1.0, 0.25, "qkv", "both", "sqrt")
    assert (r["template"], r["logit_scale"]) == ("a photo of a {}.", 100.0)
    resolved, _ = resolve_recipe("clip_lora", r, {}, {}, image_input="images")  # the harness accepts it
    assert resolved["iterations"] == 500 * shots


def test_only_lora_trains_and_the_shared_backbone_is_untouched(tiny_backbone):
    before = backbone_print(tiny_backbone.model)
    method, module, r = setup_method(tiny_backbone)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n, _ in trainable)
    width, layers = tiny_backbone.text_width, tiny_backbone.text_layers
    assert sum(p.numel() for _, p in trainable) == 2 * layers * 3 * 2 * 2 * width  # both towers (width 64)
    assert {n.split(".lora.")[1].split(".")[0] for n, _ in trainable} == {"q", "k", "v"}
    assert method.backbone.model is module.clip and module.clip is not tiny_backbone.model
    opt = make_optimizer([p for _, p in trainable], r)
    module.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = method.train_step(TrainBatch(images, labels), 0)
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert all(p.grad is not None for _, p in trainable)  # A's gradient is zero while B = 0, but present
    opt.step()
    module.eval()
    with torch.no_grad():
        method.prepare_eval(["forest", "sea_lake"], "eurosat", "{} texture.")
        logits = method.predict(EvalBatch(labels=labels, images=images))
    assert logits.shape == (4, 2) and logits.dtype == torch.float32
    assert changes(before, backbone_print(tiny_backbone.model)) == []


def test_text_features_use_the_fixed_template_and_the_adapted_encoder(tiny_backbone):
    method, module, _ = setup_method(tiny_backbone)
    module.eval()
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "eurosat", "a centered satellite photo of {}.")
    want = F.normalize(tiny_backbone.encode_text([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES]), dim=-1)
    torch.testing.assert_close(method.text_features, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for p in lora_parameters(module.modules()):
            p.add_(0.1)
        method.prepare_eval(CLASSNAMES, "eurosat", "")
    assert not torch.allclose(method.text_features, want, atol=1e-4)


def test_logits_are_the_fixed_scale_times_cosine(tiny_backbone):
    method, module, _ = setup_method(tiny_backbone, logit_scale=50.0)
    module.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "eurosat", "")
        logits = method.predict(EvalBatch(labels=torch.zeros(3, dtype=torch.long), images=images))
        image = F.normalize(method.backbone.encode_image(images), dim=-1)
    torch.testing.assert_close(logits, 50.0 * image @ method.text_features.t())


@pytest.mark.parametrize("encoders,grad_text,grad_vision", [("text", True, False), ("vision", False, True)])
def test_one_tower_only_leaves_the_other_frozen(tiny_backbone, encoders, grad_text, grad_vision):
    method, module, _ = setup_method(tiny_backbone, encoders=encoders)
    towers = {"text": module.clip.transformer, "vision": module.clip.visual.transformer}
    assert isinstance(towers["text"].resblocks[0].attn, ExplicitAttention) is grad_text
    assert isinstance(towers["vision"].resblocks[0].attn, ExplicitAttention) is grad_vision
    out = method.train_step(TrainBatch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), 0)
    out["loss"].backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("key,value,message", [("targets", "qx", "targets"), ("encoders", "all", "encoders"),
                                               ("scaling", "log", "scaling"), ("template", "photo", "template")])
def test_bad_options_are_one_line(tiny_backbone, key, value, message):
    with pytest.raises(BenchsuiteError, match=message):
        setup_method(tiny_backbone, **{key: value})


def test_parameter_count_on_vit_b16():
    from benchsuite.clip.backbone import load_backbone

    vit = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module, _ = setup_method(vit, classnames=["cat", "dog"])
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 184_320 == 12 * 3 * 4 * (512 + 768)


def test_clip_lora_runs_through_the_cli(tmp_path, tiny_checkpoint, data_root):
    code, out, err = run_quiet(["run", "--protocol", "base2new", "--method", "clip_lora", "--dataset", "eurosat",
                                "--seeds", "1", "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint),
                                "--data-root", str(data_root), "--results", str(tmp_path / "r"),
                                "--feature-cache", str(tmp_path / "f"), "--quiet", "--set", "clip_lora.iterations=3"])
    assert code == 0, out + err
    (result,) = load_results(tmp_path / "r").values()
    assert result["method"]["trainable_params"] == 2 * 2 * 3 * 2 * 2 * 64
    assert result["method"]["recipe"]["iterations"] == 3 and result["method"]["recipe"]["epochs"] == 0
    assert result["method"]["setting"] == "inductive"
    assert set(result["metrics"]) == {"base", "new"}
    assert result["timing"]["train_images"] <= 3 * 32
