"""Dassl's learning-rate schedule: constant warm-up, then a cosine restarted after it, stepped per epoch.

With base LR eta, E epochs and W warm-up epochs (WARMUP_RECOUNT=True, T_max=E, eta_min=0):
lr(e) = warmup_lr for e < W, else eta * (1 + cos(pi * (e - W) / E)) / 2. The cosine therefore
never reaches 0: E=5, W=1 gives [1e-5, eta, 0.905 eta, 0.655 eta, 0.345 eta] (methods.md 1.3).
"""

from __future__ import annotations

import math


def epoch_lr(epoch: int, epochs: int, lr: float, *, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    if epoch < warmup_epochs:
        return warmup_lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))
