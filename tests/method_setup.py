"""Building one installed method outside a job, as the unit tests of several plugins need it."""

from __future__ import annotations

import torch

from benchsuite.engine.recipe import HARNESS_DEFAULTS
from benchsuite.hookspecs import SetupContext
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol


def default_recipe(method: str, protocol: str = "few_shot", dataset: str = "dtd", shots: int = 16) -> dict:
    """The method's own recipe hook answer for one job."""
    pm, _ = job_manager(get_method(method))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def build(cls, backbone, classnames: list[str], **overrides):
    """(instance, module, recipe): a fresh `cls` set up for a 16-shot few-shot job on EuroSAT-like
    classes, with the harness defaults, its recipe and `overrides`."""
    method = cls()
    recipe = {**HARNESS_DEFAULTS, **default_recipe(cls.name), "image_input": "images", **overrides}
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="eurosat", template="{} texture.",
                       recipe=recipe, protocol=load_protocol("few_shot"), shots=16, seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx), recipe
