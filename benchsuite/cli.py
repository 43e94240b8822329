"""The single command line: `benchsuite list | run | leaderboard | validate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from .errors import BenchsuiteError

DEFAULT_RESULTS = Path("leaderboard/results")
DEFAULT_LEADERBOARD = Path("leaderboard/README.md")


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from .methods import discover

        rows = [(e.name, e.source if e.source == "builtin" else f"{e.source} {e.version}", e.entry_point,
                 "yes" if e.cls.frozen_image_encoder else "no", e.cls.summary) for e in discover().values()]
        print(tabulate(rows, headers=["method", "from", "entry point", "frozen image encoder", "summary"]))
    elif args.what == "protocols":
        from .protocols import all_protocols

        rows = []
        for p in all_protocols():
            data = ", ".join(p.train_datasets) + (f" -> {', '.join(p.spec['targets'])}" if p.task == "transfer" else "")
            rows.append((p.id, p.version, p.hash if args.hashes else p.hash[:12], p.task,
                         ",".join(map(str, p.shots)), ",".join(map(str, p.seeds)), data))
        print(tabulate(rows, headers=["protocol", "version", "hash", "task", "shots", "seeds", "datasets"]))
    else:
        from .data.registry import DATASETS

        rows = [(d.name, d.title, f"$DATA/{d.folder}/", "test only" if d.test_only else "train/val/test", d.template)
                for d in DATASETS.values()]
        print(tabulate(rows, headers=["dataset", "title", "folder", "splits", "template"]))
    return 0


def _resolve_world(args: argparse.Namespace):
    """Protocol, data root, backbone name and weights for a run.

    With neither --data-root nor --backbone, a real protocol runs its toy counterpart on the shipped
    small CLIP (the embedded default); toy protocols default to the toy world and the small CLIP.
    """
    from .protocols import load_protocol

    protocol_id = args.protocol
    if not protocol_id.startswith("toy_") and args.data_root is None and args.backbone is None:
        protocol_id = f"toy_{protocol_id}"
        print(f"benchsuite: no --data-root and no --backbone: running {protocol_id}, the toy-world counterpart of "
              f"{args.protocol}, on the shipped small CLIP (pass --data-root and --backbone for the real benchmark)")
    protocol = load_protocol(protocol_id)
    if "backbone" in protocol.spec:  # a toy protocol: the toy world and its small CLIP by default
        from .toy.datasets import default_root, materialize

        data_root = Path(args.data_root) if args.data_root else materialize(default_root())
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


def _cmd_run(args: argparse.Namespace) -> int:
    from .data.loaders import PRELOAD_BUDGET
    from .engine.feature_cache import FeatureCache
    from .engine.jobs import expand_grid
    from .engine.recipe import parse_overrides
    from .engine.runner import Runner
    from .leaderboard import build_tables, load_results
    from .methods import discover

    protocol, data_root, model, pretrained = _resolve_world(args)
    methods = sorted(discover()) if not args.method or args.method == ["all"] else args.method
    jobs = expand_grid(protocol, methods, args.dataset, args.seeds, args.shots)
    print(f"benchsuite: {len(jobs)} job(s) of {protocol.id} v{protocol.version} on {model}/{pretrained}; "
          f"data {data_root}", flush=True)
    backbone = _load_backbone(args, model, pretrained)
    print(f"benchsuite: {backbone.precision} on {backbone.device}", flush=True)
    backbone.truncate_text = not args.no_text_truncation
    results = Path(args.results)
    cache = None if args.no_feature_cache else FeatureCache(args.feature_cache)
    runner = Runner(backbone, data_root, results, manifests_root=results / "_manifests",
                    overrides=parse_overrides(args.set or []), workers=args.workers, feature_cache=cache,
                    preload_budget=0 if args.no_preload else PRELOAD_BUDGET,
                    class_text_once=not args.no_class_text_once, allow_model_selection=args.allow_model_selection)
    summary = runner.run(jobs)
    print(f"benchsuite: {len(summary.written)} written, {len(summary.skipped)} skipped, "
          f"{len(summary.failed)} failed; results in {results}")
    for line in summary.failed:
        print(f"  failed: {line}", file=sys.stderr)
    if not args.quiet:
        print("\n" + build_tables(load_results(results, [protocol.id])[0]).rstrip())
    return 1 if summary.failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import format_report, run_bench
    from .engine.recipe import parse_overrides

    backbone = _load_backbone(args, args.backbone, args.pretrained)
    report = run_bench(backbone, args.method, args.protocol, warmup=args.warmup, iters=args.iters,
                       eval_images=args.eval_images, workers=args.workers, overrides=parse_overrides(args.set or []),
                       compare=parse_overrides(args.compare or []), straightforward=not args.no_straightforward)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _cmd_toy_pretrain(args: argparse.Namespace) -> int:
    import json

    from .toy.pretrain import HERE, PretrainSettings, pretrain

    given = {"seed": args.seed, "pairs": args.pairs, "steps": args.steps, "batch_size": args.batch_size}
    settings = PretrainSettings(**{k: v for k, v in given.items() if v is not None})
    card = pretrain(settings, Path(args.out) if args.out else HERE)
    print(json.dumps(card["zero_shot"], indent=2))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .engine.feature_cache import FeatureCache

    cache = FeatureCache(args.feature_cache)
    if args.action == "clear":
        print(f"removed {cache.clear()} cached feature set(s) from {cache.root}")
        return 0
    rows = [(e.key[:12], e.meta.get("model"), e.meta.get("pretrained"), e.meta.get("precision"),
             e.meta.get("n_images"), f"{e.bytes / 2**20:.1f}") for e in cache.entries()]
    print(tabulate(rows, headers=["key", "model", "pretrained", "precision", "images", "MiB"]))
    print(f"{len(rows)} entries in {cache.root}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import write_leaderboard

    problems = write_leaderboard(Path(args.results), Path(args.out), check=args.check, tolerance=args.tolerance)
    if args.check:
        if problems:
            for problem in problems[:20]:
                print(f"  {problem}", file=sys.stderr)
            print(f"{args.out} is stale: run `benchsuite leaderboard --results {args.results} --out {args.out}`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date" + (f" (within {args.tolerance} points)" if args.tolerance else ""))
        return 0
    print(f"wrote {args.out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .results.validate import validate_files

    problems = validate_files([Path(f) for f in args.files])
    bad = 0
    for path, messages in problems.items():
        if messages:
            bad += 1
            for message in messages:
                print(f"{path}: {message}")
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchsuite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="installed methods, frozen protocols, known datasets")
    p.add_argument("what", choices=["methods", "protocols", "datasets"])
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
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help=f"results folder (default {DEFAULT_RESULTS})")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override recipe entries (marks results non-default)")
    p.add_argument("--workers", type=int, help="data loader worker processes (default: 0 on CPU, 8 on CUDA)")
    p.add_argument("--model-cache", help="where open_clip caches downloaded weights")
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
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="time a method's training step and evaluation against the image-encoder floor")
    p.add_argument("--method", required=True)
    p.add_argument("--protocol", default="base2new", help="shapes come from this protocol's recipe (default base2new)")
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--pretrained", default="none", help="'none' (default): the real architecture with random weights")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "amp"])
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--workers", type=int, help="data loader processes for the pipeline measurement")
    p.add_argument("--model-cache")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                   help="override recipe entries as `run --set` does (cocoop.batch_size=32)")
    p.add_argument("--compare", nargs="+", metavar="KEY=VALUE",
                   help="also time the training step of a second instance with these recipe overrides, in "
                        "alternation (cocoop.batched_text=false: CoCoOp's per-image loop)")
    p.add_argument("--no-straightforward", action="store_true",
                   help="skip timing the training step with the fast paths off")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("toy-pretrain", help="pretrain the small CLIP shipped with benchsuite on the toy world")
    p.add_argument("--seed", type=int, help="default: PretrainSettings in benchsuite/toy/pretrain.py (0)")
    p.add_argument("--pairs", type=int, help="captioned images rendered for pretraining (default 40000)")
    p.add_argument("--steps", type=int, help="default 1500")
    p.add_argument("--batch-size", type=int, help="default 256")
    p.add_argument("--out", help="output folder (default: the package's benchsuite/toy, replacing the shipped model)")
    p.set_defaults(func=_cmd_toy_pretrain)

    p = sub.add_parser("cache", help="list or clear the test-set feature cache")
    p.add_argument("action", choices=["ls", "clear"])
    p.add_argument("--feature-cache", help="cache folder (default $BENCHSUITE_CACHE/features)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("leaderboard", help="merge result files into the markdown leaderboard")
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--out", default=str(DEFAULT_LEADERBOARD))
    p.add_argument("--check", action="store_true", help="exit 1 if --out is stale (for CI); writes nothing")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="with --check: accept accuracies within this many points (regenerated toy runs)")
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser("validate", help="check result files against the JSON Schema and their protocol")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchsuiteError as exc:
        print(f"benchsuite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchsuite: interrupted; finished jobs are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
