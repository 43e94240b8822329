"""Each fast path and its twin, benchmarked on the same inputs; a regression shows as a ratio."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

from benchsuite.bench import CALTECH101, _synthetic_jpegs
from benchsuite.data import loaders
from benchsuite.data.transforms import train_transform
from benchsuite.engine.recipe import resolve_recipe
from benchsuite.engine.train import make_optimizer, train_step
from benchsuite.hookspecs import EvalBatch, SetupContext
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol

BASE = CALTECH101[: math.ceil(len(CALTECH101) / 2)]


def _coop(backbone):
    protocol = load_protocol("base2new")
    pm, method = job_manager(get_method("coop"))
    recipe, _ = resolve_recipe("coop", pm.hook.recipe(protocol=protocol, dataset="caltech101", shots=16), {}, {})
    torch.manual_seed(0)
    ctx = SetupContext(backbone=backbone, classnames=BASE, dataset="caltech101", template="a photo of a {}.",
                       recipe=recipe, protocol=protocol, shots=16, seed=0, device=backbone.device)
    return pm, method, pm.hook.setup(ctx=ctx), recipe


@pytest.fixture
def truncate(backbone, request):
    saved = backbone.truncate_text
    backbone.truncate_text = request.param
    yield request.param
    backbone.truncate_text = saved


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "all_77_positions"], indirect=True)
def test_coop_text_features_forward_backward(benchmark, backbone, truncate):
    benchmark.group = "coop text encoder (50 classes, fwd+bwd)"
    _, method, module, _ = _coop(backbone)

    def step():
        method.class_text_features().sum().backward()

    benchmark(step)


@pytest.mark.parametrize("truncate", [True, False], ids=["fast", "straightforward"], indirect=True)
def test_coop_train_step(benchmark, backbone, truncate):
    benchmark.group = "coop training step (batch 32)"
    pm, _, module, recipe = _coop(backbone)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], recipe)
    size = backbone.image_spec.size
    images, labels = torch.randn(32, 3, size, size), torch.randint(0, len(BASE), (32,))
    benchmark(lambda: train_step(pm, "coop", module, optimizer, backbone, images, labels, [], "features", 0))


def test_image_encoder_floor(benchmark, backbone):
    benchmark.group = "coop training step (batch 32)"
    size = backbone.image_spec.size
    images = torch.randn(32, 3, size, size)
    with torch.no_grad():
        benchmark(lambda: backbone.encode_image(images))


@pytest.mark.parametrize("cached", [True, False], ids=["cached_features", "recomputed_features"])
def test_coop_evaluation_of_200_images(benchmark, backbone, cached):
    benchmark.group = "coop evaluation (200 images)"
    pm, _, module, _ = _coop(backbone)
    size = backbone.image_spec.size
    images = torch.randn(200, 3, size, size)
    labels = torch.randint(0, len(BASE), (200,))
    with torch.no_grad():
        pm.hook.prepare_eval(classnames=list(BASE), dataset="caltech101", template="a photo of a {}.")
        features = backbone.encode_image(images)

        def run():
            for s in range(0, 200, 100):
                feats = features[s:s + 100] if cached else backbone.encode_image(images[s:s + 100])
                pm.hook.predict(batch=EvalBatch(labels=labels[s:s + 100], image_features=feats))

        benchmark(run)


@pytest.mark.parametrize("budget", [loaders.PRELOAD_BUDGET, 0], ids=["decoded_once", "decoded_every_step"])
def test_training_loader_epoch(benchmark, backbone, budget):
    benchmark.group = "train loader epoch (64 photo-sized JPEGs, 224 crops)"
    with tempfile.TemporaryDirectory() as tmp:
        items = _synthetic_jpegs(Path(tmp), 64, 0)
        from benchsuite.data.transforms import ImageSpec

        loader = loaders.train_loader(items, train_transform(ImageSpec(size=224)), 32, workers=0, pin_memory=False,
                                      preload_budget=budget)
        benchmark(lambda: [x.shape for x, _ in loader])
