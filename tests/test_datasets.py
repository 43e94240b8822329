"""Dataset readers and registry against tiny data roots in the real CoOp layouts."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from benchsuite.data import registry
from benchsuite.data.datum import DatasetSplits, Datum, fingerprint, relative_path
from benchsuite.data.registry import (
    DATASETS,
    DatasetSpec,
    clean_classname,
    format_template,
    get_dataset,
    load_dataset,
    register_dataset,
)
from benchsuite.errors import DatasetError
from fixture_data import (
    ALL_DATASETS,
    EXPECTED,
    FGVC_VARIANTS,
    IMAGENET_A_INDICES,
    IMAGENET_CLASSES,
    IMAGENET_R_INDICES,
    make_data_root,
)

ZHOU = {  # CLI name -> (folder, image root relative to the folder, split file)
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
WNIDS = [w for w, _ in IMAGENET_CLASSES]
NAMES = dict(IMAGENET_CLASSES)


def triples(items: list[Datum], root: str) -> list[list]:
    return [[relative_path(d.impath, root), d.label, d.classname] for d in items]


def first_appearance(items: list[Datum]) -> list[int]:
    return list(dict.fromkeys(d.label for d in items))


# ---------------------------------------------------------------------------------------------------
# registry


def test_registry_order_folders_titles_and_flags() -> None:
    assert list(DATASETS)[: len(ALL_DATASETS)] == list(ALL_DATASETS)  # the toy world registers after them
    real = {n: s for n, s in DATASETS.items() if n in ALL_DATASETS}
    folders = {n: s.folder for n, s in real.items()}
    assert folders == {
        "imagenet": "imagenet", "caltech101": "caltech-101", "oxford_pets": "oxford_pets",
        "stanford_cars": "stanford_cars", "oxford_flowers": "oxford_flowers", "food101": "food-101",
        "fgvc_aircraft": "fgvc_aircraft", "sun397": "sun397", "dtd": "dtd", "eurosat": "eurosat",
        "ucf101": "ucf101", "imagenetv2": "imagenetv2", "imagenet_sketch": "imagenet-sketch",
        "imagenet_a": "imagenet-adversarial", "imagenet_r": "imagenet-rendition",
    }
    assert [n for n, s in real.items() if s.test_only] == [
        "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert all(spec.name == name and spec.layout for name, spec in DATASETS.items())


def test_templates_are_coops_custom_templates() -> None:
    by_title = {s.title: s.template for n, s in DATASETS.items() if n in ALL_DATASETS}
    assert by_title == {
        "OxfordPets": "a photo of a {}, a type of pet.",
        "OxfordFlowers": "a photo of a {}, a type of flower.",
        "FGVCAircraft": "a photo of a {}, a type of aircraft.",
        "DescribableTextures": "{} texture.",
        "EuroSAT": "a centered satellite photo of {}.",
        "StanfordCars": "a photo of a {}.",
        "Food101": "a photo of {}, a type of food.",
        "SUN397": "a photo of a {}.",
        "Caltech101": "a photo of a {}.",
        "UCF101": "a photo of a person doing {}.",
        "ImageNet": "a photo of a {}.",
        "ImageNetSketch": "a photo of a {}.",
        "ImageNetV2": "a photo of a {}.",
        "ImageNetA": "a photo of a {}.",
        "ImageNetR": "a photo of a {}.",
    }


def test_cleaning_and_templates_on_loaded_classnames(data_root: Path) -> None:
    assert clean_classname("american_pit_bull_terrier") == "american pit bull terrier"
    assert clean_classname("2012 Tesla Model S Sedan") == "2012 Tesla Model S Sedan"
    pets = load_dataset("oxford_pets", data_root)
    prompts = [format_template(get_dataset("oxford_pets").template, c) for c in pets.classnames]
    assert "a photo of a american bulldog, a type of pet." in prompts
    assert all("_" not in p for p in prompts)
    cars = load_dataset("stanford_cars", data_root)
    assert format_template(get_dataset("stanford_cars").template, cars.classnames[0]) == \
        "a photo of a 2012 Tesla Model S Sedan."
    ucf = load_dataset("ucf101", data_root)
    assert format_template(get_dataset("ucf101").template, ucf.classnames[0]) == \
        "a photo of a person doing Apply Eye Makeup."
    assert format_template(get_dataset("dtd").template, "banded") == "banded texture."
    # Cleaning happens at prompt time only: the reader keeps the raw name.
    assert "american_bulldog" in pets.classnames


def test_unknown_dataset_name_lists_known_names(data_root: Path) -> None:
    with pytest.raises(DatasetError) as err:
        get_dataset("imagenet-1k")
    assert "imagenet-1k" in str(err.value)
    assert all(name in str(err.value) for name in ALL_DATASETS)
    with pytest.raises(DatasetError, match="imagenet-1k"):
        load_dataset("imagenet-1k", data_root)


def test_register_dataset_rejects_duplicates_and_loads_new(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "DATASETS", dict(DATASETS))
    with pytest.raises(ValueError, match="oxford_pets"):
        register_dataset(DATASETS["oxford_pets"])

    def toy_reader(folder: Path) -> DatasetSplits:
        item = Datum(impath=str(folder / "x.jpg"), label=0, classname="toy_thing")
        return DatasetSplits(name="reader-name", root=str(folder), train=[item], val=[], test=[item])

    register_dataset(DatasetSpec(name="toy", folder="toy_dir", title="Toy", template="a {}.",
                                 layout="$DATA/toy_dir/", reader=toy_reader))
    assert list(registry.DATASETS)[-1] == "toy"
    loaded = load_dataset("toy", tmp_path)
    assert loaded.name == "toy"  # the CLI name, not whatever the reader put there
    assert loaded.root == str(tmp_path / "toy_dir")
    assert "toy" not in DATASETS  # the module-level registry was not touched by this test


# ---------------------------------------------------------------------------------------------------
# every reader on the fixture


@pytest.mark.parametrize("name", ALL_DATASETS)
def test_reader_matches_fixture(data_root: Path, name: str) -> None:
    splits = load_dataset(name, data_root)
    want = EXPECTED[name]
    assert splits.name == name
    assert splits.classnames == want.classnames
    assert (len(splits.train), len(splits.val), len(splits.test)) == (want.train, want.val, want.test)
    for item in splits.train + splits.val + splits.test:
        assert type(item.label) is int
        assert item.classname == splits.classnames[item.label]
        assert os.path.isfile(item.impath)
        assert not relative_path(item.impath, splits.root).startswith("..")
    if DATASETS[name].test_only:
        assert splits.train == splits.val == splits.test
    else:
        assert not set(splits.train) & set(splits.test)


@pytest.mark.parametrize("name", sorted(ZHOU))
def test_split_zhou_order_labels_and_root(data_root: Path, name: str) -> None:
    folder, image_subdir, split_file = ZHOU[name]
    splits = load_dataset(name, data_root)
    assert splits.root == os.path.join(str(data_root / folder), image_subdir).rstrip(os.sep)
    raw = json.loads((data_root / folder / split_file).read_text())
    for key in ("train", "val", "test"):
        assert triples(getattr(splits, key), splits.root) == raw[key]  # exact file order
    # the fixture interleaves classes, so label order and first-appearance order differ ...
    assert first_appearance(splits.train) != sorted(first_appearance(splits.train))
    # ... and classnames still come out by label (Dassl lab2cname)
    by_label = {label: cname for _, label, cname in raw["train"]}
    assert splits.classnames == [by_label[i] for i in sorted(by_label)]


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(data_root: Path) -> None:
    cars = load_dataset("stanford_cars", data_root)
    assert cars.root == str(data_root / "stanford_cars")
    assert {relative_path(d.impath, cars.root).split("/")[0] for d in cars.train + cars.val} == {"cars_train"}
    assert {relative_path(d.impath, cars.root).split("/")[0] for d in cars.test} == {"cars_test"}


def test_train_counts_make_16_shot_sampling_meaningful(data_root: Path) -> None:
    for name in ("imagenet", "oxford_pets", "fgvc_aircraft", "eurosat"):
        counts = Counter(d.label for d in load_dataset(name, data_root).train)
        assert counts[1] == 10, name  # fewer than 16: kept whole
        assert all(n >= 16 for label, n in counts.items() if label != 1), name
    assert len(load_dataset("oxford_pets", data_root).classnames) == 5  # base/new 3/2 by ceil
    assert len(load_dataset("eurosat", data_root).classnames) == 4


def test_fingerprints_do_not_depend_on_data_location(data_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "DATA"
    shutil.copytree(data_root, moved)
    for name in ALL_DATASETS:
        a, b = load_dataset(name, data_root), load_dataset(name, moved)
        assert a.train[0].impath != b.train[0].impath
        for key in ("train", "val", "test"):
            assert fingerprint(getattr(a, key), a.root) == fingerprint(getattr(b, key), b.root), (name, key)
    # a different data set (another fixture seed) changes them
    other = make_data_root(tmp_path / "seed1", ["imagenet", "oxford_pets"], seed=1)
    for name in ("imagenet", "oxford_pets"):
        a, c = load_dataset(name, data_root), load_dataset(name, other)
        assert fingerprint(a.train, a.root) != fingerprint(c.train, c.root)


def test_fixture_is_deterministic(tmp_path: Path) -> None:
    make_data_root(tmp_path / "a")
    make_data_root(tmp_path / "b", ["oxford_pets", "imagenet"])
    for rel in ("oxford_pets/split_zhou_OxfordPets.json", "oxford_pets/images/Bengal_0.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    a, b = load_dataset("imagenet", tmp_path / "a"), load_dataset("imagenet", tmp_path / "b")
    assert fingerprint(a.train, a.root) == fingerprint(b.train, b.root)


# ---------------------------------------------------------------------------------------------------
# ImageNet and its variants


def test_imagenet_labels_follow_sorted_wnids_and_sorted_files(data_root: Path) -> None:
    net = load_dataset("imagenet", data_root)
    train_dir = data_root / "imagenet" / "images" / "train"
    assert net.root == str(data_root / "imagenet" / "images")
    for label, wnid in enumerate(sorted(WNIDS)):
        items = [d for d in net.train if d.label == label]
        files = sorted(f for f in os.listdir(train_dir / wnid) if not f.startswith("."))
        assert [os.path.basename(d.impath) for d in items] == files
        assert {Path(d.impath).parent.name for d in items} == {wnid}
        assert all(d.classname == NAMES[wnid] for d in items)
    assert not any(os.path.basename(d.impath).startswith(".") for d in net.train)
    assert (train_dir / WNIDS[0] / ".DS_Store").exists()  # the fixture did plant a hidden file
    assert net.val == net.test
    assert {relative_path(d.impath, net.root).split("/")[0] for d in net.test} == {"val"}
    # the labels come in label order, with files sorted within each class
    assert [d.label for d in net.train] == sorted(d.label for d in net.train)


def test_imagenet_labels_ignore_classnames_file_order(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["imagenet"])
    text = root / "imagenet" / "classnames.txt"
    text.write_text("".join(reversed(text.read_text().splitlines(keepends=True))))
    net = load_dataset("imagenet", root)
    assert net.classnames == [NAMES[w] for w in sorted(WNIDS)]


@pytest.mark.parametrize("name, indices, subdir", [
    ("imagenet_a", IMAGENET_A_INDICES, "imagenet-adversarial/imagenet-a"),
    ("imagenet_r", IMAGENET_R_INDICES, "imagenet-rendition/imagenet-r"),
])
def test_200_class_style_subsets(data_root: Path, name: str, indices: tuple[int, ...], subdir: str) -> None:
    assert (data_root / subdir / "README.txt").is_file()
    subset = sorted(WNIDS[i] for i in indices)
    splits = load_dataset(name, data_root)
    assert splits.root == str(data_root / subdir)
    assert sorted({d.label for d in splits.test}) == [0, 1, 2, 3]
    assert splits.classnames == [NAMES[w] for w in subset]
    for item in splits.test:
        assert Path(item.impath).parent.name == subset[item.label]


def test_imagenet_sketch_uses_all_classes_in_sorted_wnid_order(data_root: Path) -> None:
    sketch = load_dataset("imagenet_sketch", data_root)
    for item in sketch.test:
        assert Path(item.impath).parent.name == sorted(WNIDS)[item.label]
    assert sketch.classnames == load_dataset("imagenet", data_root).classnames


def test_imagenetv2_folder_i_is_label_i_aligned_with_imagenet(data_root: Path) -> None:
    v2 = load_dataset("imagenetv2", data_root)
    net = load_dataset("imagenet", data_root)
    assert v2.classnames == net.classnames
    for item in v2.test:
        assert Path(item.impath).parent.name == str(item.label)
    assert sorted({d.label for d in v2.test}) == list(range(len(WNIDS)))


def test_imagenetv2_label_names_follow_its_classnames_file_order(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["imagenetv2"])
    lines = (root / "imagenetv2" / "classnames.txt").read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    (root / "imagenetv2" / "classnames.txt").write_text("".join(lines))
    v2 = load_dataset("imagenetv2", root)
    assert v2.classnames[:2] == ["goldfish", "tench"]
    assert {d.classname for d in v2.test if Path(d.impath).parent.name == "0"} == {"goldfish"}


# ---------------------------------------------------------------------------------------------------
# FGVCAircraft


def test_fgvc_label_is_the_variants_line_index(data_root: Path) -> None:
    fgvc = load_dataset("fgvc_aircraft", data_root)
    assert fgvc.root == str(data_root / "fgvc_aircraft" / "images")
    for item in fgvc.train + fgvc.val + fgvc.test:
        assert item.label == FGVC_VARIANTS.index(item.classname)
        assert os.path.basename(item.impath).endswith(".jpg")
    assert first_appearance(fgvc.train) != sorted(first_appearance(fgvc.train))
    lines = (data_root / "fgvc_aircraft" / "images_variant_train.txt").read_text().splitlines()
    assert [f"{Path(d.impath).stem} {d.classname}" for d in fgvc.train] == lines


def test_fgvc_labels_move_with_variants_file(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["fgvc_aircraft"])
    (root / "fgvc_aircraft" / "variants.txt").write_text("".join(v + "\n" for v in reversed(FGVC_VARIANTS)))
    fgvc = load_dataset("fgvc_aircraft", root)
    assert fgvc.classnames == list(reversed(FGVC_VARIANTS))


# ---------------------------------------------------------------------------------------------------
# errors


def test_missing_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_root"
    with pytest.raises(DatasetError) as err:
        load_dataset("oxford_pets", missing)
    assert str(missing) in str(err.value)


def test_missing_dataset_folder_names_it_and_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset("oxford_pets", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "oxford_pets") in message
    assert "split_zhou_OxfordPets.json" in message and "DATASETS.md" in message


@pytest.mark.parametrize("name, relpath", [
    ("oxford_pets", "oxford_pets/split_zhou_OxfordPets.json"),
    ("oxford_pets", "oxford_pets/images"),
    ("ucf101", "ucf101/UCF-101-midframes"),
    ("stanford_cars", "stanford_cars/split_zhou_StanfordCars.json"),
    ("fgvc_aircraft", "fgvc_aircraft/images_variant_val.txt"),
    ("fgvc_aircraft", "fgvc_aircraft/variants.txt"),
    ("imagenet", "imagenet/classnames.txt"),
    ("imagenet", "imagenet/images/val"),
    ("imagenet_a", "imagenet-adversarial/classnames.txt"),
    ("imagenetv2", "imagenetv2/imagenetv2-matched-frequency-format-val/3"),
])
def test_missing_file_or_folder_is_named(tmp_path: Path, name: str, relpath: str) -> None:
    root = make_data_root(tmp_path, [name])
    target = root / relpath
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(name, root)
    assert str(target) in str(err.value)
    assert "expected" in str(err.value)


@pytest.mark.parametrize("entry, why", [
    (["Bengal_99.jpg", 4], "[relative_path, integer_label, classname]"),
    (["Bengal_99.jpg", "four", "bengal"], "non-negative integer"),
    (["Bengal_99.jpg", 1.5, "bengal"], "non-negative integer"),
    (["Bengal_99.jpg", -1, "bengal"], "non-negative integer"),
    (["Bengal_99.jpg", True, "bengal"], "non-negative integer"),
    ([7, 4, "bengal"], "relative path"),
    (["/abs/Bengal_99.jpg", 4, "bengal"], "relative path"),
    (["Bengal_99.jpg", 4, None], "class name"),
    ({"path": "Bengal_99.jpg"}, "[relative_path, integer_label, classname]"),
])
def test_malformed_split_entry_is_named(tmp_path: Path, entry: object, why: str) -> None:
    root = make_data_root(tmp_path, ["oxford_pets"])
    path = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    split["val"].insert(3, entry)
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetError) as err:
        load_dataset("oxford_pets", root)
    message = str(err.value)
    assert str(path) in message and "val[3]" in message and why in message
    assert repr(entry)[:40] in message


def test_string_labels_are_cast_to_int_like_coop(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["oxford_pets"])
    path = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    split["test"][0][1] = str(split["test"][0][1])
    path.write_text(json.dumps(split))
    first = load_dataset("oxford_pets", root).test[0]
    assert type(first.label) is int and first.label == int(split["test"][0][1])


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ('[["a.jpg", 0, "x"]]', "JSON object"),
    ('{"train": [["a.jpg", 0, "x"]], "test": [["a.jpg", 0, "x"]]}', '"val"'),
    ('{"train": [], "val": [], "test": [["a.jpg", 0, "x"]]}', '"train" list is empty'),
])
def test_malformed_split_file_is_named(tmp_path: Path, content: str, fragment: str) -> None:
    root = make_data_root(tmp_path, ["dtd"])
    path = root / "dtd" / "split_zhou_DescribableTextures.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as err:
        load_dataset("dtd", root)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_fgvc_unknown_variant_line_is_named(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["fgvc_aircraft"])
    path = root / "fgvc_aircraft" / "images_variant_test.txt"
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(2, "1234567 Boeing 999\n")
    path.write_text("".join(lines))
    with pytest.raises(DatasetError) as err:
        load_dataset("fgvc_aircraft", root)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "Boeing 999" in str(err.value)


def test_imagenet_folder_without_classname_line_is_named(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["imagenet_r"])
    text = root / "imagenet-rendition" / "classnames.txt"
    text.write_text("".join(line for line in text.read_text().splitlines(keepends=True)
                            if not line.startswith(WNIDS[2])))
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet_r", root)
    assert str(root / "imagenet-rendition" / "imagenet-r" / WNIDS[2]) in str(err.value)
    assert str(text) in str(err.value)


def test_imagenet_val_folders_must_match_train(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["imagenet"])
    shutil.rmtree(root / "imagenet" / "images" / "val" / WNIDS[4])
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet", root)
    assert WNIDS[4] in str(err.value) and str(root / "imagenet" / "images" / "val") in str(err.value)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = make_data_root(tmp_path, ["imagenet_sketch"])
    folder = root / "imagenet-sketch" / "images" / WNIDS[1]
    for image in folder.iterdir():
        image.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet_sketch", root)
    assert str(folder) in str(err.value)
