"""Per-layer learnable prompt tokens of one encoder tower, in the form the prompted encoders read.

Deep prompting (VPT-deep, IVLP, PromptSRC, MaPLe's text side) learns one set of ``length`` tokens
of the tower's width per prompted layer: set 0 enters at the input (text: the context slots after
SOS, through `ClassPrompts`; vision: appended after the positional embedding, before ``ln_pre``),
and set i (1 <= i < depth) *replaces* those tokens before transformer block i. Blocks at and after
``depth`` read the tokens the previous block produced. A depth of D therefore means D sets.

`LayerPrompts` only holds the parameters and hands them out; the transformer loop that inserts them
is `encoders.encode_text_embeddings` / `encoders.encode_image_prompted`, shared by every method.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ContractError
from .prompts import random_context


def clamp_depth(depth: int, layers: int) -> int:
    """The number of prompt sets a tower of ``layers`` blocks can hold for a configured ``depth``.

    The official builders (PromptSRC/MaPLe ``clip/model.py``) create per-block prompts for
    ``i < min(depth, layers)`` only, so a depth beyond the model means "every block"; methods follow
    that rule so one recipe runs on ViT-B/16 (12 blocks) and on smaller models alike.
    """
    if depth < 0:
        raise ContractError(f"prompt depth must be >= 0, got {depth}")
    return min(int(depth), int(layers))


class LayerPrompts(nn.Module):
    """``depth`` sets of ``length`` x ``width`` prompt tokens, N(0, std^2) unless ``first`` is given.

    ``first`` ([length, width]) initialises set 0 (e.g. word embeddings of "a photo of a"). Sets are
    drawn in order 0, 1, ... from torch's seeded CPU generator, in fp32 (masters; the encoders cast
    them to the compute dtype on use).
    """

    def __init__(self, depth: int, length: int, width: int, *, first: Optional[torch.Tensor] = None,
                 std: float = 0.02):
        super().__init__()
        if depth < 0 or length < 0:
            raise ContractError(f"prompt depth and length must be >= 0, got depth={depth}, length={length}")
        if first is not None and tuple(first.shape) != (length, width):
            raise ContractError(f"initial prompt of shape {tuple(first.shape)} does not fit ({length}, {width})")
        sets = []
        for i in range(depth if length else 0):
            init = first.detach().float().cpu().clone() if (i == 0 and first is not None) else \
                random_context(length, width, std=std)
            sets.append(nn.Parameter(init))
        self.sets = nn.ParameterList(sets)
        self.length, self.width = length, width

    @property
    def depth(self) -> int:
        return len(self.sets)

    @property
    def input(self) -> Optional[torch.Tensor]:
        """Set 0, the tokens inserted at the input (None when there are no prompts)."""
        return self.sets[0] if len(self.sets) else None

    def deep(self) -> Optional[list[Optional[torch.Tensor]]]:
        """``deep_prompts`` for the encoders: ``[None, set_1, ..., set_{depth-1}]`` (None without deep sets)."""
        if len(self.sets) <= 1:
            return None
        return [None, *self.sets[1:]]
