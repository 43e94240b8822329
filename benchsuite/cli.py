"""The single command line: `benchsuite list | run | leaderboard | compare | validate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from . import __version__
from .errors import (REFUSAL_ERRNOS, WRITE_ELSEWHERE, BenchsuiteError, Preempted, WriteError, errno_name,
                     refusal_advice)
from .suggest import unknown

#: where `run` writes by default: a folder of the user's, never the committed leaderboard results
DEFAULT_RUN_RESULTS = Path("benchsuite-results")
#: the committed results and leaderboard the maintainers regenerate (`benchsuite leaderboard`)
DEFAULT_RESULTS = Path("leaderboard/results")
DEFAULT_LEADERBOARD = Path("leaderboard/README.md")
DEFAULT_REFERENCE = Path("leaderboard/reference")
EXECUTORS = ("local", "pool", "slurm")
#: the options that choose where each command writes: named when the file system refuses a write
WRITES_TO = {"run": "--results DIR", "status": "--results DIR", "leaderboard": "--out FILE, --site DIR",
             "bench": "--json FILE", "cache": "--feature-cache DIR", "plan": "--json FILE, --figures FILE"}


class OneOf(argparse.Action):
    """A choice whose bad value is one line naming the valid ones (with did-you-mean), raised as a
    BenchsuiteError while parsing, instead of argparse's whole usage block."""

    def __init__(self, *args, known: tuple[str, ...], **kwargs) -> None:
        kwargs.setdefault("metavar", "{" + ",".join(known) + "}")
        super().__init__(*args, **kwargs)
        self.known = tuple(known)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values not in self.known:
            raise BenchsuiteError(f"{option_string}: {unknown(self.dest.replace('_', ' '), values, self.known)}")
        setattr(namespace, self.dest, values)


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        _list_methods()
    elif args.what == "protocols":
        from .protocols import all_protocols, pin_matches

        rows = []
        for p in all_protocols(verify_pin=False):  # listing must work while a pin is stale: it shows the new hash
            data = ", ".join(p.train_datasets) + (f" -> {', '.join(p.spec['targets'])}" if p.task == "transfer" else "")
            rows.append((p.id, p.version, p.hash if args.hashes else p.hash[:12],
                         "ok" if pin_matches(p) else "STALE", p.task,
                         ",".join(map(str, p.shots)), ",".join(map(str, p.seeds)), data))
        print(tabulate(rows, headers=["protocol", "version", "hash", "pin", "task", "shots", "seeds", "datasets"]))
        if any(row[3] == "STALE" for row in rows):
            print("STALE: the content no longer matches protocols/pins.json; restore the file, or bump its version "
                  "and pin the hash shown", file=sys.stderr)
    else:
        from .data.registry import all_datasets

        rows = [(d.name, d.title, f"$DATA/{d.folder}/", "test only" if d.test_only else "train/val/test", d.template)
                for d in all_datasets().values()]
        print(tabulate(rows, headers=["dataset", "title", "folder", "splits", "template"]))
    return 0


def _list_methods() -> None:
    """The installed methods, then every plugin or method discovery skipped, with why and the fix
    (on stderr, once: the discovery warnings are folded into this list)."""
    import warnings

    from .methods import PluginWarning, discover, problems

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        methods, skipped = discover(), problems()
    rows = [(e.name, e.source if e.source == "builtin" else f"{e.source} {e.version}", e.entry_point,
             e.cls.image_input, e.cls.summary) for e in methods.values()]
    print(tabulate(rows, headers=["method", "from", "entry point", "image input", "summary"]))
    if skipped:
        print(f"\n{len(skipped)} plugin problem(s); what they provide is not available:", file=sys.stderr)
        for problem in skipped:
            print(f"  SKIPPED {problem}", file=sys.stderr)


