"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR'23), after muzairkhattak/multimodal-prompt-learning
`trainers/maple.py` and its `clip/model.py` (methods.md 4.7).

Behaviour followed
- Text: ``n_ctx`` = 2 learnable context vectors initialised from the first two tokens of
  "a photo of a" ("a", "photo"), plus ``depth - 1`` deep text prompts [n_ctx, text_width], i.i.d.
  N(0, 0.02^2), which replace the context slots (positions 1..n_ctx) before text blocks 1..depth-1.
- Vision prompts are never free parameters: the input-level vision prompt is ``proj(ctx)``
  (Linear(text_width -> vision_width)), appended after the positional embedding and before
  ``ln_pre``; the deep vision prompt of block j is ``F_j(P_j)`` with ``F_j`` its own coupling
  Linear(text_width -> vision_width), replacing the last ``n_ctx`` visual tokens. The ``F_j`` are deep
  copies of ONE freshly initialised Linear, so all start identical (the official ``_get_clones``).
- Logits exp(logit_scale) * cos(prompted image feature, prompted text feature), cross-entropy, the
  same forward at train and test time. The text prompts (context and deep sets) are one `LayerPrompts`;
  deep prompts go through the shared prompted encoders
  (`Backbone.encode_embeddings` / `Backbone.encode_image`); nothing re-implements the transformer loop.
- Parameters on ViT-B/16 at depth 9: 1,024 + 393,984 + 8 x (1,024 + 393,984) = 3,555,072.

The leftover init words (methods.md 1.2, quirk 7.3): with a word init and ``n_ctx <= 4`` the official
code keeps the prompt text "a photo of a" while learning only ``n_ctx`` vectors, so the frozen words
"of a" stay between the learned vectors and the class name: ``[SOS][V1][V2] of a <class>. [EOT]``.
We keep that (``ClassPrompts(backbone, 2, "a photo of a")``): it is what produced the published
numbers. ``n_ctx > 4`` with an init string falls back to random context and "X" placeholders, as the
official code does.

