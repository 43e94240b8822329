"""Readers for the 15 datasets in the CoOp toolbox layout (KaiyangZhou/CoOp `datasets/*.py`, ff61507c).

Each `read_<name>(dataset_dir)` takes `$DATA/<folder>` and returns the train/val/test lists in exactly
the order CoOp builds them, because that order (with the seed) decides the few-shot sample.

Recorded deviations from CoOp, all invisible on a correctly installed dataset:
- Images inside a class folder are listed SORTED (CoOp: unsorted `os.listdir`, so its order depends on
  the filesystem). This affects ImageNet and the four ImageNet variants.
- ImageNet test labels reuse the sorted `images/train` folder order and the `images/val` folders must
  be the same set (CoOp re-scans `images/val` on its own, which agrees when the sets are equal).
- ImageNetV2 reads one folder per line of its classnames.txt (CoOp hard-codes `range(1000)`, which is the
  same thing for the real 1000-line file) so tiny test worlds can have fewer classes.
- Class folders are directories only (CoOp lists every non-hidden entry and would crash on a stray file);
  empty class folders, malformed lines and unknown names raise `DatasetError` instead of a KeyError.
- Image files are not stat'ed one by one (Dassl's `Datum` asserts each exists); only the split files'
  structure and the image root are checked, so loading large datasets stays fast.
- Test-only sets (ImageNetV2/-Sketch/-A/-R) return train = val = test = all images (CoOp leaves val None).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .datum import Datum, DatasetSplits, classnames_of

HINT = "see the CoOp DATASETS.md layout"

# One-line layout description per dataset (CLI name); the registry shows the same text.
LAYOUTS: dict[str, str] = {
    "imagenet": "$DATA/imagenet/classnames.txt, $DATA/imagenet/images/train/<wnid>/ and "
    "$DATA/imagenet/images/val/<wnid>/",
    "caltech101": "$DATA/caltech-101/101_ObjectCategories/ and $DATA/caltech-101/split_zhou_Caltech101.json",
    "oxford_pets": "$DATA/oxford_pets/images/ and $DATA/oxford_pets/split_zhou_OxfordPets.json",
    "stanford_cars": "$DATA/stanford_cars/cars_train/, $DATA/stanford_cars/cars_test/ and "
    "$DATA/stanford_cars/split_zhou_StanfordCars.json",
    "oxford_flowers": "$DATA/oxford_flowers/jpg/ and $DATA/oxford_flowers/split_zhou_OxfordFlowers.json",
    "food101": "$DATA/food-101/images/ and $DATA/food-101/split_zhou_Food101.json",
    "fgvc_aircraft": "$DATA/fgvc_aircraft/ (the data/ folder of fgvc-aircraft-2013b) with images/, "
    "variants.txt and images_variant_{train,val,test}.txt",
    "sun397": "$DATA/sun397/SUN397/ and $DATA/sun397/split_zhou_SUN397.json",
    "dtd": "$DATA/dtd/images/ and $DATA/dtd/split_zhou_DescribableTextures.json",
    "eurosat": "$DATA/eurosat/2750/ and $DATA/eurosat/split_zhou_EuroSAT.json",
    "ucf101": "$DATA/ucf101/UCF-101-midframes/ and $DATA/ucf101/split_zhou_UCF101.json",
    "imagenetv2": "$DATA/imagenetv2/classnames.txt (copied from imagenet) and "
    "$DATA/imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/",
    "imagenet_sketch": "$DATA/imagenet-sketch/classnames.txt (copied from imagenet) and "
    "$DATA/imagenet-sketch/images/<wnid>/",
    "imagenet_a": "$DATA/imagenet-adversarial/classnames.txt (copied from imagenet) and "
    "$DATA/imagenet-adversarial/imagenet-a/<wnid>/",
    "imagenet_r": "$DATA/imagenet-rendition/classnames.txt (copied from imagenet) and "
    "$DATA/imagenet-rendition/imagenet-r/<wnid>/",
}



# --------------------------------------------------------------------------------------------------
# small helpers


def _abs(path: Path | str) -> str:
    """Absolute, user-expanded path without resolving symlinks (CoOp's `abspath(expanduser(...))`)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _require(path: str, *, folder: bool, name: str) -> str:
    """Raise one DatasetError naming the missing path and the layout `name` expects."""
    ok = os.path.isdir(path) if folder else os.path.isfile(path)
    if not ok:
        shown = path + os.sep if folder else path
        kind = "folder" if folder else "file"
        raise DatasetError(f"{name}: missing {kind} {shown}; expected {_layout(name)}; {HINT}")
    return path


def _layout(name: str) -> str:
    return LAYOUTS.get(name, f"the {name} layout")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_label(value: Any) -> int | None:
    """CoOp applies int() to the label; accept ints and integer strings, refuse anything lossy."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str):
        try:
            label = int(value.strip())
        except ValueError:
            return None
    else:
        return None
    return label if label >= 0 else None


def _read_lines(path: str, name: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{name}: cannot read {path}: {exc}") from exc


def _listing(folder: str, *, dirs: bool) -> list[str]:
    """Sorted non-hidden sub-folders (dirs=True) or files of `folder`."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if not e.name.startswith(".") and (e.is_dir() if dirs else not e.is_dir())
        ]
    return sorted(names)


