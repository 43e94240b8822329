"""CLIP-LoRA: Low-Rank Few-Shot Adaptation of Vision-Language Models (Zanella & Ben Ayed, CVPRW 2024),
after MaxZanella/CLIP-LoRA at commit 358f0d7361f59e66c0b2d0b672a3dafb143a759b (2024-10-14):
``main.py``, ``run_utils.py`` (defaults), ``lora.py`` (``run_lora``), ``loralib/layers.py``
(``PlainMultiheadAttentionLoRA``, ``LinearLoRA``, ``LoRALayer``), ``loralib/utils.py`` (``apply_lora``),
``datasets/*.py`` (templates).

Behaviour followed
- LoRA on the query, key and value projections of every attention of both encoders (``--encoder
  both --position all --params q k v``): the official code replaces each ``nn.MultiheadAttention``
  by an explicit attention with separate projections; here ``benchsuite.clip.lora.ExplicitAttention``
  (shared machinery, equal to ``nn.MultiheadAttention`` with zero adapters) on the job's private
  copy of the backbone. Rank r = 2, alpha = 1, and the official scaling alpha / sqrt(r) = 0.7071
  (``LoRALayer``: ``self.scaling = self.lora_alpha / math.sqrt(self.r)``, the alpha / r line is
  commented out). A ~ Kaiming-uniform(a = sqrt(5)), B = 0. Dropout 0.25 on the LoRA branch's input
  only, one independent dropout per projection; the frozen projection sees the undropped input
  (``LinearLoRA.forward``). In eval mode the official code merges B A into the weights, which is the
  same function.
- Only the LoRA matrices train (``mark_only_lora_as_trainable``): r (in + out) per projection,
  184,320 parameters on ViT-B/16 (text 12 x 3 x 2,048, image 12 x 3 x 3,072).
- Loss: cross-entropy on 100 * cos(image, text), image features of the LoRA image encoder, text
  features of the LoRA text encoder recomputed at every step (the text tower is tuned) for the
  training classes with the template "a photo of a {}.". The official ``main.py`` fixes
  ``logit_scale = 100`` (not the model's exp(logit_scale); for OpenAI weights both are 100.0): the
  recipe's ``logit_scale``. The template is the same for every dataset: each ``datasets/*.py`` keeps
  its dataset-specific template inside a string literal and assigns ``template = ['a photo of a
  {}.']`` (ImageNet too).
- Inference: the same template through the LoRA text encoder for the evaluated class names, the LoRA
  image encoder, cosine logits.
- Whole model in train mode while training (``clip_model.train()``), eval mode for evaluation.

Default recipe (the same for every protocol, dataset and shot count: the method's claim is fixed
hyper-parameters, ``run_utils.py`` defaults)
- AdamW lr 2e-4, betas (0.9, 0.999), eps 1e-8 (torch default), weight decay 1e-2; batch 32;
  ``iterations`` = 500 x shots optimizer steps (``n_iters * shots``; 8,000 at 16 shots) over
  reshuffled passes of the training set (``shuffle=True, drop_last=False``), cut after exactly that
  many steps; cosine learning rate stepped per iteration, ``CosineAnnealingLR(T_max=iterations,
  eta_min=1e-6)`` (recipe ``min_lr``), no warm-up; last iterate evaluated (``VALIDATION = False``:
  no model selection, no hyper-parameter search).
- few_shot: K shots of all classes, 500 K iterations (the paper's protocol).
- base2new (not in the CLIP-LoRA paper, which reports few-shot only, MaxZanella/CLIP-LoRA#15):
  trained on the 16-shot base classes with the same recipe (8,000 iterations); new classes are
  embedded by the LoRA-adapted text encoder with the same template, exactly as base classes. This
  is how the 2SFS repository runs its CLIP-LoRA baseline (``--mode cliplora --setting base2new``).
- cross_dataset / domain_generalization (not in the paper): the same recipe on 16-shot ImageNet;
  targets are classified like new classes.
- Options: ``r``, ``alpha``, ``dropout``, ``targets`` (letters of q, k, v, o), ``encoders`` (both,
  text, vision: the official ``--encoder``; a frozen tower's features are computed without
  gradient), ``scaling`` (sqrt: official; linear: alpha / r), ``template``, ``logit_scale``.

Deliberate deviations
- fp32 master LoRA weights everywhere (the official LoRA layers are fp32 too); the official runs
  the forward under fp16 autocast with a GradScaler (the harness's ``amp`` on CUDA does the same),
  and computes logits and loss in fp16: here logits and loss are fp32. fp32 on CPU.
- The LoRA term is computed factored, (dropout(x) A^T) B^T, instead of x (B A)^T: the same value up
  to round-off, cheaper. The packed q/k/v projection is one matmul (the official splits it into three
  Linear layers): the same dot products.
- The text encoder stops after the longest EOT position of the call (exact, causal mask).
- Few-shot samples and data loading are the harness's (CoOp toolbox sampling, the protocol's train
  transform, which is the official RandomResizedCrop(0.08-1, bicubic) + flip + CLIP normalisation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.clip.lora import LORA_TARGETS, SCALINGS, apply_lora, lora_parameters
from benchsuite.data.registry import format_template
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, Method, SetupContext, TrainBatch, hookimpl

#: the official ``--encoder`` choices and the towers they adapt
ENCODERS = {"both": ("text", "vision"), "text": ("text",), "vision": ("vision",)}
#: ``n_iters`` of ``run_utils.py``: iterations per shot
ITERATIONS_PER_SHOT = 500


def parse_targets(text: str, method: str) -> tuple[str, ...]:
    """``"qkv"`` -> ("q", "k", "v"); every letter one of q, k, v, o, each at most once."""
    letters = tuple(str(text))
    if not letters or any(t not in LORA_TARGETS for t in letters) or len(set(letters)) != len(letters):
        raise BenchsuiteError(f"{method}: targets={text!r} must be letters of {''.join(LORA_TARGETS)}, each once "
                              f"(e.g. qkv)")
    return letters


class LoRACLIP(nn.Module):
    """The job's private CLIP with LoRA attention; only the LoRA matrices have requires_grad."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip


