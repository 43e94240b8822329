"""Evaluation: top-1 accuracy (micro) of the last-epoch model on one class set.

The batches come from the runner: test images for methods whose image input is "images" or
"images+features", or features of the frozen image encoder (computed here lazily, or read from the
feature cache) for "features" methods. Feature computation happens inside the timed region, so images/s stays truthful.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pluggy
import torch
from torch import nn
from tqdm import tqdm

from ..errors import BenchsuiteError, ContractError
from ..hookspecs import EvalBatch, LabelSpace
from ..report.calibration import CalibrationAccumulator


class NonFiniteLogits(BenchsuiteError):
    """A method predicted NaN/Inf logits: argmax over them is arbitrary, so the job fails, unscored."""


@dataclass
class EvalResult:
    correct: int
    total: int
    seconds: float
    cpu_seconds: float = 0.0
    calibration: dict = field(default_factory=dict)  #: `ece` and `per_class_accuracy` (report.calibration)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total


def image_batches(loader, device: torch.device) -> Iterator[EvalBatch]:
    for images, labels in loader:
        yield EvalBatch(labels=labels.to(device, non_blocking=True), images=images.to(device, non_blocking=True))


def feature_batches(features: Callable[[], tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                    device: torch.device) -> Iterator[EvalBatch]:
    """Split precomputed (or cached) features into batches; `features` is called lazily."""
    feats, labels = features()
    for start in range(0, labels.shape[0], batch_size):
        yield EvalBatch(labels=labels[start:start + batch_size].to(device, non_blocking=True),
                        image_features=feats[start:start + batch_size].to(device, non_blocking=True))


@torch.no_grad()
def compute_features(backbone, loader, *, progress: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the frozen, unprompted image encoder for a whole evaluation set."""
    feats, labels = [], []
    for images, y in tqdm(loader, desc=progress or "image features", unit="batch", leave=False, disable=None):
        with backbone.autocast():
            feats.append(backbone.encode_image(images).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(pm: pluggy.PluginManager, method: str, module: nn.Module, batches: Iterable[EvalBatch],
             classnames: list[str], dataset: str, template: str, backbone, *, progress: str = "",
             prepare_per_batch: bool = False, evaluation: str = "",
             label_space: LabelSpace | None = None) -> EvalResult:
    """Accuracy over `batches`. The classifier is prepared once; `prepare_per_batch` rebuilds it
    before every batch, the straightforward twin of that fast path (`--no-class-text-once`).
    Non-finite logits fail the evaluation (NonFiniteLogits, naming `evaluation`, the metric key).
    `label_space`: how these classes relate to the training classes (default: they are them)."""
    if label_space is None:
        label_space = LabelSpace.of(dataset, classnames, dataset, classnames)
    device = backbone.device
    module.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with backbone.autocast():
        pm.hook.prepare_eval(classnames=classnames, dataset=dataset, template=template, label_space=label_space)
    correct = torch.zeros((), dtype=torch.long, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    calibration = CalibrationAccumulator(len(classnames), device)
    total = 0
    for batch in tqdm(batches, desc=progress or f"eval {dataset}", unit="batch", leave=False, disable=None):
        with backbone.autocast():
            if prepare_per_batch:
                pm.hook.prepare_eval(classnames=classnames, dataset=dataset, template=template, label_space=label_space)
            logits = pm.hook.predict(batch=batch)
        n = batch.labels.shape[0]
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, len(classnames)):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ContractError(f"method {method!r}, hook predict: expected logits of shape "
                                f"({n}, {len(classnames)}), got {shape}")
        if logits.dtype != torch.float32:
            raise ContractError(f"method {method!r}, hook predict: logits are {logits.dtype}, must be torch.float32; "
                                f"compute them inside `with backbone.fp32():`")
        correct += (logits.argmax(dim=-1) == batch.labels).sum()
        finite &= torch.isfinite(logits).all()
        calibration.update(logits, batch.labels)
        total += n
    n_correct, all_finite = torch.stack([correct, finite.long()]).tolist()  # one host sync for both
    if not all_finite:
        raise NonFiniteLogits(f"method {method!r}, hook predict: non-finite logits (NaN or Inf) on evaluation set "
                              f"{evaluation or dataset!r} (dataset {dataset!r}); such predictions cannot be scored, "
                              f"so the job fails and writes no result. Check the method's predict (a division by a "
                              f"zero norm, an fp16 overflow)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return EvalResult(correct=n_correct, total=total, seconds=seconds, cpu_seconds=time.process_time() - cpu_start,
                      calibration=calibration.summary())