def _scan_class_folder(folder: str, label: int, classname: str, name: str) -> list[Datum]:
    files = _listing(folder, dirs=False)
    if not files:
        raise DatasetError(f"{name}: class folder {folder}{os.sep} holds no images; expected "
                           f"{_layout(name)}; {HINT}")
    return [Datum(impath=os.path.join(folder, f), label=label, classname=classname) for f in files]


def _splits(name: str, root: str, train: list[Datum], val: list[Datum], test: list[Datum]) -> DatasetSplits:
    return DatasetSplits(name=name, root=root, train=train, val=val, test=test,
                         classnames=classnames_of(train))


# --------------------------------------------------------------------------------------------------
# split_zhou_<Name>.json datasets (CoOp `OxfordPets.read_split`)


def _escapes(image_root: str, relpath: str) -> bool:
    """Whether joining `relpath` to `image_root` leaves it ('..', absolute or drive components).

    Why: a split file is data a user downloads; it must not make benchsuite read, fingerprint or
    record files elsewhere on the machine."""
    if os.path.isabs(relpath) or os.path.splitdrive(relpath)[0]:
        return True
    joined = os.path.normpath(os.path.join(image_root, relpath))
    return os.path.commonpath([joined, os.path.normpath(image_root)]) != os.path.normpath(image_root)


def _zhou_entry(split_path: str, key: str, index: int, entry: Any, image_root: str, name: str) -> Datum:
    where = f"{split_path}: entry {key}[{index}] = {_short(entry)}"
    if not isinstance(entry, list) or len(entry) != 3:
        raise DatasetError(f"{name}: malformed {where}; expected [relative_path, integer_label, classname]")
    relpath, raw_label, classname = entry
    if not isinstance(relpath, str) or not relpath or os.path.isabs(relpath):
        raise DatasetError(f"{name}: malformed {where}; the image path must be a non-empty relative path")
    if _escapes(image_root, relpath):
        raise DatasetError(f"{name}: refused {where}; the image path leads outside the image folder "
                           f"{image_root}{os.sep} (a '..' or absolute component); fix the split file")
    label = _as_label(raw_label)
    if label is None:
        raise DatasetError(f"{name}: malformed {where}; the label must be a non-negative integer")
    if not isinstance(classname, str) or not classname:
        raise DatasetError(f"{name}: malformed {where}; the class name must be a non-empty string")
    return Datum(impath=os.path.join(image_root, relpath), label=label, classname=classname)


def read_split_zhou(dataset_dir: Path, name: str, image_subdir: str, split_stem: str) -> DatasetSplits:
    """Read `split_zhou_<split_stem>.json`; paths are joined to `dataset_dir/image_subdir`, order kept."""
    ddir = _require(_abs(dataset_dir), folder=True, name=name)
    image_root = _require(os.path.join(ddir, image_subdir) if image_subdir else ddir, folder=True, name=name)
    split_path = _require(os.path.join(ddir, f"split_zhou_{split_stem}.json"), folder=False, name=name)
    try:
        with open(split_path, encoding="utf-8") as handle:
            split = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{name}: {split_path} is not valid JSON ({exc}); expected "
                           '{"train": [...], "val": [...], "test": [...]}') from exc
    if not isinstance(split, dict):
        raise DatasetError(f"{name}: {split_path} holds {type(split).__name__}; expected a JSON object "
                           'with keys "train", "val", "test"')
    parts: dict[str, list[Datum]] = {}
    for key in ("train", "val", "test"):
        entries = split.get(key)
        if not isinstance(entries, list):
            raise DatasetError(f'{name}: {split_path}: key "{key}" is missing or not a list; expected '
                               "lists of [relative_path, integer_label, classname]")
        parts[key] = [_zhou_entry(split_path, key, i, e, image_root, name) for i, e in enumerate(entries)]
    for key in ("train", "test"):
        if not parts[key]:
            raise DatasetError(f'{name}: {split_path}: the "{key}" list is empty')
    return _splits(name, image_root, parts["train"], parts["val"], parts["test"])


