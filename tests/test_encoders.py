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
