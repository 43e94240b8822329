"""What a grid would reuse instead of computing: results in the results folder, trainings saved
there for other protocols' jobs, test-set features in the feature cache.

Without the backbone (the default, nothing loaded) a result counts when it matches the job's
recipe identity, the test `benchsuite status` and a read-only `run` make first (protocol id,
version and hash, method, dataset, shots, seed, config hash); cached features count when an entry
of the same model, precision and test items exists; saved trainings are not looked up (their key
covers the weights). With the backbone loaded (`plan --exact`: its weights are hashed on the CPU),
every identity is the one `run` computes: the job id (the weights and the split lists too), the
shared training's key, the feature-cache key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..clip.backbone import Backbone
from ..data.datum import DatasetSplits
from ..data.transforms import describe, test_transform
from ..engine.feature_cache import FeatureCache, feature_key, files_signature
from ..engine.recipe import Overrides
from ..engine.runner import Runner
from ..results.status import not_done
from .work import UNLOADED, EvalWork, JobWork

FeatureId = tuple[str, str]  #: (dataset, fingerprint of the test items)


def feature_id(ev: EvalWork) -> FeatureId:
    return ev.dataset, ev.fingerprint


@dataclass
class Reuse:
    """Labels of done jobs, keys of saved trainings, cached test sets; how they were matched."""

    done: set[str] = field(default_factory=set)
    trained: set[str] = field(default_factory=set)
    features: set[FeatureId] = field(default_factory=set)
    weights: str = UNLOADED  #: the weights' sha256 in share keys (UNLOADED: not loaded, one backbone)
    precision: str = "fp32"
    exact: bool = False


def recipe_reuse(works: list[JobWork], results: Path, overrides: Overrides, cache: FeatureCache | None,
                 model: str, precision: str) -> Reuse:
    """Reuse matched without the backbone (see the module docstring)."""
    cells = [(w.job.protocol.id, w.method, w.job.dataset, w.job.shots, w.job.seed) for w in works]
    undone = set(not_done(results, cells, overrides)) if works else set()
    done = {w.job.label() for w in works} - undone
    features: set[FeatureId] = set()
    if cache is not None:
        held = {(e.meta.get("fingerprint"), e.meta.get("model"), e.meta.get("precision")) for e in cache.entries()}
        features = {feature_id(ev) for w in works if w.frozen for ev in w.evals
                    if (ev.fingerprint, model, precision) in held}
    return Reuse(done, set(), features, UNLOADED, precision, exact=False)


def exact_reuse(works: list[JobWork], results: Path, overrides: Overrides, cache: FeatureCache | None,
                backbone: Backbone, data_root: Path, splits: dict[str, DatasetSplits]) -> Reuse:
    """Reuse matched on the identities `run` computes, with `backbone` loaded (on any device)."""
    runner = Runner(backbone, data_root, results, manifests_root=results / "_manifests", overrides=overrides,
                    feature_cache=None, allow_model_selection=True, smoke=False, echo=lambda *_: None)
    runner._splits.update(splits)  # the datasets already read, not read twice
    done = {w.job.label() for w in works if runner.is_done(w.job)}
    trained = set()
    for w in works:
        key = w.share_key(backbone.weights_sha256, backbone.precision)
        if key is not None and (runner.trained_root / f"{key}.pt").is_file():
            trained.add(key)
    features: set[FeatureId] = set()
    if cache is not None:
        held = {e.key for e in cache.entries()}
        transform = describe(test_transform(backbone.image_spec))
        for ev in {feature_id(ev): ev for w in works if w.frozen for ev in w.evals}.values():
            key = feature_key(backbone.model_name, backbone.weights_sha256, ev.fingerprint + files_signature(ev.items),
                              transform, backbone.precision)
            if key in held:
                features.add(feature_id(ev))
    return Reuse(done, trained, features, backbone.weights_sha256, backbone.precision, exact=True)
