"""MMRL: Multi-Modal Representation Learning (Guo & Gu, CVPR'25), after yunncheng/MMRL at commit
27d8821f6ac135a1d0c8e4c5ed78af14df0cd82e: ``trainers/mmrl.py``, ``clip/model_mmrl.py`` (the ``MMRL`` branches of
``ResidualAttentionBlock`` and ``VisionTransformer``), ``trainers/config.py``, ``train.py`` (``extend_cfg``,
``setup_cfg``), ``configs/trainers/MMRL/*.yaml`` and ``scripts/mmrl/*.sh``.

Behaviour followed
- A shared representation space: K = ``n_rep_tokens`` (5) learnable tokens [K, rep_dim] (rep_dim 512),
  N(0, 0.02^2). For every layer l of ``rep_layers`` ([6, ..., 12], 1-indexed blocks) one
  ``Linear(rep_dim, vision_width)`` and one ``Linear(rep_dim, text_width)`` map them into the towers;
  the j-th rep layer uses the j-th pair. All pairs start as copies of one default-initialised Linear
  (the official ``_get_clones`` deep-copies a single module).
- Insertion (``benchsuite.clip.encoders``, ``rep_tokens``): before block l-1 (0-based) of the first rep
  layer the K tokens are inserted after token 0 (CLS / SOS; the sequence grows by K, no positional
  embedding); before every later rep layer they replace those K positions; blocks between keep what
  the previous block produced. Text: from the first rep layer on, the causal mask covers the grown
  sequence and the EOT feature is read at EOT + K. The text input is the frozen embeddings of the
  dataset's hand-crafted template (``CUSTOM_TEMPLATES``, the ``template`` benchsuite passes), no
  learnable context.
- Image features: the class token (``ln_post`` -> the frozen ``proj``) and the representation feature
  (the mean over the K tokens of their ``ln_post`` outputs, times the trainable ``proj_rep``
  [vision_width, embed_dim], initialised ``width**-0.5 * randn`` as the official ``VisionTransformer``).
- Logits 100 * cos (the official literal 100, not exp(logit_scale); equal for OpenAI weights): ``logits``
  (class token), ``logits_rep`` (representation feature), both against the prompted text features;
  fused = alpha * logits + (1 - alpha) * logits_rep, alpha 0.7.
- Loss (``MMRL_Loss``): alpha * CE(logits) + (1 - alpha) * CE(logits_rep) + reg_weight * (1 - mean cos(f, f~))
  + reg_weight * (1 - mean cos(w, w~)); f the normalised class-token feature of the prompted image
  encoder, f~ the frozen encoder's normalised features of the same augmented batch (the harness's
  ``batch.image_features``, ``image_input = "images+features"``, read from the shared training
  features of the keyed views, as PromptSRC's), w the prompted text features of the
  training classes, w~ the frozen CLIP's text features of the template. Parts returned: ``ce``,
  ``ce_rep``, ``reg_image``, ``reg_text`` (unweighted), and ``loss``.
- Trained: the tokens, both projection lists and ``proj_rep`` (the official ``names_to_update``:
  ``representation_learner``, ``image_encoder.proj_rep``); on ViT-B/16, rep_dim 512: 2,560 +
  7 x 393,984 + 7 x 262,656 + 393,216 = 4,992,256 parameters (rep_dim 2048, EuroSAT: 18,762,496).
- Inference by label space (the official ``test()`` switches on ``TASK``, ``DATASET.SUBSAMPLE_CLASSES``
  and ``DATASET.NAME``; here on ``prepare_eval``'s ``label_space``): fused logits when the evaluated set
  is the training dataset's training classes (``label_space.same_dataset`` and kind ``"base"``), the
  class-token logits otherwise. Mapping: B2N base -> fused, B2N new (and all) -> class token (official:
  ``logits_fusion if SUBSAMPLE_CLASSES == "base" else logits``); cross-dataset: ImageNet (the source)
  -> fused, the other ten -> class token; domain generalisation (the same CD task in the official
  scripts, ``dataset != "ImageNet"``): ImageNetV2/-Sketch/-A/-R -> class token (they are other
  datasets, even where their classes are all seen); few-shot (test classes = training classes) ->
  fused. The representation tokens stay inserted in the image encoder in every mode. The recipe key
  ``inference`` (``"auto"``; ``"fused"``, ``"class"``, ``"rep"`` force one head) is for ablations.

Default recipe per protocol (by task, so toy protocols inherit it). Every one: AdamW (Dassl
``build_optimizer``: betas 0.9/0.999, eps 1e-8, weight decay 5e-4 on every trained tensor), lr 0.001,
epoch-stepped cosine, alpha 0.7, K = 5, rep_layers 6..12; ``reg_weight`` and ``rep_dim`` per dataset from
``trainers/config.py`` (which ``setup_cfg`` merges after the yaml, before the command line):
StanfordCars 7, FGVCAircraft/SUN397/DTD 6, Food101 5, Flowers 4, UCF101 3, ImageNet/Caltech101 0.5,
OxfordPets 0.2, EuroSAT 0.01 with rep_dim 2048.
- base2new (``base2new_train.sh``): ``vit_b16.yaml``: 10 epochs, batch 4, 1 warm-up epoch at 1e-5,
  reg_weight from the table (1.0 for other datasets, the yaml); ImageNet: ``vit_b16_imagenet.yaml``,
  5 epochs, batch 32 (reg 0.5 from the table).
- transfer (cross_dataset and domain_generalization share one ImageNet training;
  ``cross_datasets_train.sh``): ``vit_b16_cross_datasets.yaml``: 1 epoch, batch 32, no warm-up;
  reg_weight 0.2 and rep_dim 512 (the scripts pass them on the command line, over the table).
- few_shot (``few_shot.sh``): ``vit_b16_few_shot.yaml``: 50 epochs, batch 32, 1 warm-up epoch, reg_weight
  from the table (0.5 for other datasets, the yaml); ImageNet: ``vit_b16_imagenet.yaml`` (5 epochs,
  batch 32). EuroSAT rep_dim 2048 here too. The same schedule at every shot count, as the script.

Deliberate deviations
- fp32 masters: the configs run ``PREC: "amp"`` (CLIP cast to fp32, autocast); here the parameters
  are fp32 and the run's precision decides the compute, as for every method. The frozen text anchors
  are computed outside autocast (fp32 under amp, as the official fp32 model computes them in
  ``build_model``) and from the run's backbone, not a second CLIP copy; the frozen image features come
  from the same frozen encoder (the official: ``clip_model_zero_shot.visual``, the same weights).
- ``rep_layers`` on a model with fewer blocks than the largest configured layer (the 4-block toy CLIP):
  the official code would insert nothing there (its ``layer in REP_LAYERS`` test never holds) and read
  patch tokens as the representation feature. Here the layers, written for a 12-block encoder, are
  scaled to the model's depth, l -> ceil(l * L / 12), duplicates dropped ([6..12] -> [2, 3, 4] on 4 blocks,
  the same relative start); on ViT-B/16 and any model at least as deep as the largest layer they are
  used as given. Both towers must be that deep (the official code assumes 12 + 12).
- The text encoder stops after the longest EOT (exact: the mask is causal); no sample is dropped by
  the loader (harness-wide rule; Dassl drops the last partial batch when it has a full one).
- The text features of an evaluation class set are computed once in ``prepare_eval`` (the official
  caches them on the first test batch: the same values).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.clip.prompts import EVAL_CHUNK
from benchsuite.data.registry import format_template
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, LabelSpace, Method, SetupContext, TrainBatch, hookimpl

#: The official logit scale, a literal 100 (``CustomCLIP.forward``).
LOGIT_SCALE = 100.0
#: The encoder depth the configs' ``REP_LAYERS`` are written for (ViT-B/16: 12 + 12 blocks).
REFERENCE_DEPTH = 12
#: ``trainers/config.py``: per-dataset REG_WEIGHT (and EuroSAT's REP_DIM), benchsuite dataset names.
DATASET_REG_WEIGHT = {
    "stanford_cars": 7.0, "fgvc_aircraft": 6.0, "sun397": 6.0, "dtd": 6.0, "food101": 5.0, "oxford_flowers": 4.0,
    "ucf101": 3.0, "imagenet": 0.5, "caltech101": 0.5, "oxford_pets": 0.2, "eurosat": 0.01,
}
DATASET_REP_DIM = {"eurosat": 2048}
INFERENCE = ("auto", "fused", "class", "rep")


def fit_rep_layers(layers, depth: int) -> list[int]:
    """1-indexed representation layers for an encoder of ``depth`` blocks (see the module docstring)."""
    try:
        chosen = sorted({int(layer) for layer in layers})
    except (TypeError, ValueError):
        raise BenchsuiteError(f"mmrl: rep_layers must be a list of block numbers (1-indexed), got {layers!r}") from None
    if not chosen or chosen[0] < 1:
        raise BenchsuiteError(f"mmrl: rep_layers must be non-empty block numbers >= 1, got {layers!r}")
    if chosen[-1] <= depth:
        return chosen
    if chosen[-1] > REFERENCE_DEPTH:
        raise BenchsuiteError(f"mmrl: rep_layers {chosen} go beyond this backbone's {depth} blocks (and beyond the "
                              f"{REFERENCE_DEPTH}-block encoder the configs are written for); use layers <= {depth}")
    return sorted({math.ceil(layer * depth / REFERENCE_DEPTH) for layer in chosen})


def choose_head(label_space: LabelSpace | None, inference: str = "auto") -> str:
    """"fused" on the training dataset's training classes, "class" (the class-token logits) elsewhere."""
    if inference != "auto":
        return inference
    if label_space is None:
        return "fused"
    return "fused" if label_space.same_dataset and label_space.kind == "base" else "class"


