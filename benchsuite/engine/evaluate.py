"""Evaluation: top-1 accuracy (micro) of the last-epoch model on one class set."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pluggy
import torch
from torch import nn
from tqdm import tqdm

from ..errors import ContractError
from ..hookspecs import EvalBatch


@dataclass
class EvalResult:
    correct: int
    total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total


@torch.no_grad()
def evaluate(pm: pluggy.PluginManager, method: str, module: nn.Module, loader, classnames: list[str],
             dataset: str, template: str, backbone, frozen_image_encoder: bool, *, progress: str = "") -> EvalResult:
    device = backbone.device
    module.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with backbone.autocast():
        pm.hook.prepare_eval(classnames=classnames, dataset=dataset, template=template)
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for images, labels in tqdm(loader, desc=progress or f"eval {dataset}", unit="batch", leave=False, disable=None):
        labels = labels.to(device, non_blocking=True)
        with backbone.autocast():
            if frozen_image_encoder:
                batch = EvalBatch(labels=labels, image_features=backbone.encode_image(images))
            else:
                batch = EvalBatch(labels=labels, images=images.to(device, non_blocking=True))
            logits = pm.hook.predict(batch=batch)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (labels.shape[0], len(classnames)):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ContractError(f"method {method!r}, hook predict: expected logits of shape "
                                f"({labels.shape[0]}, {len(classnames)}), got {shape}")
        correct += (logits.argmax(dim=-1) == labels).sum()
        total += labels.shape[0]
    n_correct = int(correct)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EvalResult(correct=n_correct, total=total, seconds=time.perf_counter() - start)
