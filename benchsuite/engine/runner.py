"""Run jobs: from a (protocol, method, dataset, shots, seed) tuple to one validated result file.

Reading order of one job (`Runner.run_job`): `_plan` resolves the recipe, then the job id; skip if
a valid result exists or another process holds the job; `_execute` seeds every RNG, samples the
few-shot split (and records its manifest), builds the method, `_train`s it (or reuses a training
shared with another protocol), `_evaluate`s every evaluation set and returns the result record,
which `run_job` writes atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import resource
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..clip.backbone import Backbone
from ..clip.integrity import backbone_print, changes
from ..data import loaders
from ..data.batching import TrainBatchSampler
from ..data.stream import STREAM_VERSION
from ..data.datum import DatasetSplits, fingerprint
from ..data.fewshot import FewShotSplit, ManifestStore, sample_fewshot, subsample_classes
from ..data.registry import get_dataset, load_dataset
from ..data.transforms import describe, test_transform, train_transform
from ..errors import BenchsuiteError, ContractError, WriteError
from ..hookspecs import TRAINING_HOOKS, LabelSpace, SetupContext, hookimpl, method_setting
from ..methods import MethodEntry, get_method, implements, job_manager
from ..results.store import ResultStore, atomic_write_text
from ..tempfiles import temp_path
from .evaluate import compute_features, evaluate, feature_batches, image_batches
from .feature_cache import FeatureCache, feature_key, files_signature
from .jobs import Job, job_id
from .recipe import Overrides, config_hash, declarations, profile_epoch_scale, resolve_recipe, trains
from .seeding import seed_everything
from .checkpoint import PREEMPT_SIGNALS, EpochCheckpoint
from .dependencies import DependencyResolver, training_items, unlabeled_record
from .smoke import smoke_check
from .train import NonFiniteLoss, make_grad_scaler, train
from .training_features import TrainingFeatures

class BackboneModified(ContractError):
    """A job changed the backbone all jobs share: its result is refused (the backbone is reloaded)."""


#: Model selections a recipe may ask for; anything but the protocol's needs --allow-model-selection.
MODEL_SELECTIONS = ("last_epoch", "best_test_epoch")


class BestTestEpoch:
    """GOPro's selection, harness-owned and opt-in: after every epoch, score the model on the job's
    first evaluation set (its test split) and load the best epoch's state when training ends.
    Registered ``trylast`` so it sees the state after the method's own epoch_end/train_end. The best
    score and state so far go into the epoch checkpoint (``training_state``), so a resumed job
    chooses among all epochs, not only those after the resume."""

    def __init__(self, score, module: torch.nn.Module):
        self.score, self.module = score, module
        self.best, self.state = -1.0, None

    @hookimpl(trylast=True)
    def epoch_end(self, epoch: int, num_epochs: int) -> None:
        accuracy = self.score()
        if accuracy > self.best:
            self.best = accuracy
            self.state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    @hookimpl(trylast=True)
    def train_end(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state)

    @hookimpl
    def training_state(self) -> dict[str, Any]:
        return {"best": self.best, "state": self.state}

    @hookimpl
    def load_training_state(self, state: dict[str, Any]) -> None:
        self.best, self.state = float(state["best"]), state["state"]


@dataclass
class TrainRecord:
    """What a job's training contributes to its result (all zero for a method that does not train)."""
    seconds: float = 0.0
    images: int = 0
    cpu_seconds: float = 0.0
    losses: dict[str, list[float]] = field(default_factory=dict)
    skipped_steps: int = 0
    resumed: int = 0
    shared_from: str | None = None
    #: the shared training features' cache state ("hit", "miss", "off"); None when the method encodes its own images
    feature_cache: str | None = None


@dataclass
class EvalRecord:
    """What a job's evaluations contribute to its result, summed over its evaluation sets."""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    images: int = 0
    feature_cache: str = "off"


@dataclass
class RunSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    import open_clip

    return {"benchsuite": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "platform": platform.platform(), "git_commit": _git_commit()}


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


