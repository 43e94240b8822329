"""Test-set image features of the frozen, unprompted image encoder, computed once and reused.

Key: (model, weights sha256, test-data fingerprint plus the files' paths, sizes and modification
times, transform, precision). Every method evaluating on frozen features and every seed evaluating
the same test set on the same backbone reads the same entry. Entries are plain `.npy` arrays
(loaded with `allow_pickle=False`) plus a JSON description, written atomically under a per-key file
lock; the cache is capped in size (oldest entries evicted first) and listed or cleared with
`benchsuite cache ls|clear`.

Integrity rules (a cache must never give a wrong number, nor delete what it did not write):
- every entry records the shape, dtype and sha256 of its two arrays; a read verifies all of them,
  and the caller's expected labels, and treats any mismatch as a miss (counted in `stats`, warned
  about, the entry removed so the next write replaces it);
- an entry whose description cannot be read is skipped, never fatal;
- a failed write (read-only or full disk) warns and the job goes on without caching; its temporary
  folder is removed, and one left by a killed writer (its name records host and pid) is removed by
  the next write or `clear` once that writer is gone;
- the cache writes a marker file at its root and a format tag into each entry; `clear` and eviction
  only touch folders named by a key that carry that tag, under a root that carries the marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from ..paths import cache_root
from ..tempfiles import is_orphan, temp_path

DEFAULT_MAX_BYTES = 4 * 1024**3
MARKER = ".benchsuite-feature-cache"
ENTRY_FORMAT = "benchsuite-feature-cache-entry/2"
_KEY = re.compile(r"^[0-9a-f]{64}$")
#: temporary entry folders: `.<key>.<host>.<pid>.w.tmp` (and `.<key>.tmp<pid>` of older versions)
_TEMP = re.compile(r"^\.[0-9a-f]{64}\..*tmp")
_ARRAYS = ("features", "labels")


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    bytes: int
    meta: dict


class _Corrupt(Exception):
    """Why an entry cannot be trusted (a miss, never a result)."""


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


def _describe(array: np.ndarray) -> dict[str, Any]:
    """What a read must find again: shape, dtype and a checksum of the raw bytes."""
    data = np.ascontiguousarray(array)
    return {"shape": list(data.shape), "dtype": data.dtype.str, "sha256": hashlib.sha256(data.data).hexdigest()}


def _read_meta(folder: Path) -> dict[str, Any]:
    """The entry's description if it is one of ours; _Corrupt otherwise."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Corrupt(f"unreadable meta.json ({type(exc).__name__})") from exc
    if not isinstance(meta, dict) or meta.get("format") != ENTRY_FORMAT:
        raise _Corrupt(f"meta.json lacks the format tag {ENTRY_FORMAT!r}")
    return meta


