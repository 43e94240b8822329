"""The toy world: deterministic rendering, captions, materialized datasets and their registry entries."""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from benchsuite.data import registry
from benchsuite.data.registry import format_template, load_dataset
from benchsuite.errors import ContractError, DatasetError
from benchsuite.toy import datasets as toy
from benchsuite.toy.world import (
    COLORS,
    COUNT_WORDS,
    COUNTS,
    DOMAINS,
    PLURALS,
    SHAPES,
    TEXTURES,
    Scene,
    caption,
    render,
    sample_scene,
)

SCALE = 0.1  # 4/1/2 images per class (2 for test-only sets): the whole world in well under a second
SOURCE = "toy_objects"


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the built-in registry plus the toy datasets, never leaking them to other modules."""
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))
    register_plugin_datasets(monkeypatch)


def register_plugin_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the datasets plugins contribute (the toy world's entry point) into the private registry."""
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    registry.all_datasets()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy.materialize(tmp_path_factory.mktemp("toy") / "world", seed=0, scale=SCALE)


def _scene(**kw) -> Scene:
    base = dict(shape="star", color="red", texture="striped", count=2, domain="clean", background=(120, 120, 120))
    base.update(kw)
    return Scene(**base)


def _snapshot(root: Path) -> dict[str, int]:
    out = {str(root): root.stat().st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


# --------------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_per_seed(domain: str) -> None:
    def draw(seed: int) -> bytes:
        rng = random.Random(seed)
        image = render(sample_scene(rng, domain=domain), rng)
        assert image.mode == "RGB" and image.size == (64, 64)
        return image.tobytes()

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_render_same_scene_different_rng_moves_objects_and_size_is_honoured() -> None:
    scene = _scene(domain="clean")
    a = render(scene, random.Random(1)).tobytes()
    b = render(scene, random.Random(2)).tobytes()
    assert a != b
    assert render(scene, random.Random(1), size=32).size == (32, 32)


def test_sketch_loses_colour_and_clean_keeps_it() -> None:
    import numpy as np

    def saturation(domain: str) -> float:
        rng = random.Random(0)
        scene = sample_scene(rng, domain=domain, color="red", texture="solid", count=1)
        arr = np.asarray(render(scene, rng), dtype=np.float32)
        return float((arr.max(-1) - arr.min(-1)).max())

    assert saturation("clean") > 120
    assert saturation("sketch") < 80


def test_sample_scene_fixed_attributes_override_and_validate() -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng, shape="heart", count=3, domain="sketch") for _ in range(50)]
    assert {s.shape for s in scenes} == {"heart"} and {s.count for s in scenes} == {3}
    assert {s.domain for s in scenes} == {"sketch"}
    assert len({s.color for s in scenes}) > 3 and len({s.texture for s in scenes}) > 2
    assert sample_scene(random.Random(0)).domain == "clean"
    with pytest.raises(TypeError, match="unknown attribute"):
        sample_scene(rng, colour="red")
    with pytest.raises(ValueError, match="shape"):
        _scene(shape="blob")
    with pytest.raises(ValueError, match="count"):
        _scene(count=5)
    assert len(SHAPES) == 8 and len(COLORS) == 8 and len(TEXTURES) == 5 and COUNTS == (1, 2, 3, 4)
    assert set(DOMAINS) == {"clean", "noisy", "sketch", "clutter", "clean_v2"}


# --------------------------------------------------------------------------------------------------
# captions

_GENERIC = {"object", "shape", "thing"}


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_caption_number_agreement(shape: str, count: int) -> None:
    plural = PLURALS[shape]
    rng = random.Random(f"{shape}{count}")
    for _ in range(60):
        scene = sample_scene(rng, shape=shape, count=count, domain=rng.choice(DOMAINS))
        text = caption(scene, rng)
        words = re.findall(r"[a-z]+", text)
        if count == 1:
            assert plural not in words and not (_GENERIC_PLURALS & set(words)), text
            assert not ({"two", "three", "four", "some", "many"} & set(words)), text
        else:
            assert shape not in words and not (_GENERIC & set(words)), text
            wrong = set(COUNT_WORDS.values()) - {COUNT_WORDS[count]}
            assert not (wrong & set(words)) and "as an outline" not in text, text


