"""Low-rank adapters (LoRA) on the attention of open_clip's encoders, through an explicit attention.

open_clip's residual blocks call ``nn.MultiheadAttention``, whose fused forward has no place for an
extra term on the query, key or value projection. :class:`ExplicitAttention` computes the same thing
in the open: the packed input projection (``in_proj_weight``, the very frozen parameters of the
replaced module), heads, ``scaled_dot_product_attention`` with the block's mask, the output
projection; with no adapter it equals ``nn.MultiheadAttention`` to fp32 round-off (see the tests).
Each of q, k, v and o may carry a :class:`LoRABranch`, added to that projection's output:

    y = W x + b + scaling * B A dropout(x)

with A [r, in] (Kaiming-uniform, a = sqrt(5), as ``nn.Linear``), B [out, r] (zeros, so an adapted
model starts as the frozen one), dropout on the branch's input only (the frozen path sees x itself)
and ``scaling`` from :func:`lora_scaling`. A and B are fp32 masters, cast to the activations' dtype
on use (fp16/bf16 backbones, autocast).

:func:`apply_lora` replaces the attention of chosen blocks of the text and/or image tower of a model
(a method's private copy, ``SetupContext.private_backbone()``: never the shared backbone) and
returns the adapted modules. Used by CLIP-LoRA (``benchsuite_plugins.clip_lora``) and available to
any method that adapts the encoders (2SFS's LoRA variant, SD-LoRA-style methods).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BenchsuiteError

#: projections a branch can sit on: query, key, value, output
LORA_TARGETS = ("q", "k", "v", "o")
#: encoders of a CLIP model
TOWERS = ("text", "vision")
#: how alpha and r give the branch's scale: "sqrt" alpha / sqrt(r) (CLIP-LoRA's loralib), "linear"
#: alpha / r (the LoRA paper, Microsoft's loralib)
SCALINGS = ("sqrt", "linear")


def lora_scaling(alpha: float, r: int, rule: str = "sqrt") -> float:
    """The factor of the low-rank term: alpha / sqrt(r) ("sqrt") or alpha / r ("linear")."""
    if rule not in SCALINGS:
        raise BenchsuiteError(f"LoRA scaling rule {rule!r} is not one of {', '.join(SCALINGS)}")
    if r < 1:
        raise BenchsuiteError(f"LoRA rank r={r} must be at least 1")
    return alpha / math.sqrt(r) if rule == "sqrt" else alpha / r


class LoRABranch(nn.Module):
    """``scaling * B A dropout(x)`` for one projection of width ``in_features -> out_features``."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float = 0.0,
                 device: torch.device | str | None = None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise BenchsuiteError(f"LoRA dropout {dropout} must be in [0, 1)")
        self.r, self.scaling = int(r), float(scaling)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        """The weight update ``scaling * B A`` [out, in] the branch adds (for merging or inspection)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        return (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scaling


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """nn.MultiheadAttention's mask convention as an additive float mask (bool True = not attended)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class ExplicitAttention(nn.Module):
    """A drop-in for one ``nn.MultiheadAttention`` (same call, same result) with optional LoRA branches.

    Holds the replaced module's own frozen ``in_proj_weight``/``in_proj_bias`` and ``out_proj``
    (same parameter objects, same state-dict names), and ``lora`` (a ModuleDict keyed by target).
    Supported: what CLIP's blocks use (equal q/k/v widths, no bias_k/bias_v, no zero attention,
    ``need_weights=False``, an additive or boolean ``attn_mask`` of shape [L, S] or [N*heads, L, S],
    a boolean ``key_padding_mask`` [N, S]); anything else is refused when the module is built or
    called, never silently computed differently.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise BenchsuiteError(f"ExplicitAttention replaces nn.MultiheadAttention, not {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise BenchsuiteError("ExplicitAttention supports self-attention of equal q/k/v widths without "
                                  "bias_k/bias_v or add_zero_attn (CLIP's attention)")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = float(mha.dropout)
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.lora = nn.ModuleDict()

    def add_lora(self, targets: Iterable[str], r: int, scaling: float, dropout: float = 0.0) -> None:
        """One branch per target (``q``, ``k``, ``v``, ``o``), each with its own dropout."""
        device = self.in_proj_weight.device
        for target in targets:
            if target not in LORA_TARGETS:
                raise BenchsuiteError(f"LoRA target {target!r} is not one of {', '.join(LORA_TARGETS)}")
            if target in self.lora:
                raise BenchsuiteError(f"LoRA target {target!r} is given twice")
            self.lora[target] = LoRABranch(self.embed_dim, self.embed_dim, r, scaling, dropout, device=device)

    def _project(self, x: torch.Tensor, index: int) -> torch.Tensor:
        e = self.embed_dim
        bias = None if self.in_proj_bias is None else self.in_proj_bias[index * e:(index + 1) * e]
        return F.linear(x, self.in_proj_weight[index * e:(index + 1) * e], bias)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise BenchsuiteError("ExplicitAttention does not return attention weights (need_weights=False)")
        key = query if key is None else key
        value = key if value is None else value
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
        if not self.batch_first:  # [L, N, E] -> [N, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query is key and key is value:  # one packed matmul, as nn.MultiheadAttention does
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        qkv = [q, k, v]
        for index, (name, source) in enumerate((("q", query), ("k", key), ("v", value))):
            if name in self.lora:  # drawn in this order (q, k, v), as CLIP-LoRA's q_proj, k_proj, v_proj
                qkv[index] = qkv[index] + self.lora[name](source)
        q, k, v = qkv
        n, length, _ = q.shape
        source_length = k.shape[1]
        heads = lambda t, ln: t.reshape(n, ln, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q, length), heads(k, source_length), heads(v, source_length)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.view(1, 1, length, source_length)
            elif mask.dim() == 3:
                mask = mask.view(n, self.num_heads, length, source_length)
            else:
                raise BenchsuiteError(f"attn_mask of {mask.dim()} dimensions is not supported (2 or 3)")
        if key_padding_mask is not None:
            padding = _float_mask(key_padding_mask, q.dtype).view(n, 1, 1, source_length)
            mask = padding if mask is None else mask + padding
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal and mask is None)
        x = x.transpose(1, 2).reshape(n, length, self.embed_dim)
        out = self.out_proj(x)
        if "o" in self.lora:
            out = out + self.lora["o"](x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None


def _towers(model: nn.Module, towers: Sequence[str]) -> list[tuple[str, nn.Module]]:
    out = []
    for tower in towers:
        if tower not in TOWERS:
            raise BenchsuiteError(f"LoRA tower {tower!r} is not one of {', '.join(TOWERS)}")
        transformer = model.transformer if tower == "text" else getattr(model.visual, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise BenchsuiteError(f"the {tower} tower of this model has no transformer blocks to adapt "
                                  f"(LoRA on attention needs a ViT image tower)")
        out.append((tower, transformer))
    return out


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str] = ("q", "k", "v"), towers: Sequence[str] = TOWERS,
               layers: Optional[Iterable[int]] = None, scaling: str = "sqrt") -> list[ExplicitAttention]:
    """Replace the attention of blocks ``layers`` (default: all) of each tower in ``towers`` by an
    :class:`ExplicitAttention` with LoRA branches on ``targets``; return the new modules, text tower
    first, in block order. ``model`` is an open_clip CLIP: pass a method's private copy only."""
    if not targets:
        raise BenchsuiteError("LoRA needs at least one target among q, k, v, o")
    scale = lora_scaling(alpha, r, scaling)
    wanted = None if layers is None else set(int(i) for i in layers)
    adapted: list[ExplicitAttention] = []
    for tower, transformer in _towers(model, towers):
        for i, block in enumerate(transformer.resblocks):
            if wanted is not None and i not in wanted:
                continue
            attn = getattr(block, "attn", None)
            if isinstance(attn, ExplicitAttention):
                raise BenchsuiteError(f"block {i} of the {tower} tower is adapted already")
            if not isinstance(attn, nn.MultiheadAttention):
                raise BenchsuiteError(f"block {i} of the {tower} tower has no nn.MultiheadAttention "
                                      f"({type(attn).__name__}); LoRA on attention supports open_clip's default blocks")
            explicit = ExplicitAttention(attn)
            explicit.add_lora(targets, r, scale, dropout)
            block.attn = explicit
            adapted.append(explicit)
    return adapted


def lora_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Every LoRA A and B inside the given modules (adapted attentions or a whole model), in order,
    each once."""
    out: dict[int, nn.Parameter] = {}
    for m in modules:
        for branch in m.modules():
            if isinstance(branch, LoRABranch):
                out.setdefault(id(branch.lora_A), branch.lora_A)
                out.setdefault(id(branch.lora_B), branch.lora_B)
    return list(out.values())


__all__ = ["ExplicitAttention", "LoRABranch", "LORA_TARGETS", "SCALINGS", "TOWERS", "apply_lora", "lora_parameters",
           "lora_scaling"]
