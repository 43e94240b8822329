"""Seed every RNG with the calls the CoOp-family toolbox makes at program start (methods.md 1.5).

The calls are the same, not what consumes the numbers afterwards: the toolbox builds a whole CLIP
(drawing from torch's CPU generator) before it initialises a random context, and shuffles with 8
loader workers, whereas benchsuite loads the backbone once before seeding and loads data in the
main process on CPU. Random context initialisations and augmentation streams of seed S therefore
differ from the original seed S; expected accuracies do not (a recorded, harness-wide deviation).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without consuming the job's random streams: every generator `seed_everything`
    seeds is saved before and restored after (the smoke check draws from them)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