def training_share_key(job: Job, recipe: dict[str, Any], train_fp: str, manifest_sha: str, weights_sha256: str,
                       precision: str) -> str | None:
    """The key a job's training is saved under in `_trained/` for other jobs to reuse, or None when it
    is not shared: transfer tasks (cross_dataset, domain_generalization) train once on the source set
    and every job of the same recipe, sample, backbone and seed reuses it (`benchsuite plan` counts
    such trainings once)."""
    if not trains(recipe) or job.protocol.task != "transfer":
        return None
    return config_hash(job.method, {"recipe": recipe, "train": train_fp, "manifest": manifest_sha,
                                    "backbone": weights_sha256, "precision": precision, "seed": job.seed})


def eval_sets(job: Job, split: FewShotSplit, splits: Callable[[str], DatasetSplits]):
    """(evaluation, test items, class names, root) of every set a job evaluates: a class subset of its
    own test split (base2new), its test split, or another dataset's (transfer); `benchsuite plan`
    counts the same sets."""
    for ev in job.evals():
        if ev.classes != "all":
            part = subsample_classes(split, ev.classes)
            yield ev, part.test, part.classnames, part.root
        elif ev.dataset == job.dataset:
            yield ev, split.test, split.classnames, split.root
        else:
            target = splits(ev.dataset)
            yield ev, target.test, target.classnames, target.root