_GENERIC_PLURALS = {"objects", "shapes", "things"}


def test_caption_articles_variety_and_determinism() -> None:
    rng = random.Random(0)
    texts = [caption(sample_scene(rng, domain=rng.choice(DOMAINS)), rng) for _ in range(800)]
    for text in texts:
        words = text.split()
        for first, second in zip(words, words[1:]):
            if first == "a":
                assert second[0] not in "aeiou", text
            if first == "an":
                assert second[0] in "aeiou", text
    assert len(set(texts)) > 500
    fixed = _scene(shape="circle", color="red", count=2, domain="clean")
    same = [caption(fixed, random.Random(i)) for i in range(200)]
    assert len(set(same)) > 20
    assert any("red" not in t for t in same) and sum("red" in t for t in same) > 100  # attributes omitted at times
    assert any("two red striped circles" in t or "two striped red circles" in t for t in same)
    assert caption(fixed, random.Random(5)) == caption(fixed, random.Random(5))
    sketches = [caption(_scene(domain="sketch"), random.Random(i)) for i in range(100)]
    assert sum(("sketch" in t or "drawing" in t) for t in sketches) > 50


# --------------------------------------------------------------------------------------------------
# dataset definitions and pretraining stream


def test_dataset_definitions() -> None:
    names = toy.toy_dataset_names()
    assert names == ["toy_objects", "toy_shapes", "toy_colors", "toy_textures", "toy_counts", "toy_objects_v2",
                     "toy_objects_sketch", "toy_objects_noisy", "toy_objects_clutter"]
    counts = {n: len(toy.toy_classnames(n)) for n in names}
    assert counts == {"toy_objects": 24, "toy_shapes": 8, "toy_colors": 8, "toy_textures": 5, "toy_counts": 4,
                      "toy_objects_v2": 24, "toy_objects_sketch": 24, "toy_objects_noisy": 24,
                      "toy_objects_clutter": 12}
    objects = toy.toy_classnames(SOURCE)
    assert len(set(objects)) == 24 and all(len(c.split("_")) == 2 for c in objects)
    colors = Counter(c.split("_")[0] for c in objects)
    shapes = Counter(c.split("_")[1] for c in objects)
    assert set(colors.values()) == {3} and set(shapes.values()) == {3}  # neither attribute alone solves it
    half = objects[:12]  # base classes of base-to-new: every shape appears among them
    assert {c.split("_")[1] for c in half} == set(SHAPES)
    assert toy.toy_classnames("toy_objects_clutter") == objects[::2]
    for suffix in ("v2", "sketch", "noisy"):
        assert toy.toy_classnames(f"toy_objects_{suffix}") == objects
    assert toy.split_sizes(SOURCE) == (40, 10, 20) and toy.split_sizes("toy_objects_sketch") == (20, 20, 20)
    assert toy.split_sizes(SOURCE, 0.01) == (1, 1, 1)
    with pytest.raises(DatasetError, match="unknown toy dataset"):
        toy.toy_dataset("toy_nothing")


def test_render_item_is_deterministic_and_dataset_specific() -> None:
    a = toy.render_item(SOURCE, 0, 0).tobytes()
    assert a == toy.render_item(SOURCE, 0, 0).tobytes()
    assert a != toy.render_item(SOURCE, 0, 1).tobytes()
    assert a != toy.render_item(SOURCE, 0, 0, seed=1).tobytes()
    assert a != toy.render_item("toy_objects_v2", 0, 0).tobytes()