class FeatureCache:
    def __init__(self, root: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root) if root is not None else cache_root() / "features"
        self.max_bytes = max_bytes
        #: hit / miss / corrupt / write_failed counts of this process, for reports
        self.stats: Counter[str] = Counter()
        #: (folder, reason) of entries `entries()` skipped because their description is unreadable
        self.skipped: list[tuple[Path, str]] = []

    def _dir(self, key: str) -> Path:
        return self.root / key

    def is_cache_root(self) -> bool:
        """True when the root was created by this cache (holds its marker file)."""
        return (self.root / MARKER).is_file()

    # ---- reading ---------------------------------------------------------------------------------
    def _load(self, folder: Path, labels: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        meta = _read_meta(folder)
        arrays = []
        for name in _ARRAYS:
            want = meta.get(name)
            if not isinstance(want, dict):
                raise _Corrupt(f"meta.json records no {name} checksum")
            try:
                array = np.load(folder / f"{name}.npy", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise _Corrupt(f"{name}.npy cannot be read ({exc})") from exc
            got = _describe(array)
            for field in ("shape", "dtype", "sha256"):
                if got[field] != want.get(field):
                    raise _Corrupt(f"{name}.npy {field} {got[field]!r} differs from the recorded {want.get(field)!r}")
            arrays.append(array)
        features, stored = arrays
        if features.ndim != 2 or stored.ndim != 1 or features.shape[0] != stored.shape[0]:
            raise _Corrupt(f"features {features.shape} do not match labels {stored.shape}")
        if features.dtype != np.float32 or stored.dtype.kind not in "iu":
            raise _Corrupt(f"unexpected dtypes {features.dtype}/{stored.dtype}")
        if labels is not None and not np.array_equal(stored, labels.detach().cpu().numpy()):
            raise _Corrupt("stored labels differ from the test set's labels")
        return features, stored

    def get(self, key: str, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (features, labels), or None. With `labels`, the entry must hold exactly these."""
        folder = self._dir(key)
        if not folder.is_dir():
            self.stats["miss"] += 1
            return None
        try:
            features, stored = self._load(folder, labels)
        except _Corrupt as why:
            self.stats["corrupt"] += 1
            self.stats["miss"] += 1
            warnings.warn(f"feature cache entry {folder} is not trusted: {why}; recomputing the features",
                          RuntimeWarning, stacklevel=2)
            self._remove(folder)
            return None
        try:
            os.utime(folder / "meta.json")  # recency for eviction
        except OSError:
            pass  # a read-only cache still serves hits
        self.stats["hit"] += 1
        return torch.from_numpy(features), torch.from_numpy(stored)

    # ---- writing ---------------------------------------------------------------------------------
    def put(self, key: str, features: torch.Tensor, labels: torch.Tensor, meta: dict) -> bool:
        """Store an entry; on any file-system failure warn and return False (the job goes on)."""
        if not _KEY.match(key):
            raise ValueError(f"feature cache keys are sha256 hex digests, got {key!r}")
        try:
            self._write(key, features, labels, meta)
        except OSError as exc:
            self.stats["write_failed"] += 1
            warnings.warn(f"could not write the feature cache entry under {self.root}: {exc}; continuing "
                          f"without caching (use --feature-cache DIR for a writable folder or --no-feature-cache)",
                          RuntimeWarning, stacklevel=2)
            return False
        try:
            self.evict()
        except OSError as exc:
            warnings.warn(f"feature cache eviction under {self.root} failed: {exc}", RuntimeWarning, stacklevel=2)
        return True

    def _write(self, key: str, features: torch.Tensor, labels: torch.Tensor, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.is_cache_root():
            (self.root / MARKER).write_text(json.dumps({"format": ENTRY_FORMAT}) + "\n", encoding="utf-8")
        feats = np.ascontiguousarray(features.detach().float().cpu().numpy())
        labs = np.ascontiguousarray(labels.detach().cpu().numpy())
        with FileLock(str(self.root / f"{key}.lock")):
            final = self._dir(key)
            if final.is_dir():
                try:
                    self._load(final, labels)
                    return  # another writer stored the same entry
                except _Corrupt:
                    if not self._remove(final):
                        raise OSError(f"{final} exists and was not written by the feature cache")
            self.sweep_temporaries()
            tmp = temp_path(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                np.save(tmp / "features.npy", feats, allow_pickle=False)
                np.save(tmp / "labels.npy", labs, allow_pickle=False)
                record = {**meta, "format": ENTRY_FORMAT, "key": key, "created": time.time(),
                          "features": _describe(feats), "labels": _describe(labs)}
                (tmp / "meta.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- listing and deleting --------------------------------------------------------------------
    def sweep_temporaries(self) -> list[Path]:
        """Remove the temporary entry folders of writers that are gone: a killed writer runs no
        cleanup, and nothing else would ever delete them. Live writers' and other hosts' stay."""
        if not (self.root.is_dir() and self.is_cache_root()):
            return []
        removed = []
        for path in sorted(self.root.iterdir()):
            if _TEMP.match(path.name) and path.is_dir() and is_orphan(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def _owned(self, folder: Path) -> bool:
        """Only folders named by a key and tagged by this cache, under a marked root, are ours."""
        if not (_KEY.match(folder.name) and folder.is_dir() and self.is_cache_root()):
            return False
        try:
            _read_meta(folder)
            return True
        except _Corrupt:
            return False

    def _remove(self, folder: Path) -> bool:
        """Delete an entry folder the cache created (a damaged one keeps its name and marker-root)."""
        if not (_KEY.match(folder.name) and self.is_cache_root() and folder.parent == self.root):
            return False
        # a damaged entry may have lost its tag; it is still ours when it only holds cache files
        if not self._owned(folder) and any(p.name not in {"meta.json", "features.npy", "labels.npy"}
                                           for p in folder.iterdir()):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def entries(self) -> list[CacheEntry]:
        """This cache's entries; folders it did not create are ignored, unreadable ones skipped."""
        self.skipped = []
        if not self.root.is_dir() or not self.is_cache_root():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if not (_KEY.match(folder.name) and folder.is_dir()):
                continue
            try:
                meta = _read_meta(folder)
                size = sum(f.stat().st_size for f in folder.iterdir())
            except (_Corrupt, OSError) as why:
                self.skipped.append((folder, str(why)))
                continue
            out.append(CacheEntry(folder.name, folder, size, meta))
        return out

    def evict(self) -> None:
        """Delete least recently used entries until the cache fits its cap."""
        def recency(entry: CacheEntry) -> float:
            try:
                return (entry.path / "meta.json").stat().st_mtime
            except OSError:
                return 0.0

        entries = sorted(self.entries(), key=recency)
        total = sum(e.bytes for e in entries)
        for entry in entries:
            if total <= self.max_bytes:
                break
            shutil.rmtree(entry.path, ignore_errors=True)
            total -= entry.bytes

    def clear(self) -> int:
        self.sweep_temporaries()
        entries = self.entries()
        for entry in entries:
            shutil.rmtree(entry.path, ignore_errors=True)
        return len(entries)
