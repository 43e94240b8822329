"""The job grid. One job = (protocol, method, training dataset, shots, seed) and one result file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

from ..data.stream import STREAM_VERSION
from ..errors import BenchsuiteError
from ..protocols import Protocol
from ..suggest import did_you_mean


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation of a job: metric key, dataset, and which class subset of its test split."""

    key: str
    dataset: str
    classes: str  # "all" | "base" | "new"


@dataclass(frozen=True)
class Job:
    protocol: Protocol
    method: str
    dataset: str
    shots: int
    seed: int

    @property
    def train_classes(self) -> str:
        return "base" if self.protocol.task == "base2new" else "all"

    def evals(self) -> list[EvalSpec]:
        task = self.protocol.task
        if task == "base2new":
            return [EvalSpec("base", self.dataset, "base"), EvalSpec("new", self.dataset, "new")]
        if task == "transfer":
            return [EvalSpec(name, name, "all") for name in self.protocol.eval_names]
        return [EvalSpec("test", self.dataset, "all")]

    def label(self) -> str:
        return f"{self.protocol.id}/{self.method}/{self.dataset}/{self.shots}shot/seed{self.seed}"


def job_id(job: Job, config_hash: str, backbone: dict[str, Any], data: str, *, plugin: tuple[str, str]) -> str:
    """Identity of a job's result: everything that must match for a result to be reused, including
    `data`, a digest of the split lists of every dataset the job reads (changed data, new job), and
    `plugin`, the (distribution, version) providing the method: after a plugin upgrade its jobs
    run again instead of silently reusing results of the old code; and the augmentation stream's
    version (a result drawn from another stream is another run)."""
    key = {
        "protocol": job.protocol.ref(), "method": job.method, "config_hash": config_hash,
        "dataset": job.dataset, "shots": job.shots, "seed": job.seed, "data": data,
        "backbone": {k: backbone[k] for k in ("model", "pretrained", "weights_sha256", "precision")},
        "plugin": {"distribution": plugin[0], "version": plugin[1]},
        "augmentation_stream": STREAM_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _choose(requested: list[str] | None, available: list[str], what: str, protocol: Protocol) -> list[str]:
    if not requested or requested == ["all"]:
        return list(available)
    unknown = [r for r in requested if r not in available]
    if unknown:
        hint = did_you_mean(unknown[0], available) if len(unknown) == 1 else ""
        raise BenchsuiteError(f"{what} {', '.join(unknown)} not in protocol {protocol.id!r}{hint}; "
                              f"choose from: {', '.join(map(str, available))} (or 'all')")
    return list(dict.fromkeys(requested))


def expand_grid(protocol: Protocol, methods: list[str], datasets: list[str] | None = None,
                seeds: Iterable[int] | None = None, shots: Iterable[int] | None = None) -> list[Job]:
    """All jobs of a protocol, ordered so that jobs sharing data and backbone run together."""
    chosen_datasets = _choose(datasets, protocol.train_datasets, "dataset", protocol)
    chosen_seeds = [int(s) for s in _choose([str(s) for s in seeds] if seeds else None,
                                            [str(s) for s in protocol.seeds], "seed", protocol)]
    chosen_shots = [int(k) for k in _choose([str(k) for k in shots] if shots else None,
                                            [str(k) for k in protocol.shots], "shots", protocol)]
    return [Job(protocol, m, d, k, s)
            for d in chosen_datasets for k in chosen_shots for s in chosen_seeds for m in methods]
