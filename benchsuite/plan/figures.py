"""Milliseconds per image of a method's training step and evaluation, from `benchsuite bench` reports.

A figure is one `bench` report (`benchsuite.bench.run_bench`) for a context (backbone model,
precision, device type) and a shape (method, batch size, training classes, and the recipe overrides
that change what a step computes). Why shapes: a text-prompt step runs the text encoder over every
class, so 1000 ImageNet classes cost far more per image than 37 pets. Figures come from, first to
last: `--bench-json` files (`benchsuite bench --json`), the figures cache (one JSON file, default
$BENCHSUITE_CACHE/bench-figures.json, written by `plan --measure`), a measurement now. A shape with
no figure of its own borrows the nearest one of the same method, and the plan says so.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from .. import __version__
from ..errors import BenchsuiteError
from ..paths import cache_root
from ..results.store import atomic_write_text, dump_json, read_json

FORMAT = "benchsuite-bench-figures/1"
#: recipe entries that change how many steps a job takes, not what one step costs per image
#: (batch_size is part of the shape itself)
SCHEDULE_KEYS = frozenset({"epochs", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr",
                           "model_selection", "drop_last", "batch_size"})
#: a measurement's iterations: a plan needs the order of magnitude, `bench` gives the digits
MEASURE = {"warmup": 1, "iters": 3, "eval_images": 100}
REQUIRED = ("method", "backbone", "precision", "device", "batch_size", "n_classes", "floor_ms_per_image",
            "eval_images_per_second", "eval_floor_images_per_second")


def default_figures_file() -> Path:
    return cache_root() / "bench-figures.json"


@dataclass(frozen=True)
class Context:
    """What figures are only valid for: they are never borrowed across it."""

    model: str
    precision: str
    device: str  #: device type: cpu or cuda

    def describe(self) -> str:
        return f"{self.model}, {self.precision} on {self.device}"


@dataclass(frozen=True)
class Shape:
    """What one step's cost per image depends on within a context."""

    method: str
    batch_size: int
    n_classes: int
    overrides: str = "{}"  #: the recipe entries changed from the default that alter a step, as canonical JSON

    def describe(self) -> str:
        extra = "" if self.overrides == "{}" else f", {self.overrides}"
        return f"batch {self.batch_size}, {self.n_classes} classes{extra}"


def step_overrides(changed: dict[str, Any]) -> str:
    """Canonical JSON of the changed recipe entries that alter what a step computes."""
    return json.dumps({k: v for k, v in changed.items() if k not in SCHEDULE_KEYS}, sort_keys=True, default=str)


def report_context(report: dict[str, Any]) -> Context:
    return Context(str(report["backbone"]), str(report["precision"]), str(report["device"]).split(":")[0])


def report_shape(report: dict[str, Any]) -> Shape:
    return Shape(str(report["method"]), int(report["batch_size"]), int(report["n_classes"]),
                 step_overrides(report.get("recipe_overrides") or {}))


def _key(context: Context, shape: Shape) -> str:
    return "|".join((context.model, context.precision, context.device, shape.method, str(shape.batch_size),
                     str(shape.n_classes), shape.overrides))


@dataclass(frozen=True)
class Figure:
    """One report and where it came from; `shape` is the shape it was measured at."""

    report: dict[str, Any]
    source: str  #: "measured now", "cached" or "bench JSON <file>"
    shape: Shape
    measured_at: str = ""

    def train_ms_per_image(self) -> float:
        """The training step per image, plus the train loader's augmentation where it runs in the
        training process (0 loader workers: the CPU default) or minus nothing where workers overlap
        it with the step (then the slower of the two sets the pace)."""
        step = float(self.report.get("train_ms_per_image", 0.0))
        rate = float(self.report.get("data_images_per_second", 0.0))
        data = 1000.0 / rate if rate > 0 else 0.0
        return step + data if int(self.report.get("data_workers", 0)) == 0 else max(step, data)

    def train_seconds(self, images: int) -> float:
        return images * self.train_ms_per_image() / 1000.0 if images else 0.0

    def view_ms_per_image(self) -> float:
        """One training view's augmentation and frozen-encoder pass: what a step of a "features"
        method no longer pays when it reads the shared training features (`training_features`)."""
        rate = float(self.report.get("data_images_per_second", 0.0))
        data = 1000.0 / rate if rate > 0 and int(self.report.get("data_workers", 0)) == 0 else 0.0
        return float(self.report["floor_ms_per_image"]) + data

    def shared_train_seconds(self, images: int) -> float:
        """Training `images` step-images from the shared training features: the step without its
        view (never below 10% of the step)."""
        step = self.train_ms_per_image()
        return images * max(step - self.view_ms_per_image(), 0.1 * step) / 1000.0 if images else 0.0

    def encode_seconds(self, images: int) -> float:
        """The frozen image encoder over `images` test images (computing their features)."""
        return images / float(self.report["eval_floor_images_per_second"])

    def eval_seconds(self, images: int, frozen: bool) -> float:
        """Evaluating `images` test images: from their features for a frozen method (computing them is
        `encode_seconds`), through the (prompted) encoder otherwise."""
        if frozen and "eval_cached_images_per_second" in self.report:
            return images / float(self.report["eval_cached_images_per_second"])
        return images / float(self.report["eval_images_per_second"])


