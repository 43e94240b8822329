"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV'22), after gaopengcuhk/Tip-Adapter at commit
d0e2d6f (``main.py``: ``run_tip_adapter``, ``run_tip_adapter_F``; ``utils.py``: ``clip_classifier``,
``build_cache_model``, ``search_hp``; ``configs/*.yaml``).

Behaviour followed
- Cache model, built once from the few-shot training set (hook ``fit_features``): keys = the mean
  over ``augment_epoch`` = 10 augmented views of each image's raw frozen feature, then L2-normalised
  (the official code averages unnormalised features, then normalises); values = one-hot labels.
- Logits of a test feature f (L2-normalised): ``100 f W + alpha * exp(-beta (1 - f K)) V`` with W the
  zero-shot classifier (the dataset's template, ``_`` -> space, normalised text features), K the
  cache keys, V the values; the official code's constant ``100`` (not the backbone's learned scale,
  which in OpenAI's fp16 release is exp(4.6055) = 100.03).
- Hyper-parameters: the config's ``init_beta`` / ``init_alpha`` per dataset, then the official grid
  search (``search_step`` [200, 20] over ``[0.1, search_scale)``, first best kept) on the validation
  split, exactly as ``search_hp`` does; Tip-Adapter-F searches with its trained keys.
- Tip-Adapter-F: the keys become a learnable ``[D, N]`` matrix (the official ``nn.Linear`` weight),
  initialised from the cache; loss = CE of the logits at ``init_beta`` / ``init_alpha``; AdamW, lr
  0.001, eps 1e-4, weight decay 0.01 (AdamW's default, which the official code leaves), batch 256,
  20 epochs (EuroSAT 100), cosine annealing stepped per iteration over epochs x batches to 0, no
  warm-up; frozen image features of freshly augmented images every epoch (``image_input`` features).

Recipe per protocol: few_shot (the paper's setting) with the dataset's config; base2new, cross-dataset
and domain generalization (the paper defines none): the same config of the training dataset. On
classes the cache does not hold (new classes, other datasets) the cache term is zero by
construction (no value column), so the logits are zero-shot CLIP's: ``prepare_eval`` maps cache
labels to the evaluated classes by name (``label_space.seen``).

Deliberate deviations
- Model selection: the official Tip-Adapter-F keeps the epoch with the best *test* accuracy and takes
  the larger of two test accuracies; benchsuite evaluates the last epoch once (the protocol).
- Validation split: the official code searches on the full validation split (on ImageNet on the test
  set); benchsuite searches on the protocol's few-shot validation split (min(K, 4) per class), and on
  ImageNet, whose protocol validation split is its test set, not at all (init values are used).
- Augmentation: the protocol's random-resized crop (scale 0.08-1, as every method here) instead of the
  official scale 0.5-1; ImageNet's classifier uses the dataset's single template, not the official
  7-template ensemble.
- fp32 throughout (the official keys, values and adapter are fp16 on CUDA); the loader keeps the last
  partial batch (the official loaders drop it when the set holds a full batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.hookspecs import EvalBatch, LabelSpace, Method, SetupContext, TrainBatch, hookimpl

#: the official ``configs/<dataset>.yaml``: (init_beta, init_alpha, search_scale, train_epoch)
CONFIGS: dict[str, tuple[float, float, tuple[float, float], int]] = {
    "caltech101": (1.0, 3.0, (12.0, 5.0), 20),
    "dtd": (1.0, 2.0, (13.0, 13.0), 20),
    "eurosat": (1.0, 2.0, (12.0, 10.0), 100),
    "fgvc_aircraft": (1.0, 5.0, (30.0, 30.0), 20),
    "food101": (1.0, 1.17, (10.0, 10.0), 20),
    "imagenet": (1.0, 1.17, (7.0, 3.0), 20),
    "oxford_flowers": (1.0, 10.0, (50.0, 50.0), 20),
    "oxford_pets": (1.0, 1.17, (7.0, 3.0), 20),
    "stanford_cars": (1.0, 3.0, (20.0, 10.0), 20),
    "sun397": (1.0, 1.17, (12.0, 10.0), 20),
    "ucf101": (1.0, 3.0, (7.0, 3.0), 20),
}
#: a dataset without an official config (toy datasets, third-party ones) takes ImageNet's
DEFAULT_CONFIG = CONFIGS["imagenet"]
SEARCH_STEPS = (200, 20)  # every official config
CLIP_SCALE = 100.0  # the official `100. * features @ clip_weights`


def search_grid(scale: float, steps: int) -> list[float]:
    """The official ``search_hp`` grid: ``i * (scale - 0.1) / steps + 0.1`` for i < steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(-beta (1 - affinity)) @ values``: the cache model's class scores."""
    return ((-1) * (beta - beta * affinity)).exp() @ values


class TipAdapter(Method):
    name = "tip_adapter"
    summary = "Tip-Adapter: training-free cache model of few-shot features beside zero-shot CLIP (Zhang et al.)"
    image_input = "features"
    fit_views = 10  # the official augment_epoch

    def __init__(self) -> None:
        self.backbone = None
        self.keys: torch.Tensor | None = None  # [N, D] normalised cache keys
        self.cache_labels: torch.Tensor | None = None
        self.beta = self.alpha = 0.0

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        beta, alpha, scale, _ = CONFIGS.get(dataset, DEFAULT_CONFIG)
        return {"epochs": 0, "init_beta": beta, "init_alpha": alpha, "search_scale": list(scale),
                "search_hp": True}

    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        self.backbone, self.recipe_ = ctx.backbone, ctx.recipe
        self.classnames, self.template = list(ctx.classnames), ctx.template
        self.beta, self.alpha = float(ctx.recipe["init_beta"]), float(ctx.recipe["init_alpha"])
        return self.module()

    def module(self) -> nn.Module:
        return nn.Module()

    def zero_shot_weights(self, classnames: list[str], template: str) -> torch.Tensor:
        """The official ``clip_classifier`` for one template: normalised text features [C, D]."""
        return self.backbone.template_classifier(classnames, template)

    @hookimpl
    def fit_features(self, features: torch.Tensor, labels: torch.Tensor, val_features, val_labels) -> None:
        self.keys = F.normalize(features.float().mean(0), dim=-1)
        self.cache_labels = labels
        self.set_cache_keys(self.keys)
        self.val = (val_features, val_labels)
        if not self.recipe_["epochs"]:
            self.search(val_features, val_labels)

    def set_cache_keys(self, keys: torch.Tensor) -> None:
        """Tip-Adapter-F makes the keys learnable; Tip-Adapter keeps them as they are."""

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.keys.t()

    def logits(self, features: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, beta: float,
               alpha: float) -> torch.Tensor:
        clip = CLIP_SCALE * features @ weights.t()
        return clip + cache_logits(self.affinity(features), values, beta) * alpha

    def search(self, val_features, val_labels) -> None:
        """The official grid search of (beta, alpha) on the validation split; the first best is kept
        (strictly greater accuracy replaces it), as in ``search_hp``."""
        if not self.recipe_["search_hp"] or val_features is None or not len(val_labels):
            return
        features = F.normalize(val_features.float(), dim=-1)
        weights = self.zero_shot_weights(self.classnames, self.template)
        values = self.values_for(self.classnames)
        best, best_beta, best_alpha = 0.0, 0.0, 0.0
        scale_beta, scale_alpha = self.recipe_["search_scale"]
        for beta in search_grid(scale_beta, SEARCH_STEPS[0]):
            for alpha in search_grid(scale_alpha, SEARCH_STEPS[1]):
                acc = float((self.logits(features, weights, values, beta, alpha).argmax(-1) == val_labels)
                            .float().mean())
                if acc > best:
                    best, best_beta, best_alpha = acc, beta, alpha
        self.beta, self.alpha = best_beta, best_alpha

    def values_for(self, classnames: list[str]) -> torch.Tensor:
        """One-hot cache values over the evaluated classes: a cache entry's column is its class's
        position there, by name; entries of classes not evaluated contribute nothing."""
        position = {name: i for i, name in enumerate(classnames)}
        columns = torch.tensor([position.get(self.classnames[int(c)], -1) for c in self.cache_labels.tolist()],
                               device=self.cache_labels.device)
        values = torch.zeros(len(columns), len(classnames), device=columns.device)
        held = columns >= 0
        values[held.nonzero().squeeze(1), columns[held]] = 1.0
        return values

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str, label_space: LabelSpace) -> None:
        self.eval_weights = self.zero_shot_weights(classnames, template)
        self.eval_values = self.values_for(classnames) if any(label_space.seen) else None
        self.eval_beta, self.eval_alpha = self.beta, self.alpha  # read once, not per batch (host values)

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        with self.backbone.fp32():
            features = F.normalize(batch.image_features.float(), dim=-1)
            if self.eval_values is None:  # no cached class among these: zero-shot CLIP
                return CLIP_SCALE * features @ self.eval_weights.t()
            return self.logits(features, self.eval_weights, self.eval_values, self.eval_beta, self.eval_alpha)


class Keys(nn.Module):
    """Tip-Adapter-F's learnable cache keys (the official ``adapter`` Linear's weight, [N, D] here) and
    the searched (beta, alpha), as buffers: a training shared with another protocol carries them."""

    def __init__(self, beta: float, alpha: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(0))
        self.register_buffer("searched", torch.tensor([beta, alpha], dtype=torch.float64))


class TipAdapterF(TipAdapter):
    name = "tip_adapter_f"
    summary = "Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (Zhang et al.)"

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        beta, alpha, scale, epochs = CONFIGS.get(dataset, DEFAULT_CONFIG)
        return {"epochs": epochs, "batch_size": 256, "lr": 0.001, "optimizer": "adamw", "eps": 1e-4,
                "weight_decay": 0.01, "warmup_epochs": 0, "lr_schedule": "cosine_per_iteration",
                "init_beta": beta, "init_alpha": alpha, "search_scale": list(scale), "search_hp": True}

    def module(self) -> nn.Module:
        self.keys_module = Keys(self.beta, self.alpha)
        return self.keys_module

    def search(self, val_features, val_labels) -> None:
        super().search(val_features, val_labels)
        self.keys_module.searched.copy_(torch.tensor([self.beta, self.alpha], dtype=torch.float64))

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str, label_space: LabelSpace) -> None:
        self.beta, self.alpha = self.keys_module.searched.tolist()  # a training shared or resumed carries them
        super().prepare_eval(classnames, dataset, template, label_space)

    def set_cache_keys(self, keys: torch.Tensor) -> None:
        self.keys_module.weight = nn.Parameter(keys.clone())

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.keys_module.weight.t()

    @hookimpl
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        if not hasattr(self, "train_weights"):
            with torch.no_grad():
                self.train_weights = self.zero_shot_weights(self.classnames, self.template)
                self.train_values = self.values_for(self.classnames)
        with self.backbone.fp32():
            features = F.normalize(batch.image_features.float(), dim=-1)
            logits = self.logits(features, self.train_weights, self.train_values, float(self.recipe_["init_beta"]),
                                 float(self.recipe_["init_alpha"]))
            return {"loss": F.cross_entropy(logits, batch.labels)}

    @hookimpl
    def train_end(self) -> None:
        with torch.no_grad():
            self.search(*self.val)


@hookimpl
def benchsuite_methods():
    return [TipAdapter, TipAdapterF]
