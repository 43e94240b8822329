"""The one-batch check before a training: contract errors surface in seconds, not after hours.

A fresh instance of the method (its own plugin manager, its own module) runs setup, one training
step with backward and optimizer step, epoch_end and the epoch checkpoint's training-state round
trip (training_state, load_training_state), prepare_eval and predict on a few test images. Nothing of
it reaches the real job: the instance is discarded and every random generator is restored, so the
real training draws exactly what it would have drawn without the check.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from ..data.loaders import ImageList
from ..errors import ContractError
from ..hookspecs import EvalBatch, LabelSpace, SetupContext
from ..methods import MethodEntry, implements, job_manager
from .checkpoint import copy_state, load_training_states, training_states
from .evaluate import evaluate
from .seeding import preserved_rng
from .train import make_grad_scaler, make_optimizer, train_step

#: images of the training and of the evaluation batch (at least the method's min_batch_size)
SMOKE_IMAGES = 2


def _first_batch(items, transform, views, size: int):
    loader = DataLoader(ImageList(items[:size], transform, views), batch_size=size, shuffle=False)
    return next(iter(loader))


def smoke_check(entry: MethodEntry, ctx: SetupContext, train_items, train_transform, eval_set) -> None:
    """Run the method once on one small batch. `eval_set` = (items, classnames, dataset, template, transform)."""
    name, backbone = entry.name, ctx.backbone
    image_input = ctx.recipe["image_input"]
    with preserved_rng():
        pm, instance = job_manager(entry)
        try:
            module = pm.hook.setup(ctx=replace(ctx, recipe=dict(ctx.recipe)))
            if not isinstance(module, torch.nn.Module):
                raise ContractError(f"method {name!r}, hook setup: must return an nn.Module, got {type(module).__name__}")
            module.to(backbone.device)
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ContractError(f"method {name!r}, hook setup: the recipe trains but the returned module has "
                                    f"no parameter with requires_grad")
            views = list(pm.hook.train_views(image_spec=backbone.image_spec) or [])
            size = min(len(train_items), max(SMOKE_IMAGES, entry.cls.min_batch_size))
            images, labels, *extra = _first_batch(train_items, train_transform, views, size)
            if implements(pm, instance, "fit_features"):
                with torch.no_grad(), backbone.autocast():
                    first = backbone.encode_image(images.to(backbone.device)).float()
                    pm.hook.fit_features(features=first[None], labels=labels.to(backbone.device), val_features=None,
                                         val_labels=None)
            module.train()
            train_step(pm, name, module, make_optimizer(params, ctx.recipe, fused=False), backbone, images, labels,
                       extra[0] if extra else [], image_input, 0, None)
            pm.hook.epoch_end(epoch=0, num_epochs=max(1, int(ctx.recipe["epochs"])))
            load_training_states(pm, copy_state(training_states(pm)))  # what a resumed job would do
            items, classnames, dataset, template, transform = eval_set
            test_images, test_labels = _first_batch(items, transform, [], min(len(items), SMOKE_IMAGES))
            device = backbone.device
            if image_input == "features":
                with torch.no_grad(), backbone.autocast():
                    batch = EvalBatch(labels=test_labels.to(device),
                                      image_features=backbone.encode_image(test_images).float())
            else:
                batch = EvalBatch(labels=test_labels.to(device), images=test_images.to(device))
            evaluate(pm, name, module, [batch], classnames, dataset, template, backbone, progress="one-batch check",
                     label_space=LabelSpace.of(ctx.dataset, ctx.classnames, dataset, classnames))
        except ContractError as exc:
            raise ContractError(f"{exc} (found by the one-batch check before training)") from exc
