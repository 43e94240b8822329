"""The shared training loop: SGD, constant warm-up, epoch-stepped cosine, last-epoch model.

No host synchronisation inside a step: losses stay on the device and are checked for finiteness
once per epoch (a non-finite loss stops the job with the method, epoch and loss named).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import pluggy
import torch
from torch import nn
from tqdm import tqdm

from ..errors import BenchsuiteError, ContractError
from ..hookspecs import TrainBatch
from .checkpoint import EpochCheckpoint
from .schedule import epoch_lr


class NonFiniteLoss(BenchsuiteError):
    """Training diverged; the job writes no result."""


@dataclass
class TrainStats:
    seconds: float
    images: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_outputs(method: str, outputs: Any) -> None:
    if not isinstance(outputs, dict) or not isinstance(outputs.get("loss"), torch.Tensor):
        raise ContractError(f"method {method!r}, hook train_step: must return a dict with a tensor 'loss', "
                            f"got {type(outputs).__name__}")
    if outputs["loss"].dim() != 0:
        raise ContractError(f"method {method!r}, hook train_step: 'loss' must be a scalar, "
                            f"got shape {tuple(outputs['loss'].shape)}")


def train_step(pm: pluggy.PluginManager, method: str, module: nn.Module, optimizer: torch.optim.Optimizer, backbone,
               images: torch.Tensor, labels: torch.Tensor, views: list[torch.Tensor], frozen_image_encoder: bool,
               epoch: int) -> dict[str, torch.Tensor]:
    """One optimisation step exactly as the loop runs it (also what `benchsuite bench` times)."""
    device = backbone.device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    views = [v.to(device, non_blocking=True) for v in views]
    with backbone.autocast():
        features = None
        if frozen_image_encoder:
            with torch.no_grad():
                features = backbone.encode_image(images)
        outputs = pm.hook.train_step(batch=TrainBatch(images, labels, features, views), epoch=epoch)
    _check_outputs(method, outputs)  # cheap Python checks, no device sync
    optimizer.zero_grad(set_to_none=True)
    pm.hook.backward(outputs=outputs, model=module)
    optimizer.step()
    return outputs


def make_optimizer(params: list[torch.nn.Parameter], recipe: dict[str, Any]) -> torch.optim.SGD:
    """Dassl's SGD: momentum 0.9, weight decay 5e-4, no dampening, no Nesterov (recipe may change them)."""
    return torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"],
                           weight_decay=recipe["weight_decay"], dampening=0, nesterov=False)


def train(pm: pluggy.PluginManager, method: str, module: nn.Module, loader, recipe: dict[str, Any], backbone,
          frozen_image_encoder: bool, *, progress: str = "", checkpoint: EpochCheckpoint | None = None) -> TrainStats:
    """Train `module` for the recipe's epochs; with `checkpoint`, resume from its saved epoch and
    hand it every epoch boundary (seconds and images count the interrupted attempts too)."""
    epochs = int(recipe["epochs"])
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ContractError(f"method {method!r}, hook setup: the recipe trains for {epochs} epochs but the "
                            f"returned module has no parameter with requires_grad")
    optimizer = make_optimizer(params, recipe)
    device = backbone.device
    n_images, first_epoch, prior_seconds = 0, 0, 0.0
    resumed = checkpoint.restore(module, optimizer) if checkpoint is not None else None
    if resumed is not None:
        first_epoch, prior_seconds, n_images = int(resumed["epoch"]), float(resumed["seconds"]), int(resumed["images"])
    _synchronize(device)
    start = time.perf_counter()
    bar = tqdm(range(first_epoch, epochs), desc=progress or f"train {method}", unit="epoch", leave=False,
               disable=None)
    for epoch in bar:
        lr = epoch_lr(epoch, epochs, recipe["lr"], warmup_epochs=recipe["warmup_epochs"],
                      warmup_lr=recipe["warmup_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        module.train()
        losses: list[torch.Tensor] = []
        for images, labels, *views in loader:
            outputs = train_step(pm, method, module, optimizer, backbone, images, labels,
                                 views[0] if views else [], frozen_image_encoder, epoch)
            losses.append(outputs["loss"].detach().float())
            n_images += images.shape[0]
        epoch_loss = torch.stack(losses).mean()
        loss = float(epoch_loss)  # one host sync per epoch
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"method {method!r}: mean training loss of epoch {epoch + 1}/{epochs} is {loss}; "
                                f"lower the learning rate (--set lr=...) or check the method's loss")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        pm.hook.epoch_end(epoch=epoch, num_epochs=epochs)
        if checkpoint is not None:
            checkpoint.epoch_done(epoch + 1, module, optimizer, images=n_images,
                                  seconds=prior_seconds + time.perf_counter() - start)
    pm.hook.train_end()
    _synchronize(device)
    return TrainStats(seconds=prior_seconds + time.perf_counter() - start, images=n_images)
