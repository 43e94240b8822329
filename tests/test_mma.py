"""MMA (Multi-Modal Adapter, CVPR'24): adapter layout and parameter count, the block branch and its
gradient scaling against an independent computation, the shared projection, the fixed prompt, the
recipes per protocol and a run through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.mma import MMA, adapted_layers

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin"]


def recipe(protocol: str, dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("mma"))
    from benchsuite.engine.recipe import HARNESS_DEFAULTS

    return {**HARNESS_DEFAULTS, **pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)}


def setup_mma(backbone, protocol="base2new", classnames=CLASSNAMES, **overrides):
    method = MMA()
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


def test_parameter_count_and_names_on_vit_b16(vit_b16):
    _, module = setup_mma(vit_b16, classnames=["cat", "dog"])
    per_layer = (512 * 32 + 32 + 32 * 512 + 512) + (768 * 32 + 32 + 32 * 768 + 768) + (32 * 32 + 32)
    assert per_layer == 84_320
    assert n_trainable(module) == 8 * per_layer == 674_560
    assert module.text_layers == module.vision_layers == {k - 1: k for k in range(5, 13)}
    names = {n for n, _ in module.named_parameters()}
    assert "text_adapter.5.down.0.weight" in names and "visual_adapter.12.up.bias" in names
    assert "shared_adapter.7.0.weight" in names and not any(n.startswith("text_adapter.4.") for n in names)
    assert tuple(module.visual_adapter[12].up.weight.shape) == (768, 32)
    assert tuple(module.text_adapter[5].down[0].weight.shape) == (32, 512)
    _, transfer = setup_mma(vit_b16, "cross_dataset", classnames=["cat"])
    assert n_trainable(transfer) == 4 * per_layer == 337_280
    # Kaiming normal (fan_out, ReLU) weights, zero biases
    up, down = module.visual_adapter[9].up.weight.detach(), module.visual_adapter[9].down[0].weight.detach()
    assert float(up.std()) == pytest.approx(math.sqrt(2 / 768), rel=0.05)
    assert float(down.std()) == pytest.approx(math.sqrt(2 / 32), rel=0.05)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_adapted_layers_official_rule_and_shallow_towers():
    assert adapted_layers(12, 5, 12) == {k - 1: k for k in range(5, 13)}
    assert adapted_layers(24, 5, 12) == {k - 1: k for k in range(5, 13)}   # ViT-L/14's vision: absolute blocks
    assert adapted_layers(4, 5, 12) == {1: 6, 2: 9, 3: 12}                  # the toy CLIP
    assert adapted_layers(4, 9, 12) == {2: 9, 3: 12}
    assert adapted_layers(2, 5, 12) == {0: 6, 1: 12}
    assert adapted_layers(2, 12, 12) == {1: 12}


def test_refuses_layer_zero_and_a_bottleneck_as_wide_as_a_tower(tiny_backbone):
    with pytest.raises(BenchsuiteError, match="adapter_start"):
        setup_mma(tiny_backbone, adapter_start=0)
    with pytest.raises(BenchsuiteError, match="adapter_dim"):
        setup_mma(tiny_backbone, adapter_dim=tiny_backbone.text_width)


def _reference_blocks(blocks, x, mask, layers, adapters, shared, scale):
    """Plain autograd, no gradient scaling: out_i = block_i(x) + s * up(ReLU(W_s ReLU(down(ln_1(x)))))."""
    for i, block in enumerate(blocks):
        out = block(x, attn_mask=mask)
        if i in layers:
            k = layers[i]
            a, s = adapters[k], shared[k]
            h = F.relu(F.linear(block.ln_1(x), a.down[0].weight, a.down[0].bias))
            h = F.relu(F.linear(h, s[0].weight, s[0].bias))
            out = out + scale * F.linear(h, a.up.weight, a.up.bias)
        x = out
    return x


def _reference_image(backbone, module, images):
    visual = backbone.model.visual
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding)
    x = _reference_blocks(visual.transformer.resblocks, x, None, module.vision_layers, module.visual_adapter,
                          module.shared_adapter, module.scale)
    return visual.ln_post(x[:, 0]) @ visual.proj


def _reference_text(backbone, module, classnames):
    model = backbone.model
    tokens = backbone.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in classnames])
    x = model.token_embedding(tokens) + model.positional_embedding
    x = _reference_blocks(model.transformer.resblocks, x, model.attn_mask, module.text_layers, module.text_adapter,
                          module.shared_adapter, module.scale)
    x = model.ln_final(x)[torch.arange(len(classnames)), tokens.argmax(dim=-1)]
    return x @ model.text_projection


@pytest.mark.parametrize("scale", [0.001, 0.1])
def test_forward_and_gradient_scaling_against_an_independent_computation(tiny_backbone, scale):
    """Logits and loss equal the definition; every adapter gradient is exactly 1/s times the plain
    autograd gradient (the official gradient-scale layers), earlier layers included."""
    method, module = setup_mma(tiny_backbone, adapter_scale=scale)
    with torch.no_grad():  # make the adapters matter, so that a wrong branch shows in the logits
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    labels = torch.tensor([0, 1, 2, 3])
    image = F.normalize(_reference_image(tiny_backbone, module, images), dim=-1)
    text = F.normalize(_reference_text(tiny_backbone, module, CLASSNAMES), dim=-1)
    ref_loss = F.cross_entropy(tiny_backbone.logit_scale * image @ text.t(), labels)
    ref_grads = torch.autograd.grad(ref_loss, list(module.parameters()))
    loss = method.train_step(TrainBatch(images=images, labels=labels), 0)["loss"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    for (name, p), ref in zip(module.named_parameters(), ref_grads):
        assert float(ref.abs().max()) > 0, name
        torch.testing.assert_close(p.grad * scale, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=name)
    frozen = tiny_backbone.cosine_logits(tiny_backbone.encode_image(images), text)
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=labels, images=images))
    torch.testing.assert_close(logits, tiny_backbone.logit_scale * image.detach() @ text.detach().t(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, frozen.detach(), atol=1e-3)


def test_shared_projection_couples_the_towers(tiny_backbone):
    """An image-only loss trains the vision and the shared adapters, not the text ones; a text-only
    loss the text and the shared ones; the shared tensor of a layer serves both towers."""
    method, module = setup_mma(tiny_backbone)
    images = torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    method.image_features(images).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("text_adapter"))
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith(("visual_adapter", "shared_adapter")))
    module.zero_grad(set_to_none=True)
    method.class_text_features().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("visual_adapter"))
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith(("text_adapter", "shared_adapter")))
    assert set(module.text_layers.values()) == set(module.vision_layers.values()) == {6, 12}


def test_the_prompt_is_fixed_whatever_the_dataset_template(tiny_backbone):
    method, module = setup_mma(tiny_backbone)
    names = [c.replace("_", " ") for c in CLASSNAMES]
    expected = tiny_backbone.embed_tokens(tiny_backbone.tokenize([f"a photo of a {c}." for c in names]))
    assembled = method.prompts.assemble(expected.new_zeros(0, tiny_backbone.text_width), cut=False)
    torch.testing.assert_close(assembled, expected, rtol=0, atol=0)
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "dtd", "{} texture.")
        a = method.text_features.clone()
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
    torch.testing.assert_close(a, method.text_features, rtol=0, atol=0)


def test_a_pass_through_block_hook_changes_nothing(tiny_backbone):
    """The shared encoders' new `block_hook` (identity here) gives the unhooked features."""
    images = torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    tokens = tiny_backbone.tokenize(["a photo of a cat.", "a dog"])
    identity = lambda i, block, x, out: out  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(tiny_backbone.encode_image(images, block_hook=identity),
                                   tiny_backbone.encode_image(images), rtol=1e-6, atol=1e-6)
        emb, eot = tiny_backbone.embed_tokens(tokens), tokens.argmax(dim=-1)
        torch.testing.assert_close(tiny_backbone.encode_embeddings(emb, eot, block_hook=identity),
                                   tiny_backbone.encode_embeddings(emb, eot), rtol=1e-6, atol=1e-6)


