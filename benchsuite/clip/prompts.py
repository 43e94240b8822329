"""The one prompt builder of every text-prompt method: learnable context between frozen token embeddings.

For a class set, the text ``"<prefix_text> <class>."`` is tokenised once; its frozen embeddings give the
SOS slot (``token_prefix``) and everything after the ``n_ctx`` context slots (``token_suffix``: class
tokens, ".", EOT, padding), as in CoOp's ``PromptLearner`` (methods.md 1.2). A prompt is
``[SOS][ctx_1..ctx_M][class][.][EOT]`` ("end"); "middle" and "front" move the class tokens to the
middle of the context (split at M // 2) or before it. Those two layouts are permutations of the
"end" layout that leave the EOT position unchanged, so every layout is one gather over the same
assembled sequence, vectorised over classes and context groups.

Context shapes (``encode`` / ``assemble``):

- ``[M, D]``: one context shared by all classes (CoOp, KgCoOp, ProGrad, IVLP...) -> features ``[C, E]``;
- ``[C, M, D]``: class-specific context (CoOp's CSC) -> ``[C, E]``;
- ``[G, M, D]`` with ``groups=True``: one context per group, every group paired with every class
  (CoCoOp's per-image context, ProDA's several prompts per class) -> ``[G, C, E]``; ``position`` may
  then be one layout per group (ProDA mixes end, middle and front).

All ``G x C`` sequences go through the text encoder in batched calls of at most ``chunk_size``
sequences, assembled chunk by chunk, so memory stays bounded under ``torch.no_grad`` (CoCoOp on
ImageNet predicts 100 images x 1,000 classes = 100,000 sequences per test batch). With
``chunk_size=None`` every sequence goes into one call (what a training step of a few groups wants).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..data.registry import clean_classname
from ..errors import BenchsuiteError, ContractError

POSITIONS = ("end", "middle", "front")
#: Sequences per text-encoder call when encoding without a chunk size of the caller's (evaluation).
EVAL_CHUNK = 8192

Position = Union[str, Sequence[str]]


def context_from_words(backbone, words: str, n_ctx: int) -> torch.Tensor:
    """Frozen embeddings of tokens 1..n_ctx of ``words`` (SOS skipped), fp32 on the CPU: the word
    initialisation of the CoOp family. ``n_ctx`` may be smaller than the number of tokens (MaPLe keeps
    2 of "a photo of a")."""
    tokens = backbone.tokenize([words.replace("_", " ")])
    n_tokens = int(tokens.argmax(dim=-1)[0]) - 1
    if n_ctx > n_tokens:
        raise ContractError(f"context init {words!r} has {n_tokens} tokens, fewer than n_ctx={n_ctx}")
    return backbone.embed_tokens(tokens)[0, 1:1 + n_ctx].float().cpu().clone()


def initial_context(backbone, n_ctx: int, ctx_init: str, *, method: str,
                    rows: Optional[int] = None) -> tuple[torch.Tensor, Optional[str]]:
    """The CoOp family's two initialisations in one place (CoOp, CoCoOp, KgCoOp): the frozen
    embeddings of the words of ``ctx_init``, whose word count fixes ``n_ctx`` as in those codes, or
    N(0, 0.02^2) vectors (``[rows, n_ctx, D]`` for a class-specific context). Returns the vectors
    and the ``ClassPrompts`` prefix text (the init words; None for "X" placeholders)."""
    if ctx_init:
        words = ctx_init.replace("_", " ")
        count = len(words.split(" "))
        if n_ctx != count:
            raise BenchsuiteError(f"{method}: ctx_init {words!r} has {count} words, which fixes the context length, "
                                  f"but n_ctx is {n_ctx}; set n_ctx={count}, or ctx_init=\"\" for {n_ctx} randomly "
                                  f"initialised context vectors")
        return context_from_words(backbone, words, n_ctx), words
    return random_context(*((rows, n_ctx) if rows else (n_ctx,)), backbone.text_width), None


def random_context(*shape: int, std: float = 0.02) -> torch.Tensor:
    """i.i.d. N(0, std^2) context, drawn on the CPU in fp32 from torch's seeded generator."""
    vectors = torch.empty(shape, dtype=torch.float32)
    nn.init.normal_(vectors, std=std)
    return vectors