def read_bench_json(path: Path) -> dict[str, Any]:
    """One `benchsuite bench --json` report, or a one-line error naming the file and what to do."""
    data, why = read_json(Path(path))
    fix = "write it with `benchsuite bench --method METHOD --json FILE`"
    if data is None:
        raise BenchsuiteError(f"--bench-json {path}: {why}; {fix}")
    lacking = [k for k in REQUIRED if k not in data]
    if lacking:
        raise BenchsuiteError(f"--bench-json {path}: not a `benchsuite bench` report (no {', '.join(lacking)}); {fix}")
    return data


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cache's entries by key; a missing or unreadable cache holds none (it is rebuilt by measuring)."""
    if not path.is_file():
        return {}
    data, _ = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("figures"), dict):
        return {}
    return {k: v for k, v in data["figures"].items()
            if isinstance(v, dict) and isinstance(v.get("report"), dict) and all(r in v["report"] for r in REQUIRED)}


def _entry_shape(entry: dict[str, Any]) -> Shape:
    """The shape a cache entry was measured at (recorded since its report may name it otherwise)."""
    try:
        return Shape(**entry["shape"])
    except (KeyError, TypeError):
        return report_shape(entry["report"])


def _distance(a: Shape, b: Shape) -> float:
    return (abs(math.log(a.n_classes / b.n_classes)) + abs(math.log(a.batch_size / b.batch_size))
            + (0.0 if a.overrides == b.overrides else 100.0))


class Figures:
    """The figures of one context, from bench JSON files and the cache; measures the missing ones."""

    def __init__(self, context: Context, cache_file: Path | None, bench_json: Iterable[Path] = ()):
        self.context = context
        self.cache_file = cache_file
        self.notes: list[str] = []
        self._found: dict[str, Figure] = {}
        for path in bench_json:
            report = read_bench_json(path)
            if report_context(report) != context:
                self.notes.append(f"--bench-json {path}: measured for {report_context(report).describe()}, not "
                                  f"{context.describe()}; not used")
                continue
            shape = report_shape(report)
            self._found.setdefault(_key(context, shape), Figure(report, f"bench JSON {path}", shape))
        for key, entry in (_read_cache(cache_file) if cache_file else {}).items():
            report = entry["report"]
            if report_context(report) == context and key not in self._found:
                self._found[key] = Figure(report, "cached", _entry_shape(entry), str(entry.get("measured_at", "")))

    def exact(self, shape: Shape) -> Figure | None:
        return self._found.get(_key(self.context, shape))

    def lookup(self, shape: Shape) -> Figure | None:
        """The figure of `shape`, else the nearest one of the same method (its `shape` tells), else None."""
        found = self.exact(shape)
        if found is not None:
            return found
        same = [f for f in self._found.values() if f.shape.method == shape.method]
        return min(same, key=lambda f: _distance(f.shape, shape)) if same else None

    def measure(self, shapes: list[Shape], bench: Callable[[Shape], dict[str, Any]], device_name: str) -> None:
        """Time every shape with `bench` (a progress bar over them), keep the figures, cache them."""
        entries = {}
        for shape in tqdm(shapes, desc="plan: measuring", unit="shape", disable=None):
            report = bench(shape)
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            key = _key(self.context, shape)  # filed under the shape asked for, which it was timed at
            self._found[key] = Figure(report, "measured now", shape, stamp)
            entries[key] = {"report": report, "shape": asdict(shape), "measured_at": stamp,
                            "device_name": device_name, "benchsuite": __version__}
        if entries and self.cache_file is not None:
            self._write_cache(entries)

    def _write_cache(self, entries: dict[str, dict[str, Any]]) -> None:
        """Merge `entries` into the cache file under its lock; a refused write is a note, not a failure."""
        import filelock

        path = self.cache_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(path) + ".lock"):
                merged = {**_read_cache(path), **entries}
                atomic_write_text(path, dump_json({"format": FORMAT, "figures": merged}))
        except (OSError, BenchsuiteError) as exc:
            self.notes.append(f"could not write the figures cache {path} ({exc}); the figures measured now are "
                              f"used but not kept")


def device_name(device: str) -> str:
    """The accelerator's or the processor's name, recorded with a measurement."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"
