"""The toy world: procedurally generated images, toy datasets in the CoOp layout, pretraining pairs.

Users and CI have no datasets and no network; `materialize(default_root())` writes the toy datasets
(a few thousand 64×64 PNGs, seconds) and `benchsuite.toy.plugin` registers them (and the small
CLIP) through the `benchsuite` entry-point group, the public path a third party uses.
"""

from .datasets import (
    MARKER,
    TOY_WORLD_VERSION,
    ToyDataset,
    default_root,
    materialize,
    pretraining_pair,
    pretraining_pairs,
    materialized_root,
    render_item,
    split_sizes,
    toy_classnames,
    toy_dataset,
    toy_dataset_names,
    toy_datasets,
)
from .world import COLORS, COUNTS, DOMAINS, SHAPES, TEXTURES, Scene, caption, render, sample_scene

__all__ = [
    "COLORS", "COUNTS", "DOMAINS", "MARKER", "SHAPES", "TEXTURES", "TOY_WORLD_VERSION", "Scene", "ToyDataset",
    "caption", "default_root", "materialize", "pretraining_pair", "pretraining_pairs", "materialized_root",
    "render", "render_item", "sample_scene", "split_sizes", "toy_classnames", "toy_dataset",
    "toy_dataset_names", "toy_datasets",
]
