"""`benchsuite status`: how far a job grid has come, read from the results folder alone.

Executors coordinate only through the results folder, so its state is the grid's state:
- the grid asked for: `benchsuite run` records its job list and its `--set` overrides as
  `_grids/<protocol>.<digest>.json` (the whole grid, even from one shard); status reports every recorded
  grid under its own overrides (a grid recorded before overrides were recorded counts as the default
  recipe's), or, with `--set`, the grid of those overrides;
- done: a schema-valid result file of the same job identity: protocol (id, version, hash), method,
  dataset, shots, seed, the config hash of the recipe the installed method resolves with the grid's
  overrides, as `run` computes it, and the plugin providing the method (its distribution, and its
  version when the result records one). The job id also covers the backbone's weights and the data's split
  lists; status matches on everything else instead, since those would need the backbone and the
  datasets loaded (a result of another backbone counts as done; `run` would still compute it afresh);
- running: a live claim (`.locks/<job id>.json` beside a lock still held: its process is alive), of the
  same recipe when the claim records its config hash;
- failed: a failure log `_logs/<protocol>/<method>/<dataset>/<shots>shot-seed<seed>.log` newer than
  any claim, and no result;
- missing: everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache
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


#: the key that stands for "every trained method" (an unqualified `--set key=value`) in a grid record
ALL_METHODS = "*"


def overrides_record(overrides: dict[str | None, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """`--set` overrides (typed, as the run used them) in the JSON form a grid record stores."""
    return {ALL_METHODS if m is None else m: dict(entries) for m, entries in (overrides or {}).items() if entries}


def overrides_of(record: dict[str, dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    """The inverse of `overrides_record`."""
    return {None if m == ALL_METHODS else m: dict(entries) for m, entries in record.items()}


def set_flags(record: dict[str, dict[str, Any]]) -> str:
    """The `--set` flags that give these overrides ('' for the default recipe)."""
    pairs = [f"{'' if m == ALL_METHODS else m + '.'}{k}={v if isinstance(v, str) else json.dumps(v)}"
             for m, entries in sorted(record.items()) for k, v in sorted(entries.items())]
    return "--set " + " ".join(pairs) if pairs else ""


def record_grid(results: Path, cells: Iterable[Cell], overrides: dict[str | None, dict[str, Any]] | None = None
                ) -> list[Path]:
    """Record the grid a run was asked for (one file per protocol, job list and `--set` overrides).

    The overrides are stored only when there are some, so a default run records the same file as
    before they were recorded."""
    by_protocol: dict[str, list[list[Any]]] = {}
    for protocol, method, dataset, shots, seed in cells:
        by_protocol.setdefault(protocol, []).append([method, dataset, int(shots), int(seed)])
    extra = {"overrides": overrides_record(overrides)} if overrides_record(overrides) else {}
    written = []
    for protocol, jobs in by_protocol.items():
        text = dump_json({"protocol": protocol, "jobs": sorted(jobs), **extra})
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
    #: `--set` flags of results that exist for missing jobs under another recipe, and how many
    other_recipes: dict[str, int] = field(default_factory=dict)
    unknown: str = ""  #: why the jobs' recipe could not be computed (method not installed, ...)

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


@lru_cache(maxsize=4096)
def _identity(protocol: str, method: str, dataset: str, shots: int, overrides_json: str
              ) -> tuple[str, dict[str, Any], str, tuple[str, str]]:
    """(config hash, changed recipe entries, protocol ref as JSON, (distribution, version) of the
    plugin) of one job, as `run` resolves it.

    Raises BenchsuiteError when it cannot be computed (unknown protocol, method not installed)."""
    from ..engine.recipe import config_hash, declarations, resolve_recipe
    from ..methods import get_method, job_manager
    from ..protocols import load_protocol

    p = load_protocol(protocol)
    entry = get_method(method)
    pm, _ = job_manager(entry)
    default = pm.hook.recipe(protocol=p, dataset=dataset, shots=shots)
    recipe, changed = resolve_recipe(method, default, p.profile, overrides_of(json.loads(overrides_json)),
                                     **declarations(entry.cls))
    return config_hash(method, recipe), changed, json.dumps(p.ref(), sort_keys=True), (entry.source, entry.version)


def _row_label(method: str, changed: dict[str, Any]) -> str:
    """The method, plus the recipe entries the overrides change (as the leaderboard labels rows)."""
    text = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(changed.items()))
    return method + (f" [{text}]" if text else "")


@dataclass(frozen=True)
class _Wanted:
    """One job of a recorded grid under the grid's overrides: its cell and its recipe identity."""

    cell: Cell
    row: str
    chash: str | None  #: None: the recipe could not be computed (see `why`)
    ref: str = ""
    why: str = ""
    changed: str = "{}"  #: the recipe entries the overrides change, as canonical JSON
    plugin: tuple[str, str] = ("", "")  #: (distribution, version) of the installed method