def _resolve_world(args: argparse.Namespace):
    """Protocol, data root, backbone name and weights for a run.

    With neither --data-root nor --backbone, a real protocol runs its toy counterpart on the shipped
    small CLIP (the embedded default); toy protocols default to the toy world and the small CLIP.
    """
    from .protocols import load_protocol, protocol_ids

    protocol_id = args.protocol
    if protocol_id not in protocol_ids():
        load_protocol(protocol_id)  # the unknown-protocol error, under the name the user typed
    if not protocol_id.startswith("toy_") and args.data_root is None and args.backbone is None:
        protocol_id = f"toy_{protocol_id}"
        print(f"benchsuite: no --data-root and no --backbone: running {protocol_id}, the toy-world counterpart of "
              f"{args.protocol}, on the shipped small CLIP (pass --data-root and --backbone for the real benchmark)")
    protocol = load_protocol(protocol_id)
    if "backbone" in protocol.spec:  # a toy protocol: the toy world and its small CLIP by default
        from .data.registry import get_dataset

        generated = get_dataset(protocol.train_datasets[0]).default_root
        if args.data_root is None and generated is None:
            raise BenchsuiteError(f"protocol {protocol.id!r}: its datasets are not generated by an installed plugin; "
                                  f"pass --data-root DIR")
        data_root = Path(args.data_root) if args.data_root else generated()
        if args.backbone is None:
            return protocol, data_root, protocol.spec["backbone"]["model"], \
                args.pretrained or protocol.spec["backbone"]["pretrained"]
        return protocol, data_root, args.backbone, args.pretrained or "openai"
    if args.data_root is None:
        raise BenchsuiteError(f"protocol {protocol.id!r} needs real datasets: pass --data-root DIR "
                              f"(the CoOp layout; `benchsuite list datasets` shows the folders), or drop "
                              f"--backbone to run its toy-world counterpart")
    return protocol, Path(args.data_root), args.backbone or "ViT-B-16", args.pretrained or "openai"


def _load_backbone(args: argparse.Namespace, model: str, pretrained: str):
    """The backbone on --device (auto: CUDA if present) in --precision (default amp on CUDA, fp32 on CPU)."""
    from .clip.backbone import default_precision, load_backbone, resolve_device

    device = resolve_device(args.device)
    return load_backbone(model, pretrained, precision=args.precision or default_precision(device), device=device,
                         cache_dir=args.model_cache)


def build_runner(args: argparse.Namespace, data_root: Path, model: str, pretrained: str, results: Path,
                 overrides, splits=None, **runner_options):
    """The Runner of a `run` invocation, built where jobs execute (this process, a pool worker or a
    Slurm task): module-level and fed only picklable arguments, so executors can ship it."""
    from .data.loaders import PRELOAD_BUDGET
    from .engine.feature_cache import FeatureCache
    from .engine.runner import Runner

    backbone = _load_backbone(args, model, pretrained)
    print(f"benchsuite: {backbone.precision} on {backbone.device}", flush=True)
    backbone.truncate_text = not args.no_text_truncation
    cache = None if args.no_feature_cache else FeatureCache(args.feature_cache)
    runner = Runner(backbone, data_root, results, manifests_root=results / "_manifests",
                    overrides=overrides, workers=args.loader_workers, feature_cache=cache,
                    preload_budget=0 if args.no_preload else PRELOAD_BUDGET,
                    class_text_once=not args.no_class_text_once, allow_model_selection=args.allow_model_selection,
                    fail_fast=args.fail_fast, checkpoint_every=args.checkpoint_every, **runner_options)
    runner._splits.update(splits or {})  # the datasets the preflight read, not read twice
    return runner


