"""Few-shot sampling and the base/new class split, identical to the CoOp-family toolbox.

Sampling (methods.md 2.2): group items by label in first-appearance order; for each label take
`random.sample(items, K)` when the class has at least K items, else keep all; train first, then
val with min(K, 4) from the same RNG stream. `random.Random(seed)` yields exactly the stream of
the toolbox's `random.seed(seed)` on the global generator, without touching global state.

The split (methods.md 2.3): sort the labels present in the train list, base = first ceil(n/2),
new = the rest; relabel by index in the selected list; apply the same filter to every split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from ..tempfiles import temp_path
from .datum import DatasetSplits, Datum, classnames_of, fingerprint, rows


def sample_per_class(items: list[Datum], k: int, rng: random.Random) -> list[Datum]:
    """Dassl `generate_fewshot_dataset` for one list (repeat=False)."""
    by_label: dict[int, list[Datum]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    picked: list[Datum] = []
    for group in by_label.values():
        picked.extend(rng.sample(group, k) if len(group) >= k else group)
    return picked


@dataclass
class FewShotSplit:
    """The data one job sees: sampled train/val, full test, class names, and their provenance."""

    dataset: str
    root: str
    shots: int
    seed: int
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]

    def manifest(self) -> dict:
        """JSON manifest of the sample (never a pickle); its sha256 goes into every result."""
        return {"dataset": self.dataset, "shots": self.shots, "seed": self.seed,
                "train": rows(self.train, self.root), "val": rows(self.val, self.root)}


def manifest_sha256(manifest: dict) -> str:
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sample_fewshot(splits: DatasetSplits, shots: int, seed: int, *, sample_val: bool = True) -> FewShotSplit:
    """Train K shots then val min(K, 4) shots per class (ImageNet: no val sampling, val = test)."""
    rng = random.Random(seed)
    train = sample_per_class(splits.train, shots, rng)
    val = sample_per_class(splits.val, min(shots, 4), rng) if sample_val else list(splits.val)
    return FewShotSplit(splits.name, splits.root, shots, seed, train, val, list(splits.test), classnames_of(train))


def _select(items: list[Datum], relabel: dict[int, int]) -> list[Datum]:
    return [Datum(d.impath, relabel[d.label], d.classname) for d in items if d.label in relabel]


def subsample_classes(split: FewShotSplit, which: str) -> FewShotSplit:
    """Keep the base or new half of the train list's labels (ceil rule) and relabel all splits."""
    if which == "all":
        return split
    if which not in ("base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', not {which!r}")
    labels = sorted({d.label for d in split.train})
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if which == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(chosen)}
    train = _select(split.train, relabel)
    return FewShotSplit(split.dataset, split.root, split.shots, split.seed, train,
                        _select(split.val, relabel), _select(split.test, relabel), classnames_of(train))


class ManifestStore:
    """Writes each sample once as JSON; a later run with different content is an error, not a reshuffle."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, dataset: str, shots: int, seed: int) -> Path:
        return self.root / dataset / f"shot_{shots}-seed_{seed}.json"

    @staticmethod
    def _read(path: Path) -> dict | None:
        """The stored manifest, or None (with a warning naming the file) when it is unreadable.

        Why: a manifest cut short (disk full, a copy interrupted) would otherwise fail every rerun;
        it records nothing a result depends on that the sample itself does not give again, so it is
        rewritten from the sample drawn now."""
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = f"cannot be read ({exc})"
        else:
            if isinstance(stored, dict) and isinstance(stored.get("sha256"), str):
                return stored
            why = "holds no sha256"
        warnings.warn(f"few-shot manifest {path} {why}: writing it again from the sample drawn now",
                      RuntimeWarning, stacklevel=3)
        return None

    def record(self, split: FewShotSplit) -> str:
        """Store the manifest (atomically) or check it equals the stored one; return its sha256."""
        manifest = split.manifest()
        digest = manifest_sha256(manifest)
        path = self.path(split.dataset, split.shots, split.seed)
        if path.exists():
            stored = self._read(path)
            if stored is not None and stored.get("sha256") != digest:
                raise DatasetError(
                    f"few-shot sample of {split.dataset} (K={split.shots}, seed={split.seed}) differs from the "
                    f"manifest at {path}: the split file or the dataset changed since it was written. Restore "
                    f"the data, or delete the manifest to accept the new sample (results will not be comparable)."
                )
            if stored is not None:
                return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        tmp.write_text(json.dumps({**manifest, "sha256": digest}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return digest


__all__ = ["FewShotSplit", "ManifestStore", "fingerprint", "manifest_sha256", "sample_fewshot", "subsample_classes"]