def test_recipes_per_protocol():
    b2n, inet = recipe("base2new"), recipe("base2new", "imagenet")
    xd, dg = recipe("cross_dataset", "imagenet"), recipe("domain_generalization", "imagenet")
    fs = recipe("few_shot", "caltech101", 4)
    for r in (b2n, inet, xd, dg, fs):
        assert (r["lr"], r["warmup_epochs"], r["momentum"], r["weight_decay"]) == (0.0015, 0, 0.9, 5e-4)
        assert (r["adapter_end"], r["adapter_dim"], r["adapter_scale"], r["text_ctx_init"]) == \
            (12, 32, 0.001, "a photo of a")
    assert (b2n["epochs"], b2n["batch_size"], b2n["adapter_start"]) == (5, 16, 5)
    assert (inet["epochs"], inet["batch_size"], inet["adapter_start"]) == (5, 128, 5)
    assert xd == dg and (xd["epochs"], xd["batch_size"], xd["adapter_start"]) == (1, 128, 9)
    assert fs == b2n
    assert MMA.image_input == "images" and MMA.setting == "inductive"


def test_mma_runs_end_to_end(tmp_path, tiny_checkpoint, data_root):
    from test_run import assert_valid, run_args, run_quiet

    results = tmp_path / "results"
    argv = run_args("base2new", tiny_checkpoint, data_root, results, "--method", "mma", "--dataset",
                    "oxford_pets", "--seeds", "1", "--set", "epochs=1")
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    (result,) = [json.loads(p.read_text()) for p in (results / "base2new" / "mma" / "oxford_pets").glob("*.json")]
    assert_valid(result)
    assert set(result["metrics"]) == {"base", "new"}
    # 2-block towers of width 64: blocks 1 and 2 as layers 6 and 12; text + vision + shared
    assert result["method"]["trainable_params"] == 2 * 2 * (64 * 32 + 32 + 32 * 64 + 64) + 2 * (32 * 32 + 32)
