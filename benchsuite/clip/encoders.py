"""Prompted encoders on top of an open_clip `CLIP` model, shared by every method.

Text: methods hand in token *embeddings* (so learned context vectors can sit between frozen word
embeddings) plus the EOT position of each sequence. The text transformer is causal, so the EOT
feature depends only on positions up to EOT; the sequence is therefore cut after the longest EOT
of the call (exact, see tests). Optional deep prompts replace the context slots after SOS at
chosen layers (IVLP, MaPLe, PromptSRC).

Image: without prompts this is `model.visual`; with prompts it rebuilds the ViT forward so that
learned tokens are appended after the positional embedding and before `ln_pre` (VPT-deep as in
IVLP/MaPLe), and can be replaced at later layers. It can also return every block's tokens (GOPro).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ContractError

DeepPrompts = Optional[Sequence[Optional[torch.Tensor]]]


def _expand(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


def check_depth(deep_prompts: DeepPrompts, transformer: nn.Module, tower: str) -> None:
    """Deep prompts deeper than the model would be silently dropped (and still count as trainable)."""
    layers = len(transformer.resblocks)
    if deep_prompts is not None and len(deep_prompts) > layers:
        raise ContractError(f"deep {tower} prompts for {len(deep_prompts)} layers, but the {tower} transformer has "
                            f"{layers}; use a prompt depth of at most {layers} for this backbone")


def _run_blocks(transformer: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor], replace) -> torch.Tensor:
    """Iterate resblocks (batch-first inside), letting `replace(i, x)` edit tokens before block i."""
    if not getattr(transformer, "batch_first", True):
        raise NotImplementedError("deep prompts need a batch-first open_clip transformer (open_clip >= 2.24)")
    for i, block in enumerate(transformer.resblocks):
        x = replace(i, x)
        x = block(x, attn_mask=mask)
    return x


def encode_text_embeddings(
    model: nn.Module,
    embeddings: torch.Tensor,
    eot: torch.Tensor,
    *,
    deep_prompts: DeepPrompts = None,
    truncate: bool = True,
    eot_device: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Text features of [N, L, D] prompt embeddings pooled at `eot` (a CPU LongTensor [N]).

    `eot` lives on the host on purpose: its maximum sets the cut length without a device sync.
    Pass the same indices already on the device as `eot_device` to avoid a blocking host-to-device
    copy inside a CUDA training step. `deep_prompts[i]` ([n, D] or [N, n, D]) replaces positions
    1..n before block i (i >= 1).
    """
    check_depth(deep_prompts, model.transformer, "text")
    eot = eot.cpu()
    length = int(eot.max()) + 1 if truncate else embeddings.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = embeddings[:, :length].to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    if deep_prompts is None:
        x = model.transformer(x, attn_mask=mask)
    else:
        def replace(i: int, h: torch.Tensor) -> torch.Tensor:
            prompt = deep_prompts[i] if i < len(deep_prompts) else None
            if i == 0 or prompt is None:
                return h
            p = _expand(prompt.to(h.dtype), h.shape[0])
            return torch.cat([h[:, :1], p, h[:, 1 + p.shape[1]:]], dim=1)

        x = _run_blocks(model.transformer, x, mask, replace)
    x = model.ln_final(x)
    index = eot_device if eot_device is not None else eot.to(x.device)
    x = x[torch.arange(x.shape[0], device=x.device), index]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_image_prompted(
    visual: nn.Module,
    images: torch.Tensor,
    prompts: Optional[torch.Tensor] = None,
    *,
    deep_prompts: DeepPrompts = None,
    return_block_tokens: bool = False,
):
    """Image features with optional visual prompt tokens; optionally every block's output tokens.

    `prompts` ([n, W] or [B, n, W]) are appended after the positional embedding, before `ln_pre`;
    `deep_prompts[i]` replaces the last n tokens before block i (i >= 1). Returns the pooled,
    projected features, and with `return_block_tokens` also a [layers, B, T, W] stack (detached).
    """
    if prompts is None and deep_prompts is None and not return_block_tokens:
        return visual(images)
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ContractError("prompted image encoding needs an open_clip VisionTransformer backbone")
    check_depth(deep_prompts, visual.transformer, "vision")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    if prompts is not None:
        x = torch.cat([x, _expand(prompts.to(x.dtype), x.shape[0])], dim=1)
    x = visual.ln_pre(x)
    block_tokens: list[torch.Tensor] = []

    def replace(i: int, h: torch.Tensor) -> torch.Tensor:
        if i > 0 and return_block_tokens:
            block_tokens.append(h.detach())
        prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
        if i == 0 or prompt is None:
            return h
        p = _expand(prompt.to(h.dtype), h.shape[0])
        return torch.cat([h[:, : h.shape[1] - p.shape[1]], p], dim=1)

    x = _run_blocks(visual.transformer, x, None, replace)
    if return_block_tokens:
        block_tokens.append(x.detach())
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return (pooled, torch.stack(block_tokens)) if return_block_tokens else pooled
