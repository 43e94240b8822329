"""Leaderboard plots: their data (what `--check` compares) and their deterministic rendering.

Each plot is first a `Plot`, a plain-data description (series of points, bands, labels), built
from the merged rows and the reported numbers; `render` draws it with matplotlib's Agg backend,
a fixed font (DejaVu Sans, shipped with matplotlib), fixed size and dpi and no time or version
metadata, so the same data gives the same PNG on the same matplotlib. CI compares the data, not
the pixels.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import writing
from ..protocols import Protocol, load_protocol
from ..results.store import atomic_write_text
from .markdown import cost_values
from .model import Row
from .reference import Reference


@dataclass
class Series:
    label: str
    points: list[list[float]]                 #: [x, y] pairs
    band: list[list[float]] = field(default_factory=list)  #: [x, low, high] triples (seed spread)
    reported: bool = False                    #: published numbers (hollow markers)


@dataclass
class Panel:
    title: str
    series: list[Series]


@dataclass
class Plot:
    name: str          #: file stem
    protocol: str
    kind: str          #: base_new | few_shot | cost
    title: str
    x_label: str
    y_label: str
    panels: list[Panel]
    machine_dependent: list[str] = field(default_factory=list)  #: coordinates --check --tolerance skips

    def data(self) -> dict[str, Any]:
        return asdict(self)


def _title(name: str) -> str:
    from .markdown import _title as title

    return title(name)


def _round(x: float) -> float:
    return round(float(x), 4)


def _base_new(p: Protocol, rows: Sequence[Row], refs: Sequence[Reference]) -> Plot | None:
    rows = [r for r in rows if r.shots == max(p.shots)]
    refs = [r for r in refs if r.protocol == p.id and r.primary]
    panels = []
    for key in ["average", *p.train_datasets]:
        series = []
        for r in rows:
            value = r.average() if key == "average" else r.cell(key)
            if value is not None:
                series.append(Series(f"{r.label} ({r.backbone[0]})", [[_round(value["base"]), _round(value["new"])]]))
        for ref in refs:
            if key in ref.values:
                v = ref.values[key]
                series.append(Series(f"{ref.label} (reported)", [[v["base"], v["new"]]], reported=True))
        if series:
            panels.append(Panel("Average" if key == "average" else _title(key), series))
    if not panels:
        return None
    return Plot(f"{p.id}-base-new", p.id, "base_new", f"{p.spec.get('title', p.id)}: base vs new accuracy",
                "Base accuracy (%)", "New accuracy (%)", panels)


def _few_shot(p: Protocol, rows: Sequence[Row]) -> Plot | None:
    by_label: dict[str, dict[int, Row]] = {}
    for r in rows:
        by_label.setdefault(f"{r.label} ({r.backbone[0]})", {})[r.shots] = r
    if not by_label:
        return None
    panels = []
    for key in ["average", *p.train_datasets]:
        series = []
        for label, per_shot in sorted(by_label.items()):
            points, band = [], []
            for k, r in sorted(per_shot.items()):
                if key == "average":
                    if not r.complete:
                        continue
                    seeds = r.seeds()
                    per_seed = [r.average_stat([s])["accuracy"] for s in seeds]
                else:
                    per_seed = [m["test"] for m in r.seed_cells(key).values()]
                if not per_seed:
                    continue
                mean = statistics.fmean(per_seed)
                sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                points.append([k, _round(mean)])
                band.append([k, _round(mean - sd), _round(mean + sd)])
            if points:
                series.append(Series(label, points, band))
        if series:
            panels.append(Panel("Average" if key == "average" else _title(key), series))
    return Plot(f"{p.id}-shots", p.id, "few_shot", f"{p.spec.get('title', p.id)}: accuracy vs shots (band: ± 1 std over seeds)",
                "Labelled images per class (log scale)", "Top-1 accuracy (%)", panels)


def _cost(p: Protocol, rows: Sequence[Row]) -> Plot | None:
    rows = [r for r in rows if r.shots == max(p.shots) and r.complete]
    series = []
    for r in rows:
        avg = r.average()
        ms = cost_values(r)["train_ms_per_image"]
        y = avg["hm"] if p.task == "base2new" else avg["accuracy"]  # type: ignore[index]
        series.append(Series(f"{r.label} ({r.backbone[0]})", [[_round(ms or 0.0), _round(y)]]))
    if not series:
        return None
    what = "HM" if p.task == "base2new" else "average accuracy"
    shots = f" ({max(p.shots)} shots)" if len(p.shots) > 1 else ""
    return Plot(f"{p.id}-cost", p.id, "cost", f"{p.spec.get('title', p.id)}: {what} vs training cost{shots}",
                "Training cost (ms per training image; 0 = no training)", f"{what[0].upper()}{what[1:]} (%)",
                [Panel("Average", series)], machine_dependent=["x"])


def plan(rows_by_protocol: dict[str, list[Row]], refs: Sequence[Reference]) -> list[Plot]:
    """Every plot of a leaderboard, in a fixed order."""
    plots = []
    pids = sorted(set(rows_by_protocol) | {r.protocol for r in refs})
    for pid in pids:
        p = load_protocol(pid)
        rows = rows_by_protocol.get(pid, [])
        if p.task == "base2new":
            plots.append(_base_new(p, rows, refs))
        if p.task == "few_shot":
            plots.append(_few_shot(p, rows))
        plots.append(_cost(p, rows))
    return [pl for pl in plots if pl is not None]


# ----------------------------------------------------------------------------- rendering

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def _style(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A stable colour and marker per method (by the method part of the label)."""
    methods = sorted({label.split(" (")[0] for label in labels})
    return {m: (_COLORS[i % len(_COLORS)], _MARKERS[(i // len(_COLORS)) % len(_MARKERS)]) for i, m in enumerate(methods)}


def render(plot: Plot, path: Path) -> None:
    """Draw `plot` to a PNG at `path` deterministically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 8, "svg.hashsalt": "benchsuite",
                                "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": 100}):
        n = len(plot.panels)
        cols = 3 if n in (5, 6, 9) else min(n, 4)
        rows = math.ceil(n / cols)
        legend_w, panel_w, panel_h = 2.6, 3.0, 2.9
        width, height = panel_w * cols + legend_w + 0.85, panel_h * rows + 1.0
        fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
        labels = [s.label for panel in plot.panels for s in panel.series]
        style = _style(labels)
        handles: dict[str, Any] = {}
        for ax, panel in zip(axes.flat, plot.panels):
            _draw_panel(ax, plot, panel, style, handles)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.subplots_adjust(left=0.85 / width, right=1 - (legend_w + 0.1) / width, bottom=0.55 / height,
                            top=1 - 0.75 / height, wspace=0.35, hspace=0.45)
        fig.suptitle(plot.title, fontsize=10)
        fig.supxlabel(plot.x_label, fontsize=8, x=(0.85 / width + 1 - (legend_w + 0.1) / width) / 2)
        fig.supylabel(plot.y_label, fontsize=8)
        fig.legend(list(handles.values()), list(handles), loc="center left", frameon=False,
                   bbox_to_anchor=(1 - legend_w / width, 0.5))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)


def _draw_panel(ax, plot: Plot, panel: Panel, style, handles) -> None:
    import numpy as np

    xs = [pt[0] for s in panel.series for pt in s.points]
    ys = [pt[1] for s in panel.series for pt in s.points]
    if plot.kind == "base_new":
        low = max(0.0, min(xs + ys) - 5)
        high = min(101.0, max(xs + ys) + 5)
        grid = np.linspace(low, high, 200)
        for h in range(5, 100, 5):  # HM iso-curves: new = h b / (2 b - h)
            with np.errstate(divide="ignore", invalid="ignore"):
                n = h * grid / (2 * grid - h)
            ok = (2 * grid > h) & (n >= low) & (n <= high)
            if ok.any():
                ax.plot(grid[ok], n[ok], color="#cccccc", linewidth=0.6, zorder=0)
                i = int(np.flatnonzero(ok)[-1])
                if n[i] > low + 0.1 * (high - low):  # no label crowding the bottom edge
                    ax.text(grid[i], n[i], f"HM {h}", fontsize=5.5, color="#999999", ha="right", va="bottom",
                            clip_on=True)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal", adjustable="box")
    for s in panel.series:
        color, marker = style[s.label.split(" (")[0]]
        px, py = [pt[0] for pt in s.points], [pt[1] for pt in s.points]
        if plot.kind == "few_shot":
            if s.band:
                ax.fill_between([b[0] for b in s.band], [b[1] for b in s.band], [b[2] for b in s.band],
                                color=color, alpha=0.18, linewidth=0)
            (h,) = ax.plot(px, py, color=color, marker=marker, markersize=3.5, linewidth=1.2)
        else:
            face = "none" if s.reported else color
            (h,) = ax.plot(px, py, linestyle="none", marker=marker, markersize=6 if plot.kind == "cost" else 5,
                           markerfacecolor=face, markeredgecolor=color, color=color)
        handles.setdefault(s.label, h)
    if plot.kind == "few_shot":
        ax.set_xscale("log", base=2)
        ticks = sorted({pt[0] for s in panel.series for pt in s.points})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(int(t)) for t in ticks])
        ax.minorticks_off()
    if plot.kind == "cost":
        for s in panel.series:
            x, y = s.points[0]
            ax.annotate(s.label.split(" (")[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.margins(x=0.25, y=0.25)
    ax.set_title(panel.title)
    ax.grid(True, linewidth=0.3, alpha=0.5)


def _without_x(data: dict[str, Any]) -> dict[str, Any]:
    """The plot data with every x coordinate blanked (machine-dependent timings)."""
    data = json.loads(json.dumps(data))
    for panel in data.get("panels", []):
        for series in panel.get("series", []):
            for point in series.get("points", []) + series.get("band", []):
                point[0] = None
    return data


def data_differences(expected: dict[str, Any], actual: dict[str, Any], tolerance: float, where: str) -> list[str]:
    """How two plots' data differ: structure and labels exactly, numbers within `tolerance`. With a
    tolerance (regenerated runs on another machine) machine-dependent coordinates are not compared."""
    if tolerance > 0 and "x" in expected.get("machine_dependent", []):
        expected, actual = _without_x(expected), _without_x(actual)
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if len(out) >= 20:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            if sorted(a) != sorted(b):
                out.append(f"{where}: {path} has keys {sorted(b)} instead of {sorted(a)}")
                return
            for k in sorted(a):
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                out.append(f"{where}: {path} has {len(b)} entries instead of {len(a)}")
                return
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
              and not isinstance(b, bool)):
            if abs(a - b) > tolerance:
                out.append(f"{where}: {path} is {b}, committed {a} (tolerance {tolerance})")
        elif a != b:
            out.append(f"{where}: {path} is {b!r}, committed {a!r}")

    walk(expected, actual, "$")
    return out


def write_folder(folder: Path, plots: Sequence[Plot]) -> None:
    """Write each plot's data (`<name>.json`) and PNG; a plot whose data did not change and whose
    PNG exists is not redrawn; files of plots that no longer exist are removed."""
    wanted = {f"{pl.name}.{ext}" for pl in plots for ext in ("json", "png")}
    if folder.is_dir():
        for old in folder.iterdir():
            if old.suffix in (".json", ".png") and old.name not in wanted:
                old.unlink()
    for pl in plots:
        data_path, png = folder / f"{pl.name}.json", folder / f"{pl.name}.png"
        text = json.dumps(pl.data(), indent=1, sort_keys=True) + "\n"
        if png.is_file() and data_path.is_file() and data_path.read_text(encoding="utf-8") == text:
            continue
        with writing(png):  # a full disk names the plot, not matplotlib's internals
            folder.mkdir(parents=True, exist_ok=True)
            render(pl, png)
        atomic_write_text(data_path, text)


def check_folder(folder: Path, plots: Sequence[Plot], tolerance: float) -> list[str]:
    """Why the committed plots in `folder` are stale: missing, extra, or data that differs."""
    out = []
    wanted = {f"{pl.name}.{ext}" for pl in plots for ext in ("json", "png")}
    if folder.is_dir():
        out += [f"{folder / f.name}: no longer produced" for f in sorted(folder.iterdir())
                if f.suffix in (".json", ".png") and f.name not in wanted]
    for pl in plots:
        data_path, png = folder / f"{pl.name}.json", folder / f"{pl.name}.png"
        if not png.is_file():
            out.append(f"{png} does not exist")
        if not data_path.is_file():
            out.append(f"{data_path} does not exist")
            continue
        committed = json.loads(data_path.read_text(encoding="utf-8"))
        out += data_differences(committed, json.loads(json.dumps(pl.data())), tolerance, str(data_path))
    return out


__all__ = ["Panel", "Plot", "Series", "check_folder", "data_differences", "plan", "render", "write_folder"]
