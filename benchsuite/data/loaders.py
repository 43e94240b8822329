"""Data loaders: every training sample is used every epoch (no `drop_last` trap)."""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .datum import Datum


class ImageList(Dataset):
    """Reads images as PIL RGB (as Dassl does) and applies one transform per access."""

    def __init__(self, items: list[Datum], transform, n_views: int = 0):
        self.items = items
        self.transform = transform
        self.n_views = n_views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        with Image.open(item.impath) as img:
            rgb = img.convert("RGB")
        if self.n_views:
            return self.transform(rgb), item.label, [self.transform(rgb) for _ in range(self.n_views)]
        return self.transform(rgb), item.label


def train_loader(items: list[Datum], transform, batch_size: int, *, workers: int, pin_memory: bool,
                 n_views: int = 0) -> DataLoader:
    """Shuffled each epoch from torch's seeded RNG. Dassl sets drop_last when len >= batch size,
    which silently discards up to batch_size-1 few-shot samples per epoch; we keep them all."""
    return DataLoader(ImageList(items, transform, n_views), batch_size=batch_size, shuffle=True, drop_last=False,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)


def eval_loader(items: list[Datum], transform, batch_size: int, *, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(ImageList(items, transform), batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=workers, pin_memory=pin_memory)


def default_workers(device: torch.device) -> int:
    """Worker processes decode in parallel on CUDA; on CPU they would compete with the model."""
    import os

    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
