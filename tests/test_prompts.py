"""The shared prompt builder (benchsuite/clip/prompts.py): layouts, context kinds, groups, chunking."""

from __future__ import annotations

import pytest
import torch

from benchsuite.clip.prompts import ClassPrompts, context_from_words, random_context
from benchsuite.errors import ContractError

NAMES = ["cat", "golden_retriever", "a rather long class name", "x"]


def builder(backbone, n_ctx=4, prefix=None, names=NAMES):
    prompts = ClassPrompts(backbone, n_ctx, prefix)
    prompts.set_classnames(names)
    return prompts


def test_word_context_prompt_equals_the_plain_text(tiny_backbone):
    prompts = builder(tiny_backbone, 4, "a photo of a")
    ctx = context_from_words(tiny_backbone, "a photo of a", 4)
    with torch.no_grad():
        ours = prompts.encode(ctx)
        reference = tiny_backbone.model.encode_text(
            tiny_backbone.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_leftover_prefix_words_stay_frozen_before_the_class(tiny_backbone):
    """MaPLe's quirk: 2 context slots from "a photo of a"; "of a" stays as frozen words."""
    prompts = builder(tiny_backbone, 2, "a photo of a")
    ctx = context_from_words(tiny_backbone, "a photo of a", 2)
    assert ctx.shape == (2, tiny_backbone.text_width)
    with torch.no_grad():
        ours = prompts.encode(ctx)
        reference = tiny_backbone.model.encode_text(tiny_backbone.tokenize([f"a photo of a {n.replace('_', ' ')}."
                                                                            for n in NAMES]))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_groups_equal_one_call_per_group(tiny_backbone, position):
    torch.manual_seed(0)
    prompts = builder(tiny_backbone)
    ctx = random_context(3, 4, tiny_backbone.text_width)
    grouped = prompts.encode(ctx, groups=True, position=position)
    loop = torch.stack([prompts.encode(ctx[g], position=position) for g in range(3)])
    assert grouped.shape == (3, len(NAMES), tiny_backbone.embed_dim)
    torch.testing.assert_close(grouped, loop, atol=1e-6, rtol=0)


def test_mixed_positions_per_group(tiny_backbone):
    torch.manual_seed(0)
    prompts = builder(tiny_backbone)
    ctx = random_context(4, 4, tiny_backbone.text_width)
    positions = ["front", "middle", "end", "end"]
    grouped = prompts.encode(ctx, groups=True, position=positions)
    for g, position in enumerate(positions):
        torch.testing.assert_close(grouped[g], prompts.encode(ctx[g], position=position), atol=1e-6, rtol=0)
    with pytest.raises(ContractError, match="positions"):
        prompts.encode(ctx, groups=True, position=["end"])


def test_class_specific_context(tiny_backbone):
    torch.manual_seed(0)
    prompts = builder(tiny_backbone)
    ctx = random_context(len(NAMES), 4, tiny_backbone.text_width)
    per_class = prompts.encode(ctx)
    for c in range(len(NAMES)):
        torch.testing.assert_close(per_class[c], prompts.encode(ctx[c])[c], atol=1e-6, rtol=0)


def test_chunks_bound_each_call_and_agree(tiny_backbone, monkeypatch):
    torch.manual_seed(0)
    prompts = builder(tiny_backbone)
    ctx = random_context(5, 4, tiny_backbone.text_width)
    with torch.no_grad():
        whole = prompts.encode(ctx, groups=True, chunk_size=10**6)
    sizes = []
    original = type(tiny_backbone).encode_embeddings

    def spy(self, embeddings, eot, **kw):
        sizes.append(embeddings.shape[0])
        return original(self, embeddings, eot, **kw)

    monkeypatch.setattr(type(tiny_backbone), "encode_embeddings", spy)
    with torch.no_grad():
        chunked = prompts.encode(ctx, groups=True, chunk_size=7)
    assert sizes == [7, 7, 6] and sum(sizes) == 5 * len(NAMES)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_one_call_when_training(tiny_backbone, monkeypatch):
    calls = []
    original = type(tiny_backbone).encode_embeddings
    monkeypatch.setattr(type(tiny_backbone), "encode_embeddings",
                        lambda self, e, eot, **kw: calls.append(e.shape[0]) or original(self, e, eot, **kw))
    prompts = builder(tiny_backbone)
    ctx = torch.nn.Parameter(random_context(6, 4, tiny_backbone.text_width))
    prompts.encode(ctx, groups=True).sum().backward()
    assert calls == [6 * len(NAMES)]
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_context_and_class_set_checks(tiny_backbone):
    prompts = ClassPrompts(tiny_backbone, 4)
    with pytest.raises(ContractError, match="set_classnames"):
        prompts.encode(torch.zeros(4, tiny_backbone.text_width))
    prompts.set_classnames(NAMES)
    with pytest.raises(ContractError, match="slots"):
        prompts.encode(torch.zeros(3, tiny_backbone.text_width))
    with pytest.raises(ContractError, match="fits neither"):
        prompts.encode(torch.zeros(2, 4, tiny_backbone.text_width))
    with pytest.raises(ContractError, match="fewer than n_ctx"):
        context_from_words(tiny_backbone, "a photo", 4)
    assert list(prompts.state_dict()) == []  # class-dependent tensors are never saved


def test_initial_context_words_or_random(tiny_backbone):
    from benchsuite.clip.prompts import initial_context
    from benchsuite.errors import BenchsuiteError

    vectors, prefix = initial_context(tiny_backbone, 4, "a_photo of a", method="m")
    assert prefix == "a photo of a"
    assert torch.equal(vectors, context_from_words(tiny_backbone, "a photo of a", 4))
    torch.manual_seed(0)
    vectors, prefix = initial_context(tiny_backbone, 3, "", method="m", rows=5)
    assert prefix is None and vectors.shape == (5, 3, tiny_backbone.text_width)
    with pytest.raises(BenchsuiteError, match=r"^kgcoop: ctx_init 'a photo of a' has 4 words.*n_ctx is 16"):
        initial_context(tiny_backbone, 16, "a photo of a", method="kgcoop")
