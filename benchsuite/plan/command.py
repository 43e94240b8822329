"""`benchsuite plan`: the grid `run` would compute with the same options, and its cost, before any of it
runs. Nothing is written except measured figures into the figures cache (`--measure`); the backbone
is loaded only to measure or, with `--exact`, to hash its weights for the exact job identities."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import BenchsuiteError
from .estimate import by_method, estimate, shape_of, wall_seconds
from .figures import MEASURE, Context, Figures, Shape, default_figures_file, device_name
from .report import duration, figure_notes, hours, table, training_notes
from .reuse import exact_reuse, recipe_reuse
from .work import JobWork, grid_work

def plan_device(name: str) -> str:
    """The device type the plan is for. CUDA need not be present here: a plan for a GPU grid can be
    made on a login node from cached or bench JSON figures."""
    import torch

    from ..engine.preflight import device_type

    kind = device_type(name)
    return kind if kind is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def _check_measurable(name: str, device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BenchsuiteError(f"--measure times the figures on --device {name}, which this machine lacks; run "
                              f"`benchsuite bench --device cuda --method METHOD --json FILE` on the GPU machine and "
                              f"pass --bench-json FILE, or plan for --device cpu")


def _parallel(args: argparse.Namespace, to_run: int) -> int:
    """Jobs running at once under the chosen executor."""
    if args.executor == "pool":
        return len([d for d in (args.gpus or "").split(",") if d.strip()]) or args.workers or 1
    if args.executor == "slurm":
        return max(1, min(args.array_parallelism, to_run))
    return 1


def _grid(args: argparse.Namespace):
    """(protocols, data roots by protocol, model, pretrained, jobs) as `run` resolves them."""
    from ..cli import _resolve_world
    from ..engine.jobs import expand_grid
    from ..engine.preflight import check_methods

    methods = check_methods(args.method or [])
    protocols, roots, jobs, backbones = [], {}, [], set()
    for asked in dict.fromkeys(args.protocol):
        protocol, data_root, model, pretrained = _resolve_world(argparse.Namespace(**{**vars(args), "protocol": asked}))
        protocols.append(protocol)
        roots[protocol.id] = data_root
        backbones.add((model, pretrained))
        jobs += expand_grid(protocol, methods, args.dataset, args.seeds, args.shots)
    if len(backbones) > 1:
        shown = ", ".join(f"{m}/{p}" for m, p in sorted(backbones))
        raise BenchsuiteError(f"--protocol {' '.join(args.protocol)}: these run on different backbones ({shown}); "
                              f"plan them one at a time, or pass --backbone")
    model, pretrained = backbones.pop()
    return protocols, roots, model, pretrained, jobs


def _timing_weights(protocols, model: str, pretrained: str) -> str:
    """Weights to time with: the protocol's own small CLIP or a local file as they are, else random
    weights of the same architecture ('none': no download, the same speed)."""
    shipped = any((p.spec.get("backbone") or {}).get("model") == model for p in protocols)
    return pretrained if shipped or Path(pretrained).expanduser().is_file() else "none"


def _measure(args, figures: Figures, shapes: list[Shape], works: list[JobWork], protocols, model: str,
             pretrained: str, precision: str) -> None:
    from ..bench import run_bench
    from ..clip.backbone import load_backbone, resolve_device

    device = resolve_device(args.device)
    backbone = load_backbone(model, _timing_weights(protocols, model, pretrained), precision=precision,
                             device=device, cache_dir=args.model_cache)
    where = {}
    for work in works:
        where.setdefault(shape_of(work), work.job)

    def bench(shape: Shape) -> dict[str, Any]:
        job = where[shape]
        overrides = {shape.method: {**json.loads(shape.overrides), "batch_size": shape.batch_size}}
        return run_bench(backbone, shape.method, job.protocol.id, dataset=job.dataset, overrides=overrides,
                         n_classes=shape.n_classes, straightforward=False, progress=True, **MEASURE)

    figures.measure(shapes, bench, device_name(str(device)))


def run_plan(args: argparse.Namespace) -> int:
    from ..clip.backbone import default_precision
    from ..cli import DEFAULT_RUN_RESULTS
    from ..engine.feature_cache import FeatureCache
    from ..engine.preflight import load_splits, resolved_recipes
    from ..engine.recipe import parse_overrides, validate_overrides

    import torch

    device = plan_device(args.device)
    precision = args.precision or default_precision(torch.device(device))
    measuring = args.measure or args.remeasure
    if measuring:
        _check_measurable(args.device, device)
    results = Path(args.results if args.results is not None else DEFAULT_RUN_RESULTS)
    overrides = parse_overrides(args.set or [])
    protocols, roots, model, pretrained, jobs = _grid(args)
    typed = validate_overrides(overrides, resolved_recipes(jobs))
    splits = {}
    for protocol in protocols:
        splits.update(load_splits([j for j in jobs if j.protocol.id == protocol.id], roots[protocol.id]))
    works = grid_work(jobs, splits, typed)
    cache = None if args.no_feature_cache else FeatureCache(Path(args.feature_cache) if args.feature_cache else None)
    if args.exact:
        from ..clip.backbone import load_backbone

        backbone = load_backbone(model, pretrained, precision=precision, device="cpu", cache_dir=args.model_cache)
        reuse = exact_reuse(works, results, typed, cache, backbone, roots[protocols[0].id], splits)
    else:
        reuse = recipe_reuse(works, results, typed, cache, model, precision)
    figures_file = Path(args.figures) if args.figures else default_figures_file()
    figures = Figures(Context(model, precision, device), figures_file, [Path(p) for p in args.bench_json or []])
    needed = list(dict.fromkeys(shape_of(w) for w in works if w.job.label() not in reuse.done))
    to_measure = needed if args.remeasure else [s for s in needed if figures.exact(s) is None]
    if measuring and to_measure:
        _measure(args, figures, to_measure, works, protocols, model, pretrained, precision)
    costs = estimate(works, reuse, figures, feature_cache=cache is not None)
    print(_format(args, protocols, model, pretrained, precision, device, results, cache, reuse, figures, costs,
                  figures_file))
    if args.json:
        from ..results.store import atomic_write_text, dump_json

        atomic_write_text(Path(args.json), dump_json(plan_record(costs, Context(model, precision, device),
                                                                 [p.id for p in protocols])))
    return 0


def plan_record(costs, context: Context, protocols: list[str]) -> dict[str, Any]:
    """The plan as JSON (`plan --json FILE`): per method and in total, seconds of one device."""
    def row(r) -> dict[str, Any]:
        return {"method": r.method, "jobs": r.jobs, "to_run": r.to_run, "reused": r.reused, "trainings": r.trainings,
                "train_seconds": r.train_s, "eval_seconds": r.eval_s, "total_seconds": r.total_s,
                "figures": sorted({f.source for f in r.figures})}

    rows = [row(r) for r in by_method(costs)]
    known = all(r["total_seconds"] is not None for r in rows)
    return {"protocols": protocols, "backbone": context.model, "precision": context.precision,
            "device": context.device, "methods": rows,
            "total": {"jobs": len(costs), "to_run": sum(not c.reused for c in costs),
                      "reused": sum(c.reused for c in costs),
                      "train_seconds": sum(r["train_seconds"] for r in rows) if known else None,
                      "eval_seconds": sum(r["eval_seconds"] for r in rows) if known else None,
                      "device_hours": sum(r["total_seconds"] for r in rows) / 3600 if known else None}}


def _format(args, protocols, model, pretrained, precision, device, results, cache, reuse, figures, costs,
            figures_file) -> str:
    rows = by_method(costs)
    to_run = sum(not c.reused for c in costs)
    grids = ", ".join(f"{p.id} v{p.version}" for p in protocols)
    how = ("by job id (weights and split lists included)" if reuse.exact else
           "by recipe identity, as `benchsuite status`; --exact matches the full job id")
    lines = [f"benchsuite plan: {len(costs)} job(s) of {grids} on {model}/{pretrained}, {precision} on {device}",
             f"  results: {results} ({len(costs) - to_run} of {len(costs)} done, matched {how})"]
    frozen = {(ev.dataset, ev.fingerprint) for c in costs if c.work.frozen and not c.reused for ev in c.work.evals}
    if cache is None:
        lines.append("  feature cache: off (--no-feature-cache): every frozen-feature job computes its test features")
    elif frozen:
        lines.append(f"  feature cache: {cache.root} ({len(frozen & reuse.features)} of {len(frozen)} test set(s) "
                     f"the jobs to run evaluate on frozen features are cached; the others are computed once)")
    lines += ["", table(rows), ""]
    total = [c.total_s for c in costs]
    if any(t is None for t in total):
        known = sum(t for t in total if t is not None)
        lines.append(f"total: unknown (at least {hours(known)} device-hours): a method has no figure, see below")
    else:
        seconds = sum(total)
        lines.append(f"total: {hours(seconds)} device-hours ({duration(seconds)} on one {device} device) for "
                     f"{to_run} job(s) to run")
        parallel = _parallel(args, to_run)
        wall = wall_seconds(costs, parallel)
        if parallel > 1 and wall is not None:
            lines.append(f"wall clock: about {duration(wall)} with --executor {args.executor} on {parallel} "
                         f"parallel worker(s)")
    lines += training_notes(costs, str(results))
    hint = (f"pass --measure (times it here on {device}) or --bench-json FILE written by "
            f"`benchsuite bench --method {{method}} --device {device} --json FILE`")
    lines += figure_notes(costs, Context(model, precision, device).describe(), hint)
    if any(c.figure is not None and c.figure.source == "measured now" for c in costs):
        lines.append(f"measured figures are cached in {figures_file}")
    lines += [f"note: {n}" for n in figures.notes]
    lines.append("not counted: process start, backbone load, image decoding, the loop's work between steps "
                 "(epoch ends, checkpoints); a figure is the median of a few timed steps")
    return "\n".join(lines)
