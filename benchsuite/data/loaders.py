"""Data loaders: every training sample is used every epoch (no `drop_last` trap)."""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import DatasetError
from .batching import TrainBatchSampler
from .datum import Datum
from .stream import keyed_draw

#: decoded training images kept in memory per job (bytes); 0 decodes from disk at every access
PRELOAD_BUDGET = 2 * 1024**3


def decode(path: str) -> Image.Image:
    """PIL RGB, as Dassl's `read_image`; a file that cannot be decoded is named in one line (an
    image damaged after the preflight, or a run with --no-image-check)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {path} cannot be read ({exc}); restore the file or remove its split entry") from None


class ImageList(Dataset):
    """Images as PIL RGB with one random transform per access.

    With a `preload_budget` (bytes), every image is decoded once up front when the decoded set fits
    the budget (few-shot sets do; ImageNet 16-shot at full resolution may not), so each epoch only
    pays for the augmentation; the random transforms are still drawn per access.

    With a `stream_seed`, the set is indexed by ``(epoch, index)`` keys (`TrainBatchSampler` with
    ``keyed=True``) and each random transform is drawn from the augmentation stream
    (`benchsuite.data.stream`): view 0 is `transform`, view v + 1 is ``views[v]``.
    """

    def __init__(self, items: list[Datum], transform, views: list = (), preload_budget: int = 0,
                 stream_seed: int | None = None):
        self.items = items
        self.transform = transform
        self.views = list(views)
        self.stream_seed = stream_seed
        self.decoded = [decode(item.impath) for item in items] if self._fits(preload_budget) else None

    def _fits(self, budget: int) -> bool:
        if budget <= 0:
            return False
        total = 0
        for item in self.items:  # header only: PIL reads the size without decoding pixels
            try:
                with Image.open(item.impath) as img:
                    total += img.width * img.height * 3
            except (OSError, SyntaxError, ValueError):
                decode(item.impath)  # raises the one-line error naming the file
            if total > budget:
                return False
        return True

    def __len__(self) -> int:
        return len(self.items)

    def rgb(self, index: int) -> Image.Image:
        return self.decoded[index] if self.decoded is not None else decode(self.items[index].impath)

    def __getitem__(self, key):
        if self.stream_seed is not None:
            return self.keyed(*key)
        item = self.items[key]
        rgb = self.rgb(key)
        if self.views:
            return self.transform(rgb), item.label, [view(rgb) for view in self.views]
        return self.transform(rgb), item.label

    def keyed(self, epoch: int, index: int):
        """Sample `index` as the augmentation stream draws it in `epoch`."""
        rgb = self.rgb(index)
        with keyed_draw(self.stream_seed, epoch, index, 0):
            image = self.transform(rgb)
        if not self.views:
            return image, self.items[index].label
        drawn = []
        for v, view in enumerate(self.views, start=1):
            with keyed_draw(self.stream_seed, epoch, index, v):
                drawn.append(view(rgb))
        return image, self.items[index].label, drawn


def train_loader(items: list[Datum], transform, batch_size: int, *, workers: int, pin_memory: bool,
                 views: list = (), preload_budget: int = PRELOAD_BUDGET, drop_last: bool = False,
                 min_batch_size: int = 1, stream_seed: int | None = None) -> DataLoader:
    """Shuffled each epoch from torch's seeded RNG. By default every sample is used (Dassl sets
    drop_last when len >= batch size, which silently discards up to batch_size-1 few-shot samples
    per epoch; a recipe opts in with `drop_last`); see `batching.tail_rule` for `min_batch_size`.
    With `stream_seed` the augmentations come from the keyed stream (`ImageList`); the training
    loop then tells the batch sampler its epoch (`TrainBatchSampler.set_epoch`)."""
    dataset = ImageList(items, transform, views, preload_budget, stream_seed=stream_seed)
    sampler = TrainBatchSampler(dataset, batch_size, drop_last=drop_last, min_batch_size=min_batch_size,
                                keyed=stream_seed is not None)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


def eval_loader(items: list[Datum], transform, batch_size: int, *, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(ImageList(items, transform), batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=workers, pin_memory=pin_memory)


def epoch_loader(items: list[Datum], transform, batch_size: int, *, seed: int, epoch: int, workers: int,
                 pin_memory: bool, preload_budget: int = PRELOAD_BUDGET) -> DataLoader:
    """Every sample once, in index order, as the augmentation stream draws it in `epoch` (the
    views whose frozen features `training_features` computes and shares)."""
    dataset = ImageList(items, transform, preload_budget=preload_budget, stream_seed=seed)
    keys = [(epoch, i) for i in range(len(items))]
    return DataLoader(dataset, batch_size=batch_size, sampler=keys, shuffle=False, drop_last=False,
                      num_workers=workers, pin_memory=pin_memory)


def default_workers(device: torch.device) -> int:
    """Worker processes decode in parallel on CUDA; on CPU they would compete with the model."""
    import os

    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