def mmrl_loss(logits, logits_rep, image, image_frozen, text, text_frozen, labels, *, alpha: float,
              reg_weight: float) -> dict[str, torch.Tensor]:
    """``MMRL_Loss`` with its parts (features already normalised)."""
    ce = F.cross_entropy(logits, labels)
    ce_rep = F.cross_entropy(logits_rep, labels)
    reg_image = 1 - torch.mean(F.cosine_similarity(image, image_frozen, dim=1))
    reg_text = 1 - torch.mean(F.cosine_similarity(text, text_frozen, dim=1))
    loss = alpha * ce + (1 - alpha) * ce_rep + reg_weight * reg_image + reg_weight * reg_text
    return {"loss": loss, "ce": ce, "ce_rep": ce_rep, "reg_image": reg_image, "reg_text": reg_text}


class RepresentationSpace(nn.Module):
    """The shared tokens, their per-layer projections into both towers, and ``proj_rep``."""

    def __init__(self, backbone, *, n_tokens: int, rep_dim: int, rep_layers: list[int]):
        super().__init__()
        if n_tokens < 1 or rep_dim < 1:
            raise BenchsuiteError(f"mmrl: n_rep_tokens and rep_dim must be >= 1, got {n_tokens}, {rep_dim}")
        depth = min(backbone.text_layers, backbone.vision_layers)
        self.layers = fit_rep_layers(rep_layers, depth)
        width, embed = backbone.vision_width, backbone.embed_dim
        # the official order: proj_rep is drawn when CLIP is built, then the tokens and the two Linears
        self.proj_rep = nn.Parameter(width ** -0.5 * torch.randn(width, embed))
        self.tokens = nn.Parameter(torch.empty(n_tokens, rep_dim))
        nn.init.normal_(self.tokens, std=0.02)
        to_vision, to_text = nn.Linear(rep_dim, width), nn.Linear(rep_dim, backbone.text_width)
        self.to_vision = nn.ModuleList(copy.deepcopy(to_vision) for _ in self.layers)
        self.to_text = nn.ModuleList(copy.deepcopy(to_text) for _ in self.layers)
        self.text_blocks, self.vision_blocks = backbone.text_layers, backbone.vision_layers

    def per_block(self, projections: nn.ModuleList, blocks: int) -> list:
        """``rep_tokens`` for the encoders: the projected tokens before each rep layer's block, else None."""
        out: list = [None] * blocks
        for layer, projection in zip(self.layers, projections):
            out[layer - 1] = projection(self.tokens)
        return out

    def text_tokens(self) -> list:
        return self.per_block(self.to_text, self.text_blocks)

    def vision_tokens(self) -> list:
        return self.per_block(self.to_vision, self.vision_blocks)


