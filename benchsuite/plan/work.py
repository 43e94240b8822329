"""What each job of a grid computes, counted from its recipe and the datasets (no backbone, nothing run).

A job's training sees `epochs x (images of one epoch)` images, where one epoch follows the train
loader's batching rule (`data.batching.tail_rule`) over the few-shot sample drawn exactly as the
job draws it (an `iterations` budget: the images of that many batches, epoch after epoch); its evaluations are the test sets `engine.runner.eval_sets` yields. A transfer job's
training is identified by the key `engine.runner.training_share_key` gives it, so that jobs of
cross_dataset and domain_generalization training the same model are counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.batching import tail_rule
from ..data.datum import DatasetSplits, Datum, fingerprint
from ..data.fewshot import FewShotSplit, manifest_sha256, sample_fewshot, subsample_classes
from ..data.registry import get_dataset
from ..engine.jobs import Job
from ..engine.recipe import Overrides, config_hash, declarations, resolve_recipe, trains
from ..engine.runner import eval_sets, training_share_key
from ..methods import get_method, implements, job_manager

#: stands for the backbone's weights in a share key when they are not loaded: one plan, one backbone
UNLOADED = "unloaded"


@dataclass(frozen=True)
class EvalWork:
    """One test set a job evaluates."""

    key: str
    dataset: str
    fingerprint: str  #: of the test items (with the backbone: the feature cache's identity)
    items: tuple[Datum, ...] = field(repr=False, compare=False)

    @property
    def n_images(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class JobWork:
    """Everything the cost of one job depends on."""

    job: Job
    recipe: dict[str, Any] = field(repr=False)
    changed: dict[str, Any]  #: the recipe entries `--set` changes
    config_hash: str
    n_classes: int  #: training classes: with the batch size, the shape of a training step
    train_images: int  #: images the training steps see over every epoch (0: the method does not train)
    epochs_run: int  #: epochs the training loop runs (an iterations budget: the passes it needs)
    fit_images: int  #: frozen-encoder passes over training images (methods fitting on features)
    evals: tuple[EvalWork, ...]
    train_fp: str
    manifest_sha: str
    n_train: int = 0  #: training images of one epoch
    shared_views: bool = False  #: trains on the shared training features ("features", no train_views)

    @property
    def method(self) -> str:
        return self.job.method

    @property
    def batch_size(self) -> int:
        return int(self.recipe["batch_size"])

    @property
    def frozen(self) -> bool:
        """Evaluates on the frozen encoder's features (computed once per test set, or cached)."""
        return self.recipe["image_input"] == "features"

    @property
    def trains(self) -> bool:
        return trains(self.recipe)

    @property
    def selects_on_test(self) -> bool:
        """Scores every epoch on its first test set (GOPro's best_test_epoch selection)."""
        return self.recipe.get("model_selection") == "best_test_epoch" and self.trains

    def share_key(self, weights_sha256: str, precision: str) -> str | None:
        return training_share_key(self.job, self.recipe, self.train_fp, self.manifest_sha, weights_sha256, precision)


class _Method:
    """A method's entry, recipes and hooks, looked up once per grid."""

    def __init__(self, name: str):
        self.entry = get_method(name)
        pm, plugin = job_manager(self.entry)
        self.pm = pm
        self.fits = hasattr(pm.hook, "fit_features") and implements(pm, plugin, "fit_features")
        self.fit_views = int(getattr(self.entry.cls, "fit_views", 1))
        self.views = implements(pm, plugin, "train_views")
        self.min_batch = int(getattr(self.entry.cls, "min_batch_size", 1))
        self._recipes: dict[tuple, tuple[dict[str, Any], dict[str, Any]]] = {}

    def recipe(self, job: Job, overrides: Overrides) -> tuple[dict[str, Any], dict[str, Any]]:
        """The job's resolved recipe and the entries the overrides change, as `run` resolves them."""
        key = (job.protocol.id, job.dataset, job.shots)
        if key not in self._recipes:
            default = self.pm.hook.recipe(protocol=job.protocol, dataset=job.dataset, shots=job.shots)
            self._recipes[key] = resolve_recipe(job.method, default, job.protocol.profile, overrides,
                                                **declarations(self.entry.cls))
        return self._recipes[key]


def _budget(recipe: dict[str, Any], sizes: list[int]) -> tuple[int, int]:
    """(training images, epochs) of a recipe's budget over epochs of batches `sizes`, as
    `engine.train.train` spends it: `epochs` passes, or exactly `iterations` steps."""
    if not trains(recipe) or not sizes:
        return 0, 0
    iterations = int(recipe.get("iterations", 0) or 0)
    if not iterations:
        return int(recipe["epochs"]) * sum(sizes), int(recipe["epochs"])
    passes, rest = divmod(iterations, len(sizes))
    return passes * sum(sizes) + sum(sizes[:rest]), passes + (rest > 0)


def grid_work(jobs: list[Job], splits: dict[str, DatasetSplits], overrides: Overrides) -> list[JobWork]:
    """The work of every job, in grid order (the order `run` executes them in)."""
    methods: dict[str, _Method] = {}
    samples: dict[tuple[str, int, int], FewShotSplit] = {}
    prints: dict[tuple, str] = {}
    out = []
    for job in jobs:
        if job.method not in methods:
            methods[job.method] = _Method(job.method)
        method = methods[job.method]
        recipe, changed = method.recipe(job, overrides)
        where = (job.dataset, job.shots, job.seed)
        if where not in samples:
            samples[where] = sample_fewshot(splits[job.dataset], job.shots, job.seed,
                                            sample_val=get_dataset(job.dataset).sample_val)
        split = samples[where]
        train = subsample_classes(split, job.train_classes)
        sizes = tail_rule(len(train.train), int(recipe["batch_size"]), bool(recipe["drop_last"]), method.min_batch)
        images, epochs = _budget(recipe, sizes)
        evals = []
        for ev, items, classnames, root in eval_sets(job, split, splits.__getitem__):
            memo = (ev.dataset, ev.classes, tuple(classnames), len(items))
            if memo not in prints:
                prints[memo] = fingerprint(items, root)
            evals.append(EvalWork(ev.key, ev.dataset, prints[memo], tuple(items)))
        out.append(JobWork(job, recipe, changed, config_hash(job.method, recipe), len(train.classnames),
                           images, epochs,
                           method.fit_views * len(train.train) if method.fits else 0, tuple(evals),
                           fingerprint(train.train, train.root), manifest_sha256(split.manifest()),
                           n_train=len(train.train),
                           shared_views=recipe["image_input"] == "features" and not method.views))
    return out