def _recorded_grids(results: Path, protocols: list[str] | None) -> list[tuple[str, str, list[Cell]]]:
    """(protocol, overrides as canonical JSON, cells) of every readable grid record."""
    grids = []
    for path in sorted((results / GRIDS).glob("*.json")):
        data, _ = read_json(path)
        if data is None or (protocols and data.get("protocol") not in protocols):
            continue
        overrides = json.dumps(data.get("overrides") or {}, sort_keys=True)
        cells = [(data["protocol"], m, d, int(k), int(s)) for m, d, k, s in data["jobs"]]
        grids.append((data["protocol"], overrides, cells))
    return grids


def _select(grids: list[tuple[str, str, list[Cell]]], asked: str | None) -> list[tuple[str, list[Cell]]]:
    """(overrides, cells) to report: every grid under its own overrides; with `asked` overrides, per
    protocol the grids recorded with them, else every grid of the protocol under them (what `run`
    with those --set flags would have to compute for the recorded jobs)."""
    if asked is None:
        return [(overrides, cells) for _, overrides, cells in grids]
    out = []
    for protocol in dict.fromkeys(p for p, _, _ in grids):
        same = [cells for p, o, cells in grids if p == protocol and o == asked]
        every = [cells for p, _, cells in grids if p == protocol]
        out += [(asked, cells) for cells in (same or every)]
    return out


def _wanted(grids: list[tuple[str, list[Cell]]]) -> list[_Wanted]:
    """Every job of `grids` with its identity; a job whose recipe cannot be computed here (its method
    is not installed, its protocol unknown, its recipe hook broken) is kept, marked unknown. Overrides
    that `run` would refuse for a job raise the same error."""
    from ..errors import BenchsuiteError, ContractError, ProtocolError

    wanted: dict[tuple[Cell, str | None, str], _Wanted] = {}
    for overrides, cells in grids:
        for cell in cells:
            protocol, method, dataset, shots, _ = cell
            try:
                chash, changed, ref, plugin = _identity(protocol, method, dataset, shots, overrides)
                item = _Wanted(cell, _row_label(method, changed), chash, ref,
                               changed=json.dumps(changed, sort_keys=True, default=str), plugin=plugin)
            except (ContractError, ProtocolError) as exc:
                item = _Wanted(cell, f"{method} [recipe unknown]", None, why=str(exc))
            except BenchsuiteError:
                raise
            except Exception as exc:  # a method's recipe hook with a bug: that row only
                item = _Wanted(cell, f"{method} [recipe unknown]", None,
                               why=f"the recipe hook of {method!r} failed: {type(exc).__name__}: {exc}")
            wanted.setdefault((cell, item.chash, item.row), item)
    return sorted(wanted.values(), key=lambda w: (w.cell[0], w.row, w.cell))


def _results_by_cell(results: Path) -> dict[Cell, list[dict[str, Any]]]:
    """Schema-valid results by cell (protocol, method, dataset, shots, seed)."""
    found: dict[Cell, list[dict[str, Any]]] = {}
    for _, data in ResultStore(results).iter_results(on_error=lambda *_: None):
        if validate_schema(data):
            continue
        job = data["job"]
        cell = (job["protocol"]["id"], job["method"], job["dataset"], int(job["shots"]), int(job["seed"]))
        found.setdefault(cell, []).append(data)
    return found


def _same_plugin(result: dict[str, Any], want: _Wanted) -> bool:
    """The result comes from the installed plugin (its version when the result records one)."""
    source, version = want.plugin
    return result["method"]["source"] == source and result["method"].get("version", version) == version


def _matches(result: dict[str, Any], want: _Wanted) -> bool:
    return (result["method"]["config_hash"] == want.chash and _same_plugin(result, want)
            and json.dumps(result["job"]["protocol"], sort_keys=True) == want.ref)


def _claims(results: Path) -> tuple[dict[Cell, set[str | None]], dict[Cell, float]]:
    """Live claims by cell (with the config hash each records, None when it records none), and the
    time of the latest claim of each cell."""
    running: dict[Cell, set[str | None]] = {}
    claim_times: dict[Cell, float] = {}
    for info_path in (results / LOCK_DIR).glob("*.json"):
        info, _ = read_json(info_path)
        if not info or "protocol" not in info:
            continue
        cell = (info["protocol"], info["method"], info["dataset"], int(info["shots"]), int(info["seed"]))
        claim_times[cell] = info_path.stat().st_mtime
        if _claim_alive(info_path.with_suffix(".lock"), info):
            running.setdefault(cell, set()).add(info.get("config_hash"))
    return running, claim_times


