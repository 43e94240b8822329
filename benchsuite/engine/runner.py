"""Run jobs: from a (protocol, method, dataset, shots, seed) tuple to one validated result file.

Reading order of one job (`Runner.run_job`): resolve the recipe and the job id, skip if a valid
result exists or another process holds the job, seed every RNG, sample the few-shot split (and
record its manifest), build the method, train (or reuse a training shared with another protocol),
evaluate every evaluation set, and write the result atomically.
"""

from __future__ import annotations

import hashlib
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..clip.backbone import Backbone
from ..data import loaders
from ..data.datum import DatasetSplits, fingerprint
from ..data.fewshot import FewShotSplit, ManifestStore, sample_fewshot, subsample_classes
from ..data.registry import get_dataset, load_dataset
from ..data.transforms import describe, test_transform, train_transform
from ..errors import BenchsuiteError, ContractError
from ..hookspecs import TRAINING_HOOKS, SetupContext, hookimpl
from ..methods import MethodEntry, get_method, implements, job_manager
from ..results.store import ResultStore
from .evaluate import compute_features, evaluate, feature_batches, image_batches
from .feature_cache import FeatureCache, feature_key, files_signature
from .jobs import Job, job_id
from .recipe import Overrides, config_hash, resolve_recipe
from .seeding import seed_everything
from .train import NonFiniteLoss, train

#: Model selections a recipe may ask for; anything but the protocol's needs --allow-model-selection.
MODEL_SELECTIONS = ("last_epoch", "best_test_epoch")


class BestTestEpoch:
    """GOPro's selection, harness-owned and opt-in: after every epoch, score the model on the job's
    first evaluation set (its test split) and load the best epoch's state when training ends.
    Registered ``trylast`` so it sees the state after the method's own epoch_end/train_end."""

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