class MMRL(Method):
    name = "mmrl"
    summary = "Shared representation tokens projected into both towers' upper layers, decoupled inference (CVPR'25)"
    image_input = "images+features"

    def __init__(self) -> None:
        self.backbone = None
        self.space: RepresentationSpace | None = None
        self.alpha, self.reg_weight, self.inference = 0.7, 1.0, "auto"
        self.anchors: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.head = "fused"
        self.class_embeddings = self.class_eot = self.class_eot_device = None

    # ---- recipe ---------------------------------------------------------------------------
    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        common = {"optimizer": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 5e-4,
                  "warmup_epochs": 1, "warmup_lr": 1e-5, "alpha": 0.7, "n_rep_tokens": 5,
                  "rep_layers": list(range(6, 13)), "rep_dim": DATASET_REP_DIM.get(dataset, 512),
                  "inference": "auto"}
        if protocol.task == "transfer":
            return {**common, "epochs": 1, "batch_size": 32, "warmup_epochs": 0, "reg_weight": 0.2, "rep_dim": 512}
        if dataset == "imagenet":  # vit_b16_imagenet.yaml, base2new and few_shot
            return {**common, "epochs": 5, "batch_size": 32, "reg_weight": DATASET_REG_WEIGHT["imagenet"]}
        if protocol.task == "few_shot":
            return {**common, "epochs": 50, "batch_size": 32, "reg_weight": DATASET_REG_WEIGHT.get(dataset, 0.5)}
        return {**common, "epochs": 10, "batch_size": 4, "reg_weight": DATASET_REG_WEIGHT.get(dataset, 1.0)}

    # ---- model ----------------------------------------------------------------------------
    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        r = ctx.recipe
        self.inference = str(r["inference"])
        if self.inference not in INFERENCE:
            raise BenchsuiteError(f"mmrl: inference must be one of {INFERENCE}, got {self.inference!r}")
        self.alpha, self.reg_weight = float(r["alpha"]), float(r["reg_weight"])
        self.backbone = ctx.backbone
        self.space = RepresentationSpace(ctx.backbone, n_tokens=int(r["n_rep_tokens"]), rep_dim=int(r["rep_dim"]),
                                         rep_layers=r["rep_layers"])
        with ctx.backbone.fp32():  # the official anchors come from the fp32 model, outside autocast
            self.anchors = ctx.backbone.template_classifier(ctx.classnames, ctx.template)
        self.set_classes(ctx.classnames, ctx.template)
        self.head = "fused"
        return self.space

    def set_classes(self, classnames: list[str], template: str) -> None:
        """Frozen token embeddings of the template filled with every class name (no learnable context)."""
        tokens = self.backbone.tokenize([format_template(template, name) for name in classnames])
        self.class_eot = tokens.argmax(dim=-1)
        self.class_embeddings = self.backbone.embed_tokens(tokens)
        self.class_eot_device = self.class_eot.to(self.class_embeddings.device)

    def text_features(self, chunk: int | None = None) -> torch.Tensor:
        """Normalised fp32 text features of the current class set with the representation tokens [C, E]."""
        rep = self.space.text_tokens()
        n = self.class_embeddings.shape[0]
        step = chunk or n
        parts = [self.backbone.encode_embeddings(self.class_embeddings[s:s + step], self.class_eot[s:s + step],
                                                 eot_device=self.class_eot_device[s:s + step], rep_tokens=rep)
                 for s in range(0, n, step)]
        return F.normalize(torch.cat(parts).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised fp32 class-token and representation features [B, E] of the prompted image encoder."""
        pooled, rep = self.backbone.encode_image(images, rep_tokens=self.space.vision_tokens())
        rep = rep @ self.space.proj_rep.to(rep.dtype)
        return F.normalize(pooled.float(), dim=-1), F.normalize(rep.float(), dim=-1)

    def frozen_image_features(self, batch: TrainBatch) -> torch.Tensor:
        """The unprompted encoder's features of the batch: the harness's, or computed here when the step is
        called directly (tests, tools)."""
        features = batch.image_features
        if features is None:
            with torch.no_grad():
                features = self.backbone.encode_image(batch.images)
        return F.normalize(features.detach().float(), dim=-1)

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with self.backbone.fp32():
            return LOGIT_SCALE * image.float() @ text.float().t()

    @hookimpl
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        text = self.text_features()
        image, rep = self.image_features(batch.images)
        frozen = self.frozen_image_features(batch)
        with self.backbone.fp32():
            return mmrl_loss(self.logits(image, text), self.logits(rep, text), image, frozen, text,
                             self.anchors.to(text.device), batch.labels, alpha=self.alpha, reg_weight=self.reg_weight)

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str, label_space: LabelSpace) -> None:
        self.set_classes(classnames, template)
        self.text = self.text_features(chunk=EVAL_CHUNK)
        self.head = choose_head(label_space, self.inference)

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        image, rep = self.image_features(batch.images)
        if self.head == "class":
            return self.logits(image, self.text)
        if self.head == "rep":
            return self.logits(rep, self.text)
        with self.backbone.fp32():
            return self.alpha * self.logits(image, self.text) + (1 - self.alpha) * self.logits(rep, self.text)


@hookimpl
def benchsuite_methods():
    return [MMRL]