def read_caltech101(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "caltech101", "101_ObjectCategories", "Caltech101")


def read_oxford_pets(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "oxford_pets", "images", "OxfordPets")


def read_stanford_cars(dataset_dir: Path) -> DatasetSplits:
    """Split paths (`cars_train/…`, `cars_test/…`) are relative to the dataset folder itself."""
    return read_split_zhou(dataset_dir, "stanford_cars", "", "StanfordCars")


def read_oxford_flowers(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "oxford_flowers", "jpg", "OxfordFlowers")


def read_food101(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "food101", "images", "Food101")


def read_sun397(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "sun397", "SUN397", "SUN397")


def read_dtd(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "dtd", "images", "DescribableTextures")


def read_eurosat(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "eurosat", "2750", "EuroSAT")


def read_ucf101(dataset_dir: Path) -> DatasetSplits:
    return read_split_zhou(dataset_dir, "ucf101", "UCF-101-midframes", "UCF101")


# --------------------------------------------------------------------------------------------------
# FGVCAircraft: official text splits, label = line index in variants.txt


def read_fgvc_aircraft(dataset_dir: Path) -> DatasetSplits:
    """`images_variant_<split>.txt` lines are `<imageid> <variant words>` → `images/<imageid>.jpg`."""
    name = "fgvc_aircraft"
    ddir = _require(_abs(dataset_dir), folder=True, name=name)
    image_root = _require(os.path.join(ddir, "images"), folder=True, name=name)
    variants_path = _require(os.path.join(ddir, "variants.txt"), folder=False, name=name)
    variants = [line.strip() for line in _read_lines(variants_path, name)]
    while variants and not variants[-1]:
        variants.pop()  # a trailing blank line shifts nothing; one in the middle would shift labels
    cname2lab: dict[str, int] = {}
    for index, variant in enumerate(variants):
        if not variant or variant in cname2lab:
            problem = "is blank" if not variant else f"repeats variant {variant!r}"
            raise DatasetError(f"{name}: {variants_path} line {index + 1} {problem}; expected one distinct "
                               "variant per line (label = line index)")
        cname2lab[variant] = index
    if not cname2lab:
        raise DatasetError(f"{name}: {variants_path} lists no variants")

    def read(split: str) -> list[Datum]:
        path = _require(os.path.join(ddir, f"images_variant_{split}.txt"), folder=False, name=name)
        items: list[Datum] = []
        for number, raw in enumerate(_read_lines(path, name), start=1):
            if not raw.strip():
                continue
            parts = raw.strip().split(" ")
            classname = " ".join(parts[1:])
            if _escapes(image_root, parts[0] + ".jpg"):
                raise DatasetError(f"{name}: refused line {number} of {path}: {_short(raw.rstrip())}; the image "
                                   f"id leads outside {image_root}{os.sep}; fix the file")
            if classname not in cname2lab:
                raise DatasetError(f"{name}: malformed line {number} of {path}: {_short(raw.rstrip())}; "
                                   f"expected '<imageid> <variant>' with a variant listed in {variants_path}")
            items.append(Datum(impath=os.path.join(image_root, parts[0] + ".jpg"),
                               label=cname2lab[classname], classname=classname))
        if split != "val" and not items:
            raise DatasetError(f"{name}: {path} lists no images")
        return items

    return _splits(name, image_root, read("train"), read("val"), read("test"))


# --------------------------------------------------------------------------------------------------
# ImageNet and its variants: class folders named by wnid plus classnames.txt


