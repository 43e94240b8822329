"""Every exact speed-up equals its straightforward twin on the same inputs (fp32, 1e-5 relative)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchsuite.data import loaders
from benchsuite.data.datum import Datum
from benchsuite.data.transforms import ImageSpec, train_transform
from benchsuite.engine.feature_cache import MARKER, FeatureCache, feature_key
from benchsuite.engine.recipe import resolve_recipe
from benchsuite.engine.train import make_optimizer, train_step
from benchsuite.hookspecs import EvalBatch, SetupContext
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol

CLASSES = ["american_bulldog", "abyssinian", "2012 Tesla Model S Sedan", "face", "sea_horse"]


def _coop(backbone, seed: int = 0):
    protocol = load_protocol("base2new")
    pm, method = job_manager(get_method("coop"))
    recipe, _ = resolve_recipe("coop", pm.hook.recipe(protocol=protocol, dataset="oxford_pets", shots=16), {}, {})
    torch.manual_seed(seed)
    ctx = SetupContext(backbone=backbone, classnames=CLASSES, dataset="oxford_pets", template="a photo of a {}.",
                       recipe=recipe, protocol=protocol, shots=16, seed=seed, device=backbone.device)
    module = pm.hook.setup(ctx=ctx)
    return pm, method, module, recipe


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Relative error of the whole tensor, ||a - b|| / ||b|| (elementwise ratios blow up near zero)."""
    return float((a - b).detach().norm()) <= rel * float(b.detach().norm())


@pytest.fixture
def truncation(tiny_backbone):
    saved = tiny_backbone.truncate_text
    yield tiny_backbone
    tiny_backbone.truncate_text = saved


def test_truncated_text_encoder_gives_the_same_coop_logits_and_loss(truncation):
    backbone = truncation
    pm, method, module, _ = _coop(backbone)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    feats = backbone.encode_image(images)
    out = {}
    for truncate in (True, False):
        backbone.truncate_text = truncate
        text = method.class_text_features()
        logits = method.logits(feats, text)
        out[truncate] = (logits, F.cross_entropy(logits, labels))
    assert int(method.learner.eot.max()) + 1 < 77  # the cut really happens
    assert _close(out[True][0], out[False][0])
    assert _close(out[True][1], out[False][1])


def test_a_few_coop_steps_follow_the_same_trajectory_with_and_without_truncation(truncation):
    backbone = truncation
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    trajectories = {}
    for truncate in (True, False):
        backbone.truncate_text = truncate
        pm, method, module, recipe = _coop(backbone, seed=3)
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], {**recipe, "lr": 0.5})
        losses = [train_step(pm, "coop", module, optimizer, backbone, images, labels, [], "features", 0)["loss"].detach()
                  for _ in range(4)]
        trajectories[truncate] = (torch.stack(losses), module.ctx.detach().clone())
    assert not torch.equal(trajectories[True][1], _coop(backbone, seed=3)[2].ctx.detach())  # it did move
    assert _close(trajectories[True][0], trajectories[False][0])
    assert _close(trajectories[True][1], trajectories[False][1])


