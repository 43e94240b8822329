"""Few-shot sampling, the base/new split and the manifest store (methods.md 2.2, 2.3).

The references below restate, independently and in the plainest form, what the CoOp toolbox does:
- Dassl.pytorch `dassl/data/datasets/base_dataset.py` (c61a1b5), `DatasetBase.generate_fewshot_dataset`
  with `repeat=False` (the default since Dassl e3a15da, 2021-10-09): group the items by label in a
  dict whose order is the first appearance of each label; per label, `random.sample(items, K)` with
  the GLOBAL `random` module when the class has at least K items, else all of them; concatenate.
- CoOp `datasets/*.py` (e.g. oxford_pets.py): `train = fewshot(train, K)` then
  `val = fewshot(val, min(K, 4))`, both from the global stream seeded once by `random.seed(seed)`.
- CoOp `OxfordPets.subsample_classes`: labels of the FIRST list (train), sorted; m = ceil(n/2);
  base = first m, new = the rest; relabel by index in the selected list; filter every list.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict

import pytest

from benchsuite.data.datum import DatasetSplits, Datum
from benchsuite.data.fewshot import FewShotSplit, ManifestStore, sample_fewshot, subsample_classes
from benchsuite.errors import DatasetError
from fixture_data import EXPECTED

ROOT = "/data/toy"

# --------------------------------------------------------------------------------------------------
# independent references (global `random`, as the toolbox uses it)


def dassl_fewshot(items: list[Datum], num_shots: int) -> list[Datum]:
    tracker: dict[int, list[Datum]] = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    dataset: list[Datum] = []
    for _label, group in tracker.items():
        if len(group) >= num_shots:
            dataset.extend(random.sample(group, num_shots))
        else:
            dataset.extend(group)  # repeat=False: keep the small class as it is
    return dataset


def coop_fewshot(train: list[Datum], val: list[Datum], shots: int, seed: int):
    state = random.getstate()
    try:
        random.seed(seed)  # Dassl's set_random_seed at program start
        sampled_train = dassl_fewshot(train, shots)
        sampled_val = dassl_fewshot(val, min(shots, 4))
    finally:
        random.setstate(state)
    return sampled_train, sampled_val


def coop_subsample(train, val, test, subsample):
    labels = sorted({item.label for item in train})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: i for i, y in enumerate(selected)}
    out = []
    for data in (train, val, test):
        out.append([Datum(d.impath, relabeler[d.label], d.classname) for d in data if d.label in selected])
    return out


# --------------------------------------------------------------------------------------------------
# lists with interleaved labels, small classes, first appearance != label order


def make_items(counts: dict[int, int], split: str, *, shuffle_seed: int) -> list[Datum]:
    """Items of several classes, interleaved in a shuffled order (labels need not start at 0)."""
    items = [Datum(f"{ROOT}/{split}/c{label}/img_{i:03d}.jpg", label, f"class_{label}")
             for label, n in counts.items() for i in range(n)]
    random.Random(shuffle_seed).shuffle(items)
    return items


COUNTS = {0: 20, 1: 3, 2: 17, 3: 16, 4: 1, 5: 9, 6: 40, 7: 2}  # several classes below K = 4, 8, 16


def splits_for(counts=COUNTS, *, shuffle_seed=7) -> DatasetSplits:
    train = make_items(counts, "train", shuffle_seed=shuffle_seed)
    val = make_items({k: max(1, v // 3) for k, v in counts.items()}, "val", shuffle_seed=shuffle_seed + 1)
    test = make_items({k: 5 for k in counts}, "test", shuffle_seed=shuffle_seed + 2)
    return DatasetSplits("toy", ROOT, train, val, test, [f"class_{k}" for k in sorted(counts)])


def test_fixture_lists_really_interleave():
    train = splits_for().train
    first_appearance = list(dict.fromkeys(d.label for d in train))
    assert first_appearance != sorted(first_appearance)
    assert [d.label for d in train] != sorted(d.label for d in train)


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_sampler_equals_the_toolbox(shots, seed):
    splits = splits_for()
    ref_train, ref_val = coop_fewshot(splits.train, splits.val, shots, seed)
    got = sample_fewshot(splits, shots, seed)
    assert got.train == ref_train  # same items in the same order
    assert got.val == ref_val
    assert got.test == splits.test  # test is never sampled
    assert got.shots == shots and got.seed == seed
    # small classes are kept whole, large ones give exactly K
    per_class = defaultdict(int)
    for d in got.train:
        per_class[d.label] += 1
    assert per_class == {label: min(n, shots) for label, n in COUNTS.items()}


def test_sampler_with_many_seeds_and_shuffles():
    for shuffle_seed in range(5):
        splits = splits_for(shuffle_seed=shuffle_seed)
        for seed in range(1, 8):
            for shots in (1, 2, 4, 8, 16):
                ref_train, ref_val = coop_fewshot(splits.train, splits.val, shots, seed)
                got = sample_fewshot(splits, shots, seed)
                assert (got.train, got.val) == (ref_train, ref_val), (shuffle_seed, seed, shots)


def test_val_is_drawn_after_train_from_the_same_stream():
    """Sampling val from a fresh stream (or before train) would give another val sample."""
    splits = splits_for()
    got = sample_fewshot(splits, 16, 1)
    random.seed(1)
    fresh_val = dassl_fewshot(splits.val, 4)
    assert got.val != fresh_val
    per_class = defaultdict(int)
    for d in got.val:
        per_class[d.label] += 1
    assert max(per_class.values()) == 4  # val uses min(K, 4)


def test_imagenet_mode_keeps_val_and_samples_train_identically():
    splits = splits_for()
    ref_train, _ = coop_fewshot(splits.train, splits.val, 16, 2)
    got = sample_fewshot(splits, 16, 2, sample_val=False)
    assert got.train == ref_train
    assert got.val == splits.val


def test_sampler_does_not_touch_the_global_stream():
    random.seed(99)
    before = random.getstate()
    sample_fewshot(splits_for(), 4, 1)
    assert random.getstate() == before


def test_sampler_classnames_come_from_the_sample():
    got = sample_fewshot(splits_for(), 2, 1)
    assert got.classnames == [f"class_{k}" for k in sorted(COUNTS)]


def test_sampler_on_a_real_reader_list(data_root):
    from benchsuite.data.registry import load_dataset

    splits = load_dataset("oxford_pets", data_root)
    assert len(splits.train) == EXPECTED["oxford_pets"].train
    for seed in (1, 2, 3):
        ref_train, ref_val = coop_fewshot(splits.train, splits.val, 16, seed)
        got = sample_fewshot(splits, 16, seed)
        assert (got.train, got.val) == (ref_train, ref_val)


# --------------------------------------------------------------------------------------------------
# base / new


def split_of(counts, *, shuffle_seed=3) -> FewShotSplit:
    s = splits_for(counts, shuffle_seed=shuffle_seed)
    names = sorted({d.classname for d in s.train}, key=lambda c: int(c.split("_")[1]))
    return FewShotSplit("toy", ROOT, 16, 1, s.train, s.val, s.test, names)


@pytest.mark.parametrize("which", ["base", "new"])
@pytest.mark.parametrize("labels", [
    list(range(37)),                     # odd: 19 / 18
    list(range(10)),                     # even: 5 / 5
    [3, 5, 6, 10, 11],                   # not starting at 0, with gaps: 3 / 2
    [100, 7, 42, 8, 99, 1, 64],          # unsorted first appearance, gaps
    [4],                                 # a single class: base 1 / new 0
])
def test_subsample_equals_the_toolbox(labels, which):
    split = split_of({y: 3 + (y % 4) for y in labels})
    ref_train, ref_val, ref_test = coop_subsample(split.train, split.val, split.test, which)
    got = subsample_classes(split, which)
    assert got.train == ref_train
    assert got.val == ref_val
    assert got.test == ref_test
    n = len(set(labels))
    m = math.ceil(n / 2)
    chosen = sorted(set(labels))[:m] if which == "base" else sorted(set(labels))[m:]
    assert len(got.classnames) == len(chosen)
    # class names follow the relabelled train list: index i is the name of the i-th selected label
    assert got.classnames == [f"class_{y}" for y in chosen]
    assert sorted({d.label for d in got.test}) == list(range(len(chosen)))


def test_subsample_37_classes_gives_19_and_18():
    split = split_of({y: 2 for y in range(37)})
    base, new = subsample_classes(split, "base"), subsample_classes(split, "new")
    assert len(base.classnames) == 19 and len(new.classnames) == 18
    assert {d.classname for d in base.test}.isdisjoint({d.classname for d in new.test})
    assert len(base.test) + len(new.test) == len(split.test)


def test_subsample_label_set_comes_from_train_only():
    """A label present only in test is in neither half (the toolbox reads the label set from train)."""
    split = split_of({0: 4, 2: 4, 5: 4, 9: 4})
    extra = Datum(f"{ROOT}/test/c7/img.jpg", 7, "class_7")
    split.test = [*split.test, extra]
    base, new = subsample_classes(split, "base"), subsample_classes(split, "new")
    assert base.classnames == ["class_0", "class_2"] and new.classnames == ["class_5", "class_9"]
    assert all(d.impath != extra.impath for d in base.test + new.test)
    # order inside every split is kept (filtering, not sorting)
    assert [d.impath for d in base.test] == [d.impath for d in split.test if d.label in (0, 2)]


def test_subsample_all_and_bad_argument():
    split = split_of({0: 2, 1: 2})
    assert subsample_classes(split, "all") is split
    with pytest.raises(ValueError, match="basis"):
        subsample_classes(split, "basis")


def test_fewshot_then_subsample_on_fixture_data(data_root):
    """Sampling happens before the split: base train = the K-shot sample restricted to base classes."""
    from benchsuite.data.registry import load_dataset

    splits = load_dataset("oxford_pets", data_root)
    sampled = sample_fewshot(splits, 16, 1)
    ref_train, ref_val = coop_fewshot(splits.train, splits.val, 16, 1)
    ref = coop_subsample(ref_train, ref_val, splits.test, "base")
    base = subsample_classes(sampled, "base")
    assert [base.train, base.val, base.test] == ref
    n = len(EXPECTED["oxford_pets"].classnames)
    assert base.classnames == EXPECTED["oxford_pets"].classnames[: math.ceil(n / 2)]


# --------------------------------------------------------------------------------------------------
# manifests


def canonical_sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


def test_manifest_is_json_with_its_sha256(tmp_path):
    split = sample_fewshot(splits_for(), 4, 1)
    store = ManifestStore(tmp_path)
    digest = store.record(split)
    path = store.path("toy", 4, 1)
    assert path == tmp_path / "toy" / "shot_4-seed_1.json"
    raw = path.read_bytes()
    assert raw.lstrip().startswith(b"{")  # JSON text, not a pickle
    data = json.loads(raw)
    assert data["sha256"] == digest
    body = {k: v for k, v in data.items() if k != "sha256"}
    assert canonical_sha(body) == digest
    assert body["train"] == [[d.impath[len(ROOT) + 1:], d.label, d.classname] for d in split.train]
    assert body["val"] == [[d.impath[len(ROOT) + 1:], d.label, d.classname] for d in split.val]
    assert ROOT not in raw.decode()  # paths are relative to the dataset root
    assert (body["dataset"], body["shots"], body["seed"]) == ("toy", 4, 1)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_manifest_rerecording_the_same_sample_is_fine(tmp_path):
    store = ManifestStore(tmp_path)
    first = store.record(sample_fewshot(splits_for(), 8, 2))
    before = store.path("toy", 8, 2).read_bytes()
    again = store.record(sample_fewshot(splits_for(), 8, 2))
    assert again == first
    assert store.path("toy", 8, 2).read_bytes() == before


def test_manifest_refuses_a_changed_sample(tmp_path):
    store = ManifestStore(tmp_path)
    store.record(sample_fewshot(splits_for(shuffle_seed=7), 8, 2))
    changed = sample_fewshot(splits_for(shuffle_seed=8), 8, 2)  # the split file order changed
    with pytest.raises(DatasetError) as info:
        store.record(changed)
    assert str(store.path("toy", 8, 2)) in str(info.value)


def test_manifest_different_keys_do_not_collide(tmp_path):
    store = ManifestStore(tmp_path)
    a = store.record(sample_fewshot(splits_for(), 8, 1))
    b = store.record(sample_fewshot(splits_for(), 8, 2))
    c = store.record(sample_fewshot(splits_for(), 4, 1))
    assert len({a, b, c}) == 3
    assert len(list((tmp_path / "toy").iterdir())) == 3
