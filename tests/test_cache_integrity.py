"""The feature cache never gives a wrong number, survives bad entries and deletes only its own."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from benchsuite.engine.feature_cache import FeatureCache, feature_key
from test_run import load_results, run_args, run_quiet

KEY = feature_key("m", "w" * 64, "f" * 64, "t", "fp32")


def _filled(root: Path, n: int = 8, dim: int = 4) -> tuple[FeatureCache, torch.Tensor, torch.Tensor]:
    cache = FeatureCache(root)
    feats, labels = torch.randn(n, dim), torch.arange(n) % 3
    assert cache.put(KEY, feats, labels, {"model": "bs-tiny-test", "n_images": n}) is not False
    return cache, feats, labels


def _quiet_get(cache: FeatureCache, key: str, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cache.get(key, **kw)
    return got, [str(w.message) for w in caught]


def test_same_size_feature_corruption_is_a_counted_miss(tmp_path):
    cache, feats, labels = _filled(tmp_path)
    path = tmp_path / KEY / "features.npy"
    np.save(path, np.ascontiguousarray(feats.numpy()[::-1]), allow_pickle=False)  # same size, same header
    assert path.stat().st_size == (tmp_path / KEY / "features.npy").stat().st_size
    got, messages = _quiet_get(cache, KEY)
    assert got is None
    assert cache.stats["corrupt"] == 1 and any("sha256" in m for m in messages)
    assert not (tmp_path / KEY).exists()  # removed, so the next put rewrites it
    assert cache.put(KEY, feats, labels, {})
    assert torch.equal(cache.get(KEY)[0], feats)


def test_swapped_labels_and_wrong_expected_labels_are_misses(tmp_path):
    cache, feats, labels = _filled(tmp_path)
    np.save(tmp_path / KEY / "labels.npy", labels.flip(0).numpy(), allow_pickle=False)
    assert _quiet_get(cache, KEY)[0] is None
    cache.put(KEY, feats, labels, {})
    assert _quiet_get(cache, KEY, labels=labels.flip(0))[0] is None  # the test set's labels differ
    cache.put(KEY, feats, labels, {})
    got, _ = _quiet_get(cache, KEY, labels=labels.clone())
    assert got is not None and torch.equal(got[1], labels)


def test_a_changed_dtype_with_a_recomputed_checksum_is_still_refused(tmp_path):
    cache, feats, labels = _filled(tmp_path)
    meta_path = tmp_path / KEY / "meta.json"
    meta = json.loads(meta_path.read_text())
    halves = feats.numpy().astype(np.float16)
    np.save(tmp_path / KEY / "features.npy", halves, allow_pickle=False)
    meta["features"]["sha256"] = __import__("hashlib").sha256(halves.tobytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    got, messages = _quiet_get(cache, KEY)
    assert got is None and any("dtype" in m for m in messages)


def test_undecodable_metadata_is_skipped_by_ls_clear_and_get(tmp_path):
    cache, feats, labels = _filled(tmp_path)
    other = feature_key("m", "w" * 64, "g" * 64, "t", "fp32")
    cache.put(other, feats, labels, {"model": "second"})
    (tmp_path / KEY / "meta.json").write_bytes(b"\xff\xfe{not json")
    assert [e.key for e in cache.entries()] == [other] and len(cache.skipped) == 1
    run = lambda *a: subprocess.run([sys.executable, "-m", "benchsuite.cli", "cache", *a, "--feature-cache",
                                     str(tmp_path)], capture_output=True, text=True)
    listed = run("ls")
    assert listed.returncode == 0, listed.stderr
    assert "1 entries" in listed.stdout and "skipped" in listed.stdout
    assert _quiet_get(cache, KEY)[0] is None and cache.stats["corrupt"] == 1
    cleared = run("clear")
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout


def test_a_write_failure_warns_and_returns(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = FeatureCache(blocker / "features")
    with pytest.warns(RuntimeWarning, match="could not write the feature cache"):
        assert cache.put(KEY, torch.randn(2, 3), torch.arange(2), {}) is False
    assert cache.stats["write_failed"] == 1
    cache = FeatureCache(tmp_path / "ro")

    def refuse(*_a, **_k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("benchsuite.engine.feature_cache.os.replace", refuse)
    with pytest.warns(RuntimeWarning, match="Read-only"):
        assert cache.put(KEY, torch.randn(2, 3), torch.arange(2), {}) is False
    assert not [p for p in (tmp_path / "ro").iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_clear_never_deletes_what_the_cache_did_not_write(tmp_path):
    user = tmp_path / "photos"
    (user / "holiday").mkdir(parents=True)
    (user / "holiday" / "meta.json").write_text("{}")
    (user / KEY).mkdir()
    (user / KEY / "meta.json").write_text("{}")
    (user / KEY / "notes.txt").write_text("mine")
    out = subprocess.run([sys.executable, "-m", "benchsuite.cli", "cache", "clear", "--feature-cache", str(user)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (user / "holiday" / "meta.json").exists() and (user / KEY / "notes.txt").exists()
    assert "not a benchsuite feature cache" in out.stdout
    # inside a real cache root, foreign folders survive clear and eviction too
    cache, _, _ = _filled(tmp_path / "cache")
    (tmp_path / "cache" / "keep").mkdir()
    (tmp_path / "cache" / "keep" / "meta.json").write_text(json.dumps({"created": 0}))
    assert cache.clear() == 1
    assert (tmp_path / "cache" / "keep" / "meta.json").exists()
    tiny = FeatureCache(tmp_path / "cache", max_bytes=1)
    tiny.put(feature_key("x", "w", "f", "t", "fp32"), torch.randn(50, 8), torch.arange(50), {})
    assert (tmp_path / "cache" / "keep" / "meta.json").exists()


def test_a_corrupted_cache_entry_does_not_change_a_run(tmp_path, tiny_checkpoint, data_root):
    """End to end: same-size corruption used to give a wrong accuracy written as a valid result."""
    args = ("--method", "zeroshot_clip", "--dataset", "oxford_pets", "--seeds", "1")
    first = tmp_path / "first"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, first, *args))
    assert code == 0, out + err
    cache_dir = tmp_path / "first-features"
    for npy in cache_dir.rglob("features.npy"):
        array = np.load(npy)
        np.save(npy, np.ascontiguousarray(array[::-1]), allow_pickle=False)
    second = tmp_path / "second"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = run_args("base2new", tiny_checkpoint, data_root, second, *args)
        argv[argv.index("--feature-cache") + 1] = str(cache_dir)
        code, out, err = run_quiet(argv)
    assert code == 0, out + err
    (before,) = load_results(first).values()
    (after,) = load_results(second).values()
    assert after["timing"]["eval_feature_cache"] == "miss"
    assert after["metrics"] == before["metrics"]
