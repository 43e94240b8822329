"""`benchsuite status`: how far a job grid has come, read from the results folder alone.

Executors coordinate only through the results folder, so its state is the grid's state:
- the grid asked for: `benchsuite run` records its job list as `_grids/<protocol>.<digest>.json` (the whole
  grid, even from one shard), and status reports against the union of those lists;
- done: a schema-valid result file of that (method, dataset, shots, seed);
- running: a live claim (`.locks/<job id>.json` beside a lock still held: its process is alive);
- failed: a failure log `_logs/<protocol>/<method>/<dataset>/<shots>shot-seed<seed>.log` newer than
  any claim, and no result;
- missing: everything else.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .schema import validate_schema
from .store import LOCK_DIR, ResultStore, atomic_write_text, dump_json, read_json

GRIDS = "_grids"
LOGS = "_logs"

Cell = tuple[str, str, str, int, int]  # protocol, method, dataset, shots, seed


def failure_log(results: Path, protocol: str, method: str, dataset: str, shots: int, seed: int) -> Path:
    """Where an executor writes the traceback of a job's last failure."""
    return Path(results) / LOGS / protocol / method / dataset / f"{shots}shot-seed{seed}.log"


def record_grid(results: Path, cells: Iterable[Cell]) -> list[Path]:
    """Record the grid a run was asked for (one file per protocol and distinct job list)."""
    by_protocol: dict[str, list[list[Any]]] = {}
    for protocol, method, dataset, shots, seed in cells:
        by_protocol.setdefault(protocol, []).append([method, dataset, int(shots), int(seed)])
    written = []
    for protocol, jobs in by_protocol.items():
        text = dump_json({"protocol": protocol, "jobs": sorted(jobs)})
        # flat: no folder named after the protocol outside the protocol's own result folder
        path = Path(results) / GRIDS / f"{protocol}.{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if not path.exists():
            atomic_write_text(path, text)
        written.append(path)
    return written


@dataclass
class MethodStatus:
    done: int = 0
    running: list[str] = field(default_factory=list)
    failed: list[tuple[str, Path]] = field(default_factory=list)  # (job, log of its last failure)
    missing: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.done + len(self.running) + len(self.failed) + len(self.missing)


def _label(cell: Cell) -> str:
    protocol, method, dataset, shots, seed = cell
    return f"{protocol}/{method}/{dataset}/{shots}shot/seed{seed}"


def _claim_alive(lock: Path, info: dict[str, Any]) -> bool:
    """On this host, the claiming process must still exist; elsewhere, trust the claim file (it is
    removed when the claim ends; a claim left by a killed process on another host reads as running)."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return lock.exists()
    return True


def grid_status(results: Path, protocols: list[str] | None = None) -> dict[tuple[str, str], MethodStatus]:
    """Per (protocol, method): done, running, failed and missing jobs of the recorded grids."""
    results = Path(results)
    wanted: set[Cell] = set()
    for path in sorted((results / GRIDS).glob("*.json")):
        data, _ = read_json(path)
        if data is None or (protocols and data.get("protocol") not in protocols):
            continue
        wanted.update((data["protocol"], m, d, int(k), int(s)) for m, d, k, s in data["jobs"])
    done: set[Cell] = set()
    for _, data in ResultStore(results).iter_results(on_error=lambda *_: None):
        if validate_schema(data):
            continue
        job = data["job"]
        done.add((job["protocol"]["id"], job["method"], job["dataset"], int(job["shots"]), int(job["seed"])))
    running: set[Cell] = set()
    claim_times: dict[Cell, float] = {}
    for info_path in (results / LOCK_DIR).glob("*.json"):
        info, _ = read_json(info_path)
        if not info or "protocol" not in info:
            continue
        cell = (info["protocol"], info["method"], info["dataset"], int(info["shots"]), int(info["seed"]))
        claim_times[cell] = info_path.stat().st_mtime
        if _claim_alive(info_path.with_suffix(".lock"), info):
            running.add(cell)
    out: dict[tuple[str, str], MethodStatus] = {}
    for cell in sorted(wanted):
        status = out.setdefault((cell[0], cell[1]), MethodStatus())
        log = failure_log(results, *cell)
        if cell in done:
            status.done += 1
        elif cell in running:
            status.running.append(_label(cell))
        elif log.exists() and log.stat().st_mtime >= claim_times.get(cell, 0.0):
            status.failed.append((_label(cell), log))
        else:
            status.missing.append(_label(cell))
    return out


def format_status(table: dict[tuple[str, str], MethodStatus]) -> str:
    from tabulate import tabulate

    rows = [(p, m, s.done, len(s.running), len(s.failed), len(s.missing), s.total) for (p, m), s in table.items()]
    lines = [tabulate(rows, headers=["protocol", "method", "done", "running", "failed", "missing", "total"])]
    for status in table.values():
        lines += [f"  failed: {job} (log: {log})" for job, log in status.failed]
    return "\n".join(lines)


def is_complete(table: dict[tuple[str, str], MethodStatus]) -> bool:
    return bool(table) and all(s.done == s.total for s in table.values())


__all__ = ["MethodStatus", "failure_log", "format_status", "grid_status", "is_complete", "record_grid"]