Default recipe per protocol (by task, so toy protocols inherit it)
- base2new: ``vit_b16_c2_ep5_batch4_2ctx``: n_ctx 2 from "a photo of a", depth 9, batch 4,
  lr 0.0035, 5 epochs (the official repo's value; the copy in the PromptSRC repo says 2), 16 shots.
- cross_dataset / domain_generalization (transfer): ``vit_b16_c2_ep5_batch4_2ctx_cross_datasets``:
  ImageNet, lr 0.0026, 2 epochs, depth 3 (evaluation loads epoch 2, the last).
- few_shot: the paper has no few-shot recipe of its own; the base-to-new config is used.
All: SGD momentum 0.9, weight decay 5e-4 (on prompts and couplings), 1 warm-up epoch at 1e-5,
epoch-stepped cosine, last epoch. A depth beyond the model means every block (the official builders
only create prompts for the blocks that exist), so one recipe also runs on the small toy CLIP.

Deliberate deviations
- fp32 master parameters. The official code (muzairkhattak/multimodal-prompt-learning at commit
  69bce21ae8eda80ad6187534b2dce09cf6c59e17) casts the shallow coupling layer to fp16 at build time
  (``trainers/maple.py``, ``self.proj.half()``) and, in ``clip/model.py``'s forward, rounds to fp16
  with ``.half()`` the input-level vision prompt (``VisionTransformer_MaPLe.forward``), every deep
  vision prompt AND every deep text prompt (``ResidualAttentionBlock_MaPLe.forward``, both
  branches), whatever the model's precision; the deep text prompts and deep couplings are fp32
  parameters (created after ``build_model``'s fp16 conversion). Only the first-layer text context is
  not cast: ``MultiModalPromptLearner.ctx`` is created in CLIP's dtype (fp16 under the configs'
  ``PREC: "fp16"``) and added to the positional embedding as it is. (With ``PREC`` fp32 the fp16
  ``proj`` would receive the fp32 context, a dtype mismatch: the configs only use fp16.) Here the
  parameters stay fp32 and every text and vision prompt is cast to the dtype of the hidden states it
  joins (see ``benchsuite_plugins.ivlp``), so the run's precision decides the rounding.
- No sample dropped by the loader (a harness-wide rule; Dassl drops the last partial batch).
- The text encoder stops after the longest EOT position of the call (exact, the mask is causal).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.clip.layer_prompts import LayerPrompts, clamp_depth
from benchsuite.clip.prompts import ClassPrompts, context_from_words, random_context
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, Method, SetupContext, TrainBatch, hookimpl

#: The official code initialises from words only when n_ctx <= 4 (methods.md 1.2).
MAX_WORD_INIT = 4


class MultiModalPrompts(nn.Module):
    """MaPLe's learnable state: text context, deep text prompts and the text-to-vision couplings."""

    def __init__(self, backbone, n_ctx: int, ctx_init: str, depth: int):
        super().__init__()
        if n_ctx < 1 or depth < 1:
            raise BenchsuiteError(f"maple: n_ctx and prompt_depth must be >= 1, got n_ctx={n_ctx}, "
                                  f"prompt_depth={depth}")
        # prompts enter both towers, so the depth is clamped to the shallower one
        depth = clamp_depth(depth, min(backbone.text_layers, backbone.vision_layers))
        text_width, vision_width = backbone.text_width, backbone.vision_width
        ctx_init = ctx_init.replace("_", " ")
        word_init = bool(ctx_init) and n_ctx <= MAX_WORD_INIT
        # parameters are drawn in the official order (ctx, proj, deep text prompts, couplings)
        first = (context_from_words(backbone, ctx_init, n_ctx) if word_init
                 else random_context(n_ctx, text_width))
        self.proj = nn.Linear(text_width, vision_width)
        # set 0 is the context after SOS, sets 1..depth-1 the deep text prompts (shared machinery)
        self.text = LayerPrompts(depth, n_ctx, text_width, first=first)
        single = nn.Linear(text_width, vision_width)
        self.deep_proj = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
        self.prompts = ClassPrompts(backbone, n_ctx, ctx_init if word_init else None)
        self.depth, self.n_ctx = depth, n_ctx

    @property
    def ctx(self) -> nn.Parameter:
        """The learnable context after SOS (the text prompts' set 0)."""
        return self.text.input

    @property
    def deep_text(self) -> list[nn.Parameter]:
        """The deep text prompts P_1..P_{depth-1}, each replacing the context before its block."""
        return list(self.text.sets[1:])

    def vision_prompts(self) -> tuple[torch.Tensor, Optional[list[Optional[torch.Tensor]]]]:
        """(input-level vision prompt, deep vision prompts): always projections of the text prompts."""
        deep = [f(p) for f, p in zip(self.deep_proj, self.deep_text)]
        return self.proj(self.ctx), ([None, *deep] if deep else None)

    def text_features(self) -> torch.Tensor:
        return self.prompts.encode(self.ctx, deep_prompts=self.text.deep())

    def image_features(self, backbone, images: torch.Tensor) -> torch.Tensor:
        shallow, deep = self.vision_prompts()
        return backbone.encode_image(images, prompts=shallow, deep_prompts=deep)


class MaPLe(Method):
    name = "maple"
    summary = "Multi-modal Prompt Learning: vision prompts coupled to deep text prompts (Khattak et al., CVPR'23)"
    image_input = "images"

    def __init__(self) -> None:
        self.backbone = None
        self.learner: MultiModalPrompts | None = None
        self.text_features: torch.Tensor | None = None

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        common = {"batch_size": 4, "n_ctx": 2, "ctx_init": "a photo of a"}
        if protocol.task == "transfer":
            return {**common, "epochs": 2, "lr": 0.0026, "prompt_depth": 3}
        return {**common, "epochs": 5, "lr": 0.0035, "prompt_depth": 9}

    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        r = ctx.recipe
        self.backbone = ctx.backbone
        self.learner = MultiModalPrompts(ctx.backbone, int(r["n_ctx"]), str(r["ctx_init"]), int(r["prompt_depth"]))
        self.learner.prompts.set_classnames(ctx.classnames)
        return self.learner.to(ctx.device)

    def logits(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image_features = self.learner.image_features(self.backbone, images)
        with self.backbone.fp32():
            image = F.normalize(image_features.float(), dim=-1)
            text = F.normalize(text_features.float(), dim=-1)
            return self.backbone.logit_scale * image @ text.t()

    @hookimpl
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        logits = self.logits(batch.images, self.learner.text_features())
        with self.backbone.fp32():
            return {"loss": F.cross_entropy(logits, batch.labels)}

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str) -> None:
        self.learner.prompts.set_classnames(classnames)
        self.text_features = self.learner.text_features()

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        return self.logits(batch.images, self.text_features)


@hookimpl
def benchsuite_methods():
    return [MaPLe]
