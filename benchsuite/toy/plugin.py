"""The toy world as a plugin: its datasets, its small CLIP and its `toy-pretrain` command.

Registered in pyproject.toml under the `benchsuite` entry-point group, exactly as a third-party
plugin registers; the core never imports `benchsuite.toy`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..clip.backbone import ModelSpec
from ..hookspecs import hookimpl
from . import pretrain
from .datasets import dataset_spec, toy_datasets


@hookimpl
def benchsuite_datasets():
    return [dataset_spec(name) for name in toy_datasets()]


@hookimpl
def benchsuite_models():
    return [ModelSpec(pretrain.MODEL_NAME, pretrain.CONFIG_PATH,
                      {pretrain.CHECKPOINT_PATH.name: pretrain.CHECKPOINT_PATH})]


def _cmd_toy_pretrain(args: argparse.Namespace) -> int:
    given = {"seed": args.seed, "pairs": args.pairs, "steps": args.steps, "batch_size": args.batch_size}
    settings = pretrain.PretrainSettings(**{k: v for k, v in given.items() if v is not None})
    card = pretrain.pretrain(settings, Path(args.out) if args.out else pretrain.HERE)
    print(json.dumps(card["zero_shot"], indent=2))
    return 0


@hookimpl
def benchsuite_commands(subparsers):
    p = subparsers.add_parser("toy-pretrain", help="pretrain the small CLIP shipped with benchsuite on the toy world")
    p.add_argument("--seed", type=int, help="default: PretrainSettings in benchsuite/toy/pretrain.py (0)")
    p.add_argument("--pairs", type=int, help="captioned images rendered for pretraining (default 40000)")
    p.add_argument("--steps", type=int, help="default 1500")
    p.add_argument("--batch-size", type=int, help="default 256")
    p.add_argument("--out", help="output folder (default: the package's benchsuite/toy, replacing the shipped model)")
    p.set_defaults(func=_cmd_toy_pretrain)
