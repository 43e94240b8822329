"""The keyed augmentation stream and the shared training features (issue: the grid at the cost of its floor).

A sample's view is a function of (seed, epoch, index, view) only; a "features" method trained from
the cached frozen features of those views gives bit-identical results to the same method computing
them, with or without a cache, and Tip-Adapter's augmented views are the same entries.
"""

from __future__ import annotations

import random

import pytest
import torch

from benchsuite.data import loaders
from benchsuite.data.batching import TrainBatchSampler
from benchsuite.data.stream import STREAM_VERSION, keyed_draw, sample_seed
from benchsuite.data.transforms import train_transform
from benchsuite.engine.feature_cache import FeatureCache
from test_run import load_results, run_args, run_quiet

DATASET = "oxford_pets"


@pytest.fixture(scope="module")
def noise_items(tmp_path_factory):
    """Twelve noise images (the fixture datasets' flat colours would make every crop alike)."""
    from PIL import Image

    from benchsuite.data.datum import Datum

    folder = tmp_path_factory.mktemp("noise")
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(12):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        items.append(Datum(str(path), i % 3, f"class{i % 3}"))
    return items


def test_a_view_depends_only_on_its_key_and_leaves_the_callers_streams_alone(noise_items, tiny_backbone):
    items = noise_items
    transform = train_transform(tiny_backbone.image_spec)
    data = loaders.ImageList(items, transform, stream_seed=3)
    torch.manual_seed(0)
    random.seed(0)
    first = data[(2, 5)][0]
    after_torch, after_python = torch.rand(3), random.random()
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(torch.rand(3), after_torch) and random.random() == after_python  # streams untouched
    torch.manual_seed(123)  # whatever was drawn before, the view is the same
    torch.rand(17)
    assert torch.equal(data[(2, 5)][0], first)
    assert not torch.equal(data[(3, 5)][0], first)  # another epoch, another crop
    assert not torch.equal(loaders.ImageList(items, transform, stream_seed=4)[(2, 5)][0], first)  # another seed
    assert sample_seed(1, 0, 1) != sample_seed(1, 1, 0) != sample_seed(1, 0, 0, view=1)


def test_views_are_the_same_whatever_the_batch_size_and_the_epoch_order(noise_items, tiny_backbone):
    items = noise_items
    transform = train_transform(tiny_backbone.image_spec)

    def views(batch_size: int) -> dict[tuple[int, int], torch.Tensor]:
        torch.manual_seed(batch_size)
        loader = loaders.train_loader(items, transform, batch_size, workers=0, pin_memory=False, stream_seed=7,
                                      preload_budget=0)
        sampler = loader.batch_sampler
        out = {}
        for epoch in (1, 0):
            sampler.set_epoch(epoch)
            order = [key for batch in sampler for key in batch]
            assert sorted(i for _, i in order) == list(range(len(items))) and {e for e, _ in order} == {epoch}
            sampler.set_epoch(epoch)
            for images, _labels in loader:
                pass
            for key in order:
                out[key] = loader.dataset[key][0]
        return out

    small, large = views(3), views(12)
    assert small.keys() == large.keys()
    assert all(torch.equal(small[k], large[k]) for k in small)
    epoch0 = loaders.epoch_loader(items, transform, 5, seed=7, epoch=0, workers=0, pin_memory=False)
    images = torch.cat([x for x, _ in epoch0])
    assert all(torch.equal(images[i], small[(0, i)]) for i in range(len(items)))


def test_keyed_and_plain_batches_shuffle_alike():
    torch.manual_seed(5)
    plain = list(TrainBatchSampler(range(10), 4))
    torch.manual_seed(5)
    keyed = TrainBatchSampler(range(10), 4, keyed=True)
    keyed.set_epoch(2)
    assert [[i for _, i in b] for b in keyed] == plain
    torch.manual_seed(5)
    assert list(keyed.index_batches()) == plain


def test_a_draw_restores_the_generators_after_an_exception():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        with keyed_draw(1, 2, 3):
            torch.rand(4)
            raise ValueError("boom")
    assert torch.equal(torch.get_rng_state(), state)


def _coop_run(tiny_checkpoint, data_root, results, *extra):
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "coop",
                                        "--dataset", DATASET, "--seeds", "1", "--set", "epochs=3", *extra))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    return result


def test_trained_from_cached_features_is_bit_identical_to_computing_them(tmp_path, tiny_checkpoint, data_root):
    cache = tmp_path / "shared-cache"
    cold = _coop_run(tiny_checkpoint, data_root, tmp_path / "cold", "--feature-cache", str(cache))
    warm = _coop_run(tiny_checkpoint, data_root, tmp_path / "warm", "--feature-cache", str(cache))
    off = _coop_run(tiny_checkpoint, data_root, tmp_path / "off", "--no-feature-cache")
    assert (cold["timing"]["train_feature_cache"], warm["timing"]["train_feature_cache"],
            off["timing"]["train_feature_cache"]) == ("miss", "hit", "off")
    for other in (warm, off):
        assert other["metrics"] == cold["metrics"]
        assert other["training"]["loss_per_epoch"] == cold["training"]["loss_per_epoch"]
    assert cold["data"]["train"]["augmentation_stream"] == STREAM_VERSION
    training_entries = [e for e in FeatureCache(cache).entries() if e.meta.get("kind") == "training views"]
    assert sorted(e.meta["epoch"] for e in training_entries) == [0, 1, 2]  # one entry per epoch, written once