def test_pretraining_stream_is_deterministic_and_resumable() -> None:
    pairs = list(toy.pretraining_pairs(6, seed=2))
    assert len(pairs) == 6
    again = list(toy.pretraining_pairs(3, seed=2, start=3))
    assert [(p[0].tobytes(), p[1]) for p in pairs[3:]] == [(p[0].tobytes(), p[1]) for p in again]
    image, text = toy.pretraining_pair(4, 2)
    assert (image.tobytes(), text) == (pairs[4][0].tobytes(), pairs[4][1])
    assert image.size == (64, 64) and isinstance(text, str) and text
    other = list(toy.pretraining_pairs(6, seed=3))
    assert [p[1] for p in other] != [p[1] for p in pairs]
    endless = toy.pretraining_pairs(None, seed=0)
    assert len([next(endless) for _ in range(3)]) == 3


def test_pretraining_distribution_is_skewed_but_complete() -> None:
    rng = random.Random(0)
    scenes = [toy.pretraining_scene(rng) for _ in range(4000)]
    domains = Counter(s.domain for s in scenes)
    assert domains["clean"] > 0.6 * len(scenes)
    assert 0 < domains["sketch"] < 0.08 * len(scenes) and set(domains) == set(DOMAINS)
    for attr, values in (("shape", SHAPES), ("color", COLORS), ("texture", TEXTURES), ("count", COUNTS)):
        seen = Counter(getattr(s, attr) for s in scenes)
        assert set(seen) == set(values)
        assert max(seen.values()) > 2 * min(seen.values())  # some attribute words are rare


# --------------------------------------------------------------------------------------------------
# materialize + registry


def test_materialized_world_loads_through_the_registry(world: Path) -> None:
    marker = json.loads((world / toy.MARKER).read_text(encoding="utf-8"))
    assert marker == {"version": toy.TOY_WORLD_VERSION, "seed": 0, "scale": SCALE}
    for name in toy.toy_dataset_names():
        spec = registry.get_dataset(name)
        classnames = toy.toy_classnames(name)
        split_file = world / name / f"split_zhou_{name}.json"
        raw = json.loads(split_file.read_text(encoding="utf-8"))
        assert set(raw) == {"train", "val", "test"}
        for rel, label, cname in raw["test"]:
            assert rel == f"{cname}/{rel.split('/')[1]}" and classnames[label] == cname
            assert (world / name / "images" / rel).is_file()
        splits = load_dataset(name, world)
        assert splits.name == name and splits.classnames == classnames
        assert splits.root == str(world / name / "images")
        n_train, n_val, n_test = toy.split_sizes(name, SCALE)
        k = len(classnames)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (n_train * k, n_val * k, n_test * k)
        # class-interleaved: the first k entries are one image of every class, in label order
        assert [d.label for d in splits.test[:k]] == list(range(k))
        assert sorted({d.label for d in splits.test}) == list(range(k))
        paths = [d.impath for d in splits.train + splits.val + splits.test]
        if spec.test_only:
            assert splits.train == splits.val == splits.test
        else:
            assert len(set(paths)) == len(paths)  # no image in two splits
        assert all(os.path.isfile(p) for p in paths)
        assert spec.folder == name and spec.test_only == toy.toy_dataset(name).test_only
        assert format_template(spec.template, classnames[-1]).count("_") == 0


def test_dg_targets_use_source_names_and_subset_labels(world: Path) -> None:
    source = load_dataset(SOURCE, world)
    clutter = load_dataset("toy_objects_clutter", world)
    subset = toy.toy_dataset("toy_objects_clutter").source_labels
    assert subset == tuple(range(0, 24, 2))
    assert clutter.classnames == [source.classnames[i] for i in subset]
    for d in clutter.test:
        assert d.classname == source.classnames[subset[d.label]]
    for suffix in ("v2", "sketch", "noisy"):
        target = load_dataset(f"toy_objects_{suffix}", world)
        assert target.classnames == source.classnames
        assert all(source.classnames[d.label] == d.classname for d in target.test)


