"""The text `benchsuite plan` prints: a table per method, the total in device-hours, and where every
figure came from (measured now, cached, a bench JSON, or borrowed from the nearest shape)."""

from __future__ import annotations

import math
from collections import Counter

from tabulate import tabulate

from .estimate import JobCost, MethodRow, shape_of


def hours(seconds: float | None) -> str:
    """Device-hours to three significant digits (at least two decimals), '?' when unknown."""
    if seconds is None:
        return "?"
    h = seconds / 3600.0
    if h == 0:
        return "0"
    return f"{h:.{max(2, 2 - math.floor(math.log10(h)))}f}"


def duration(seconds: float) -> str:
    """A human reading of a duration."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def table(rows: list[MethodRow]) -> str:
    body = [(r.method, r.jobs, r.to_run, r.reused, r.trainings, hours(r.train_s), hours(r.eval_s), hours(r.total_s))
            for r in rows]
    total = MethodRow("total")
    for r in rows:
        total.jobs, total.to_run, total.reused = total.jobs + r.jobs, total.to_run + r.to_run, total.reused + r.reused
        total.trainings += r.trainings
        if r.train_s is None or total.train_s is None:
            total.train_s = total.eval_s = None
        else:
            total.train_s += r.train_s
            total.eval_s += r.eval_s
    body.append(("total", total.jobs, total.to_run, total.reused, total.trainings, hours(total.train_s),
                 hours(total.eval_s), hours(total.total_s)))
    return tabulate(body, headers=["method", "jobs", "to run", "reused", "trainings", "est. train h", "est. eval h",
                                   "est. total h"], disable_numparse=True, colalign=("left",) + ("right",) * 7)


def figure_notes(costs: list[JobCost], context: str, measure_hint: str) -> list[str]:
    """One line per method: how many of its shapes' figures were measured now, cached, read from a
    bench JSON or borrowed from another shape, and the fix when it has none (`measure_hint`, with
    {method} filled in)."""
    per: dict[str, Counter] = {}
    borrowed: dict[str, list[str]] = {}
    oldest: dict[str, str] = {}  #: the earliest measurement among a method's cached figures
    missing: list[str] = []
    seen: set = set()
    for cost in costs:
        if cost.reused:
            continue
        shape = shape_of(cost.work)
        if shape in seen:  # a shape's figure is the same in every job of it
            continue
        seen.add(shape)
        method = shape.method
        if cost.figure is None:
            if method not in missing:
                missing.append(method)
            continue
        per.setdefault(method, Counter())[cost.figure.source] += 1
        if cost.figure.source == "cached" and cost.figure.measured_at:
            oldest[method] = min(oldest.get(method, cost.figure.measured_at), cost.figure.measured_at)
        if cost.figure.shape != shape:
            borrowed.setdefault(method, []).append(f"{shape.describe()} from {cost.figure.shape.describe()}")
    lines = [f"figures ({context}; ms/image of `benchsuite bench` per method and shape):"] if per or missing else []
    for method, counts in per.items():
        parts = [f"{n} {source}" + (f" (measured {oldest[method]}{' or later' if n > 1 else ''})"
                                     if source == "cached" and method in oldest else "")
                 for source, n in counts.items()]
        text = f"  {method}: " + ", ".join(parts)
        if method in borrowed:
            text += f"; {len(borrowed[method])} borrowed from the nearest shape measured ({borrowed[method][0]}" \
                    + (", ..." if len(borrowed[method]) > 1 else "") + "; --measure times them)"
        lines.append(text)
    for method in missing:
        lines.append(f"  {method}: no figure; {measure_hint.format(method=method)}")
    return lines


def training_notes(costs: list[JobCost], results: str) -> list[str]:
    shared = sum(c.training == "shared" for c in costs)
    saved = sum(c.training == "saved" for c in costs)
    lines = []
    if shared:
        lines.append(f"shared trainings: {shared} job(s) reuse the training of another job of this plan "
                     f"(transfer protocols train once on the source dataset)")
    if saved:
        lines.append(f"saved trainings: {saved} job(s) reuse a training saved in {results}/_trained")
    return lines
