"""Jobs that depend on other jobs, and training on the unlabeled train split (contract v3).

Two mechanisms a two-stage, distilling method (PromptKD) needs, kept out of the runner's job loop:

- :class:`DependencyResolver` answers ``SetupContext.trained_dependency(method)``: the trained module
  of ``method``'s job on the same protocol, dataset, shots, seed and backbone. Not stored yet, it is
  trained exactly as that job trains it (same recipe with the run's overrides, same few-shot sample,
  ``seed_everything(seed)`` before its setup, epoch checkpoints under its own job id) inside
  ``preserved_rng``, so the caller's random streams are untouched; it is stored in
  ``RESULTS/_trained/dependency-<job id>.pt`` (the shared-training format of the runner) and
  always loaded back from that file's bytes, whose sha256 the caller's result records with the
  dependency's job id (``method.dependencies``).
- :func:`training_items` gives the images a method trains on under ``Method.train_data``: the
  few-shot sample, or (``"unlabeled_all"``) every train-split image of every class of the dataset
  with label -1, and the class names the method may then know (``SetupContext.all_classnames``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..data.datum import DatasetSplits, Datum, fingerprint
from ..data.fewshot import FewShotSplit, subsample_classes
from ..data.registry import get_dataset
from ..errors import BenchsuiteError, ContractError
from ..hookspecs import TRAIN_DATA, SetupContext, TrainedDependency
from .jobs import Job, job_id
from .recipe import config_hash, trains
from .seeding import preserved_rng, seed_everything

if TYPE_CHECKING:
    from .runner import Runner

#: the label every image of an ``"unlabeled_all"`` training carries
UNLABELED = -1


def train_data_of(method_cls: type) -> str:
    value = getattr(method_cls, "train_data", "fewshot")
    if value not in TRAIN_DATA:
        raise ContractError(f"method {getattr(method_cls, 'name', method_cls.__name__)!r}: train_data {value!r} "
                            f"is not one of {', '.join(TRAIN_DATA)} (Method.train_data in benchsuite/hookspecs.py)")
    return value


def training_items(method_cls: type, splits: DatasetSplits,
                   train_split: FewShotSplit) -> tuple[FewShotSplit, list[str] | None]:
    """(the split whose ``train`` list the method trains on, the class names it may know beyond
    its training classes or None). ``"fewshot"``: ``train_split`` itself. ``"unlabeled_all"``: every
    image of the dataset's train split, reader order, label -1 and no class name."""
    if train_data_of(method_cls) == "fewshot":
        return train_split, None
    from ..data.datum import classnames_of

    names = list(splits.classnames) or classnames_of(splits.train)
    items = [Datum(d.impath, UNLABELED, "") for d in splits.train]
    if not items:
        raise BenchsuiteError(f"dataset {splits.name!r} has no train-split images to train on unlabeled")
    return replace(train_split, train=items), names


def unlabeled_record(items: list[Datum], root: str, dataset: str, n_classes: int) -> dict[str, Any]:
    """``data.unlabeled`` of a result: what an ``"unlabeled_all"`` method trained on."""
    return {"dataset": dataset, "fingerprint": fingerprint(items, root), "n_images": len(items),
            "n_classes": n_classes}


class DependencyResolver:
    """``SetupContext.dependencies`` of one job: trains or loads the jobs it depends on, once per
    method (the one-batch check's setup and the real setup share the answer), and keeps what the
    job's result records about them."""

    def __init__(self, runner: "Runner", job: Job, prefix: str = ""):
        self.runner, self.job, self.prefix = runner, job, prefix
        self.records: list[dict[str, Any]] = []
        self._held: dict[str, TrainedDependency] = {}

    def trained(self, method: str) -> TrainedDependency:
        if method not in self._held:
            self._held[method] = self._resolve(method)
        return self._held[method]

    def _resolve(self, method: str) -> TrainedDependency:
        runner = self.runner
        if method == self.job.method:
            raise BenchsuiteError(f"method {method!r} cannot depend on its own training")
        job = replace(self.job, method=method)
        entry, pm, instance, recipe, _, epoch_scale = runner._plan(job)
        if train_data_of(entry.cls) != "fewshot":
            raise BenchsuiteError(f"method {self.job.method!r} depends on {method!r}, which itself trains on "
                                  f"unlabeled data; chains of dependencies are not supported")
        if not trains(recipe):
            raise BenchsuiteError(f"method {self.job.method!r} depends on the training of {method!r}, whose recipe "
                                  f"does not train (epochs 0)")
        b = runner.backbone
        jid = job_id(job, config_hash(method, recipe), runner.backbone_record(), runner.data_identity(job),
                     plugin=(entry.source, entry.version))
        key = f"dependency-{jid}"
        path = runner._shared_path(key)
        prefix = f"{self.prefix} dependency {method}"
        with preserved_rng():  # the caller's streams continue as if nothing had run
            seed_everything(job.seed)  # as the dependency's own job (runner._execute) seeds itself
            split, _ = runner.fewshot(job)
            train_split = subsample_classes(split, job.train_classes)
            ctx = SetupContext(backbone=b, classnames=train_split.classnames, dataset=job.dataset,
                               template=get_dataset(job.dataset).template, recipe=recipe, protocol=job.protocol,
                               shots=job.shots, seed=job.seed, device=b.device, epoch_scale=epoch_scale)
            stored = path.exists()
            if runner.smoke and not stored:
                runner.smoke_check(job, entry, ctx, split, train_split.train)
            module = runner.setup_module(pm, method, ctx)
            if not stored:
                self.runner.echo(f"{prefix}: training it first (job {jid[:12]})")
            record = runner._train(job, entry, pm, module, recipe, split, train_split, key, jid, prefix)
            runner.checkpoint(jid).remove()
        blob = path.read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        state = torch.load(io.BytesIO(blob), map_location=b.device, weights_only=True)
        module.load_state_dict(state["state"], strict=True)  # exactly the bytes the hash names
        module.eval()
        module.requires_grad_(False)
        self.records.append({"method": method, "job_id": jid, "sha256": sha, "trained": not stored,
                             "train_seconds": float(state.get("train_seconds", record.seconds)),
                             "train_images": int(state.get("train_images", record.images))})
        return TrainedDependency(method=instance, module=module, job_id=jid, sha256=sha, trained=not stored)
