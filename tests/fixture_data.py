"""Tiny deterministic data roots in the real CoOp layouts (a helper for tests, not a test module).

`make_data_root(root)` writes all 15 datasets in well under a second: 4–7 classes each, 20×16 px JPEGs
whose colour depends on the class (so a model could learn it), class names that need `_` cleaning, and
split files whose entries interleave classes so first-appearance order differs from label order.
`EXPECTED[name]` describes what a correct reader must return (class names by label, split sizes).
"""

from __future__ import annotations

import colorsys
import io
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ALL_DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
)

TRAIN_COUNTS = (20, 10, 18, 19, 20, 18, 19)  # class 1 has fewer than 16: 16-shot keeps all of it
N_VAL, N_TEST = 5, 3
VARIANT_PER_CLASS = 3  # images per class folder of the test-only ImageNet variants

# CLIP's ImageNet class names for the first six wnids (sorted), as CoOp's classnames.txt has them.
IMAGENET_CLASSES = (
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"),
    ("n01494475", "hammerhead shark"),
    ("n01496331", "electric ray"),
)
IMAGENET_A_INDICES = (1, 2, 4, 5)  # strict subsets of the 6 wnids, like the 200-class A and R
IMAGENET_R_INDICES = (0, 2, 3, 5)


@dataclass(frozen=True)
class Expected:
    """What a reader must return for a fixture dataset."""

    classnames: list[str]  # by label
    train: int
    val: int
    test: int


EXPECTED: dict[str, Expected] = {}


def _split_sizes(n_classes: int) -> tuple[int, int, int]:
    return sum(TRAIN_COUNTS[:n_classes]), N_VAL * n_classes, N_TEST * n_classes


