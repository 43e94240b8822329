"""Frozen image features of the training views, one epoch at a time, computed once per grid.

Every frozen-encoder method (``image_input = "features"``: zero-shot, CoOp, CoCoOp, KgCoOp, ProGrad,
ProDA, the adapters) sees, through the keyed augmentation stream (`benchsuite.data.stream`), the same
view of sample i in epoch e, and so do the ``"images+features"`` methods (PromptSRC, DePT on
PromptSRC, MMRL), whose consistency terms need the frozen features of the views they prompt. The frozen encoder's features of those views therefore depend only on
(backbone, training images, transform, seed, epoch): `TrainingFeatures` computes an epoch's features
for all samples in index order, in fixed chunks (so the numbers do not depend on any method's batch
size), and files them in the feature cache. A second method, a ``--set`` variant, a resumed job,
Tip-Adapter's augmented cache views (epochs 0..fit_views-1) or PromptSRC's frozen anchors read them
back bit for bit instead of running the encoder again; without a cache they are computed the same way, so a result never depends
on whether the cache was warm.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..data import loaders
from ..data.stream import STREAM_VERSION
from ..data.transforms import describe
from .evaluate import compute_features
from .feature_cache import FeatureCache, feature_key, files_signature

#: features per encoder call; fixed, so an epoch's numbers never depend on a method's batch size
CHUNK = 256


class TrainingFeatures:
    """``epoch(e)`` -> (features [N, E] fp32, labels [N]) on the backbone's device, for the training
    items in their split order; ``state`` says whether every epoch came from the cache."""

    def __init__(self, backbone, items, transform, seed: int, fingerprint: str, *,
                 cache: Optional[FeatureCache], may_cache: Callable[[], bool] = lambda: True,
                 workers: int = 0, preload_budget: int = loaders.PRELOAD_BUDGET, progress: str = ""):
        self.backbone, self.items, self.transform, self.seed = backbone, items, transform, int(seed)
        self.cache, self.may_cache = cache, may_cache
        self.workers, self.preload_budget, self.progress = workers, preload_budget, progress
        self.labels = torch.tensor([item.label for item in items])
        self.hits = self.misses = 0
        self._base = None
        if cache is not None:
            self._base = f"{fingerprint}|{files_signature(items)}|stream{STREAM_VERSION}|seed{self.seed}"

    def key(self, epoch: int) -> Optional[str]:
        if self._base is None:
            return None
        b = self.backbone
        return feature_key(b.model_name, b.weights_sha256, f"{self._base}|epoch{int(epoch)}",
                           describe(self.transform), b.precision)

    @property
    def state(self) -> str:
        """"hit" (every epoch read from the cache), "miss" (some computed) or "off" (no cache)."""
        if self.cache is None:
            return "off"
        return "miss" if self.misses else "hit"

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.backbone.device
        key = self.key(epoch)
        if key is not None:
            cached = self.cache.get(key, labels=self.labels)
            if cached is not None:
                self.hits += 1
                return cached[0].to(device), cached[1].to(device)
        loader = loaders.epoch_loader(self.items, self.transform, CHUNK, seed=self.seed, epoch=epoch,
                                      workers=self.workers, pin_memory=device.type == "cuda",
                                      preload_budget=self.preload_budget)
        # a DataLoader draws its base seed from torch's generator when iterated: fork it, so that a
        # cache miss leaves the job's shuffling and initialisation exactly as a hit does
        with torch.random.fork_rng(devices=[]):
            feats, labels = compute_features(self.backbone, loader,
                                             progress=f"{self.progress} training features epoch {epoch + 1}")
        if key is not None:
            self.misses += 1
            if self.may_cache():
                b = self.backbone
                self.cache.put(key, feats, labels, {"model": b.model_name, "pretrained": b.pretrained,
                                                    "precision": b.precision, "kind": "training views",
                                                    "seed": self.seed, "epoch": int(epoch),
                                                    "augmentation_stream": STREAM_VERSION,
                                                    "n_images": int(labels.shape[0])})
        return feats.to(device), labels.to(device)
