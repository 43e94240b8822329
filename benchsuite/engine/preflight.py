"""Checks before cost: everything that can fail from the command line alone is checked before the
backbone is loaded or weights are fetched (a missing data root must not wait for 60 s of download
retries), and every image a grid reads is checked before the first training.

Order in `benchsuite run`: device, protocol (cli), method names, grid, results folder, `--set`
keys and values, dataset layouts, image files; only then the backbone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.datum import DatasetSplits, relative_path
from ..data.fewshot import sample_fewshot
from ..data.images import check_images
from ..data.registry import get_dataset, load_dataset
from ..errors import BenchsuiteError, DatasetError
from .. import methods as registry  # looked up per call: tests and tools may replace discover()
from ..suggest import unknown
from ..tempfiles import sweep_orphans, temp_path
from .jobs import Job
from .recipe import Overrides, declarations, resolve_recipe, validate_overrides

DEVICE_TYPES = ("cpu", "cuda")


def device_type(name: str) -> str | None:
    """The type (cpu, cuda) of the device `--device` names, None for auto, or one clear error for a
    device benchsuite does not run on (`tpu`), not a traceback. Whether CUDA is present is not
    checked here (`benchsuite plan` plans GPU grids on a login node)."""
    if name == "auto":
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise BenchsuiteError(f"--device {name}: not a device benchsuite runs on; use auto, cpu, cuda or cuda:N")
    return device.type


def check_device(name: str) -> None:
    """`--device` must name a device benchsuite runs on, and CUDA must be present when asked for."""
    if device_type(name) is None:
        return
    from ..clip.backbone import resolve_device

    resolve_device(name)  # CUDA asked for but absent: its own clear error


def check_methods(names: list[str]) -> list[str]:
    """The installed methods asked for (`all` or none: every one), or one error with a suggestion."""
    installed = registry.discover()
    if not names or names == ["all"]:
        return sorted(installed)
    for name in names:
        if name not in installed and registry.skipped_method(name) is not None:
            registry.get_method(name)  # the error says which plugin provides it and why it was skipped
        if name not in installed:
            raise BenchsuiteError(unknown("method", name, installed) + " (`benchsuite list methods`; a third-party "
                                  "method must be pip-installed with an entry point in the 'benchsuite' group)")
    return list(dict.fromkeys(names))


WRITABLE_FIX = "pass --results DIR with a folder you can write to"


def results_folder_problem(path: Path) -> str | None:
    """Why no file can be written in the existing results folder (None: one can). A folder that
    cannot even be created is an error here: it holds no result a run could reuse.

    Why not always an error: a read-only folder whose jobs are all done (a shared, archived grid)
    can still be reused by a run that writes nothing; `run` decides once it knows the jobs."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchsuiteError(f"results folder {path} cannot be created ({exc.strerror or exc}); "
                              f"{WRITABLE_FIX}") from None
    probe = temp_path(path / ".write-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def check_results_folder(path: Path) -> None:
    """The results folder exists or can be created, and a file can be written in it, before any work."""
    problem = results_folder_problem(path)
    if problem is not None:
        raise BenchsuiteError(f"results folder {path} is not writable ({problem}); {WRITABLE_FIX}")


def resolved_recipes(jobs: list[Job]) -> dict[str, list[dict[str, Any]]]:
    """Each method's resolved recipes (before overrides) over the grid's (dataset, shots) pairs."""
    out: dict[str, list[dict[str, Any]]] = {}
    managers: dict[str, Any] = {}
    seen: set[tuple[str, str, int]] = set()
    for job in jobs:
        if (job.method, job.dataset, job.shots) in seen:
            continue
        seen.add((job.method, job.dataset, job.shots))
        if job.method not in managers:
            managers[job.method] = registry.job_manager(registry.get_method(job.method))[0]
        raw = managers[job.method].hook.recipe(protocol=job.protocol, dataset=job.dataset, shots=job.shots)
        recipe, _ = resolve_recipe(job.method, raw, job.protocol.profile, {},
                                   **declarations(registry.get_method(job.method).cls))
        out.setdefault(job.method, []).append(recipe)
    return out


def load_splits(jobs: list[Job], data_root: Path) -> dict[str, DatasetSplits]:
    """Read every dataset the grid trains or evaluates on (a bad layout fails here, naming the path)."""
    splits: dict[str, DatasetSplits] = {}
    for job in jobs:
        for name in (job.dataset, *(ev.dataset for ev in job.evals())):
            if name not in splits:
                splits[name] = load_dataset(name, data_root)
    return splits


def image_entries(jobs: list[Job], splits: dict[str, DatasetSplits]) -> Iterator[tuple[str, str, str]]:
    """(dataset, split entry, path) of every image the grid reads: each job's few-shot training sample
    (drawn exactly as the job will draw it) and the full test list of every evaluated dataset."""
    index: dict[str, dict[int, int]] = {}
    for job in sorted({(j.dataset, j.shots, j.seed) for j in jobs}):
        dataset, shots, seed = job
        s = splits[dataset]
        where = index.setdefault(dataset, {id(d): i for i, d in enumerate(s.train)})
        sample = sample_fewshot(s, shots, seed, sample_val=get_dataset(dataset).sample_val)
        for d in sample.train:
            i = where.get(id(d), -1)
            yield dataset, f"train[{i}] = {relative_path(d.impath, s.root)!r}", d.impath
    for name in sorted({ev.dataset for j in jobs for ev in j.evals()}):
        s = splits[name]
        for i, d in enumerate(s.test):
            yield name, f"test[{i}] = {relative_path(d.impath, s.root)!r}", d.impath


@dataclass
class Preflight:
    """What the checks produced that the run reuses: typed overrides, read datasets, images checked."""

    overrides: Overrides
    splits: dict[str, DatasetSplits] = field(default_factory=dict)
    images_checked: int = 0
    orphans_removed: list[Path] = field(default_factory=list)


def preflight(jobs: list[Job], data_root: Path, results: Path, overrides: Overrides, *,
              check_image_files: bool = True, echo: Callable[[str], None] = print,
              read_only: bool = False) -> Preflight:
    """Every check of a run that needs neither the backbone nor training, cheapest first. With
    `read_only` (a results folder the run may only reuse) nothing is written or removed there."""
    if not read_only:
        check_results_folder(results)
    removed = [] if read_only else sweep_orphans(results)
    if removed:
        echo(f"benchsuite: removed {len(removed)} temporary file(s) left by interrupted writers in {results}")
    typed = validate_overrides(overrides, resolved_recipes(jobs))
    splits = load_splits(jobs, data_root)
    checked = 0
    if check_image_files:
        entries = list(image_entries(jobs, splits))
        checked = len({path for _, _, path in entries})
        problems = check_images(entries)
        if problems:
            for line in problems[1:21]:  # the error names the first; list the next ones too
                print(f"  also: {line}", file=sys.stderr)
            more = f" (and {len(problems) - 1} more image problem(s))" if len(problems) > 1 else ""
            raise DatasetError(problems[0] + more)
    return Preflight(typed, splits, checked, removed)