class Runner:
    """Holds what jobs of one invocation share: backbone, loaded datasets, stores."""

    def __init__(self, backbone: Backbone, data_root: Path, results_root: Path, *, manifests_root: Path,
                 overrides: Overrides | None = None, workers: int | None = None,
                 feature_cache: FeatureCache | None = None, preload_budget: int = loaders.PRELOAD_BUDGET,
                 class_text_once: bool = True, allow_model_selection: bool = False, echo=print):
        self.backbone = backbone
        self.data_root = Path(data_root)
        self.store = ResultStore(Path(results_root))
        self.trained_root = Path(results_root) / "_trained"
        self.manifests = ManifestStore(manifests_root)
        self.overrides = overrides or {}
        self.workers = loaders.default_workers(backbone.device) if workers is None else workers
        self.feature_cache = feature_cache  # None: computed afresh for every evaluation
        self.preload_budget = preload_budget
        self.class_text_once = class_text_once
        self.allow_model_selection = allow_model_selection
        self.echo = echo
        self._splits: dict[str, DatasetSplits] = {}
        self._signatures: dict[tuple[str, str], str] = {}  # (first file, fingerprint) -> files_signature
        self._data_prints: dict[str, str] = {}  # dataset name -> fingerprints of its split lists
        self._env = environment()

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
        """Read every dataset the grid needs before any training, so a bad path fails at once."""
        for job in jobs:
            self.splits(job.dataset)
            for ev in job.evals():
                self.splits(ev.dataset)
            get_method(job.method)

    def fewshot(self, job: Job) -> tuple[FewShotSplit, str]:
        split = sample_fewshot(self.splits(job.dataset), job.shots, job.seed,
                               sample_val=get_dataset(job.dataset).sample_val)
        return split, self.manifests.record(split)

    def eval_data(self, job: Job, split: FewShotSplit):
        for ev in job.evals():
            if ev.classes != "all":
                part = subsample_classes(split, ev.classes)
                yield ev, part.test, part.classnames, part.root
            elif ev.dataset == job.dataset:
                yield ev, split.test, split.classnames, split.root
            else:
                target = self.splits(ev.dataset)
                yield ev, target.test, target.classnames, target.root

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
            except NonFiniteLoss as exc:
                summary.failed.append(f"{job.label()}: {exc}")
                self.echo(f"{prefix}: FAILED: {exc}")
                continue
            if path is None:
                summary.skipped.append(job.label())
            else:
                summary.written.append(path)
        return summary

    def run_job(self, job: Job, *, prefix: str = "") -> Path | None:
        entry = get_method(job.method)
        pm, method = job_manager(entry)
        recipe, overrides = resolve_recipe(
            job.method, pm.hook.recipe(protocol=job.protocol, dataset=job.dataset, shots=job.shots),
            job.protocol.profile, self.overrides)
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
        missing = [hook for hook in TRAINING_HOOKS if not implements(pm, method, hook)]
        if recipe["epochs"] > 0 and missing:
            raise ContractError(f"method {job.method!r} ({entry.source}): the recipe trains for {recipe['epochs']} "
                                f"epochs but the method does not implement the hook {missing[0]!r}")
        chash = config_hash(job.method, recipe)
        backbone = self.backbone_record()
        jid = job_id(job, chash, backbone, self.data_identity(job))
        path = self.store.path_for(job.protocol.id, job.method, job.dataset, jid)
        if self.store.existing(path, jid) is not None:
            self.echo(f"{prefix}: result exists, skipped ({path})")
            return None
        with self.store.claim(jid) as held:
            if not held:
                self.echo(f"{prefix}: another process is running this job, skipped")
                return None
            if self.store.existing(path, jid) is not None:
                return None
            result = self._execute(job, entry, pm, recipe, chash, jid, backbone, prefix)
            result["method"].update(default_recipe=not overrides, overrides=overrides)
            written = self.store.write(result)
        metrics = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in result["metrics"].items())
        self.echo(f"{prefix}: {metrics} -> {written}")
        return written

    def _execute(self, job: Job, entry: MethodEntry, pm, recipe, chash, jid, backbone_rec, prefix) -> dict:
        b = self.backbone
        if b.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(b.device)
        seed_everything(job.seed)
        split, manifest_sha = self.fewshot(job)
        train_split = subsample_classes(split, job.train_classes)
        spec = get_dataset(job.dataset)
        ctx = SetupContext(backbone=b, classnames=train_split.classnames, dataset=job.dataset,
                           template=spec.template, recipe=recipe, protocol=job.protocol, shots=job.shots,
                           seed=job.seed, device=b.device)
        module = pm.hook.setup(ctx=ctx)
        if not isinstance(module, torch.nn.Module):
            raise ContractError(f"method {job.method!r}, hook setup: must return an nn.Module, got {type(module).__name__}")
        module.to(b.device)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        train_fp = fingerprint(train_split.train, train_split.root)
        t_tf = train_transform(b.image_spec)
        train_seconds, train_images, shared_from = 0.0, 0, None
        if recipe["epochs"] > 0:
            share_key = None
            if job.protocol.task == "transfer":  # cross_dataset and domain_generalization share this training
                share_key = config_hash(job.method, {"recipe": recipe, "train": train_fp, "manifest": manifest_sha,
                                                     "backbone": backbone_rec["weights_sha256"],
                                                     "precision": b.precision, "seed": job.seed})
            shared = self._load_shared(share_key, module)
            if shared is not None:
                train_seconds, train_images, shared_from = shared
                if shared_from == jid:  # its own training, saved just before an interruption
                    shared_from = None
                else:
                    self.echo(f"{prefix}: reusing the training of job {shared_from[:12]}")
            else:
                if recipe["model_selection"] == "best_test_epoch":
                    pm.register(BestTestEpoch(self._first_eval_scorer(job, entry, split, pm, module), module),
                                name="harness:best_test_epoch")
                views = list(pm.hook.train_views(image_spec=b.image_spec) or [])
                loader = loaders.train_loader(train_split.train, t_tf, int(recipe["batch_size"]),
                                              workers=self.workers, pin_memory=b.device.type == "cuda",
                                              views=views, preload_budget=self.preload_budget)
                stats = train(pm, job.method, module, loader, recipe, b, entry.cls.frozen_image_encoder,
                              progress=f"{prefix} train")
                train_seconds, train_images = stats.seconds, stats.images
                self._save_shared(share_key, module, jid, stats.seconds, stats.images)
        e_tf = test_transform(b.image_spec)
        metrics, evals, eval_seconds, eval_images = {}, {}, 0.0, 0
        batch_size = int(job.protocol.spec["eval_batch_size"])
        cache_states = []
        for ev, items, classnames, root in self.eval_data(job, split):
            fp = fingerprint(items, root)
            batches, state = self._eval_batches(entry, items, fp, batch_size, f"{prefix} features {ev.key}")
            cache_states.append(state)
            res = evaluate(pm, job.method, module, batches(), classnames, ev.dataset, get_dataset(ev.dataset).template,
                           b, progress=f"{prefix} eval {ev.key}", prepare_per_batch=not self.class_text_once)
            metrics[ev.key] = {"accuracy": res.accuracy, "correct": res.correct, "total": res.total}
            evals[ev.key] = {"dataset": ev.dataset, "fingerprint": fp, "n_images": len(items),
                             "n_classes": len(classnames), "transform": describe(e_tf)}
            eval_seconds += res.seconds
            eval_images += res.total
        peak, kind = _peak_memory(b.device)
        return {
            "schema_version": 1,
            "job": {"id": jid, "protocol": job.protocol.ref(), "method": job.method, "dataset": job.dataset,
                    "shots": job.shots, "seed": job.seed},
            "method": {"name": job.method, "source": entry.source, "recipe": recipe, "config_hash": chash,
                       "default_recipe": True, "overrides": {}, "trainable_params": trainable},
            "backbone": backbone_rec,
            "data": {"train": {"dataset": job.dataset, "fingerprint": train_fp, "n_images": len(train_split.train),
                               "n_classes": len(train_split.classnames), "manifest_sha256": manifest_sha,
                               "transform": describe(t_tf)},
                     "evals": evals},
            "metrics": metrics,
            "timing": {"train_seconds": train_seconds, "train_images": train_images,
                       "train_ms_per_image": 1000.0 * train_seconds / train_images if train_images else 0.0,
                       "eval_seconds": eval_seconds, "eval_images": eval_images,
                       "eval_images_per_second": eval_images / eval_seconds if eval_seconds > 0 else 0.0,
                       "peak_memory_bytes": peak, "peak_memory_kind": kind, "train_shared_from": shared_from,
                       "eval_feature_cache": "hit" if cache_states and set(cache_states) == {"hit"} else
                                             "off" if set(cache_states) <= {"off"} else "miss"},
            "environment": self._env,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _eval_batches(self, entry: MethodEntry, items, fp: str, batch_size: int, progress: str):
        """A factory of evaluation batches for one set, and the feature-cache state (hit, miss, off).

        Methods that prompt the image encoder get image batches. For frozen-encoder methods the
        features are computed at most once per call of this function (inside the first iteration,
        so inside the timed region) or read from the feature cache; calling the factory again
        reuses them (model selection scores every epoch on the same features).
        """
        b = self.backbone
        transform = test_transform(b.image_spec)
        loader = loaders.eval_loader(items, transform, batch_size, workers=self.workers,
                                     pin_memory=b.device.type == "cuda")
        if not entry.cls.frozen_image_encoder:
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
                if key is not None:
                    self.feature_cache.put(key, feats, labels, {"model": b.model_name, "pretrained": b.pretrained,
                                                                "precision": b.precision, "fingerprint": fp,
                                                                "n_images": int(labels.shape[0])})
                held.append((feats, labels))
            return held[0]

        return (lambda: feature_batches(features, batch_size, b.device)), state

    def _first_eval_scorer(self, job: Job, entry: MethodEntry, split: FewShotSplit, pm, module):
        ev, items, classnames, root = next(iter(self.eval_data(job, split)))
        batches, _ = self._eval_batches(entry, items, fingerprint(items, root),
                                        int(job.protocol.spec["eval_batch_size"]), f"select on {ev.key}")
        template = get_dataset(ev.dataset).template
        return lambda: evaluate(pm, job.method, module, batches(), classnames, ev.dataset, template,
                                self.backbone).accuracy

    # ---- trainings shared between protocols -----------------------------------------------------
    def _shared_path(self, key: str) -> Path:
        return self.trained_root / f"{key}.pt"

    def _load_shared(self, key: str | None, module: torch.nn.Module):
        if key is None or not self._shared_path(key).exists():
            return None
        blob = torch.load(self._shared_path(key), map_location=self.backbone.device, weights_only=True)
        module.load_state_dict(blob["state"], strict=True)
        return float(blob["train_seconds"]), int(blob["train_images"]), str(blob["job_id"])

    def _save_shared(self, key: str | None, module: torch.nn.Module, jid: str, seconds: float, images: int) -> None:
        if key is None:
            return
        import os

        self.trained_root.mkdir(parents=True, exist_ok=True)
        path = self._shared_path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        torch.save({"state": state, "job_id": jid, "train_seconds": seconds, "train_images": images}, tmp)
        os.replace(tmp, path)