def _layout(position: str, n_ctx: int, name_len: int, length: int) -> list[int]:
    """Source index, in the "end" layout, of every position of the given layout."""
    ctx = list(range(1, 1 + n_ctx))
    name = list(range(1 + n_ctx, 1 + n_ctx + name_len))
    rest = list(range(1 + n_ctx + name_len, length))
    if position == "end":
        return [0, *ctx, *name, *rest]
    if position == "middle":
        half = n_ctx // 2
        return [0, *ctx[:half], *name, *ctx[half:], *rest]
    return [0, *name, *ctx, *rest]


class ClassPrompts(nn.Module):
    """Frozen token embeddings of one class set and the assembly of learnable context into them.

    ``prefix_text`` is the text whose first ``n_ctx`` tokens after SOS the context replaces: the init
    words, or ``n_ctx`` copies of "X" (the default). Tokens of ``prefix_text`` beyond ``n_ctx`` stay as
    frozen words before the class name (MaPLe's leftover "of a", ProGrad's comma quirk).
    The class-dependent tensors are non-persistent buffers: a trained context is evaluated on any other
    class set after :meth:`set_classnames`, and they are never saved with the method's state.
    ``name_template`` is the text after the prefix, ``{}`` standing for the class name (default
    ``"{}."``; TCP's per-dataset tails such as ``"{}, a type of pet."``); the "middle" and "front"
    layouts assume it starts with the name.
    """

    def __init__(self, backbone, n_ctx: int, prefix_text: Optional[str] = None, *, name_template: str = "{}."):
        super().__init__()
        self.name_template = name_template
        if n_ctx < 0:
            raise ContractError(f"n_ctx must be >= 0, got {n_ctx}")
        self.backbone = [backbone]  # a list keeps the frozen model out of this module's state
        self.n_ctx = n_ctx
        self.prefix_text = " ".join(["X"] * n_ctx) if prefix_text is None else prefix_text.replace("_", " ")
        self.classnames: list[str] = []

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """(Re)build prefix/suffix embeddings, EOT positions and the layouts for a class set."""
        backbone = self.backbone[0]
        self.classnames = list(classnames)
        names = [clean_classname(c) for c in classnames]
        text = f"{self.prefix_text} " if self.prefix_text else ""
        tokens = backbone.tokenize([f"{text}{self.name_template.format(name)}" for name in names])
        embedding = backbone.embed_tokens(tokens)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:], persistent=False)
        self.eot = tokens.argmax(dim=-1)  # host tensor: sets the truncation length without a device sync
        self.register_buffer("eot_index", self.eot.to(embedding.device), persistent=False)
        self.name_lens = [len(backbone.tokenizer.encode(name)) for name in names]
        self.length = tokens.shape[1]
        layouts = [[_layout(p, self.n_ctx, n, self.length) for n in self.name_lens] for p in POSITIONS]
        self.register_buffer("layouts", torch.tensor(layouts, dtype=torch.long, device=embedding.device),
                             persistent=False)

    # ---- assembly ---------------------------------------------------------------------------
    def _position_index(self, position: Position, groups: int) -> torch.Tensor:
        """Layout id per group (host LongTensor [groups])."""
        names = [position] * groups if isinstance(position, str) else list(position)
        if len(names) != groups:
            raise ContractError(f"got {len(names)} class-token positions for {groups} context groups")
        bad = sorted({p for p in names if p not in POSITIONS})
        if bad:
            raise ContractError(f"class-token position {bad[0]!r} is not one of {POSITIONS}")
        return torch.tensor([POSITIONS.index(p) for p in names], dtype=torch.long)

    def _kind(self, ctx: torch.Tensor, groups: bool) -> tuple[str, int]:
        if not self.classnames:
            raise ContractError("ClassPrompts: call set_classnames() before building prompts")
        if ctx.dim() == 2 and not groups:
            kind, n_groups = "shared", 1
        elif ctx.dim() == 3 and groups:
            kind, n_groups = "grouped", ctx.shape[0]
        elif ctx.dim() == 3 and ctx.shape[0] == self.n_cls:
            kind, n_groups = "class", 1
        else:
            raise ContractError(f"context of shape {tuple(ctx.shape)} fits neither [M, D], [n_cls={self.n_cls}, M, D] "
                                f"nor [G, M, D] with groups=True")
        if ctx.shape[-2] != self.n_ctx:
            raise ContractError(f"context has {ctx.shape[-2]} vectors, the prompts have {self.n_ctx} slots")
        return kind, n_groups

    def _assemble_chunk(self, ctx: torch.Tensor, kind: str, g: torch.Tensor, c: torch.Tensor,
                        layout: Optional[torch.Tensor], keep: int) -> torch.Tensor:
        """Embeddings [n, keep, D] of the sequences (group g[i], class c[i]) on the device; ``layout``
        (host, layout id per sequence) is None when every sequence uses the "end" layout."""
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = ctx.to(prefix.dtype)
        if kind == "shared":
            ctx_rows = ctx.unsqueeze(0).expand(c.shape[0], -1, -1)
        else:
            ctx_rows = ctx[g if kind == "grouped" else c]
        tail = max(keep - 1 - self.n_ctx, 0)
        end = torch.cat([prefix[c], ctx_rows, suffix[:, :tail][c]], dim=1)[:, :keep]
        if layout is None:
            return end
        index = self.layouts[layout.to(self.layouts.device, non_blocking=True), c, :keep]
        return end[torch.arange(c.shape[0], device=end.device).unsqueeze(1), index]

    def _plan(self, ctx: torch.Tensor, position: Position, groups: bool):
        """Context kind, group count, layout id per group (None: all "end") and the cut length."""
        kind, n_groups = self._kind(ctx, groups)
        layout_of_group = self._position_index(position, n_groups)
        if bool(layout_of_group.eq(0).all()):
            layout_of_group = None
        keep = int(self.eot.max()) + 1 if self.backbone[0].truncate_text else self.length
        return kind, n_groups, layout_of_group, keep

    def _chunks(self, n_groups: int, chunk_size: Optional[int]):
        """(first, last) flat sequence ranges over group-major order."""
        total = n_groups * self.n_cls
        step = total if not chunk_size else max(1, int(chunk_size))
        return [(start, min(start + step, total)) for start in range(0, total, step)]

    def _indices(self, start: int, stop: int, device: torch.device):
        """Group and class of flat sequences start..stop-1, on the host and (created there, no copy) the device."""
        host, dev = torch.arange(start, stop), torch.arange(start, stop, device=device)
        return host // self.n_cls, host % self.n_cls, dev // self.n_cls, dev % self.n_cls

    def assemble(self, ctx: torch.Tensor, *, position: Position = "end", groups: bool = False,
                 cut: bool = True) -> torch.Tensor:
        """Prompt embeddings: [C, L', D], or [G, C, L', D] with ``groups``; L' is the length the text
        encoder will use (all positions with ``cut=False``)."""
        kind, n_groups, layout_of_group, keep = self._plan(ctx, position, groups)
        keep = keep if cut else self.length
        g_host, c_host, g, c = self._indices(0, n_groups * self.n_cls, self.token_prefix.device)
        layout = None if layout_of_group is None else layout_of_group[g_host]
        out = self._assemble_chunk(ctx, kind, g, c, layout, keep)
        return out.view(n_groups, self.n_cls, *out.shape[1:]) if groups else out

    def encode(self, ctx: torch.Tensor, *, position: Position = "end", groups: bool = False,
               deep_prompts=None, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Text features (not normalised) of every prompt: [C, E], or [G, C, E] with ``groups``.

        ``deep_prompts`` go to ``Backbone.encode_embeddings`` unchanged (shared by all sequences).
        ``chunk_size`` bounds the sequences per text-encoder call; ``None`` means one call, unless
        gradients are off, where :data:`EVAL_CHUNK` bounds evaluation memory.
        """
        backbone = self.backbone[0]
        kind, n_groups, layout_of_group, keep = self._plan(ctx, position, groups)
        if chunk_size is None and not torch.is_grad_enabled():
            chunk_size = EVAL_CHUNK
        device = self.token_prefix.device
        features = []
        for start, stop in self._chunks(n_groups, chunk_size):
            g_host, c_host, g, c = self._indices(start, stop, device)
            layout = None if layout_of_group is None else layout_of_group[g_host]
            embeddings = self._assemble_chunk(ctx, kind, g, c, layout, keep)
            features.append(backbone.encode_embeddings(embeddings, self.eot[c_host], deep_prompts=deep_prompts,
                                                       eot_device=self.eot_index[c]))
        out = features[0] if len(features) == 1 else torch.cat(features)
        return out.view(n_groups, self.n_cls, -1) if groups else out