def read_classnames(path: str, name: str) -> dict[str, str]:
    """classnames.txt as an ordered wnid → class name map (lines `wnid name words…`, file order kept)."""
    classnames: dict[str, str] = {}
    for number, raw in enumerate(_read_lines(path, name), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(" ")
        wnid, classname = parts[0], " ".join(parts[1:])
        if not classname.strip():
            raise DatasetError(f"{name}: malformed line {number} of {path}: {_short(raw.rstrip())}; "
                               "expected '<wnid> <class name>' separated by a space")
        if wnid in classnames:
            raise DatasetError(f"{name}: {path} line {number} repeats wnid {wnid!r}")
        classnames[wnid] = classname
    if not classnames:
        raise DatasetError(f"{name}: {path} lists no classes; expected lines '<wnid> <class name>'")
    return classnames


def _name_of(classnames: dict[str, str], wnid: str, folder: str, path: str, name: str) -> str:
    if wnid not in classnames:
        raise DatasetError(f"{name}: class folder {folder}{os.sep} has no line in {path}; expected "
                           "classnames.txt copied from $DATA/imagenet/")
    return classnames[wnid]


def _read_wnid_folders(image_dir: str, folders: list[str], classnames: dict[str, str], text_file: str,
                       name: str) -> list[Datum]:
    """Label = index in `folders` (sorted wnids); images of each folder in sorted order."""
    if not folders:
        raise DatasetError(f"{name}: {image_dir}{os.sep} holds no class folders; expected {_layout(name)}; "
                           f"{HINT}")
    items: list[Datum] = []
    for label, wnid in enumerate(folders):
        folder = os.path.join(image_dir, wnid)
        items += _scan_class_folder(folder, label, _name_of(classnames, wnid, folder, text_file, name), name)
    return items


def read_imagenet(dataset_dir: Path) -> DatasetSplits:
    """Labels follow the sorted wnid folders of images/train; images/val is the test set (and val).

    Recorded deviation: file names inside a class folder are sorted (CoOp uses unsorted os.listdir, so
    its ImageNet few-shot sample depends on the filesystem).
    """
    name = "imagenet"
    ddir = _require(_abs(dataset_dir), folder=True, name=name)
    text_file = _require(os.path.join(ddir, "classnames.txt"), folder=False, name=name)
    image_root = _require(os.path.join(ddir, "images"), folder=True, name=name)
    train_dir = _require(os.path.join(image_root, "train"), folder=True, name=name)
    val_dir = _require(os.path.join(image_root, "val"), folder=True, name=name)
    classnames = read_classnames(text_file, name)
    wnids = _listing(train_dir, dirs=True)
    val_wnids = _listing(val_dir, dirs=True)
    if val_wnids != wnids:
        missing = sorted(set(wnids) ^ set(val_wnids))[:5]
        raise DatasetError(f"{name}: {train_dir}{os.sep} and {val_dir}{os.sep} hold different wnid folders "
                           f"(e.g. {', '.join(missing)}); the val images must be sorted into the same "
                           "class folders as train")
    train = _read_wnid_folders(train_dir, wnids, classnames, text_file, name)
    test = _read_wnid_folders(val_dir, wnids, classnames, text_file, name)
    return _splits(name, image_root, train, list(test), test)


def _test_only(name: str, image_root: str, data: list[Datum]) -> DatasetSplits:
    return DatasetSplits(name=name, root=image_root, train=data, val=list(data), test=list(data),
                         classnames=classnames_of(data))


def _read_variant(dataset_dir: Path, name: str, image_subdir: str) -> DatasetSplits:
    """Sketch/-A/-R: labels by sorted order of the wnid folders present, classnames.txt beside them."""
    ddir = _require(_abs(dataset_dir), folder=True, name=name)
    text_file = _require(os.path.join(ddir, "classnames.txt"), folder=False, name=name)
    image_root = _require(os.path.join(ddir, image_subdir), folder=True, name=name)
    classnames = read_classnames(text_file, name)
    folders = _listing(image_root, dirs=True)  # class folders only: ImageNet-A/-R's README.txt is a file
    return _test_only(name, image_root, _read_wnid_folders(image_root, folders, classnames, text_file, name))


def read_imagenetv2(dataset_dir: Path) -> DatasetSplits:
    """Folder `str(i)` holds class i = the i-th line of imagenetv2/classnames.txt (file order)."""
    name = "imagenetv2"
    ddir = _require(_abs(dataset_dir), folder=True, name=name)
    text_file = _require(os.path.join(ddir, "classnames.txt"), folder=False, name=name)
    image_root = _require(os.path.join(ddir, "imagenetv2-matched-frequency-format-val"), folder=True, name=name)
    classnames = read_classnames(text_file, name)
    data: list[Datum] = []
    for label, wnid in enumerate(classnames):
        folder = _require(os.path.join(image_root, str(label)), folder=True, name=name)
        data += _scan_class_folder(folder, label, classnames[wnid], name)
    return _test_only(name, image_root, data)


def read_imagenet_sketch(dataset_dir: Path) -> DatasetSplits:
    return _read_variant(dataset_dir, "imagenet_sketch", "images")


def read_imagenet_a(dataset_dir: Path) -> DatasetSplits:
    """200 of the 1000 wnids: labels 0..199 in sorted order of those present; README.txt ignored."""
    return _read_variant(dataset_dir, "imagenet_a", "imagenet-a")


def read_imagenet_r(dataset_dir: Path) -> DatasetSplits:
    """200 of the 1000 wnids: labels 0..199 in sorted order of those present; README.txt ignored."""
    return _read_variant(dataset_dir, "imagenet_r", "imagenet-r")
