"""The harness-owned augmentation stream: the random view of a training sample is a function of
(run seed, epoch, sample index, view) only.

Why: a grid runs many methods and ``--set`` variants on the same few-shot images. When the random
crop of sample i in epoch e depended on the loader's consumption order (batch size, workers,
what a method drew from torch's generator before), every method paid for its own augmented copies
and its own image-encoder passes. Keyed draws make the views identical across methods, batch sizes,
worker counts and resumed runs, so the frozen features of one epoch's views can be computed once
and shared (`benchsuite.engine.training_features`).

Each draw runs under a private torch CPU generator state and Python ``random`` state seeded from the
key, and restores both afterwards, so the caller's streams (shuffling, initialisation) are untouched.
Only the CPU generator is seeded (the transforms draw from it): ``torch.manual_seed`` would also
reseed every CUDA generator, which ``fork_rng(devices=[])`` does not restore (on a GPU each draw
would reset the caller's CUDA dropout stream), and before CUDA starts it formats a stack trace per
call for CUDA's lazy seeding.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

#: recorded in every result (``data.train.augmentation_stream``) and part of the job identity:
#: results drawn from another stream are never reused as if they were the same run
STREAM_VERSION = 1


def sample_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    """A 63-bit seed for one draw: sha256 of the key, so nearby keys give unrelated streams."""
    blob = f"benchsuite-augmentation/{STREAM_VERSION}/{int(seed)}/{int(epoch)}/{int(index)}/{int(view)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def keyed_draw(seed: int, epoch: int, index: int, view: int = 0) -> Iterator[None]:
    """Run the body with torch's CPU generator and Python ``random`` seeded from the key; the
    previous states of both are restored on exit (also on an exception)."""
    import torch  # here, so that STREAM_VERSION can be read by modules that must not import torch

    value = sample_seed(seed, epoch, index, view)
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(value)  # the CPU stream alone: see the module docstring
        random.seed(value)
        try:
            yield
        finally:
            random.setstate(python_state)
