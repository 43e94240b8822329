"""Markdown blocks the leaderboard adds to each protocol section.

Seed statistics (`--std`), measured-minus-reported deltas with their flag, calibration
(`--calibration`), cost (`--cost`), method declarations and the reported rows. The flag rule
(README, "Reported numbers"): a measured cell is flagged when the published number lies outside
the cell's 95% seed-bootstrap interval (`report.stats`), widened by 0.005 on each side because
published numbers are rounded to two decimals.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from tabulate import tabulate

from ..protocols import Protocol
from .model import Row
from .reference import Reference
from .stats import seed_hms, seed_std

DASH = "–"
FLAG = "⚑"
UNCONFIRMED = "‡"
ROUNDING = 0.005


@dataclass(frozen=True)
class Options:
    """Which optional tables the leaderboard shows."""

    std: bool = False
    calibration: bool = False
    cost: bool = False


def _f(x: float) -> str:
    return f"{x:.2f}"


def _title(name: str) -> str:
    """Display title from the dataset registry (plugins included) when available, else the name."""
    from ..errors import BenchsuiteError

    try:
        from ..data.registry import get_dataset

        return str(get_dataset(name).title)
    except (ImportError, KeyError, AttributeError, TypeError, BenchsuiteError):
        return name


class _Escaped(str):
    """Text already escaped for a markdown cell."""


def _user(text: str) -> _Escaped:
    """A string from a result file (a row label, a device name), escaped like the leaderboard's own
    cells: no HTML, links, code spans or table breaks."""
    from ..leaderboard import _cell_text  # lazy: the leaderboard imports this module

    return _Escaped(_cell_text(text))


def _esc(text: str) -> str:
    if isinstance(text, _Escaped):
        return text
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(headers: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    return tabulate([[_esc(c) for c in r] for r in body], headers=[_esc(h) for h in headers], tablefmt="github",
                    disable_numparse=True) + "\n"


def _parts(p: Protocol, values: dict[str, float], fmt: Callable[[str, float], str]) -> str:
    keys = ["base", "new", "hm"] if p.task == "base2new" else ["accuracy"]
    return " / ".join(fmt(k, values[k]) for k in keys)


def declaration_suffix(extra: Sequence[str], transductive: bool, setting: str = "inductive") -> str:
    """What a row's label carries so extra knowledge, transduction or a non-inductive setting
    (Method.setting: teacher-distilled, external-text) is never ranked silently."""
    marks = [f"extra knowledge: {', '.join(extra)}"] if extra else []
    marks += ["transductive"] if transductive or setting == "transductive" else []
    marks += [setting] if setting not in ("inductive", "transductive") else []
    return f" [{'; '.join(marks)}]" if marks else ""


def primary_reference(row: Row, refs: Sequence[Reference]) -> Reference | None:
    model, pretrained, _ = row.backbone
    for r in refs:
        if (r.primary and r.method == row.method and r.protocol == row.protocol.id and r.model == model
                and r.pretrained == pretrained and r.shots == row.shots and row.label == row.method):
            return r
    return None


def _headers(p: Protocol, first: str, names: Sequence[str], *extra: str) -> list[str]:
    return [first, *(_title(n) for n in names), "Average", *extra]


def _std_cell(row: Row, name: str) -> str:
    cell, seeds = row.cell(name), row.seed_cells(name)
    if cell is None:
        return DASH
    if row.protocol.task == "base2new":
        hms = seed_hms(seeds)
        sd = {"base": seed_std(seeds, "base"), "new": seed_std(seeds, "new"),
              "hm": statistics.stdev(hms) if len(hms) > 1 else None}
    else:
        sd = {"accuracy": seed_std(seeds, "test")}
    return _parts(row.protocol, cell, lambda k, v: _f(v) + (f" ± {_f(sd[k])}" if sd[k] is not None else ""))


def _interval_cell(p: Protocol, values: dict[str, float] | None, ci: dict[str, tuple[float, float]] | None) -> str:
    if values is None or ci is None:
        return DASH
    return _parts(p, values, lambda k, v: f"{_f(v)} [{_f(ci[k][0])}, {_f(ci[k][1])}]")


def std_table(p: Protocol, rows: Sequence[Row]) -> str:
    body = [[_user(r.label), *(_std_cell(r, n) for n in r.names), _interval_cell(p, r.average(), r.average_interval())]
            for r in rows]
    return _table(_headers(p, "Method", rows[0].names), body)


def _delta(p: Protocol, measured: dict[str, float] | None, ci: dict[str, tuple[float, float]] | None,
           published: dict[str, float] | None) -> str:
    if measured is None or ci is None or published is None:
        return DASH

    def one(k: str, v: float) -> str:
        ref = published[k]
        out = f"{v - ref:+.2f}".replace("-", "−")
        return out + (FLAG if not ci[k][0] - ROUNDING <= ref <= ci[k][1] + ROUNDING else "")

    return _parts(p, measured, one)


def delta_table(p: Protocol, rows: Sequence[Row], refs: Sequence[Reference]) -> str | None:
    body = []
    for r in rows:
        ref = primary_reference(r, refs)
        if ref is None:
            continue
        cells = [_delta(p, r.cell(n), r.cell_interval(n), ref.values.get(n)) for n in r.names]
        body.append([_user(f"{r.label} − {ref.label}"), *cells, _delta(p, r.average(), r.average_interval(), ref.values["average"])])
    return _table(_headers(p, "Measured − reported", rows[0].names), body) if body else None


def calibration_table(p: Protocol, rows: Sequence[Row]) -> str:
    body = []
    for r in rows:
        cells = [r.cell_ece(n) for n in r.names]
        text = [DASH if c is None else " / ".join(_f(c[k]) for k in r.keys()) for c in cells]
        avg_cells = [r.cell_ece(n) for n in r.average_names]
        if any(c is None for c in avg_cells):
            avg = DASH
        else:
            avg = " / ".join(_f(statistics.fmean(c[k] for c in avg_cells)) for k in r.keys())  # type: ignore[index]
        body.append([_user(r.label), *text, avg])
    return _table(_headers(p, "Method", rows[0].names), body)


def cost_values(row: Row) -> dict[str, object]:
    """A row's cost: trainable parameters, summed training time of the trainings it ran (a shared
    training counts once, where it ran), mean ms per training image (a job reusing a shared training
    carries that training's speed) and evaluation images/s, peak memory."""
    res = row.results
    params = sorted({r["method"]["trainable_params"] for r in res})
    trained = [r["timing"] for r in res if r["timing"]["train_images"] > 0]
    own = [t for t in trained if t["train_shared_from"] is None]
    peak = max(r["timing"]["peak_memory_bytes"] for r in res)
    kinds = sorted({r["timing"]["peak_memory_kind"] for r in res})
    devices = sorted({r["backbone"].get("device_name") or r["backbone"]["device"] for r in res})
    return {
        "params": params,
        "train_seconds": sum(t["train_seconds"] for t in own),
        "train_ms_per_image": statistics.fmean(t["train_ms_per_image"] for t in trained) if trained else None,
        "eval_images_per_second": statistics.fmean(r["timing"]["eval_images_per_second"] for r in res),
        "peak_mib": peak / 2 ** 20, "peak_kind": kinds, "devices": devices,
    }


def cost_table(rows: Sequence[Row]) -> str:
    body = []
    for r in rows:
        c = cost_values(r)
        params = c["params"]
        ms = c["train_ms_per_image"]
        body.append([_user(r.label), f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}{DASH}{params[-1]:,}",  # type: ignore[index]
                     f"{c['train_seconds']:.1f}", DASH if ms is None else f"{ms:.2f}",
                     f"{c['eval_images_per_second']:.1f}", f"{c['peak_mib']:.0f} ({', '.join(c['peak_kind'])})",  # type: ignore[arg-type]
                     _user(", ".join(c["devices"]))])  # type: ignore[arg-type]
    return _table(["Method", "Trainable params", "Train time (s, sum)", "ms / train image", "Eval images/s",
                   "Peak memory (MiB)", "Device"], body)