class _Writer:
    """Writes JPEGs whose colour is the class hue plus a small per-image jitter."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def image(self, path: Path, label: int, n_classes: int) -> None:
        r, g, b = colorsys.hsv_to_rgb(label / n_classes, 0.8, 0.85)
        colour = tuple(max(0, min(255, int(c * 255) + self.rng.randint(-10, 10))) for c in (r, g, b))
        buffer = io.BytesIO()
        Image.new("RGB", (20, 16), colour).save(buffer, format="JPEG", quality=90)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())


def _interleave(per_class: list[list[list]], rng: random.Random) -> list[list]:
    """Round-robin over classes in a shuffled, never-identity class order (first appearance ≠ label)."""
    order = list(range(len(per_class)))
    rng.shuffle(order)
    if order == sorted(order):
        order.reverse()
    out: list[list] = []
    for step in range(max(len(items) for items in per_class)):
        out += [per_class[c][step] for c in order if step < len(per_class[c])]
    return out


# ----------------------------------------------------------------------------------------------------
# split_zhou datasets: (folder, image subdir, split stem, classes [(path stem, classname)], path maker)

PathMaker = Callable[[str, str, int, random.Random], str]  # (path stem, split, running index, rng)


def _per_folder(ext: str = "jpg", pattern: str = "{stem}/image_{k:04d}") -> PathMaker:
    return lambda stem, split, k, rng: pattern.format(stem=stem, k=k, r=rng.randrange(10**6)) + "." + ext


_ZHOU: dict[str, tuple[str, str, str, list[tuple[str, str]], PathMaker]] = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "Caltech101",
                   [("accordion", "accordion"), ("airplanes", "airplane"), ("Faces", "face"),
                    ("Leopards", "leopard"), ("yin_yang", "yin_yang")], _per_folder()),
    "oxford_pets": ("oxford_pets", "images", "OxfordPets",
                    [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                     ("american_pit_bull_terrier", "american_pit_bull_terrier"),
                     ("basset_hound", "basset_hound"), ("Bengal", "bengal")],
                    _per_folder(pattern="{stem}_{k}")),
    "stanford_cars": ("stanford_cars", "", "StanfordCars",
                      [("", "2012 Tesla Model S Sedan"), ("", "2012 BMW M3 Coupe"), ("", "2007 Hummer SUV"),
                       ("", "1993 Geo Metro Convertible"), ("", "2012 Acura TL Sedan"),
                       ("", "2009 Spyker C8 Coupe")],
                      lambda stem, split, k, rng: f"cars_{'test' if split == 'test' else 'train'}/{k:05d}.jpg"),
    "oxford_flowers": ("oxford_flowers", "jpg", "OxfordFlowers",
                       [("", "pink primrose"), ("", "hard-leaved pocket orchid"), ("", "canterbury bells"),
                        ("", "sweet pea"), ("", "english marigold"), ("", "tiger lily"), ("", "moon orchid")],
                       lambda stem, split, k, rng: f"image_{k:05d}.jpg"),
    "food101": ("food-101", "images", "Food101",
                [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava"),
                 ("beef_carpaccio", "beef_carpaccio")], _per_folder(pattern="{stem}/{k}{r:06d}")),
    "sun397": ("sun397", "SUN397", "SUN397",
               [("a/abbey", "abbey"), ("a/airplane_cabin", "airplane_cabin"),
                ("a/apartment_building/outdoor", "outdoor apartment_building"),
                ("b/badminton_court/indoor", "indoor badminton_court"), ("b/bakery/shop", "shop bakery")],
               _per_folder(pattern="{stem}/sun_a{r:06d}{k:03d}")),
    "dtd": ("dtd", "images", "DescribableTextures",
            [(c, c) for c in ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered")],
            lambda stem, split, k, rng: f"{stem}/{stem}_{k:04d}.jpg"),
    "eurosat": ("eurosat", "2750", "EuroSAT",
                [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
                 ("HerbaceousVegetation", "Herbaceous Vegetation Land"), ("Highway", "Highway or Road")],
                lambda stem, split, k, rng: f"{stem}/{stem}_{k + 1}.jpg"),
    "ucf101": ("ucf101", "UCF-101-midframes", "UCF101",
               [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Apply_Lipstick", "Apply_Lipstick"),
                ("Archery", "Archery"), ("Baby_Crawling", "Baby_Crawling"), ("Balance_Beam", "Balance_Beam")],
               lambda stem, split, k, rng: f"{stem}/v_{stem.replace('_', '')}_g{k // 7 + 1:02d}_c{k % 7 + 1:02d}.jpg"),
}


def _make_zhou(root: Path, name: str, writer: _Writer, rng: random.Random) -> None:
    folder, subdir, stem, classes, make_path = _ZHOU[name]
    image_root = root / folder / subdir if subdir else root / folder
    counters: dict[str, int] = {}
    split: dict[str, list[list]] = {}
    for key, count in (("train", None), ("val", N_VAL), ("test", N_TEST)):
        per_class: list[list[list]] = []
        for label, (path_stem, classname) in enumerate(classes):
            n = TRAIN_COUNTS[label] if count is None else count
            entries = []
            for _ in range(n):
                k = counters.get(path_stem, 0)  # running index per class folder ("" = shared folder)
                counters[path_stem] = k + 1
                relpath = make_path(path_stem, key, k, rng)
                writer.image(image_root / relpath, label, len(classes))
                entries.append([relpath, label, classname])
            per_class.append(entries)
        split[key] = _interleave(per_class, rng)
    (root / folder / f"split_zhou_{stem}.json").write_text(json.dumps(split, indent=4), encoding="utf-8")
    EXPECTED[name] = Expected([c for _, c in classes], *_split_sizes(len(classes)))


# ----------------------------------------------------------------------------------------------------
# FGVCAircraft

FGVC_VARIANTS = ("707-320", "A300B4", "BAE 146-200", "Cessna 172", "F/A-18")


def _make_fgvc(root: Path, writer: _Writer, rng: random.Random) -> None:
    base = root / "fgvc_aircraft"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("".join(v + "\n" for v in FGVC_VARIANTS), encoding="utf-8")
    image_ids = rng.sample(range(1_000_000, 2_000_000), 200)
    for key, count in (("train", None), ("val", N_VAL), ("test", N_TEST)):
        per_class = []
        for label, variant in enumerate(FGVC_VARIANTS):
            n = TRAIN_COUNTS[label] if count is None else count
            entries = []
            for _ in range(n):
                image_id = f"{image_ids.pop():07d}"
                writer.image(base / "images" / f"{image_id}.jpg", label, len(FGVC_VARIANTS))
                entries.append([image_id, variant])
            per_class.append(entries)
        lines = [f"{image_id} {variant}\n" for image_id, variant in _interleave(per_class, rng)]
        (base / f"images_variant_{key}.txt").write_text("".join(lines), encoding="utf-8")
    EXPECTED["fgvc_aircraft"] = Expected(list(FGVC_VARIANTS), *_split_sizes(len(FGVC_VARIANTS)))


# ----------------------------------------------------------------------------------------------------
# ImageNet and its variants


def _classnames_txt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in IMAGENET_CLASSES), encoding="utf-8")


def _make_imagenet(root: Path, writer: _Writer, rng: random.Random) -> None:
    base = root / "imagenet"
    _classnames_txt(base / "classnames.txt")
    n = len(IMAGENET_CLASSES)
    order = list(range(n))
    rng.shuffle(order)  # create folders and files out of order: the reader must sort
    for label in order:
        wnid = IMAGENET_CLASSES[label][0]
        for number in rng.sample(range(1, 10_000), TRAIN_COUNTS[label]):
            writer.image(base / "images" / "train" / wnid / f"{wnid}_{number}.JPEG", label, n)
        for number in rng.sample(range(1, 50_001), N_TEST):
            writer.image(base / "images" / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", label, n)
    (base / "images" / "train" / IMAGENET_CLASSES[0][0] / ".DS_Store").write_bytes(b"hidden")
    sizes = _split_sizes(n)
    EXPECTED["imagenet"] = Expected([c for _, c in IMAGENET_CLASSES], sizes[0], sizes[2], sizes[2])


def _make_variant(root: Path, name: str, writer: _Writer, rng: random.Random) -> None:
    folder, subdir, indices = {
        "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", range(len(IMAGENET_CLASSES))),
        "imagenet_sketch": ("imagenet-sketch", "images", range(len(IMAGENET_CLASSES))),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", IMAGENET_A_INDICES),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", IMAGENET_R_INDICES),
    }[name]
    base = root / folder
    _classnames_txt(base / "classnames.txt")
    n = len(IMAGENET_CLASSES)
    for index in sorted(indices, key=lambda _: rng.random()):
        wnid = IMAGENET_CLASSES[index][0]
        class_dir = base / subdir / (str(index) if name == "imagenetv2" else wnid)
        for k in range(VARIANT_PER_CLASS):
            stem = f"{rng.getrandbits(40):010x}" if name == "imagenetv2" else f"{name}_{rng.randrange(900)}_{k}"
            writer.image(class_dir / f"{stem}.jpeg", index, n)  # colour of the ImageNet class
    if name in ("imagenet_a", "imagenet_r"):
        (base / subdir / "README.txt").write_text("wnid folders, as shipped\n", encoding="utf-8")
    count = VARIANT_PER_CLASS * len(indices)
    EXPECTED[name] = Expected([IMAGENET_CLASSES[i][1] for i in sorted(indices)], count, count, count)


# ----------------------------------------------------------------------------------------------------


def make_data_root(root: Path, names: Iterable[str] | None = None, *, seed: int = 0) -> Path:
    """Write the requested datasets (default: all 15) under `root` and return `root`.

    Each dataset draws from its own `random.Random(f"{seed}:{name}")`, so its bytes do not depend on
    which other datasets are requested.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ALL_DATASETS if names is None else names:
        if name not in ALL_DATASETS:
            raise ValueError(f"no fixture for dataset {name!r}")
        rng = random.Random(f"{seed}:{name}")
        writer = _Writer(rng)
        if name in _ZHOU:
            _make_zhou(root, name, writer, rng)
        elif name == "fgvc_aircraft":
            _make_fgvc(root, writer, rng)
        elif name == "imagenet":
            _make_imagenet(root, writer, rng)
        else:
            _make_variant(root, name, writer, rng)
    return root