class Runner:
    """Holds what jobs of one invocation share: backbone, loaded datasets, stores."""

    def __init__(self, backbone: Backbone, data_root: Path, results_root: Path, *, manifests_root: Path,
                 overrides: Overrides | None = None, workers: int | None = None,
                 feature_cache: FeatureCache | None = None, preload_budget: int = loaders.PRELOAD_BUDGET,
                 class_text_once: bool = True, allow_model_selection: bool = False, fail_fast: bool = False,
                 smoke: bool = True, echo=print, checkpoint_every: int = 1,
                 preempt_signals: tuple[int, ...] = PREEMPT_SIGNALS):
        self.backbone = backbone
        self.data_root = Path(data_root)
        self.store = ResultStore(Path(results_root))
        self.trained_root = Path(results_root) / "_trained"
        self.checkpoints_root = Path(results_root) / "_checkpoints"
        self.checkpoint_every = checkpoint_every  # epochs between checkpoint writes
        self.preempt_signals = preempt_signals  # save the checkpoint and stop (submitit owns SIGUSR1 on Slurm)
        self.manifests = ManifestStore(manifests_root)
        self.overrides = overrides or {}
        self.workers = loaders.default_workers(backbone.device) if workers is None else workers
        self.feature_cache = feature_cache  # None: computed afresh for every evaluation
        self.preload_budget = preload_budget
        self.class_text_once = class_text_once
        self.allow_model_selection = allow_model_selection
        self.fail_fast = fail_fast  # False: a failing job is logged and the grid goes on
        self.smoke = smoke  # run the one-batch check before every training
        self.echo = echo
        self._splits: dict[str, DatasetSplits] = {}
        self._signatures: dict[tuple[str, str], str] = {}  # (first file, fingerprint) -> files_signature
        self._data_prints: dict[str, str] = {}  # dataset name -> fingerprints of its split lists
        self._env = environment()
        self._pristine = backbone_print(backbone.model)  # what no job may change (clip.integrity)

    # ---- data -------------------------------------------------------------------------------
    def splits(self, name: str) -> DatasetSplits:
        if name not in self._splits:
            self._splits[name] = load_dataset(name, self.data_root)
        return self._splits[name]

    def data_identity(self, job: Job) -> str:
        """Digest of the train/val/test lists of every dataset the job reads (memoised per run)."""
        names = sorted({job.dataset, *(ev.dataset for ev in job.evals())})
        for name in names:
            if name not in self._data_prints:
                s = self.splits(name)
                self._data_prints[name] = "/".join(fingerprint(part, s.root) for part in (s.train, s.val, s.test))
        return hashlib.sha256("|".join(f"{n}={self._data_prints[n]}" for n in names).encode()).hexdigest()

    def preflight(self, jobs: list[Job]) -> None:
        """Read every dataset the grid needs and resolve every job's recipe before any training, so a
        bad path, a bad --set value or a refused model selection fails at once, not after hours."""
        for job in jobs:
            self.splits(job.dataset)
            for ev in job.evals():
                self.splits(ev.dataset)
            get_method(job.method)
        for job in jobs:
            try:
                self._plan(job)
            except ContractError:  # a method bug: that job fails when it runs, the grid goes on
                pass
            except BenchsuiteError:  # the user's settings: nothing of the grid can run as asked
                raise
            except Exception:  # a method bug in its recipe hook: as a contract error
                pass

    def fewshot(self, job: Job) -> tuple[FewShotSplit, str]:
        split = sample_fewshot(self.splits(job.dataset), job.shots, job.seed,
                               sample_val=get_dataset(job.dataset).sample_val)
        return split, self.manifests.record(split)

    def eval_data(self, job: Job, split: FewShotSplit):
        return eval_sets(job, split, self.splits)

    # ---- identity ---------------------------------------------------------------------------
    def backbone_record(self) -> dict[str, Any]:
        b = self.backbone
        name = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else platform.processor() or "cpu"
        return {"model": b.model_name, "pretrained": b.pretrained, "weights_sha256": b.weights_sha256,
                "precision": b.precision, "device": str(b.device), "device_name": name}

    # ---- running ----------------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> RunSummary:
        self.preflight(jobs)
        summary = RunSummary()
        for index, job in enumerate(jobs, 1):
            prefix = f"[{index}/{len(jobs)}] {job.label()}"
            try:
                path = self.run_job(job, prefix=prefix)
            except NonFiniteLoss as exc:  # the method diverged: no traceback to show, but a log like any failure
                log = self._log_failure(job, f"{exc}\n")
                summary.failed.append(f"{job.label()}: {exc} [log: {log}]")
                self.echo(f"{prefix}: FAILED: {exc} (log: {log})")
                continue
            except WriteError:  # a full or read-only disk: every later job would train and fail to save
                raise
            except Exception as exc:  # one job's failure is not the grid's (KeyboardInterrupt still stops)
                if self.fail_fast:
                    raise
                log = self._log_failure(job)
                what = str(exc) if isinstance(exc, BenchsuiteError) else f"{type(exc).__name__}: {exc}"
                summary.failed.append(f"{job.method} on {job.dataset}, seed {job.seed} ({job.label()}): {what} "
                                      f"[traceback: {log}]")
                self.echo(f"{prefix}: FAILED ({what}); full traceback in {log}; going on with the other jobs")
                continue
            if path is None:
                summary.skipped.append(job.label())
            else:
                summary.written.append(path)
        return summary

    def _log_failure(self, job: Job, text: str | None = None) -> Path:
        """Write the job's last failure (default: the current exception's full traceback) to the log
        `benchsuite status` points at, whichever executor ran the job; return its path."""
        from ..results.status import failure_log

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = failure_log(self.store.root, job.protocol.id, job.method, job.dataset, job.shots, job.seed)
        try:
            atomic_write_text(path, f"{job.label()}\n{stamp}\n\n{text or traceback.format_exc()}")
        except OSError as exc:
            self.echo(f"benchsuite: could not write the failure log {path}: {exc}")
        return path

    def _plan(self, job: Job):
        """The job's method, plugin manager, resolved recipe, user overrides and profile epoch scale."""
        entry = get_method(job.method)
        pm, method = job_manager(entry)
        default = pm.hook.recipe(protocol=job.protocol, dataset=job.dataset, shots=job.shots)
        recipe, overrides = resolve_recipe(job.method, default, job.protocol.profile, self.overrides,
                                           **declarations(entry.cls))
        epoch_scale = profile_epoch_scale(int((default or {}).get("epochs", 0)), job.protocol.profile)
        selection = recipe["model_selection"]
        if selection != job.protocol.spec["model_selection"]:
            if selection not in MODEL_SELECTIONS:
                raise BenchsuiteError(f"method {job.method!r}: unknown model_selection {selection!r}; "
                                      f"known: {', '.join(MODEL_SELECTIONS)}")
            if not self.allow_model_selection:
                raise BenchsuiteError(
                    f"method {job.method!r} asks for model selection {selection!r}, but protocol "
                    f"{job.protocol.id!r} evaluates the {job.protocol.spec['model_selection']} model. Pass "
                    f"--allow-model-selection to run it anyway; its results are marked off-protocol and the "
                    f"leaderboard refuses them")
        return entry, pm, method, recipe, overrides, epoch_scale

    def is_done(self, job: Job) -> bool:
        """Whether a valid result of this exact job (its job id: recipe, backbone, data) exists, so
        that running it would reuse it and write nothing. The job id is computed as in `run_job`."""
        entry, _, _, recipe, _, _ = self._plan(job)
        jid = job_id(job, config_hash(job.method, recipe), self.backbone_record(), self.data_identity(job),
                     plugin=(entry.source, entry.version))
        path = self.store.path_for(job.protocol.id, job.method, job.dataset, jid)
        return self.store.existing(path, jid) is not None

    def run_job(self, job: Job, *, prefix: str = "") -> Path | None:
        entry, pm, method, recipe, overrides, epoch_scale = self._plan(job)
        missing = [hook for hook in TRAINING_HOOKS if not implements(pm, method, hook)]
        if trains(recipe) and missing:
            raise ContractError(f"method {job.method!r} ({entry.source}): the recipe trains (epochs "
                                f"{recipe['epochs']}, iterations {recipe.get('iterations', 0)}) but the method does "
                                f"not implement the hook {missing[0]!r}")
        chash = config_hash(job.method, recipe)
        backbone = self.backbone_record()
        jid = job_id(job, chash, backbone, self.data_identity(job), plugin=(entry.source, entry.version))
        path = self.store.path_for(job.protocol.id, job.method, job.dataset, jid)
        if self.store.existing(path, jid) is not None:
            self.echo(f"{prefix}: result exists, reused ({path})")
            return None
        with self.store.claim(jid, {"label": job.label(), "protocol": job.protocol.id, "method": job.method,
                                    "dataset": job.dataset, "shots": job.shots, "seed": job.seed,
                                    "config_hash": chash}) as held:
            if not held:
                self.echo(f"{prefix}: another process is running this job, skipped")
                return None
            if self.store.existing(path, jid) is not None:
                return None
            try:
                result = self._execute(job, entry, pm, recipe, chash, jid, backbone, prefix, epoch_scale)
            except BaseException:
                self._isolate_backbone(job, failing=True)
                raise
            self._isolate_backbone(job)
            result["method"].update(default_recipe=not overrides, overrides=overrides)
            written = self.store.write(result)
            self.checkpoint(jid).remove()
        metrics = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in result["metrics"].items())
        self.echo(f"{prefix}: {metrics} -> {written}")
        return written

    def smoke_check(self, job: Job, entry: MethodEntry, ctx: SetupContext, split: FewShotSplit, train_items) -> None:
        """The one-batch check of `job`'s method on its training items and first evaluation set."""
        b = self.backbone
        _, items, classnames, _ = next(iter(self.eval_data(job, split)))
        first = next(iter(job.evals()))
        smoke_check(entry, ctx, train_items, train_transform(b.image_spec),
                    (items, classnames, first.dataset, get_dataset(first.dataset).template,
                     test_transform(b.image_spec)))

    def setup_module(self, pm, method: str, ctx: SetupContext) -> torch.nn.Module:
        """The module the method's `setup` returns (checked to be one), on the backbone's device."""
        module = pm.hook.setup(ctx=ctx)
        if not isinstance(module, torch.nn.Module):
            raise ContractError(f"method {method!r}, hook setup: must return an nn.Module, got {type(module).__name__}")
        return module.to(self.backbone.device)

    def _execute(self, job: Job, entry: MethodEntry, pm, recipe, chash, jid, backbone_rec, prefix,
                 epoch_scale: float = 1.0) -> dict:
        """One job after planning: build the method, train it, evaluate it, and return the result record."""
        b = self.backbone
        if b.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(b.device)
        seed_everything(job.seed)
        split, manifest_sha = self.fewshot(job)
        train_split = subsample_classes(split, job.train_classes)
        # Method.train_data: the few-shot sample, or every train-split image unlabeled (dependencies.py)
        trained_on, all_classnames = training_items(entry.cls, self.splits(job.dataset), train_split)
        dependencies = DependencyResolver(self, job, prefix)
        ctx = SetupContext(backbone=b, classnames=train_split.classnames, dataset=job.dataset,
                           template=get_dataset(job.dataset).template, recipe=recipe, protocol=job.protocol,
                           shots=job.shots, seed=job.seed, device=b.device, epoch_scale=epoch_scale,
                           all_classnames=all_classnames, dependencies=dependencies)
        train_fp = fingerprint(train_split.train, train_split.root)
        share_key = training_share_key(job, recipe, train_fp if trained_on is train_split else
                                       fingerprint(trained_on.train, trained_on.root), manifest_sha,
                                       backbone_rec["weights_sha256"], b.precision)
        if self.smoke and trains(recipe) and not (share_key and self._shared_path(share_key).exists()):
            self.smoke_check(job, entry, ctx, split, trained_on.train)
        module = self.setup_module(pm, job.method, ctx)
        fit_seconds = None
        if implements(pm, pm.get_plugin(f"method:{entry.name}"), "fit_features"):
            fit_seconds = self._fit_features(pm, entry, train_split, job.seed, prefix)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        trained = TrainRecord()
        if trains(recipe):
            trained = self._train(job, entry, pm, module, recipe, split, trained_on, share_key, jid, prefix)
        evaluated = self._evaluate(job, pm, module, recipe["image_input"], split, prefix)
        peak, kind = _peak_memory(b.device)
        record = {
            "schema_version": 2,
            "job": {"id": jid, "protocol": job.protocol.ref(), "method": job.method, "dataset": job.dataset,
                    "shots": job.shots, "seed": job.seed},
            "method": {"name": job.method, "source": entry.source, "version": entry.version, "recipe": recipe,
                       "config_hash": chash,
                       "default_recipe": True, "overrides": {},
                       "trainable_params": trainable,
                       "extra_knowledge": list(entry.cls.extra_knowledge), "transductive": entry.cls.transductive,
                       "setting": method_setting(entry.cls)},
            "backbone": backbone_rec,
            "data": {"train": {"dataset": job.dataset, "fingerprint": train_fp, "n_images": len(train_split.train),
                               "n_classes": len(train_split.classnames), "manifest_sha256": manifest_sha,
                               "transform": describe(train_transform(b.image_spec)),
                               "augmentation_stream": STREAM_VERSION},
                     "evals": evaluated.evals},
            "metrics": evaluated.metrics,
            "timing": {"train_seconds": trained.seconds, "train_images": trained.images,
                       "train_ms_per_image": 1000.0 * trained.seconds / trained.images if trained.images else 0.0,
                       "train_cpu_seconds": trained.cpu_seconds, "eval_seconds": evaluated.seconds,
                       "eval_cpu_seconds": evaluated.cpu_seconds, "eval_images": evaluated.images,
                       "eval_images_per_second": (evaluated.images / evaluated.seconds if evaluated.seconds > 0
                                                  else 0.0),
                       "peak_memory_bytes": peak, "peak_memory_kind": kind, "train_shared_from": trained.shared_from,
                       "train_resumed": trained.resumed, "eval_feature_cache": evaluated.feature_cache,
                       **({"train_feature_cache": trained.feature_cache} if trained.feature_cache else {}),
                       **({"fit_seconds": fit_seconds} if fit_seconds is not None else {})},
            "training": {"loss_per_epoch": trained.losses, "skipped_steps": trained.skipped_steps,
                         "min_batch_size": int(entry.cls.min_batch_size), "epoch_scale": epoch_scale},
            "environment": self._env,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if dependencies.records:  # the trained jobs this one consumed (SetupContext.trained_dependency)
            record["method"]["dependencies"] = dependencies.records
        if trained_on is not train_split:  # Method.train_data "unlabeled_all"
            record["data"]["unlabeled"] = unlabeled_record(trained_on.train, trained_on.root, job.dataset,
                                                           len(all_classnames))
        return record

    def _train(self, job: Job, entry: MethodEntry, pm, module: torch.nn.Module, recipe: dict[str, Any],
               split: FewShotSplit, train_split: FewShotSplit, share_key: str | None, jid: str,
               prefix: str) -> "TrainRecord":
        """Train `module` on the job's training split, or reuse the training another job of the same
        transfer source saved (a concurrent one waits on the lock, then reuses it)."""
        b = self.backbone
        with self._shared_lock(share_key):
            shared = self._load_shared(share_key, module)
            if shared is not None:
                seconds, images, shared_from, cpu_seconds, losses = shared
                if shared_from == jid:  # its own training, saved just before an interruption
                    shared_from = None
                else:
                    self.echo(f"{prefix}: reusing the training of job {shared_from[:12]}")
                return TrainRecord(seconds, images, cpu_seconds, losses, shared_from=shared_from)
            if recipe["model_selection"] == "best_test_epoch":
                pm.register(BestTestEpoch(self._first_eval_scorer(job, recipe["image_input"], split, pm, module),
                                          module), name="harness:best_test_epoch")
            views = list(pm.hook.train_views(image_spec=b.image_spec) or [])
            shared_views = recipe["image_input"] in ("features", "images+features") and not views
            # a "features" or "images+features" method reads its epochs' frozen features from the shared
            # training features; for "features" no image is decoded here, the loader is only its batch sampler
            only_features = shared_views and recipe["image_input"] == "features"
            loader = (TrainBatchSampler(train_split.train, int(recipe["batch_size"]), drop_last=bool(recipe["drop_last"]),
                                        min_batch_size=int(entry.cls.min_batch_size)) if only_features else
                      loaders.train_loader(train_split.train, train_transform(b.image_spec), int(recipe["batch_size"]),
                                           workers=self.workers, pin_memory=b.device.type == "cuda", views=views,
                                           preload_budget=self.preload_budget, drop_last=bool(recipe["drop_last"]),
                                           min_batch_size=int(entry.cls.min_batch_size), stream_seed=job.seed))
            shared_features = self.training_features(train_split, job.seed, prefix) if shared_views else None
            ckpt = self.checkpoint(jid)
            with ckpt.active(self.preempt_signals):
                stats = train(pm, job.method, module, loader, recipe, b, recipe["image_input"],
                              progress=f"{prefix} train", scaler=make_grad_scaler(b), checkpoint=ckpt,
                              epoch_features=shared_features.epoch if shared_features is not None else None)
            self._isolate_backbone(job)  # a training on a changed backbone is never shared
            self._save_shared(share_key, module, jid, stats)
        return TrainRecord(stats.seconds, stats.images, stats.cpu_seconds, stats.losses,
                           skipped_steps=stats.skipped_steps, resumed=ckpt.resumed,
                           feature_cache=shared_features.state if shared_features is not None else None)

    def training_features(self, train_split: FewShotSplit, seed: int, prefix: str) -> TrainingFeatures:
        """The frozen features of the training views of `train_split` under the job's seed, epoch by
        epoch, shared through the feature cache (never filed from a changed backbone)."""
        b = self.backbone
        return TrainingFeatures(b, train_split.train, train_transform(b.image_spec), seed,
                                fingerprint(train_split.train, train_split.root), cache=self.feature_cache,
                                may_cache=lambda: not self._backbone_changes(), workers=self.workers,
                                preload_budget=self.preload_budget, progress=prefix)

    def _fit_features(self, pm, entry: MethodEntry, train_split: FewShotSplit, seed: int, prefix: str) -> float:
        """Hand a method the frozen features of its training images under `fit_views` augmented
        views (hook fit_features): view v is epoch v of the augmentation stream, read from the shared
        training features or computed once per image and view (`training_features`). Returns the
        seconds it took, features and fit (recorded as timing.fit_seconds)."""
        import time

        b = self.backbone
        if b.device.type == "cuda":
            torch.cuda.synchronize(b.device)
        start = time.perf_counter()
        views = int(entry.cls.fit_views)
        if views < 1:
            raise ContractError(f"method {entry.name!r}: fit_views must be at least 1, got {views}")
        # view v is epoch v of the augmentation stream: the same features a "features" method trains on
        shared = self.training_features(train_split, seed, prefix)
        drawn = [shared.epoch(v) for v in range(views)]
        features = torch.stack([f for f, _ in drawn]).to(b.device)
        val_features = val_labels = None
        if get_dataset(train_split.dataset).sample_val and train_split.val:  # a validation split of its own
            val_loader = loaders.eval_loader(train_split.val, test_transform(b.image_spec), 256, workers=0,
                                             pin_memory=False)
            val_features, val_labels = compute_features(b, val_loader, progress=f"{prefix} fit features val")
            val_features, val_labels = val_features.to(b.device), val_labels.to(b.device)
        with torch.no_grad(), b.autocast():
            pm.hook.fit_features(features=features, labels=drawn[0][1].to(b.device), val_features=val_features,
                                 val_labels=val_labels)
        if b.device.type == "cuda":
            torch.cuda.synchronize(b.device)
        return time.perf_counter() - start

    def _evaluate(self, job: Job, pm, module: torch.nn.Module, image_input: str, split: FewShotSplit,
                  prefix: str) -> "EvalRecord":
        """Evaluate the trained module on every evaluation set of the job."""
        out = EvalRecord()
        batch_size = int(job.protocol.spec["eval_batch_size"])
        transform = describe(test_transform(self.backbone.image_spec))
        cache_states = []
        for ev, items, classnames, root in self.eval_data(job, split):
            fp = fingerprint(items, root)
            batches, state = self._eval_batches(image_input, items, fp, batch_size, f"{prefix} features {ev.key}")
            cache_states.append(state)
            res = evaluate(pm, job.method, module, batches(), classnames, ev.dataset, get_dataset(ev.dataset).template,
                           self.backbone, progress=f"{prefix} eval {ev.key}",
                           prepare_per_batch=not self.class_text_once, evaluation=ev.key,
                           label_space=self._label_space(job, split, ev.dataset, classnames))
            out.metrics[ev.key] = {"accuracy": res.accuracy, "correct": res.correct, "total": res.total,
                                   **res.calibration}
            out.evals[ev.key] = {"dataset": ev.dataset, "fingerprint": fp, "n_images": len(items),
                                 "n_classes": len(classnames), "transform": transform}
            out.seconds += res.seconds
            out.cpu_seconds += res.cpu_seconds
            out.images += res.total
        out.feature_cache = ("hit" if cache_states and set(cache_states) == {"hit"} else
                             "off" if set(cache_states) <= {"off"} else "miss")
        return out

    def _eval_batches(self, image_input: str, items, fp: str, batch_size: int, progress: str):
        """A factory of evaluation batches for one set, and the feature-cache state (hit, miss, off).

        "images" and "images+features" methods get image batches. For "features" methods the
        features are computed at most once per call of this function (inside the first iteration,
        so inside the timed region) or read from the feature cache; calling the factory again
        reuses them (model selection scores every epoch on the same features).
        """
        b = self.backbone
        transform = test_transform(b.image_spec)
        loader = loaders.eval_loader(items, transform, batch_size, workers=self.workers,
                                     pin_memory=b.device.type == "cuda")
        if image_input != "features":
            return (lambda: image_batches(loader, b.device)), "off"
        held: list = []
        key, state = None, "off"
        if self.feature_cache is not None:
            # stat every test image once per run, not once per job; keyed by where the files are too,
            # since two datasets can share relative paths, labels and names (toy DG sets do)
            where = (items[0].impath if items else "", fp)
            if where not in self._signatures:
                self._signatures[where] = files_signature(items)
            key = feature_key(b.model_name, b.weights_sha256, fp + self._signatures[where], describe(transform),
                              b.precision)
            cached = self.feature_cache.get(key, labels=torch.tensor([item.label for item in items]))
            if cached is not None:
                held.append(cached)
            state = "hit" if held else "miss"

        def features():
            if not held:
                feats, labels = compute_features(b, loader, progress=progress)
                if key is not None and self._backbone_changes():
                    self.echo(f"benchsuite: not caching features of {progress}: the backbone differs from the "
                              f"weights they would be filed under")
                elif key is not None:
                    self.feature_cache.put(key, feats, labels, {"model": b.model_name, "pretrained": b.pretrained,
                                                                "precision": b.precision, "fingerprint": fp,
                                                                "n_images": int(labels.shape[0])})
                held.append((feats, labels))
            return held[0]

        return (lambda: feature_batches(features, batch_size, b.device)), state

    def _first_eval_scorer(self, job: Job, image_input: str, split: FewShotSplit, pm, module):
        ev, items, classnames, root = next(iter(self.eval_data(job, split)))
        batches, _ = self._eval_batches(image_input, items, fingerprint(items, root),
                                        int(job.protocol.spec["eval_batch_size"]), f"select on {ev.key}")
        template = get_dataset(ev.dataset).template
        space = self._label_space(job, split, ev.dataset, classnames)
        return lambda: evaluate(pm, job.method, module, batches(), classnames, ev.dataset, template,
                                self.backbone, label_space=space).accuracy

    def _label_space(self, job: Job, split: FewShotSplit, dataset: str, classnames: list[str]) -> LabelSpace:
        """How an evaluated class set relates to the job's training classes (hook prepare_eval)."""
        return LabelSpace.of(job.dataset, subsample_classes(split, job.train_classes).classnames, dataset, classnames)

    # ---- backbone isolation ----------------------------------------------------------------------
    def _backbone_changes(self) -> list[str]:
        """What differs of the shared backbone from its state when the run started (empty: nothing)."""
        return changes(self._pristine, backbone_print(self.backbone.model))

    def _isolate_backbone(self, job: Job, *, failing: bool = False) -> None:
        """After (part of) a job: if it changed the frozen backbone, reload the pristine weights for
        the jobs after it and refuse its result (BackboneModified); `failing`: the job is failing
        already, so only reload and say so."""
        found = self._backbone_changes()
        if not found:
            return
        self.backbone.reload()
        self._pristine = backbone_print(self.backbone.model)
        what = "; ".join(found)
        if failing:
            self.echo(f"benchsuite: method {job.method!r} changed the frozen backbone before failing ({what}); "
                      f"reloaded its weights for the next jobs")
            return
        raise BackboneModified(
            f"method {job.method!r} changed the frozen backbone, which every job shares ({what}); its result "
            f"is refused and the backbone reloaded for the next jobs. A method must not modify ctx.backbone: "
            f"train a copy of what it tunes inside the module setup returns")

    def checkpoint(self, jid: str) -> EpochCheckpoint:
        """The job-private epoch checkpoint of job `jid` (benchsuite.engine.checkpoint)."""
        return EpochCheckpoint(self.checkpoints_root / f"{jid}.pt", every=self.checkpoint_every, warn=self.echo)

    # ---- trainings shared between protocols -----------------------------------------------------
    def _shared_lock(self, key: str | None):
        """A blocking lock around load-or-train of a shared training (a no-op lock without a key)."""
        import filelock

        if key is None:
            return contextlib.nullcontext()
        self.trained_root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.trained_root / f"{key}.lock"))

    def _shared_path(self, key: str) -> Path:
        return self.trained_root / f"{key}.pt"

    def _load_shared(self, key: str | None, module: torch.nn.Module):
        """A saved shared training, or None to train; an unreadable one (truncated by a full disk or
        a copy) is named, removed and retrained instead of failing every rerun."""
        if key is None or not self._shared_path(key).exists():
            return None
        path = self._shared_path(key)
        try:
            blob = torch.load(path, map_location=self.backbone.device, weights_only=True)
            module.load_state_dict(blob["state"], strict=True)
            return (float(blob["train_seconds"]), int(blob["train_images"]), str(blob["job_id"]),
                    float(blob.get("train_cpu_seconds", 0.0)), dict(blob.get("losses", {})))
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... on a cut file
            self.echo(f"benchsuite: shared training {path} cannot be read ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); removing it and training again")
            path.unlink(missing_ok=True)
            return None

    def _save_shared(self, key: str | None, module: torch.nn.Module, jid: str, stats) -> None:
        if key is None:
            return
        import os

        self.trained_root.mkdir(parents=True, exist_ok=True)
        path = self._shared_path(key)
        tmp = temp_path(path)
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        try:
            torch.save({"state": state, "job_id": jid, "train_seconds": stats.seconds, "train_images": stats.images,
                        "train_cpu_seconds": stats.cpu_seconds, "losses": stats.losses}, tmp)
            os.replace(tmp, path)
        except BaseException:  # a failed or interrupted write leaves no temporary file behind
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