def _reported_cell(p: Protocol, ref: Reference, key: str) -> str:
    values = ref.values.get(key)
    if values is None:
        return DASH
    return _parts(p, values, lambda k, v: _f(v)) + (UNCONFIRMED if key in ref.unconfirmed else "")


def reported_table(p: Protocol, refs: Sequence[Reference]) -> str:
    names = p.eval_names if p.task == "transfer" else p.train_datasets
    body = []
    for r in refs:
        source = r.source + (f" ({r.note})" if r.note else "")
        body.append([f"{r.label} (reported)" + declaration_suffix(r.extra_knowledge, r.transductive,
                                                                       getattr(r, "setting", "inductive")),
                     *(_reported_cell(p, r, n) for n in names), _reported_cell(p, r, "average"), r.seeds, source])
    return _table(_headers(p, "Method", names, "Seeds", "Source"), body)


def protocol_blocks(p: Protocol, rows: Sequence[Row], refs: Sequence[Reference], opts: Options) -> list[str]:
    """The markdown blocks after a protocol's measured tables (rows of one protocol, any backbone)."""
    out: list[str] = []
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.backbone, r.shots), []).append(r)
    per_shot = p.task == "few_shot" or len(p.shots) > 1
    for (backbone, shots), group in sorted(groups.items()):
        where = " · ".join(backbone) + (f", {shots} shots" if per_shot else "")
        if opts.std:
            out.append(f"#### Seed statistics: {where}\n")
            out.append("Cells are mean ± sample std over seeds (a dataset's HM: the std of the per-seed HMs); "
                       "Average cells add the 95% seed-bootstrap interval [low, high].\n")
            out.append(std_table(p, group))
        deltas = delta_table(p, group, refs)
        if deltas:
            out.append(f"#### Measured − reported: {where}\n")
            out.append(f"{FLAG} marks a published number outside the cell's 95% seed-bootstrap interval.\n")
            out.append(deltas)
        if opts.calibration:
            out.append(f"#### Calibration: {where}\n")
            out.append("Expected calibration error (%, 15 equal-width bins of the top-1 softmax confidence), "
                       "mean over seeds" + (" (Base / New)" if p.task == "base2new" else "") + ".\n")
            out.append(calibration_table(p, group))
        if opts.cost:
            out.append(f"#### Cost: {where}\n")
            out.append(cost_table(group))
    mine: dict[tuple, list[Reference]] = {}
    for r in refs:
        if r.protocol == p.id:
            mine.setdefault((r.model, r.pretrained, r.shots), []).append(r)
    for (model, pretrained, shots), group in sorted(mine.items()):
        out.append(f"### Reported: {model} · {pretrained}, {shots} shots (published numbers, not measured by benchsuite)\n")
        out.append(f"{UNCONFIRMED} marks a value the sources could not confirm (carried from the spec). "
                   "Reported rows are listed apart and never merged into measured tables.\n")
        out.append(reported_table(p, group))
    return out


__all__ = ["FLAG", "Options", "UNCONFIRMED", "declaration_suffix", "primary_reference", "protocol_blocks"]