def _cmd_run(args: argparse.Namespace) -> int:
    import functools

    from .engine import executors
    from .engine.jobs import expand_grid
    from .engine.preflight import check_device, check_methods, preflight, results_folder_problem
    from .engine.recipe import parse_overrides
    from .leaderboard import build_tables, load_results
    from .results.status import record_grid

    results = Path(args.results if args.results is not None else DEFAULT_RUN_RESULTS)
    print(f"benchsuite: results go to {results.absolute()}" +
          (" (the default; --results DIR to change)" if args.results is None else ""), flush=True)
    # checks before cost: nothing below loads a backbone or fetches weights until every check passed
    if args.checkpoint_every < 1:
        raise BenchsuiteError(f"--checkpoint-every must be at least 1 (epochs), got {args.checkpoint_every}")
    if args.executor != "pool" and (args.gpus or args.workers is not None):
        raise BenchsuiteError("--workers and --gpus size the pool executor: add --executor pool "
                              "(the data-loader processes are --loader-workers)")
    if args.workers is not None and args.workers < 1:
        raise BenchsuiteError(f"--workers must be at least 1, got {args.workers}")
    shard = executors.parse_shard(args.shard) if args.shard else None
    slurm = _slurm_options(args) if args.executor == "slurm" else None
    check_device(args.device)
    overrides = parse_overrides(args.set or [])
    methods = check_methods(args.method or [])
    read_only = results_folder_problem(results)  # not yet an error: a run that only reuses writes nothing
    protocol, data_root, model, pretrained = _resolve_world(args)
    jobs = expand_grid(protocol, methods, args.dataset, args.seeds, args.shots)
    checked = preflight(jobs, data_root, results, overrides, check_image_files=not args.no_image_check,
                        read_only=read_only is not None)
    if read_only is None:
        record_grid(results, [(j.protocol.id, j.method, j.dataset, j.shots, j.seed) for j in jobs], checked.overrides)
    if shard:
        jobs = executors.shard(jobs, *shard)
        print(f"benchsuite: shard {shard[0]}/{shard[1]}", flush=True)
    print(f"benchsuite: {len(jobs)} job(s) of {protocol.id} v{protocol.version} on {model}/{pretrained}; "
          f"data {data_root}" + (f"; {checked.images_checked} images checked" if checked.images_checked else ""),
          flush=True)
    factory = functools.partial(build_runner, args, data_root, model, pretrained, results, checked.overrides)
    if read_only is not None:
        summary = _reuse_read_only(args, factory, checked, jobs, results, read_only)
    elif slurm is not None:
        return _submit_slurm(args, slurm, factory, jobs, protocol, results)
    elif args.executor == "pool":
        devices = [d.strip() for d in args.gpus.split(",") if d.strip()] if args.gpus else None
        summary = executors.run_pool(factory, jobs, devices=devices, workers=args.workers or 1, results=results)
    else:
        summary = executors.run_local(functools.partial(factory, splits=checked.splits), jobs)
    computed, reused = len(summary.written), len(summary.skipped)
    print(f"benchsuite: {computed} computed, {reused} reused, {len(summary.failed)} failed; results in {results}")
    if reused and not computed and not summary.failed:
        print(f"benchsuite: every result was reused from {results}, nothing was computed; pass --results NEWDIR "
              f"to compute them afresh")
    for line in summary.failed:
        print(f"  failed: {line}", file=sys.stderr)
    if not args.quiet:
        print("\n" + build_tables(load_results(results, [protocol.id])[0]).rstrip())
    return 1 if summary.failed else 0


def _reuse_read_only(args: argparse.Namespace, factory, checked, jobs, results: Path, why: str):
    """A results folder nothing can be written to: run only if every job already has its result
    there (all reused, nothing written, exit 0), else refuse before any training. A cheap check
    (recipe identity, no backbone) comes first, then the exact one (job ids, backbone loaded)."""
    from .engine.preflight import WRITABLE_FIX
    from .results.status import not_done

    def refuse(undone: list[str]) -> BenchsuiteError:
        return BenchsuiteError(f"results folder {results} is not writable ({why}) and {len(undone)} of {len(jobs)} "
                               f"job(s) have no result there to reuse (first: {undone[0]}); {WRITABLE_FIX}")

    undone = not_done(results, [(j.protocol.id, j.method, j.dataset, j.shots, j.seed) for j in jobs],
                      checked.overrides)
    if undone:
        raise refuse(undone)
    print(f"benchsuite: results folder {results} is not writable ({why}): every job must already be done there; "
          f"they are reused in this process and nothing is written"
          + (f" (--executor {args.executor} is not needed)" if args.executor != "local" else ""), flush=True)
    runner = factory(splits=checked.splits)
    undone = [job.label() for job in jobs if not runner.is_done(job)]
    if undone:
        raise refuse(undone)
    return runner.run(jobs)


def _slurm_options(args: argparse.Namespace):
    from .engine import executors

    options = executors.SlurmOptions(partition=args.partition, time=args.time, gpus_per_job=args.gpus_per_job,
                                     cpus_per_job=args.cpus_per_job, mem=args.mem,
                                     array_parallelism=args.array_parallelism,
                                     extra=executors.parse_extra(args.slurm_extra or []))
    executors.check_partition(options)  # an unknown partition is refused before the preflight's cost
    return options


