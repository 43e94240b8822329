"""Seed every RNG with the calls the CoOp-family toolbox makes at program start (methods.md 1.5).

The calls are the same, not what consumes the numbers afterwards: the toolbox builds a whole CLIP
(drawing from torch's CPU generator) before it initialises a random context, and shuffles with 8
loader workers, whereas benchsuite loads the backbone once before seeding and loads data in the
main process on CPU. Random context initialisations and augmentation streams of seed S therefore
differ from the original seed S; expected accuracies do not (a recorded, harness-wide deviation).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
