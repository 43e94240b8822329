"""The unit of data every reader returns, and a dataset's three splits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Datum:
    """One labelled image: absolute path, integer label, class name as the reader gives it."""

    impath: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """train/val/test lists of one dataset, in reader order (the order few-shot sampling sees).

    `root` is the folder image paths are made relative to in fingerprints and manifests, so that a
    fingerprint does not depend on where a user keeps the data.
    """

    name: str
    root: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str] = field(default_factory=list)


def classnames_of(items: list[Datum]) -> list[str]:
    """Class names ordered by label, taken from the items (Dassl `get_lab2cname`)."""
    mapping: dict[int, str] = {}
    for item in items:
        mapping.setdefault(item.label, item.classname)
    return [mapping[label] for label in sorted(mapping)]


def relative_path(impath: str, root: str) -> str:
    """Path of an image relative to its dataset root, with forward slashes."""
    import os

    return os.path.relpath(impath, root).replace(os.sep, "/")


def rows(items: list[Datum], root: str) -> list[list]:
    """[relative path, label, classname] per item: the form of fingerprints and manifests."""
    return [[relative_path(d.impath, root), d.label, d.classname] for d in items]


def fingerprint(items: list[Datum], root: str) -> str:
    """sha256 of the ordered (relative path, label, classname) triples: equal data, equal print."""
    blob = json.dumps(rows(items, root), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