def _submit_slurm(args: argparse.Namespace, options, factory, jobs, protocol, results: Path) -> int:
    from .engine import executors

    if not jobs:
        print("benchsuite: no job to submit")
        return 0
    submitted = executors.submit_slurm(factory, jobs, options, results.resolve() / "_slurm")
    array_id = str(submitted[0].job_id).split("_")[0]
    status = f"benchsuite status --results {results} --protocol {protocol.id}"
    print(f"benchsuite: submitted Slurm job array {array_id} ({len(submitted)} tasks); logs in "
          f"{results / '_slurm'}\nfollow it with: {status}", flush=True)
    if not args.wait:
        return 0
    finished, failures = executors.wait_slurm(submitted)
    print(f"benchsuite: Slurm array {array_id}: {finished} finished, {len(failures)} failed; results in {results}")
    for line in failures:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .results.status import format_status, grid_status, is_complete, typed_overrides

    overrides = typed_overrides(Path(args.results), args.protocol, args.set) if args.set else None
    table = grid_status(Path(args.results), args.protocol, overrides)
    if not table:
        print(f"benchsuite: no grid recorded under {args.results}"
              + (f" for protocol(s) {', '.join(args.protocol)}" if args.protocol else "")
              + ": `benchsuite run` records the grid it runs", file=sys.stderr)
        return 1
    print(format_status(table))
    complete = is_complete(table)
    print("complete" if complete else "incomplete")
    return 0 if complete else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan.command import run_plan

    return run_plan(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import bench_backbone, format_report, run_bench
    from .engine.preflight import check_device, check_methods
    from .engine.recipe import parse_overrides
    from .protocols import load_protocol

    check_device(args.device)
    check_methods([args.method])
    protocol = load_protocol(args.protocol)
    model, pretrained = bench_backbone(protocol, args.backbone, args.pretrained)
    print(f"benchsuite bench: {args.method} on {model}/{pretrained}, shapes of {protocol.id}", flush=True)
    backbone = _load_backbone(args, model, pretrained)
    report = run_bench(backbone, args.method, args.protocol, warmup=args.warmup, iters=args.iters,
                       eval_images=args.eval_images, workers=args.loader_workers, progress=True,
                       overrides=parse_overrides(args.set or []), compare=parse_overrides(args.compare or []),
                       straightforward=not args.no_straightforward)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .engine.feature_cache import MARKER, FeatureCache

    cache = FeatureCache(args.feature_cache)
    if cache.root.is_dir() and not cache.is_cache_root():
        print(f"{cache.root} is not a benchsuite feature cache (no {MARKER} file): nothing listed or removed; "
              f"a cache written before this marker existed can be deleted by hand")
        return 0
    if args.action == "clear":
        print(f"removed {cache.clear()} cached feature set(s) from {cache.root}")
    else:
        rows = [(e.key[:12], e.meta.get("model"), e.meta.get("pretrained"), e.meta.get("precision"),
                 e.meta.get("n_images"), f"{e.bytes / 2**20:.1f}") for e in cache.entries()]
        print(tabulate(rows, headers=["key", "model", "pretrained", "precision", "images", "MiB"]))
        print(f"{len(rows)} entries in {cache.root}")
    for folder, why in cache.skipped:
        print(f"skipped {folder.name[:12]}: {why} (remove the folder by hand if it is not needed)")
    return 0


def _read_recorded(out: Path) -> str | None:
    """The options an existing board records on its first line (None: no board, or none recorded)."""
    from .leaderboard import recorded_options

    try:
        return recorded_options(out.read_text(encoding="utf-8")) if out.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _board_options(args: argparse.Namespace, recorded: str | None):
    """(Options, plots, from_record): the options given; with --check and none given, those the
    board records, so that checking a board built with --std does not call it stale for lacking them."""
    from .leaderboard import parse_options
    from .report.markdown import Options

    given = any(v is not None for v in (args.std, args.calibration, args.cost, args.no_plots))
    if args.check and not given and recorded is not None:
        return (*parse_options(recorded), True)
    return Options(std=bool(args.std), calibration=bool(args.calibration), cost=bool(args.cost)), \
        not args.no_plots, False


def _report_check(args: argparse.Namespace, problems: list[str], flags: str, recorded: str | None) -> int:
    """Print the --check verdict; on a stale board, the command that regenerates it with the same flags."""
    if not problems:
        print(f"{args.out} is up to date" + (f" (within {args.tolerance} points)" if args.tolerance else ""))
        return 0
    for problem in problems[:20]:
        print(f"  {problem}", file=sys.stderr)
    command = " ".join(["benchsuite leaderboard --results", str(args.results), "--out", str(args.out), flags]).strip()
    note = ""
    if recorded is not None and recorded != flags:
        note = (f" (it records being built with {recorded or 'no options'}, this check used {flags or 'none'}: "
                f"check with {recorded or 'no options'} instead, or regenerate it as below)")
    print(f"{args.out} is stale{note}: run `{command}`", file=sys.stderr)
    return 1


def _report_refused(results: Path, out: Path, refused, merged: int) -> int:
    """Refused result files make the command fail: how many, why and where, never only in the board."""
    if not refused:
        return 0
    print(f"benchsuite: {len(refused)} result file(s) under {results} refused, {merged} merged; the board lists "
          f"them under 'Refused results' ({out}):", file=sys.stderr)
    for label, why in refused[:10]:
        print(f"  {results / label}: {why}", file=sys.stderr)
    if len(refused) > 10:
        print(f"  ... and {len(refused) - 10} more", file=sys.stderr)
    return 1


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import options_flags, write_board

    results, out = Path(args.results), Path(args.out)
    if not results.is_dir():
        raise BenchsuiteError(f"--results {args.results}: no such folder; pass the folder `benchsuite run` wrote "
                              f"(default {DEFAULT_RUN_RESULTS}; the committed results are {DEFAULT_RESULTS})")
    recorded = _read_recorded(out)
    options, plots, from_record = _board_options(args, recorded)
    flags = options_flags(options, plots)
    if from_record:
        print(f"benchsuite: checking with the options {out} records: {flags or '(none)'}")
    report = write_board(results, out, check=args.check, tolerance=args.tolerance,
                         reference_dir=Path(args.reference), options=options, plots=plots,
                         site=None if args.check or not args.site else Path(args.site))
    if args.check:
        code = _report_check(args, report.problems, flags, recorded)
    else:
        print(f"wrote {out}" + (" and its plots" if plots else "") + (f"; site in {args.site}" if args.site else ""))
        if recorded is not None and recorded != flags:
            print(f"benchsuite: note: {out} was built with {recorded or 'no options'}, this run used "
                  f"{flags or 'none'}; pass the same options to keep its sections", file=sys.stderr)
        code = 0
    return max(code, _report_refused(results, out, report.refused, report.merged))


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report.compare import compare_command

    return compare_command(args.a, args.b, args.protocol, Path(args.results), as_json=args.json)


def _cmd_validate(args: argparse.Namespace) -> int:
    """Validate result files; a JSON file that is not a result (a manifest, a grid record, a claim:
    what `find RESULTS -name '*.json'` also picks up) is named and skipped, and does not fail the run."""
    from .results.validate import skipped_files, validate_files

    paths = [Path(f) for f in args.files]
    skipped = skipped_files(paths)
    problems = validate_files([p for p in paths if p not in skipped])
    bad = 0
    for path in dict.fromkeys(paths):
        if path in skipped:
            print(f"{path}: is {skipped[path]}, not a result file; skipped")
        elif problems[path]:
            bad += 1
            for message in problems[path]:
                print(f"{path}: {message}")
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


class _CommandsFormatter(argparse.HelpFormatter):
    """`benchsuite --help`: every subcommand's description on its own single line, however narrow
    the terminal (the description and epilog still wrap)."""

    def __init__(self, prog: str, **kwargs) -> None:
        super().__init__(prog, **kwargs)
        self._max_help_position = 30  # command names up to 24 characters keep their description beside them

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        for command in getattr(action, "_get_subactions", list)():  # argparse measures them without their indent
            self._action_max_length = max(self._action_max_length, self._current_indent + self._indent_increment
                                          + len(self._format_action_invocation(command)))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return [" ".join(text.split())]


def build_parser(plugin_commands: bool = True) -> argparse.ArgumentParser:
    """The parser; with `plugin_commands`, plugins' subcommands too (importing the plugins costs ~2 s)."""
    parser = argparse.ArgumentParser(prog="benchsuite", formatter_class=_CommandsFormatter,
                                     description="A frozen, plugin-based benchmark for prompt learning on "
                                                 "CLIP-style vision-language models.",
                                     epilog="`benchsuite COMMAND --help` lists a command's options; the "
                                            "documentation is in docs/ (`mkdocs serve`).")
    parser.add_argument("--version", action="version", version=f"benchsuite {__version__}",
                        help="print `benchsuite VERSION` and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser("list", help="installed methods, frozen protocols, known datasets")
    p.add_argument("what", choices=["methods", "protocols", "datasets"], help="what to list")
    p.add_argument("--hashes", action="store_true", help="print full protocol hashes")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="run a protocol's job grid; one result JSON per job")
    p.add_argument("--protocol", required=True, help="protocol id (benchsuite list protocols)")
    p.add_argument("--method", nargs="+", help="method names or 'all' (default: all installed)")
    p.add_argument("--dataset", nargs="+", help="training datasets or 'all' (default: the protocol's)")
    p.add_argument("--seeds", nargs="+", type=int, help="subset of the protocol's seeds (default: all)")
    p.add_argument("--shots", nargs="+", type=int, help="subset of the protocol's shot counts (default: all)")
    p.add_argument("--data-root", help="folder holding the datasets in the CoOp layout")
    p.add_argument("--backbone", help="open_clip model name (default ViT-B-16; toy protocols: bs-toy-clip)")
    p.add_argument("--pretrained", help="open_clip pretrained tag (default openai), a local checkpoint file "
                                        "(state dict or OpenAI JIT archive), or 'none' for random weights")
    p.add_argument("--quiet", action="store_true", help="do not print the protocol's leaderboard at the end")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "amp"],
                   help="default: amp on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--results", help=f"results folder (default ./{DEFAULT_RUN_RESULTS}); a rerun reuses every "
                                      f"valid result in it")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="override recipe entries (marks results non-default); may be repeated")
    p.add_argument("--loader-workers", type=int,
                   help="data loader worker processes per job (default: 0 on CPU, min(8, CPU count) on CUDA)")
    p.add_argument("--model-cache", help="where open_clip caches downloaded weights")
    g = p.add_argument_group("executors (where the jobs run)")
    g.add_argument("--executor", action=OneOf, known=EXECUTORS, default="local",
                   help="local: in this process (default); pool: worker processes; slurm: one Slurm job array")
    g.add_argument("--workers", type=int, help="pool: number of CPU worker processes (default 1)")
    g.add_argument("--gpus", help="pool: CUDA device ids, one worker per device, e.g. 0,1,2,3")
    g.add_argument("--shard", help="run only part RANK/WORLD of the grid (e.g. 0/4), or 'auto': rank and world "
                                   "from torchrun, Slurm or MPI variables")
    g.add_argument("--checkpoint-every", type=int, default=1,
                   help="write a training job's epoch checkpoint every N epochs (default 1)")
    g.add_argument("--partition", help="slurm: partition")
    g.add_argument("--time", type=int, default=60, help="slurm: minutes per job (default 60)")
    g.add_argument("--gpus-per-job", type=int, default=0, help="slurm: GPUs per job (default 0)")
    g.add_argument("--cpus-per-job", type=int, default=1, help="slurm: CPUs per job (default 1)")
    g.add_argument("--mem", help="slurm: memory per job, Slurm syntax (16G)")
    g.add_argument("--array-parallelism", type=int, default=256, help="slurm: jobs running at once (default 256)")
    g.add_argument("--slurm-extra", nargs="+", metavar="KEY=VALUE",
                   help="slurm: more sbatch options, e.g. account=proj qos=high constraint=a100")
    g.add_argument("--wait", action="store_true", help="slurm: wait for the array, with a progress bar")
    p.add_argument("--feature-cache", help="test-set feature cache folder (default $BENCHSUITE_CACHE/features)")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="recompute test-set image features for every evaluation")
    p.add_argument("--no-text-truncation", action="store_true",
                   help="run the text encoder over all context positions (the exact fast path cuts after EOT)")
    p.add_argument("--allow-model-selection", action="store_true",
                   help="let a recipe select its model on the test set (GOPro); results are marked off-protocol")
    p.add_argument("--no-class-text-once", action="store_true",
                   help="rebuild the classifier (class text features) before every test batch")
    p.add_argument("--no-preload", action="store_true",
                   help="decode training images from disk at every step instead of once per job")
    p.add_argument("--no-image-check", action="store_true",
                   help="skip the check, before any training, that every image the grid reads opens and is complete")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failing job (default: log its traceback under RESULTS/_logs/, run the "
                        "other jobs, exit 1 with a summary)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="time a method's training step and evaluation against the image-encoder floor")
    p.add_argument("--method", required=True, help="the installed method to time (benchsuite list methods)")
    p.add_argument("--protocol", default="base2new", help="shapes come from this protocol's recipe (default base2new)")
    p.add_argument("--backbone", help="open_clip model name (default ViT-B-16; a toy protocol: its own small CLIP)")
    p.add_argument("--pretrained", help="'none' (default): the real architecture with random weights; a toy protocol "
                                        "without --backbone uses its shipped checkpoint")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "amp"], help="default: amp on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--eval-images", type=int, default=200, help="synthetic test images per evaluation (default 200)")
    p.add_argument("--loader-workers", type=int, help="data loader processes for the pipeline measurement "
                                                       "(default: 0 on CPU, min(8, CPU count) on CUDA)")
    p.add_argument("--model-cache", help="where open_clip caches downloaded weights")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="override recipe entries as `run --set` does (cocoop.batch_size=32); may be repeated")
    p.add_argument("--compare", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="also time the training step of a second instance with these recipe overrides, in "
                        "alternation (cocoop.batched_text=false: CoCoOp's per-image loop)")
    p.add_argument("--no-straightforward", action="store_true",
                   help="skip timing the training step with the fast paths off")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("plan", help="a grid's jobs and estimated device-hours before it runs (from bench figures)")
    p.add_argument("--protocol", required=True, nargs="+",
                   help="protocol id(s); cross_dataset and domain_generalization together count a shared training once")
    p.add_argument("--method", nargs="+", help="method names or 'all' (default: all installed)")
    p.add_argument("--dataset", nargs="+", help="training datasets or 'all' (default: the protocol's)")
    p.add_argument("--seeds", nargs="+", type=int, help="subset of the protocol's seeds (default: all)")
    p.add_argument("--shots", nargs="+", type=int, help="subset of the protocol's shot counts (default: all)")
    p.add_argument("--data-root", help="folder holding the datasets in the CoOp layout (as for run)")
    p.add_argument("--backbone", help="open_clip model name (as for run)")
    p.add_argument("--pretrained", help="pretrained tag or checkpoint (as for run)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "amp"], help="default: amp on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto",
                   help="the device the grid will run on: auto, cpu, cuda ... (need not be present without --measure)")
    p.add_argument("--results", help=f"results folder run would write to (default ./{DEFAULT_RUN_RESULTS}); its "
                                      f"valid results count as reused")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="recipe overrides, as for run")
    p.add_argument("--executor", action=OneOf, known=EXECUTORS, default="local",
                   help="the executor run will use: pool and slurm add a wall-clock estimate")
    p.add_argument("--workers", type=int, help="pool: CPU worker processes")
    p.add_argument("--gpus", help="pool: CUDA device ids, one worker per device")
    p.add_argument("--array-parallelism", type=int, default=256, help="slurm: jobs running at once (default 256)")
    p.add_argument("--feature-cache", help="test-set feature cache folder (default $BENCHSUITE_CACHE/features)")
    p.add_argument("--no-feature-cache", action="store_true", help="plan for run --no-feature-cache")
    p.add_argument("--bench-json", nargs="+", metavar="FILE", help="figures from `benchsuite bench --json` files")
    p.add_argument("--figures", metavar="FILE",
                   help="figures cache (default $BENCHSUITE_CACHE/bench-figures.json), read and written by --measure")
    p.add_argument("--measure", action="store_true",
                   help="time here, on --device, every figure neither a bench JSON nor the cache has")
    p.add_argument("--remeasure", action="store_true", help="time every figure the grid needs afresh")
    p.add_argument("--exact", action="store_true",
                   help="load the backbone (on the CPU) to match results, saved trainings and cached features by "
                        "the exact identities run computes")
    p.add_argument("--model-cache", help="where open_clip caches downloaded weights")
    p.add_argument("--json", metavar="FILE", help="also write the plan to this JSON file")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("status", help="done, running, failed and missing jobs of the grids run into a results folder")
    p.add_argument("--results", default=str(DEFAULT_RUN_RESULTS),
                   help=f"results folder (default ./{DEFAULT_RUN_RESULTS}, where run writes by default)")
    p.add_argument("--protocol", nargs="+", help="only these protocols (default: every recorded grid)")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="only the grid run with these `run --set` overrides (default: every recorded grid, each "
                        "under its own overrides); a result counts only for the recipe it was computed with")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cache", help="list or clear the test-set feature cache")
    p.add_argument("action", choices=["ls", "clear"], help="ls: list entries; clear: remove them")
    p.add_argument("--feature-cache", help="cache folder (default $BENCHSUITE_CACHE/features)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("leaderboard", help="merge result files into the markdown leaderboard")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help=f"folder of result files to merge (default {DEFAULT_RESULTS}, the committed results; "
                        f"`run` writes to ./{DEFAULT_RUN_RESULTS} by default)")
    p.add_argument("--out", default=str(DEFAULT_LEADERBOARD),
                   help=f"markdown file to write (default {DEFAULT_LEADERBOARD})")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if --out is stale (for CI); writes nothing. Without --std, --calibration, --cost "
                        "and --no-plots it checks with the options --out records on its first line")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="with --check: accept accuracies within this many points (regenerated toy runs)")
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                   help=f"published numbers (default {DEFAULT_REFERENCE}; a missing folder means none)")
    # default None, not False: --check without any of these four uses the ones the board records
    p.add_argument("--std", action="store_true", default=None,
                   help="add seed statistics: mean ± std cells, 95%% bootstrap intervals")
    p.add_argument("--calibration", action="store_true", default=None, help="add expected calibration error tables")
    p.add_argument("--cost", action="store_true", default=None,
                   help="add cost tables (parameters, training time, ms/image, images/s, memory, device)")
    p.add_argument("--no-plots", action="store_true", default=None,
                   help="do not write or embed plots (plots/<out stem>/ next to --out)")
    p.add_argument("--site", metavar="DIR", help="also write a self-contained static page (index.html) to DIR")
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser("compare", help="paired comparison of two methods' results under one protocol")
    p.add_argument("a", help="method (leaderboard row label) A")
    p.add_argument("b", help="method (leaderboard row label) B")
    p.add_argument("--protocol", required=True, help="protocol id")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help=f"results folder (default {DEFAULT_RESULTS})")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("validate", help="check result files against the JSON Schema and their protocol")
    p.add_argument("files", nargs="+", help="result JSON files (manifests, grid records and other non-result JSON "
                                            "files are named and skipped)")
    p.set_defaults(func=_cmd_validate)
    if plugin_commands:
        from .methods import add_commands

        add_commands(sub)
    return parser


def _builtin_commands() -> set[str]:
    sub = next(a for a in build_parser(plugin_commands=False)._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def _refusal_line(exc: OSError, command: str | None) -> str:
    """One line for a full disk, quota, read-only or forbidden path met outside benchsuite's own
    writers: the file (a rename's target, not its temporary source), the reason, what to do."""
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    where = f"{name}: " if name is not None else ""
    return (f"benchsuite: error: {where}{exc.strerror} ({errno_name(exc.errno)}); "
            f"{refusal_advice(exc.errno, WRITES_TO.get(command or '', WRITE_ELSEWHERE))}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(plugin_commands=command not in _builtin_commands()).parse_args(argv)
        return args.func(args)
    except BenchsuiteError as exc:
        if isinstance(exc, WriteError) and command in WRITES_TO:
            exc.elsewhere = WRITES_TO[command]
        print(f"benchsuite: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in REFUSAL_ERRNOS:
            raise  # not the file system refusing a file: a bug, whose traceback is the report
        print(_refusal_line(exc, command), file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"benchsuite: stopped: {exc}; rerun the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("benchsuite: interrupted; finished jobs are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
