"""Device time of a grid from its work, what it reuses and the bench figures.

Per job to run: training = training images (epochs x one epoch's, or an iterations budget's) x
ms/image of the training step (plus the loader's augmentation when no loader worker overlaps it:
`Figure.train_ms_per_image`), once per shared training (a transfer job whose training another job
of the plan runs, or that the results folder holds, trains nothing); evaluation = test images x ms/image of the evaluation. A method on
frozen features computes each test set's features once (the first such job of the grid, in run
order) unless the feature cache holds them, then evaluates from features; `--no-feature-cache`
computes them in every job. Methods fitting on training features pay one encoder pass per image and
view; best_test_epoch selection one evaluation of the first test set per epoch. A "features" method
without extra views trains on the shared training features: its steps cost the step minus the
view, and each (training sample set, seed, epoch) of the grid pays the views once (the first job
that needs it, Tip-Adapter's fit views being epochs 0..fit_views-1). Not counted:
process start, backbone load, data decoding, the one-batch smoke check.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from .figures import Figure, Figures, Shape, step_overrides
from .reuse import FeatureId, Reuse, feature_id
from .work import JobWork


def shape_of(work: JobWork) -> Shape:
    return Shape(work.method, work.batch_size, work.n_classes, step_overrides(work.changed))


@dataclass
class JobCost:
    """One job's estimate; `train_s`/`eval_s` are None when no figure covers its method."""

    work: JobWork
    reused: bool = False
    training: str = "none"  #: none | run | shared (another job of this plan) | saved (in RESULTS/_trained)
    feature_passes: int = 0  #: test sets whose features this job computes
    view_passes: int = 0  #: epochs of shared training views this job computes (the grid's first to need them)
    train_s: float | None = 0.0
    eval_s: float | None = 0.0
    figure: Figure | None = None

    @property
    def total_s(self) -> float | None:
        return None if self.train_s is None or self.eval_s is None else self.train_s + self.eval_s


def estimate(works: list[JobWork], reuse: Reuse, figures: Figures, feature_cache: bool) -> list[JobCost]:
    """Every job's cost, walking the grid in run order (what an earlier job computes, a later reuses)."""
    trained: set[str] = set(reuse.trained)
    encoded: set[FeatureId] = set(reuse.features)
    views: set[tuple[str, int, int]] = set()  # (training sample fingerprint, seed, epoch) whose views are computed
    out = []
    for work in works:
        cost = JobCost(work)
        out.append(cost)
        if work.job.label() in reuse.done:
            cost.reused, cost.train_s, cost.eval_s = True, 0.0, 0.0
            continue
        figure = cost.figure = figures.lookup(shape_of(work))
        key = work.share_key(reuse.weights, reuse.precision)
        train_images = 0
        if work.trains:
            if key is not None and key in reuse.trained:
                cost.training = "saved"
            elif key is not None and key in trained:
                cost.training = "shared"
            else:
                cost.training, train_images = "run", work.train_images
                if key is not None:
                    trained.add(key)
        encode = []
        for ev in work.evals:
            if work.frozen and (not feature_cache or feature_id(ev) not in encoded):
                encode.append(ev.n_images)
                if feature_cache:
                    encoded.add(feature_id(ev))
        cost.feature_passes = len(encode)
        if figure is None or (train_images and "train_ms_per_image" not in figure.report):
            cost.figure, cost.train_s, cost.eval_s = None, None, None  # no figure, or one without a training step
            continue
        epochs: set[int] = set()
        if cost.training == "run" and work.shared_views:
            epochs |= set(range(work.epochs_run))
        if work.fit_images:  # fit views 0..fit_views-1 are epochs of the same stream
            epochs |= set(range(work.fit_images // max(work.n_train, 1)))
        wanted = {(work.train_fp, work.job.seed, e) for e in epochs}
        cost.view_passes = len(wanted - views)
        views |= wanted
        cost.train_s = (figure.shared_train_seconds(train_images) if work.shared_views
                        else figure.train_seconds(train_images))
        cost.train_s += cost.view_passes * work.n_train * figure.view_ms_per_image() / 1000.0
        if cost.training == "run":
            if work.selects_on_test and work.evals:
                cost.train_s += work.epochs_run * figure.eval_seconds(work.evals[0].n_images, work.frozen)
        cost.eval_s = (sum(figure.eval_seconds(ev.n_images, work.frozen) for ev in work.evals)
                       + sum(figure.encode_seconds(n) for n in encode))
    return out


@dataclass
class MethodRow:
    """The per-method line of the plan's table."""

    method: str
    jobs: int = 0
    to_run: int = 0
    reused: int = 0
    trainings: int = 0
    train_s: float | None = 0.0
    eval_s: float | None = 0.0
    figures: list[Figure] = field(default_factory=list)

    @property
    def total_s(self) -> float | None:
        return None if self.train_s is None or self.eval_s is None else self.train_s + self.eval_s


def by_method(costs: list[JobCost]) -> list[MethodRow]:
    rows: dict[str, MethodRow] = {}
    for cost in costs:
        row = rows.setdefault(cost.work.method, MethodRow(cost.work.method))
        row.jobs += 1
        row.reused += cost.reused
        row.to_run += not cost.reused
        row.trainings += cost.training == "run"
        if cost.figure is not None and cost.figure not in row.figures:
            row.figures.append(cost.figure)
        if cost.train_s is None or row.train_s is None:
            row.train_s = row.eval_s = None
        else:
            row.train_s += cost.train_s
            row.eval_s += cost.eval_s
    return list(rows.values())


def wall_seconds(costs: list[JobCost], workers: int) -> float | None:
    """Wall clock of the jobs to run on `workers` parallel workers taking them in grid order as each
    frees up (a pool or a Slurm array); None when a cost is unknown."""
    todo = [c.total_s for c in costs if not c.reused]
    if any(t is None for t in todo):
        return None
    free = [0.0] * max(1, workers)
    for seconds in todo:
        heapq.heapreplace(free, free[0] + seconds)
    return max(free)
