"""Test-set image features of the frozen, unprompted image encoder, computed once and reused.

Key: (model, weights sha256, test-data fingerprint plus the files' paths, sizes and modification
times, transform, precision). Every method whose
`frozen_image_encoder` is True and every seed evaluating the same test set on the same backbone
reads the same entry. Entries are plain `.npy` arrays (loaded with `allow_pickle=False`) plus a JSON
description, written atomically under a per-key file lock; the cache is capped in size (oldest
entries evicted first) and listed or cleared with `benchsuite cache ls|clear`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from ..paths import cache_root

DEFAULT_MAX_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    bytes: int
    meta: dict


def files_signature(items) -> str:
    """sha256 of every image's absolute path, size and modification time: replacing the pixels of a
    test image (same path and label, so the same data fingerprint) must not reuse old features."""
    digest = hashlib.sha256()
    for item in items:
        st = os.stat(item.impath)
        digest.update(f"{os.path.abspath(item.impath)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_key(model: str, weights_sha256: str, fingerprint: str, transform: str, precision: str) -> str:
    blob = json.dumps([model, weights_sha256, fingerprint, transform, precision], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class FeatureCache:
    def __init__(self, root: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root) if root is not None else cache_root() / "features"
        self.max_bytes = max_bytes

    def _dir(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        folder = self._dir(key)
        if not (folder / "meta.json").exists():
            return None
        try:
            features = np.load(folder / "features.npy", allow_pickle=False)
            labels = np.load(folder / "labels.npy", allow_pickle=False)
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: a miss, and the next put rewrites it
            return None
        os.utime(folder / "meta.json")  # recency for eviction
        return torch.from_numpy(features), torch.from_numpy(labels)

    def put(self, key: str, features: torch.Tensor, labels: torch.Tensor, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock")):
            final = self._dir(key)
            if (final / "meta.json").exists():
                return
            tmp = self.root / f".{key}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            np.save(tmp / "features.npy", features.detach().float().cpu().numpy(), allow_pickle=False)
            np.save(tmp / "labels.npy", labels.detach().cpu().numpy(), allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps({**meta, "created": time.time()}, indent=1), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.evict()

    def entries(self) -> list[CacheEntry]:
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            meta_path = folder / "meta.json"
            if folder.name.startswith(".") or not meta_path.exists():
                continue
            size = sum(f.stat().st_size for f in folder.iterdir())
            out.append(CacheEntry(folder.name, folder, size, json.loads(meta_path.read_text(encoding="utf-8"))))
        return out

    def evict(self) -> None:
        """Delete least recently used entries until the cache fits its cap."""
        entries = sorted(self.entries(), key=lambda e: (e.path / "meta.json").stat().st_mtime)
        total = sum(e.bytes for e in entries)
        for entry in entries:
            if total <= self.max_bytes:
                break
            shutil.rmtree(entry.path, ignore_errors=True)
            total -= entry.bytes

    def clear(self) -> int:
        entries = self.entries()
        for entry in entries:
            shutil.rmtree(entry.path, ignore_errors=True)
        return len(entries)
