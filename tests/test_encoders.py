"""Backbone shape facts and the prompted encoders' depth rules."""

from __future__ import annotations

import pytest
import torch

from benchsuite.errors import ContractError


def test_shape_facts_of_the_tiny_model(tiny_backbone):
    b = tiny_backbone  # tests/model_configs/bs-tiny-test.json
    assert (b.text_layers, b.vision_layers) == (2, 2)
    assert (b.text_width, b.vision_width, b.embed_dim) == (64, 64, 32)
    assert (b.image_size, b.patch_count, b.text_context_length) == (32, 16, 77)


def test_shape_facts_of_vit_b_16():
    from benchsuite.clip.backbone import load_backbone

    b = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    assert (b.text_layers, b.vision_layers, b.text_width, b.vision_width, b.embed_dim) == (12, 12, 512, 768, 512)
    assert (b.image_size, b.patch_count, b.text_context_length) == (224, 196, 77)


def test_deep_prompts_deeper_than_the_model_are_refused(tiny_backbone):
    b = tiny_backbone
    tokens = b.tokenize(["a photo of a cat."])
    embeddings = b.embed_tokens(tokens)
    text_prompts = [None] + [torch.zeros(2, b.text_width)] * 2  # before blocks 1 and 2: block 2 does not exist
    with pytest.raises(ContractError, match="deep text prompts for 3 layers, but the text transformer has 2"):
        b.encode_embeddings(embeddings, tokens.argmax(dim=-1), deep_prompts=text_prompts)
    vision_prompts = [None] + [torch.zeros(2, b.vision_width)] * 2
    with pytest.raises(ContractError, match="deep vision prompts for 3 layers"):
        b.encode_image(torch.zeros(1, 3, 32, 32), prompts=torch.zeros(2, b.vision_width), deep_prompts=vision_prompts)


def test_prompted_paths_without_prompts_equal_open_clip(tiny_backbone):
    b = tiny_backbone
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = b.model.encode_image(images)
        # the manual ViT loop (taken when block tokens are asked for) with zero prompt tokens
        pooled, blocks = b.encode_image(images, return_block_tokens=True)
        empty = b.encode_image(images, prompts=torch.zeros(0, b.vision_width), deep_prompts=[None, None])
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(empty, reference, atol=1e-5, rtol=0)
    assert blocks.shape == (b.vision_layers, 2, 1 + b.patch_count, b.vision_width)


def test_text_path_with_zero_prompt_tokens_equals_open_clip(tiny_backbone, monkeypatch):
    b = tiny_backbone
    texts = ["a photo of a cat.", "a centered satellite photo of Annual Crop Land.", "x"]
    tokens = b.tokenize(texts)
    empty = [None] + [torch.zeros(0, b.text_width)] * (b.text_layers - 1)  # the manual block loop, nothing replaced
    with torch.no_grad():
        reference = b.model.encode_text(tokens)
        cut = b.encode_embeddings(b.embed_tokens(tokens), tokens.argmax(dim=-1), deep_prompts=empty)
        monkeypatch.setattr(b, "truncate_text", False)
        full = b.encode_embeddings(b.embed_tokens(tokens), tokens.argmax(dim=-1), deep_prompts=empty)
    torch.testing.assert_close(cut, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)


def test_text_truncation_stays_exact_with_deep_text_prompts(tiny_backbone, monkeypatch):
    """The cut after the longest EOT must not move the replaced positions 1..n nor drop what EOT reads."""
    b = tiny_backbone
    torch.manual_seed(3)
    texts = ["a b c d cat.", "a b c d a much longer class name than the others.", "a b c d x"]
    tokens = b.tokenize(texts)
    deep = [None, torch.randn(4, b.text_width) * 0.5]
    embeddings = b.embed_tokens(tokens)
    with torch.no_grad():
        cut = b.encode_embeddings(embeddings, tokens.argmax(dim=-1), deep_prompts=deep)
        monkeypatch.setattr(b, "truncate_text", False)
        full = b.encode_embeddings(embeddings, tokens.argmax(dim=-1), deep_prompts=deep)
        plain = b.encode_embeddings(embeddings, tokens.argmax(dim=-1))
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)
    assert (cut - plain).abs().max() > 1e-3  # the deep prompts did change the features


def test_layer_prompts_sets_init_and_deep_list():
    from benchsuite.clip.layer_prompts import LayerPrompts, clamp_depth

    torch.manual_seed(0)
    first = torch.arange(12.0).view(3, 4)
    prompts = LayerPrompts(5, 3, 4, first=first)
    assert prompts.depth == 5 and all(tuple(p.shape) == (3, 4) and p.requires_grad for p in prompts.sets)
    assert torch.equal(prompts.input.detach(), first)
    deep = prompts.deep()
    assert deep[0] is None and len(deep) == 5 and all(d is p for d, p in zip(deep[1:], prompts.sets[1:]))
    big = LayerPrompts(2, 2000, 50)
    assert abs(float(big.sets[1].detach().std()) - 0.02) < 0.001 and abs(float(big.sets[1].detach().mean())) < 0.001
    assert LayerPrompts(1, 3, 4).deep() is None  # input-level set only: shallow prompting
    assert LayerPrompts(4, 0, 4).depth == 0 and LayerPrompts(0, 3, 4).input is None
    assert (clamp_depth(9, 12), clamp_depth(9, 4), clamp_depth(0, 4)) == (9, 4, 0)
    with pytest.raises(ContractError, match="does not fit"):
        LayerPrompts(2, 3, 4, first=torch.zeros(2, 4))