def test_class_text_features_computed_once_equal_per_batch_recomputation(tiny_backbone):
    pm, method, module, _ = _coop(tiny_backbone)
    module.eval()
    with torch.no_grad():
        pm.hook.prepare_eval(classnames=CLASSES[:3], dataset="oxford_pets", template="a photo of a {}.")
        feats = tiny_backbone.encode_image(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
        once = pm.hook.predict(batch=EvalBatch(labels=torch.zeros(4, dtype=torch.long), image_features=feats))
        per_batch = method.logits(feats, method.class_text_features())
    assert once.shape == (4, 3)
    assert _close(once, per_batch)


def test_feature_cache_round_trip_key_invalidation_and_cap(tmp_path):
    cache = FeatureCache(tmp_path / "f", max_bytes=10_000)
    feats, labels = torch.randn(10, 16), torch.arange(10)
    key = feature_key("m", "w" * 64, "f" * 64, "t", "fp32")
    assert cache.get(key) is None
    cache.put(key, feats, labels, {"n_images": 10})
    got_feats, got_labels = cache.get(key)
    assert torch.equal(got_feats, feats) and torch.equal(got_labels, labels)
    for other in (feature_key("m", "w" * 64, "f" * 64, "t", "fp16"), feature_key("m", "w" * 64, "g" * 64, "t", "fp32"),
                  feature_key("m", "x" * 64, "f" * 64, "t", "fp32"), feature_key("m", "w" * 64, "f" * 64, "u", "fp32")):
        assert other != key and cache.get(other) is None
    # the cap evicts the least recently used entries
    for i in range(5):
        cache.put(feature_key("m", "w" * 64, str(i) * 64, "t", "fp32"), torch.randn(40, 16), torch.arange(40), {})
    assert sum(e.bytes for e in cache.entries()) <= 10_000
    assert cache.get(key) is None
    remaining = len(cache.entries())
    assert remaining > 0 and cache.clear() == remaining
    assert cache.entries() == []


def test_a_damaged_cache_entry_is_a_miss_not_a_crash(tmp_path):
    cache = FeatureCache(tmp_path)
    key = feature_key("m", "w", "f", "t", "fp32")
    cache.put(key, torch.randn(3, 4), torch.arange(3), {})
    (tmp_path / key / "features.npy").write_bytes(b"garbage")
    assert cache.get(key) is None


def _put_worker(root: str, index: int) -> None:
    cache = FeatureCache(Path(root))
    key = feature_key("m", "w", "f", "t", "fp32")
    torch.manual_seed(0)
    cache.put(key, torch.randn(100, 32), torch.arange(100), {"writer": index})


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_put_worker, args=(str(tmp_path), i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = FeatureCache(tmp_path)
    entries = cache.entries()
    assert len(entries) == 1
    feats, labels = cache.get(entries[0].key)
    assert feats.shape == (100, 32) and labels.tolist() == list(range(100))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no temp folders left


def test_decoded_once_loader_yields_the_same_batches_as_decoding_every_step(data_root):
    from benchsuite.data.registry import load_dataset

    items: list[Datum] = load_dataset("oxford_pets", data_root).train[:20]
    transform = train_transform(ImageSpec(size=24))
    batches = {}
    for budget in (loaders.PRELOAD_BUDGET, 0):
        torch.manual_seed(7)
        loader = loaders.train_loader(items, transform, 8, workers=0, pin_memory=False, preload_budget=budget)
        assert (loader.dataset.decoded is not None) == (budget > 0)
        batches[budget] = [(x.clone(), y.clone()) for _ in range(2) for x, y in loader]
    assert len(batches[0]) == 6  # 20 images, batch 8: 8 + 8 + 4 per epoch, nothing dropped
    for (xa, ya), (xb, yb) in zip(batches[loaders.PRELOAD_BUDGET], batches[0]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_preload_respects_its_memory_budget(data_root):
    from benchsuite.data.registry import load_dataset

    items = load_dataset("oxford_pets", data_root).train[:10]
    assert loaders.ImageList(items, None, preload_budget=1).decoded is None
    assert loaders.ImageList(items, None, preload_budget=10**9).decoded is not None


def test_amp_training_step_runs_under_autocast_on_cpu(tiny_checkpoint):
    from benchsuite.clip.backbone import load_backbone

    from conftest import TINY_MODEL

    backbone = load_backbone(TINY_MODEL, str(tiny_checkpoint), precision="amp", device="cpu")
    pm, method, module, recipe = _coop(backbone)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], recipe)
    images = torch.randn(4, 3, 32, 32)
    out = train_step(pm, "coop", module, optimizer, backbone, images, torch.tensor([0, 1, 2, 3]), [], "features", 0)
    assert torch.isfinite(out["loss"])
    assert module.ctx.dtype == torch.float32 and module.ctx.grad is not None  # fp32 master weights
    with backbone.autocast():
        assert backbone.encode_image(images).dtype == torch.bfloat16


def test_cache_cli_lists_and_clears(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put(feature_key("m", "w", "f", "t", "fp32"), torch.randn(3, 4), torch.arange(3),
              {"model": "bs-tiny-test", "n_images": 3})
    run = lambda *a: subprocess.run([sys.executable, "-m", "benchsuite.cli", "cache", *a, "--feature-cache",
                                     str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "bs-tiny-test" in run("ls") and "1 entries" in run("ls")
    assert "removed 1" in run("clear")
    assert "0 entries" in run("ls")


def test_replacing_a_test_image_changes_the_feature_cache_key(tmp_path):
    import os

    from benchsuite.engine.feature_cache import files_signature

    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    items = [Datum(str(image), 0, "a")]
    before = files_signature(items)
    assert files_signature(items) == before
    image.write_bytes(b"other pixels")
    os.utime(image, ns=(1, 1))
    assert files_signature(items) != before