class ClipLoRA(Method):
    name = "clip_lora"
    summary = "CLIP-LoRA: LoRA (r=2) on q, k, v of both encoders, fixed hyper-parameters (Zanella & Ben Ayed, CVPRW'24)"
    image_input = "images"

    def __init__(self) -> None:
        self.backbone = None
        self.module: LoRACLIP | None = None
        self.towers: tuple[str, ...] = ()
        self.template = "a photo of a {}."
        self.scale = 100.0
        self.train_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.frozen_text: torch.Tensor | None = None
        self.text_features: torch.Tensor | None = None

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        return {"epochs": 0, "iterations": ITERATIONS_PER_SHOT * shots, "warmup_epochs": 0, "batch_size": 32,
                "optimizer": "adamw", "lr": 2e-4, "min_lr": 1e-6, "betas": [0.9, 0.999], "eps": 1e-8,
                "weight_decay": 1e-2, "r": 2, "alpha": 1.0, "dropout": 0.25, "targets": "qkv", "encoders": "both",
                "scaling": "sqrt", "template": "a photo of a {}.", "logit_scale": 100.0}

    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        r = ctx.recipe
        if r["encoders"] not in ENCODERS:
            raise BenchsuiteError(f"clip_lora: encoders={r['encoders']!r} is not one of {', '.join(ENCODERS)}")
        if r["scaling"] not in SCALINGS:
            raise BenchsuiteError(f"clip_lora: scaling={r['scaling']!r} is not one of {', '.join(SCALINGS)}")
        if "{}" not in str(r["template"]):
            raise BenchsuiteError(f"clip_lora: template={r['template']!r} needs one {{}} for the class name")
        self.backbone = ctx.private_backbone()
        self.towers = ENCODERS[r["encoders"]]
        self.template, self.scale = str(r["template"]), float(r["logit_scale"])
        adapted = apply_lora(self.backbone.model, r=int(r["r"]), alpha=float(r["alpha"]), dropout=float(r["dropout"]),
                             targets=parse_targets(r["targets"], self.name), towers=self.towers,
                             scaling=str(r["scaling"]))
        for p in lora_parameters(adapted):
            p.requires_grad_(True)
        self.module = LoRACLIP(self.backbone.model)
        self.train_text = self._tokens(ctx.classnames)
        if "text" not in self.towers:  # the official ``--encoder vision``: fixed text features
            with torch.no_grad():
                self.frozen_text = self._encode_text(self.train_text)
        return self.module

    # ---- encoders ----------------------------------------------------------------------------
    def _tokens(self, classnames: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frozen token embeddings, EOT on the host, EOT on the device) of the template prompts."""
        tokens = self.backbone.tokenize([format_template(self.template, c) for c in classnames])
        eot = tokens.argmax(dim=-1)
        return self.backbone.embed_tokens(tokens), eot, eot.to(self.backbone.device)

    def _encode_text(self, text: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        embeddings, eot, eot_device = text
        features = self.backbone.encode_embeddings(embeddings, eot, eot_device=eot_device)
        with self.backbone.fp32():
            return F.normalize(features.float(), dim=-1)

    def _logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if "vision" in self.towers:
            image = self.backbone.encode_image(images)
        else:
            with torch.no_grad():
                image = self.backbone.encode_image(images)
        with self.backbone.fp32():
            return self.scale * F.normalize(image.float(), dim=-1) @ text.t()

    # ---- hooks -------------------------------------------------------------------------------
    @hookimpl
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        text = self.frozen_text if self.frozen_text is not None else self._encode_text(self.train_text)
        logits = self._logits(batch.images, text)
        with self.backbone.fp32():
            return {"loss": F.cross_entropy(logits, batch.labels)}

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str) -> None:
        self.text_features = self._encode_text(self._tokens(classnames))

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        return self._logits(batch.images, self.text_features)


@hookimpl
def benchsuite_methods():
    return [ClipLoRA]
