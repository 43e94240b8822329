"""The merged results regrouped for reporting: one `Row` per leaderboard row.

A row is (protocol, backbone, shots, method with its recipe overrides), like a leaderboard table
row; it keeps every number the report needs per dataset and seed (accuracy, ECE, per-class
accuracy) and the job-level cost records.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..protocols import Protocol, load_protocol
from .stats import Cells, aggregate, bootstrap, common_seeds, hm, seed_mean

Backbone = tuple[str, str, str]  # model, pretrained, precision


@dataclass
class Row:
    protocol: Protocol
    backbone: Backbone
    shots: int
    method: str
    label: str
    cells: dict[str, dict[int, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    ece: dict[str, dict[int, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    results: list[dict[str, Any]] = field(default_factory=list)

    # ---- declarations (schema v2; v1 results declare nothing) ----
    @property
    def extra_knowledge(self) -> tuple[str, ...]:
        return tuple(sorted({k for r in self.results for k in r["method"].get("extra_knowledge", [])}))

    @property
    def transductive(self) -> bool:
        return any(r["method"].get("transductive", False) for r in self.results)

    @property
    def setting(self) -> str:
        """The declared setting (contract v3); results before it was recorded read as inductive."""
        settings = sorted({r["method"].get("setting", "inductive") for r in self.results})
        return "+".join(settings) if settings else "inductive"

    @property
    def declared(self) -> bool:
        return all("transductive" in r["method"] for r in self.results)

    # ---- protocol numbers ----
    @property
    def names(self) -> list[str]:
        """Table columns: training datasets, or evaluation names for transfer protocols."""
        p = self.protocol
        return p.eval_names if p.task == "transfer" else p.train_datasets

    @property
    def average_names(self) -> list[str]:
        p = self.protocol
        return p.eval_names[1:] if p.task == "transfer" else p.train_datasets

    def seed_cells(self, name: str) -> Mapping[int, Mapping[str, float]]:
        """seed -> metrics of one column (transfer: the source's results, keyed by evaluation name)."""
        if self.protocol.task == "transfer":
            source = self.protocol.train_datasets[0]
            return {s: {"test": m[name]} for s, m in self.cells.get(source, {}).items() if name in m}
        return self.cells.get(name, {})

    @property
    def complete(self) -> bool:
        seeds = set(self.protocol.seeds)
        return all(set(self.seed_cells(n)) >= seeds for n in self.average_names)

    def keys(self) -> list[str]:
        return ["base", "new"] if self.protocol.task == "base2new" else ["test"]

    def cell_stat(self, name: str, seeds: list[int]) -> dict[str, float]:
        """One column's numbers from the given (resampled) seeds: base/new/hm or accuracy."""
        cell = self.seed_cells(name)
        if self.protocol.task == "base2new":
            b, n = seed_mean(cell, "base", seeds), seed_mean(cell, "new", seeds)
            return {"base": b, "new": n, "hm": hm(b, n)}
        return {"accuracy": seed_mean(cell, "test", seeds)}

    def average_stat(self, seeds: list[int]) -> dict[str, float]:
        """The protocol's headline numbers, keyed like reference values (base/new/hm or accuracy)."""
        p = self.protocol
        cells: Cells = self.cells if p.task != "transfer" else {p.train_datasets[0]: self.cells[p.train_datasets[0]]}
        out = aggregate(p.task, cells, self.average_names, seeds)
        return out if p.task == "base2new" else {"accuracy": out["average"]}

    def seeds(self) -> list[int]:
        return common_seeds({n: self.seed_cells(n) for n in self.average_names})

    def average(self) -> dict[str, float] | None:
        return self.average_stat(self.seeds()) if self.complete else None

    def average_interval(self) -> dict[str, tuple[float, float]] | None:
        return bootstrap(self.average_stat, self.seeds()) if self.complete else None

    def cell(self, name: str) -> dict[str, float] | None:
        seeds = sorted(self.seed_cells(name))
        return self.cell_stat(name, seeds) if seeds else None

    def cell_interval(self, name: str) -> dict[str, tuple[float, float]] | None:
        seeds = sorted(self.seed_cells(name))
        return bootstrap(lambda s: self.cell_stat(name, list(s)), seeds) if seeds else None

    def cell_ece(self, name: str) -> dict[str, float] | None:
        """Mean ECE over seeds per metric key of one column, when every seed recorded it."""
        p = self.protocol
        if p.task == "transfer":
            per_seed = [m.get(name) for m in self.ece.get(p.train_datasets[0], {}).values()]
            return {"test": statistics.fmean(per_seed)} if per_seed and None not in per_seed else None
        seeds = self.ece.get(name, {})
        if not seeds or any(set(m) != set(self.keys()) for m in seeds.values()):
            return None
        return {k: statistics.fmean(m[k] for m in seeds.values()) for k in self.keys()}


def row_label(result: Mapping[str, Any]) -> str:
    """The leaderboard's row label: method name, plus the user's overrides for a changed recipe."""
    m = result["method"]
    if m["default_recipe"]:
        return result["job"]["method"]
    return result["job"]["method"] + " [" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(m["overrides"].items())) + "]"


def build_rows(results: Iterable[Mapping[str, Any]]) -> dict[str, list[Row]]:
    """protocol id -> rows (sorted by backbone, shots, label) of already merged results."""
    rows: dict[tuple, Row] = {}
    protocols: dict[str, Protocol] = {}
    for r in results:
        job, b = r["job"], r["backbone"]
        pid = job["protocol"]["id"]
        p = protocols.setdefault(pid, load_protocol(pid))
        backbone = (b["model"], b["pretrained"], b["precision"])
        key = (pid, backbone, job["shots"], row_label(r))
        row = rows.setdefault(key, Row(p, backbone, job["shots"], job["method"], row_label(r)))
        row.cells[job["dataset"]][job["seed"]] = {k: float(v["accuracy"]) for k, v in r["metrics"].items()}
        if all("ece" in v for v in r["metrics"].values()):
            row.ece[job["dataset"]][job["seed"]] = {k: float(v["ece"]) for k, v in r["metrics"].items()}
        row.results.append(dict(r))
    out: dict[str, list[Row]] = defaultdict(list)
    for key in sorted(rows):
        out[key[0]].append(rows[key])
    return dict(out)


__all__ = ["Row", "build_rows", "row_label"]