def test_registry_entries_and_idempotent_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    register_plugin_datasets(monkeypatch)  # second registration (the fixture made the first): no error, no duplicate
    specs = {n: registry.DATASETS[n] for n in toy.toy_dataset_names()}
    assert {n: s.title for n, s in specs.items()} == {
        "toy_objects": "ToyObjects", "toy_shapes": "ToyShapes", "toy_colors": "ToyColors",
        "toy_textures": "ToyTextures", "toy_counts": "ToyCounts", "toy_objects_v2": "ToyObjectsV2",
        "toy_objects_sketch": "ToyObjectsSketch", "toy_objects_noisy": "ToyObjectsNoisy",
        "toy_objects_clutter": "ToyObjectsClutter"}
    assert format_template(specs["toy_textures"].template, "polka_dotted") == "a polka dotted texture."
    assert format_template(specs["toy_counts"].template, "two_objects") == "a photo of two objects."
    assert format_template(specs["toy_shapes"].template, "star") == "a photo of a star shape."
    assert format_template(specs["toy_colors"].template, "red") == "a photo of something red."
    assert format_template(specs["toy_objects"].template, "red_circle") == "a photo of a red circle."
    assert [n for n, s in specs.items() if s.test_only] == ["toy_objects_v2", "toy_objects_sketch",
                                                           "toy_objects_noisy", "toy_objects_clutter"]
    assert "split_zhou_toy_shapes.json" in specs["toy_shapes"].layout
    registry.DATASETS["toy_shapes"] = registry.DatasetSpec(name="toy_shapes", folder="elsewhere", title="X",
                                                           template="{}", layout="", reader=lambda p: None)
    with pytest.raises(ContractError, match="toy_shapes"):
        register_plugin_datasets(monkeypatch)


def test_missing_world_names_materialize(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="materialize"):
        load_dataset("toy_shapes", tmp_path)


def test_materialize_is_idempotent(world: Path) -> None:
    before = _snapshot(world)
    assert toy.materialize(world, seed=0, scale=SCALE) == world
    assert _snapshot(world) == before
    assert not list(world.parent.glob(".world.*"))  # no temporary siblings left behind


def test_materialize_replaces_an_outdated_world_and_refuses_foreign_folders(tmp_path: Path) -> None:
    root = toy.materialize(tmp_path / "w", seed=0, scale=0.05)
    first = (root / SOURCE / "images" / "red_circle" / "000.png").read_bytes()
    toy.materialize(root, seed=1, scale=0.05)
    assert json.loads((root / toy.MARKER).read_text())["seed"] == 1
    assert (root / SOURCE / "images" / "red_circle" / "000.png").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w", "w.lock"]
    foreign = tmp_path / "data"
    (foreign / "imagenet").mkdir(parents=True)
    with pytest.raises(DatasetError, match="refusing"):
        toy.materialize(foreign, scale=0.05)
    assert (foreign / "imagenet").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (toy.materialize(empty, scale=0.05) / toy.MARKER).is_file()


def test_materialize_crash_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = toy._write_dataset
    calls = []

    def flaky(folder, spec, seed, scale):
        calls.append(spec.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(folder, spec, seed, scale)

    monkeypatch.setattr(toy, "_write_dataset", flaky)
    with pytest.raises(KeyboardInterrupt):
        toy.materialize(tmp_path / "w", scale=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.lock"]
    monkeypatch.setattr(toy, "_write_dataset", real)
    assert (toy.materialize(tmp_path / "w", scale=0.05) / toy.MARKER).is_file()


def test_concurrent_materialize_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = toy._write_dataset
    written = Counter()

    def counting(folder, spec, seed, scale):
        written[spec.name] += 1
        return real(folder, spec, seed, scale)

    monkeypatch.setattr(toy, "_write_dataset", counting)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(toy.materialize(tmp_path / "w", scale=0.05))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [tmp_path / "w"] * 3
    assert set(written.values()) == {1}


def test_default_root_follows_benchsuite_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path))
    assert toy.default_root() == tmp_path / f"toy-world-v{toy.TOY_WORLD_VERSION}"
    monkeypatch.delenv("BENCHSUITE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert toy.default_root() == tmp_path / "home" / ".cache" / "benchsuite" / f"toy-world-v{toy.TOY_WORLD_VERSION}"