def test_another_method_and_tip_adapters_views_reuse_the_same_entries(tmp_path, tiny_checkpoint, data_root):
    cache = tmp_path / "cache"
    _coop_run(tiny_checkpoint, data_root, tmp_path / "coop", "--feature-cache", str(cache), "--set", "epochs=10")
    before = {e.key for e in FeatureCache(cache).entries()}
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, tmp_path / "others", "--method",
                                        "kgcoop", "tip_adapter", "--dataset", DATASET, "--seeds", "1",
                                        "--set", "kgcoop.epochs=4", "--feature-cache", str(cache)))
    assert code == 0, out + err
    found = load_results(tmp_path / "others")
    assert found[("kgcoop", DATASET, 16, 1)]["timing"]["train_feature_cache"] == "hit"
    assert {e.key for e in FeatureCache(cache).entries()} == before  # Tip-Adapter's 10 views: epochs 0-9, cached


def test_the_stream_version_is_part_of_the_job_identity(monkeypatch):
    from benchsuite.engine import jobs
    from benchsuite.protocols import load_protocol

    job = jobs.Job(load_protocol("base2new"), "coop", DATASET, 16, 1)
    backbone = {"model": "m", "pretrained": "p", "weights_sha256": "0" * 64, "precision": "fp32"}
    before = jobs.job_id(job, "c", backbone, "d", plugin=("builtin", "1"))
    monkeypatch.setattr(jobs, "STREAM_VERSION", STREAM_VERSION + 1)
    assert jobs.job_id(job, "c", backbone, "d", plugin=("builtin", "1")) != before


def test_a_draw_seeds_the_cpu_generator_alone(monkeypatch):
    """The transforms draw from the CPU generator; a draw must not reseed (and so reset) the caller's
    CUDA generators, which ``fork_rng(devices=[])`` would not restore, nor pay for CUDA's lazy seeding."""
    import torch.cuda

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    with keyed_draw(1, 2, 3):
        drawn = torch.rand(4)
    torch.manual_seed(sample_seed(1, 2, 3))  # the same CPU stream as seeding every device
    assert torch.equal(drawn, torch.rand(4))
    assert calls  # the monkeypatch sees what torch.manual_seed does
    calls.clear()
    with keyed_draw(4, 5, 6):
        torch.rand(1)
    assert calls == []


def test_an_images_and_features_step_gets_the_shared_features_of_its_own_views(noise_items, tiny_backbone):
    """"images+features" (PromptSRC, MMRL): the loader brings the images, and beside each batch the
    shared features of the same samples' views, as the frozen encoder gives them on those images."""
    from benchsuite.engine.train import _epoch_batches
    from benchsuite.engine.training_features import TrainingFeatures

    transform = train_transform(tiny_backbone.image_spec)
    shared = TrainingFeatures(tiny_backbone, noise_items, transform, seed=3, fingerprint="f", cache=None)
    loader = loaders.train_loader(noise_items, transform, 5, workers=0, pin_memory=False, stream_seed=3)
    torch.manual_seed(0)
    seen = []
    for epoch in (0, 1):
        for images, labels, views, features in _epoch_batches(loader, epoch, shared.epoch, with_images=True):
            assert views == [] and features.shape[0] == images.shape[0] == labels.shape[0]
            with torch.no_grad():
                frozen = tiny_backbone.encode_image(images).float()
            torch.testing.assert_close(features, frozen, rtol=1e-5, atol=1e-5)
            seen.append(labels)
    assert sum(len(y) for y in seen) == 2 * len(noise_items)
    torch.manual_seed(0)  # the loader shuffles exactly as without shared features
    plain = [labels for epoch in (0, 1) for _, labels, _, _ in _epoch_batches(loader, epoch, None)]
    assert all(torch.equal(a, b) for a, b in zip(seen, plain))


def _promptsrc_run(tiny_checkpoint, data_root, results, *extra):
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "promptsrc",
                                        "--dataset", DATASET, "--seeds", "1", "--set", "promptsrc.epochs=2",
                                        "--set", "promptsrc.warmup_epochs=0", *extra))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    return result


def test_an_images_and_features_method_reads_the_frozen_features_other_methods_filed(tmp_path, tiny_checkpoint,
                                                                                     data_root):
    """PromptSRC's frozen image features are those CoOp's epochs filed: a warm cache removes its frozen
    forwards, bit for bit the same result as computing them, with or without a cache."""
    cache = tmp_path / "shared-cache"
    cold = _promptsrc_run(tiny_checkpoint, data_root, tmp_path / "cold", "--no-feature-cache")
    _coop_run(tiny_checkpoint, data_root, tmp_path / "coop", "--feature-cache", str(cache))  # epochs 0-2
    before = {e.key for e in FeatureCache(cache).entries()}
    warm = _promptsrc_run(tiny_checkpoint, data_root, tmp_path / "warm", "--feature-cache", str(cache))
    assert (cold["timing"]["train_feature_cache"], warm["timing"]["train_feature_cache"]) == ("off", "hit")
    assert {e.key for e in FeatureCache(cache).entries()} == before
    assert warm["metrics"] == cold["metrics"]
    assert warm["training"]["loss_per_epoch"] == cold["training"]["loss_per_epoch"]
