"""Toy datasets in the real CoOp split_zhou layout, their registry entries, and the pretraining stream.

Datasets (class counts; per class train/val/test images at scale 1):

====================  ===================  =====  ==========  ===================================
name                  title                class  per class   what varies / domain
====================  ===================  =====  ==========  ===================================
toy_objects           ToyObjects             24   40/10/20    colour+shape combos; clean (source)
toy_shapes            ToyShapes               8   40/10/20    shape; clean
toy_colors            ToyColors               8   40/10/20    colour; clutter
toy_textures          ToyTextures             5   40/10/20    texture (1-2 objects); clean
toy_counts            ToyCounts               4   40/10/20    number of objects; clean_v2
toy_objects_v2        ToyObjectsV2           24   test 20     toy_objects classes; clean_v2
toy_objects_sketch    ToyObjectsSketch       24   test 20     toy_objects classes; sketch
toy_objects_noisy     ToyObjectsNoisy        24   test 20     toy_objects classes; noisy
toy_objects_clutter   ToyObjectsClutter      12   test 20     every 2nd toy_objects class; clutter
====================  ===================  =====  ==========  ===================================

On disk (``materialize``), every dataset is ``root/<name>/images/<class>/<index>.png`` plus
``root/<name>/split_zhou_<name>.json`` = ``{"train": [...], "val": [...], "test": [...]}`` with entries
``[relative path under images/, label, class name]``, listed class-interleaved (image 0 of every class,
then image 1 of every class, ...). Test-only sets write the same list under all three keys, which is
what the reader returns for the real test-only sets (train = val = test) and what `read_split_zhou`
needs (it refuses an empty "train"). The clutter subset's labels are the source labels restricted to
the subset and renumbered 0..11 in source order; its class names are the source's.

Every image is rendered from its own `random.Random` seeded by (world version, seed, dataset, class,
index), so a dataset's content does not depend on generation order or on the other datasets.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import DatasetError
from ..data.datum import DatasetSplits

#: Bump whenever rendering, captions, dataset definitions or sizes change: it names the cache folder.
TOY_WORLD_VERSION = "2"
MARKER = "TOY_WORLD_VERSION"

_PER_CLASS = (40, 10, 20)  # train, val, test
_PER_CLASS_TEST_ONLY = 20


@dataclass(frozen=True)
class ToyDataset:
    """Definition of one toy dataset. `classes` fixes scene attributes per class (label order);
    `choices` restricts the random attributes; `source` names the dataset a DG target shadows."""

    name: str
    title: str
    template: str
    classnames: tuple[str, ...]
    classes: tuple[tuple[tuple[str, object], ...], ...]
    domain: str = "clean"
    choices: tuple[tuple[str, tuple], ...] = ()
    test_only: bool = False
    source: str | None = None
    source_labels: tuple[int, ...] = ()  # for DG targets: the source label of each class

    @property
    def folder(self) -> str:
        return self.name

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.name}.json"

    @property
    def layout(self) -> str:
        return (f"$DATA/{self.name}/images/<class>/ and $DATA/{self.name}/{self.split_file} "
                "(the generated toy world, see benchsuite.toy.materialize)")


def _objects_classes() -> list[tuple[str, str]]:
    """24 (colour, shape) combos: every shape in 3 colours, every colour on 3 shapes; ordered so the
    first (base) and second (new) halves both mix all shapes and colours (new = unseen combos)."""
    from .world import COLORS, SHAPES

    colors = list(COLORS)
    return [(colors[(i + 3 * k) % 8], SHAPES[i]) for k in range(3) for i in range(8)]


def _build() -> dict[str, ToyDataset]:
    from .world import COLORS, COUNTS, SHAPES, TEXTURES

    objects = _objects_classes()
    objects_names = tuple(f"{c}_{s}" for c, s in objects)
    objects_attrs = tuple((("color", c), ("shape", s)) for c, s in objects)
    texture_names = {"dotted": "polka_dotted"}
    count_names = {1: "one_object", 2: "two_objects", 3: "three_objects", 4: "four_objects"}
    defs = [
        ToyDataset("toy_objects", "ToyObjects", "a photo of a {}.", objects_names, objects_attrs),
        ToyDataset("toy_shapes", "ToyShapes", "a photo of a {} shape.", SHAPES,
                   tuple((("shape", s),) for s in SHAPES)),
        # colours in clutter and counts in the v2 rendering: on clean images the small CLIP names both
        # almost perfectly, which would leave prompt learning no room (see the model card)
        ToyDataset("toy_colors", "ToyColors", "a photo of something {}.", tuple(COLORS),
                   tuple((("color", c),) for c in COLORS), domain="clutter"),
        ToyDataset("toy_textures", "ToyTextures", "a {} texture.",
                   tuple(texture_names.get(t, t) for t in TEXTURES), tuple((("texture", t),) for t in TEXTURES),
                   choices=(("count", (1, 2)),)),
        ToyDataset("toy_counts", "ToyCounts", "a photo of {}.", tuple(count_names[n] for n in COUNTS),
                   tuple((("count", n),) for n in COUNTS), domain="clean_v2"),
    ]
    everything = tuple(range(len(objects)))
    subset = tuple(range(0, len(objects), 2))
    for suffix, title, domain, labels in (("v2", "V2", "clean_v2", everything),
                                          ("sketch", "Sketch", "sketch", everything),
                                          ("noisy", "Noisy", "noisy", everything),
                                          ("clutter", "Clutter", "clutter", subset)):
        defs.append(ToyDataset(f"toy_objects_{suffix}", f"ToyObjects{title}", "a photo of a {}.",
                               tuple(objects_names[i] for i in labels), tuple(objects_attrs[i] for i in labels),
                               domain=domain, test_only=True, source="toy_objects", source_labels=labels))
    return {d.name: d for d in defs}


_DATASETS: dict[str, ToyDataset] | None = None


def toy_datasets() -> dict[str, ToyDataset]:
    """All toy dataset definitions by name, sources first, then the DG targets."""
    global _DATASETS
    if _DATASETS is None:
        _DATASETS = _build()
    return _DATASETS


def toy_dataset_names() -> list[str]:
    return list(toy_datasets())


def toy_dataset(name: str) -> ToyDataset:
    try:
        return toy_datasets()[name]
    except KeyError:
        raise DatasetError(f"unknown toy dataset {name!r}; known: {', '.join(toy_datasets())}") from None


def toy_classnames(name: str) -> list[str]:
    """Class names in label order, as the reader returns them (underscores kept)."""
    return list(toy_dataset(name).classnames)


def split_sizes(name: str, scale: float = 1.0) -> tuple[int, int, int]:
    """(train, val, test) images per class at `scale`; test-only sets give the same n three times."""
    if toy_dataset(name).test_only:
        n = max(1, round(_PER_CLASS_TEST_ONLY * scale))
        return n, n, n
    train, val, test = (max(1, round(k * scale)) for k in _PER_CLASS)
    return train, val, test


# --------------------------------------------------------------------------------------------------
# rendering one dataset image


def image_rng(seed: int, dataset: str, classname: str, index: int) -> random.Random:
    # str seeds are hashed with sha512 by `random`: stable across runs and PYTHONHASHSEED
    return random.Random(f"toy-world-v{TOY_WORLD_VERSION}:{seed}:{dataset}:{classname}:{index}")


def render_item(name: str, label: int, index: int, *, seed: int = 0, size: int = 64):
    """The `index`-th image of class `label` of dataset `name` (a PIL image), without touching disk."""
    from .world import render, sample_scene

    spec = toy_dataset(name)
    rng = image_rng(seed, name, spec.classnames[label], index)
    fixed: dict[str, object] = dict(spec.classes[label])
    for attr, options in spec.choices:
        if attr not in fixed:
            fixed[attr] = rng.choice(options)
    scene = sample_scene(rng, domain=spec.domain, **fixed)
    return render(scene, rng, size=size)


# --------------------------------------------------------------------------------------------------
# materialize


def _marker_text(seed: int, scale: float) -> str:
    return json.dumps({"version": TOY_WORLD_VERSION, "seed": seed, "scale": scale}, sort_keys=True) + "\n"


def _marker_ok(root: Path, want: str) -> bool:
    try:
        return (root / MARKER).read_text(encoding="utf-8") == want
    except OSError:
        return False


def _write_dataset(folder: Path, spec: ToyDataset, seed: int, scale: float) -> int:
    n_train, n_val, n_test = split_sizes(spec.name, scale)
    images = folder / "images"
    for classname in spec.classnames:
        (images / classname).mkdir(parents=True)
    parts: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    bounds = (("train", 0, n_train), ("val", n_train, n_train + n_val), ("test", n_train + n_val,
                                                                          n_train + n_val + n_test))
    if spec.test_only:
        bounds = (("test", 0, n_test),)
    written = 0
    for key, start, stop in bounds:
        for index in range(start, stop):  # class-interleaved lists, like a shuffled split file
            for label, classname in enumerate(spec.classnames):
                rel = f"{classname}/{index:03d}.png"
                render_item(spec.name, label, index, seed=seed).save(images / rel, format="PNG",
                                                                       compress_level=1)
                parts[key].append([rel, label, classname])
                written += 1
    if spec.test_only:
        parts["train"] = parts["val"] = parts["test"]
    with open(folder / spec.split_file, "w", encoding="utf-8") as handle:
        json.dump(parts, handle, separators=(",", ":"))
    return written


def materialize(root: Path, *, seed: int = 0, scale: float = 1.0) -> Path:
    """Write every toy dataset under `root` (idempotent, crash-safe, safe across processes); return root.

    If `root/TOY_WORLD_VERSION` already records this version, seed and scale nothing is written.
    Otherwise the world is generated in a hidden sibling folder and renamed into place, under the
    lock `root.parent/<root.name>.lock`; an outdated world at `root` is replaced. A non-empty `root`
    without the marker is refused rather than deleted. `scale` < 1 writes fewer images per class
    (at least one per split), for tests.
    """
    import filelock

    if not scale > 0:
        raise ValueError(f"materialize: scale must be > 0, got {scale!r}")
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    want = _marker_text(seed, float(scale))
    if _marker_ok(root, want):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(root.parent / (root.name + ".lock"))):
        if _marker_ok(root, want):
            return root
        if root.exists() and not (root / MARKER).is_file():
            if not root.is_dir() or any(root.iterdir()):
                raise DatasetError(f"{root} exists and is not a toy world (no {MARKER} file); refusing to "
                                   "overwrite it: pass an empty or new folder to materialize")
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # leftovers of a crashed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.parent.glob(f".{root.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for spec in toy_datasets().values():
                _write_dataset(tmp / spec.folder, spec, seed, float(scale))
            (tmp / MARKER).write_text(want, encoding="utf-8")
            if root.exists():
                old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:12]}"
                os.replace(root, old)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def default_root() -> Path:
    """`$BENCHSUITE_CACHE/toy-world-v<version>`, the cache defaulting to ~/.cache/benchsuite."""
    from ..paths import cache_root

    return cache_root() / f"toy-world-v{TOY_WORLD_VERSION}"


# --------------------------------------------------------------------------------------------------
# reading and registering


def read_toy(dataset_dir: Path, *, name: str) -> DatasetSplits:
    """Read one materialized toy dataset with the generic split_zhou reader."""
    from ..data.readers import read_split_zhou

    try:
        return read_split_zhou(dataset_dir, name, "images", name)
    except DatasetError as exc:
        raise DatasetError(f"{exc}; toy datasets are generated, not downloaded: run "
                           "benchsuite.toy.materialize(<data root>) (default root: "
                           f"{default_root()})") from exc


_READERS = {}


def _reader(name: str):
    if name not in _READERS:
        _READERS[name] = partial(read_toy, name=name)
    return _READERS[name]


def dataset_spec(name: str):
    """The registry `DatasetSpec` of a toy dataset (the same object contents on every call)."""
    from ..data.registry import DatasetSpec

    spec = toy_dataset(name)
    return DatasetSpec(name=spec.name, folder=spec.folder, title=spec.title, template=spec.template,
                       layout=spec.layout, reader=_reader(name), test_only=spec.test_only,
                       default_root=materialized_root)


def materialized_root() -> Path:
    """The toy world under $BENCHSUITE_CACHE, rendered on first use: the data root of every toy dataset."""
    return materialize(default_root())


# --------------------------------------------------------------------------------------------------
# pretraining stream

#: Pretraining sampling weights: a skewed world (some words rare, sketches rare) so downstream
#: zero-shot is learnable but imperfect.
PRETRAIN_DOMAINS = {"clean": 0.74, "noisy": 0.10, "clutter": 0.10, "clean_v2": 0.03, "sketch": 0.03}
PRETRAIN_SHAPES = {"circle": 1.0, "square": 1.0, "triangle": 1.0, "star": 0.9, "cross": 0.7,
                   "diamond": 0.7, "heart": 0.5, "crescent": 0.35}
PRETRAIN_COLORS = {"red": 1.0, "green": 1.0, "blue": 1.0, "yellow": 0.9, "orange": 0.8, "white": 0.7,
                   "purple": 0.5, "cyan": 0.35}
PRETRAIN_TEXTURES = {"solid": 1.6, "striped": 1.0, "dotted": 0.8, "hollow": 0.7, "checkered": 0.4}
PRETRAIN_COUNTS = {1: 0.45, 2: 0.25, 3: 0.17, 4: 0.13}
PRETRAIN_MISMATCH = 0.03  #: share of captions describing another random scene (alt-text noise)


def _weighted(rng: random.Random, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def pretraining_scene(rng: random.Random):
    from .world import sample_scene

    return sample_scene(rng, domain=_weighted(rng, PRETRAIN_DOMAINS), shape=_weighted(rng, PRETRAIN_SHAPES),
                        color=_weighted(rng, PRETRAIN_COLORS), texture=_weighted(rng, PRETRAIN_TEXTURES),
                        count=_weighted(rng, PRETRAIN_COUNTS))


def pretraining_pair(index: int, seed: int = 0, *, size: int = 64):
    """The `index`-th (image, caption) pair of the stream for `seed` (random access, for sharding)."""
    from .world import caption, render

    rng = random.Random(f"toy-pretrain-v{TOY_WORLD_VERSION}:{seed}:{index}")
    scene = pretraining_scene(rng)
    image = render(scene, rng, size=size)
    described = pretraining_scene(rng) if rng.random() < PRETRAIN_MISMATCH else scene
    return image, caption(described, rng)


def pretraining_pairs(n: int | None = None, seed: int = 0, *, start: int = 0, size: int = 64) -> Iterator:
    """Deterministic stream of (PIL image, caption) pairs `start`, `start+1`, ...; endless if n is None."""
    index = start
    while n is None or index < start + n:
        yield pretraining_pair(index, seed, size=size)
        index += 1