def grid_status(results: Path, protocols: list[str] | None = None,
                overrides: dict[str | None, dict[str, Any]] | None = None) -> dict[tuple[str, str], MethodStatus]:
    """Per (protocol, row): done, running, failed and missing jobs of the recorded grids.

    A row is a method under one recipe: its name, plus the entries a grid's `--set` overrides change
    (`coop [epochs=1]`). Without `overrides` every recorded grid is reported under its own overrides;
    with them (typed, as `run` types `--set`), only the grid of those overrides. A result counts as
    done only for the job of its own recipe: results of a `--set` run never complete the default grid.
    """
    results = Path(results)
    asked = None if overrides is None else json.dumps(overrides_record(overrides), sort_keys=True)
    wanted = _wanted(_select(_recorded_grids(results, protocols), asked))
    found = _results_by_cell(results)
    running, claim_times = _claims(results)
    out: dict[tuple[str, str], MethodStatus] = {}
    for want in wanted:
        cell = want.cell
        status = out.setdefault((cell[0], want.row), MethodStatus())
        status.unknown = status.unknown or want.why
        claims = running.get(cell, set())
        log = failure_log(results, *cell)
        if any(_matches(r, want) for r in found.get(cell, [])):
            status.done += 1
        elif want.chash is not None and (None in claims or want.chash in claims):
            status.running.append(_label(cell))
        elif log.exists() and log.stat().st_mtime >= claim_times.get(cell, 0.0):
            status.failed.append((_label(cell), log))
        else:
            status.missing.append(_label(cell))
            for other in found.get(cell, []):
                why = _other_reason(other, want)
                status.other_recipes[why] = status.other_recipes.get(why, 0) + 1
    return out


def _other_reason(result: dict[str, Any], want: _Wanted) -> str:
    """Why a result of a missing job's cell does not count for it, with the command to ask about it."""
    if result["method"]["config_hash"] == want.chash and not _same_plugin(result, want):
        m = result["method"]
        return (f"a result of {m['source']} {m.get('version', '')}".rstrip() + f", not of the installed "
                f"{want.plugin[0]} {want.plugin[1]}".rstrip() + ": rerun the job")
    if result["method"]["config_hash"] == want.chash:
        return f"a result under another version of protocol {want.cell[0]} (its hash differs): rerun the job"
    recorded = dict(result["method"].get("overrides") or {})
    if json.dumps(recorded, sort_keys=True, default=str) == want.changed:
        return ("a result of the same overrides under another recipe of the method (the installed method's "
                "recipe changed since): rerun the job")
    flags = set_flags({result["job"]["method"]: recorded})
    where = f"`{flags}`" if flags else "the default recipe"
    return f"a result under {where}, which does not count here; ask about that grid with " \
           f"`{('benchsuite status ' + flags).strip()}`"


def format_status(table: dict[tuple[str, str], MethodStatus]) -> str:
    from tabulate import tabulate

    rows = [(p, m, s.done, len(s.running), len(s.failed), len(s.missing), s.total) for (p, m), s in table.items()]
    lines = [tabulate(rows, headers=["protocol", "method", "done", "running", "failed", "missing", "total"])]
    for status in table.values():
        lines += [f"  failed: {job} (log: {log})" for job, log in status.failed]
    lines += _missing_lines(table)
    return "\n".join(lines)


def _missing_lines(table: dict[tuple[str, str], MethodStatus], limit: int = 20) -> list[str]:
    """The missing jobs (the first `limit`), and why a row's jobs may look missing."""
    missing = [(row, job) for (_, row), s in table.items() for job in s.missing]
    lines = [f"  missing: {job}" + (f" [{row.split(' ', 1)[1][1:-1]}]" if " " in row else "")
             for row, job in missing[:limit]]
    if len(missing) > limit:
        lines.append(f"  ... and {len(missing) - limit} more missing job(s)")
    for (protocol, row), s in table.items():
        if s.unknown:
            lines.append(f"  note: {protocol} {row}: {s.unknown}")
        for why, count in sorted(s.other_recipes.items()):
            lines.append(f"  note: {protocol} {row}: {count} missing job(s) have {why}")
    return lines


def not_done(results: Path, cells: Iterable[Cell], overrides: dict[str | None, dict[str, Any]] | None = None
             ) -> list[str]:
    """Labels of the jobs with no result of their recipe identity in `results` (the cheap test of
    `grid_status`, without backbone or datasets; the exact job id is checked by the runner)."""
    record = json.dumps(overrides_record(overrides), sort_keys=True)
    found = _results_by_cell(Path(results))
    return [_label(w.cell) for w in _wanted([(record, list(cells))])
            if not any(_matches(r, w) for r in found.get(w.cell, []))]


def typed_overrides(results: Path, protocols: list[str] | None, pairs: list[str]) -> dict[str | None, dict[str, Any]]:
    """`status --set` pairs checked and typed exactly as `run --set` types them, against the recipes
    of the installed methods of the recorded grids (a typo is the same one-line error as in `run`)."""
    from ..engine.jobs import Job
    from ..engine.preflight import resolved_recipes
    from ..engine.recipe import parse_overrides, validate_overrides
    from ..methods import discover
    from ..protocols import load_protocol

    installed = discover()
    jobs = [Job(load_protocol(p), m, d, k, s) for p, _, cells in _recorded_grids(Path(results), protocols)
            for (p, m, d, k, s) in cells if m in installed]
    return validate_overrides(parse_overrides(pairs), resolved_recipes(jobs))


def is_complete(table: dict[tuple[str, str], MethodStatus]) -> bool:
    return bool(table) and all(s.done == s.total for s in table.values())


__all__ = ["MethodStatus", "failure_log", "format_status", "grid_status", "is_complete", "not_done", "overrides_of",
           "overrides_record", "record_grid", "set_flags", "typed_overrides"]
