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

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import ContractError

DeepPrompts = Optional[Sequence[Optional[torch.Tensor]]]
#: ``block_hook(i, block, x_in, x_out) -> x_out``: edits what block i returns, from its input (a
#: per-block residual branch, MMA's adapters); None leaves every block as it is.
BlockHook = Optional[Callable[[int, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]


def _expand(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


def check_depth(deep_prompts: DeepPrompts, transformer: nn.Module, tower: str) -> None:
    """Deep prompts deeper than the model would be silently dropped (and still count as trainable)."""
    layers = len(transformer.resblocks)
    if deep_prompts is not None and len(deep_prompts) > layers:
        raise ContractError(f"deep {tower} prompts for {len(deep_prompts)} layers, but the {tower} transformer has "
                            f"{layers}; use a prompt depth of at most {layers} for this backbone")


def _run_blocks(transformer: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor], replace,
                block_hook: BlockHook = None) -> torch.Tensor:
    """Iterate resblocks (batch-first inside), letting `replace(i, x)` edit tokens before block i
    and `block_hook(i, block, x, out)` edit what block i returns. `mask` may also be a callable giving
    the mask for the current sequence length (it grows where representation tokens are inserted)."""
    if not getattr(transformer, "batch_first", True):
        raise NotImplementedError("deep prompts need a batch-first open_clip transformer (open_clip >= 2.24)")
    for i, block in enumerate(transformer.resblocks):
        x = replace(i, x)
        out = block(x, attn_mask=mask(x.shape[1]) if callable(mask) else mask)
        x = out if block_hook is None else block_hook(i, block, x, out)
    return x


def _rep_tokens_step(rep_tokens: DeepPrompts, i: int, h: torch.Tensor, inserted: list) -> torch.Tensor:
    """MMRL's representation tokens before block i: the first set given is inserted after token 0 (the
    sequence grows by K), every later one replaces those K positions; `inserted` ([K]) records K."""
    tokens = rep_tokens[i] if rep_tokens is not None and i < len(rep_tokens) else None
    if tokens is None:
        return h
    r = _expand(tokens.to(h.dtype), h.shape[0])
    if not inserted[0]:
        inserted[0] = r.shape[1]
        return torch.cat([h[:, :1], r, h[:, 1:]], dim=1)
    if r.shape[1] != inserted[0]:
        raise ContractError(f"representation tokens before block {i}: {r.shape[1]} tokens, but {inserted[0]} were "
                            f"inserted earlier; every layer needs the same number")
    return torch.cat([h[:, :1], r, h[:, 1 + inserted[0]:]], dim=1)


def encode_text_embeddings(
    model: nn.Module,
    embeddings: torch.Tensor,
    eot: torch.Tensor,
    *,
    deep_prompts: DeepPrompts = None,
    truncate: bool = True,
    eot_device: Optional[torch.Tensor] = None,
    block_hook: BlockHook = None,
    rep_tokens: DeepPrompts = None,
) -> torch.Tensor:
    """Text features of [N, L, D] prompt embeddings pooled at `eot` (a CPU LongTensor [N]).

    `eot` lives on the host on purpose: its maximum sets the cut length without a device sync.
    Pass the same indices already on the device as `eot_device` to avoid a blocking host-to-device
    copy inside a CUDA training step. `deep_prompts[i]` ([n, D] or [N, n, D]) replaces positions
    1..n before block i (i >= 1). `block_hook` (see :data:`BlockHook`) edits every block's output.
    `rep_tokens[i]` ([K, D] or [N, K, D], MMRL's representation tokens; not combined with
    `deep_prompts`) is inserted after SOS before block i for the first i that has a set (i >= 0; the
    sequence grows by K, the causal mask and the EOT position follow) and replaces those K positions
    before every later block that has one.
    """
    check_depth(deep_prompts, model.transformer, "text")
    check_depth(rep_tokens, model.transformer, "text")
    if deep_prompts is not None and rep_tokens is not None:
        raise ContractError("text deep prompts and representation tokens cannot be combined (both take the "
                            "positions after SOS)")
    eot = eot.cpu()
    length = int(eot.max()) + 1 if truncate else embeddings.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = embeddings[:, :length].to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    inserted = [0]
    if rep_tokens is not None and mask is not None:
        grown = length + max((t.shape[-2] for t in rep_tokens if t is not None), default=0)
        causal = torch.full((grown, grown), float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
        mask = lambda n: causal[:n, :n]  # noqa: E731 (the causal mask of the grown sequence)
    if deep_prompts is None and block_hook is None and rep_tokens is None:
        x = model.transformer(x, attn_mask=mask)
    else:
        def replace(i: int, h: torch.Tensor) -> torch.Tensor:
            h = _rep_tokens_step(rep_tokens, i, h, inserted)
            prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
            if i == 0 or prompt is None:
                return h
            p = _expand(prompt.to(h.dtype), h.shape[0])
            return torch.cat([h[:, :1], p, h[:, 1 + p.shape[1]:]], dim=1)

        x = _run_blocks(model.transformer, x, mask, replace, block_hook)
    x = model.ln_final(x)
    index = eot_device if eot_device is not None else eot.to(x.device)
    x = x[torch.arange(x.shape[0], device=x.device), index + inserted[0] if inserted[0] else index]
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
    block_hook: BlockHook = None,
    rep_tokens: DeepPrompts = None,
):
    """Image features with optional visual prompt tokens; optionally every block's output tokens.

    `prompts` ([n, W] or [B, n, W]) are appended after the positional embedding, before `ln_pre`;
    `deep_prompts[i]` replaces the last n tokens before block i (i >= 1). Returns the pooled,
    projected features, and with `return_block_tokens` also a [layers, B, T, W] stack (detached).
    `block_hook` (see :data:`BlockHook`) edits every block's output. `rep_tokens[i]` ([K, W] or
    [B, K, W], MMRL's representation tokens) is inserted after CLS before block i for the first i that
    has a set (i >= 0) and replaces those K tokens before every later block that has one; the call
    then returns (pooled, rep): rep is the mean over the K tokens of their ``ln_post`` outputs [B, W],
    not projected.
    """
    if prompts is None and deep_prompts is None and not return_block_tokens and block_hook is None \
            and rep_tokens is None:
        return visual(images)
    if rep_tokens is not None and return_block_tokens:
        raise ContractError("representation tokens and return_block_tokens cannot be combined")
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ContractError("prompted image encoding needs an open_clip VisionTransformer backbone")
    check_depth(deep_prompts, visual.transformer, "vision")
    check_depth(rep_tokens, visual.transformer, "vision")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    if prompts is not None:
        x = torch.cat([x, _expand(prompts.to(x.dtype), x.shape[0])], dim=1)
    x = visual.ln_pre(x)
    block_tokens: list[torch.Tensor] = []
    inserted = [0]

    def replace(i: int, h: torch.Tensor) -> torch.Tensor:
        if i > 0 and return_block_tokens:
            block_tokens.append(h.detach())
        h = _rep_tokens_step(rep_tokens, i, h, inserted)
        prompt = deep_prompts[i] if deep_prompts is not None and i < len(deep_prompts) else None
        if i == 0 or prompt is None:
            return h
        p = _expand(prompt.to(h.dtype), h.shape[0])
        return torch.cat([h[:, : h.shape[1] - p.shape[1]], p], dim=1)

    x = _run_blocks(visual.transformer, x, None, replace, block_hook)
    if return_block_tokens:
        block_tokens.append(x.detach())
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    if rep_tokens is not None:
        return pooled, visual.ln_post(x[:, 1:1 + inserted[0]]).mean(dim=1)
    return (pooled, torch.stack(block_tokens)) if return_block_tokens else pooled
