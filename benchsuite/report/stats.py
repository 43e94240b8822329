"""Seed statistics computed the way a protocol aggregates, and their bootstrap intervals.

Estimator (README, "Seed statistics"): a job's seeds are resampled with replacement *jointly*
across datasets (a resample is one multiset of seeds, used for every dataset, because seed s of
every dataset shares the run's randomness source), the protocol's headline numbers are recomputed
from the resampled seed means exactly as the leaderboard computes them (base-to-new: mean Base,
mean New and HM of those two means; transfer: mean over targets; few-shot: mean over datasets),
and the 95% interval is the percentile interval of that bootstrap distribution. With n seeds the
n^n ordered resamples are enumerated exactly when n^n <= 100,000 (3 seeds: 27), so the interval is
deterministic; otherwise 20,000 resamples are drawn from a generator seeded with 0. Percentiles:
the lower bound is the smallest value v with F(v) >= 2.5%, the upper the smallest with
F(v) >= 97.5% (F the bootstrap distribution's CDF). With 3 seeds that is the minimum and the
maximum over the 27 resamples: read such an interval as "the range seed noise spans", not as a
calibrated 95% confidence interval.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Callable, Mapping, Sequence

Cells = Mapping[str, Mapping[int, Mapping[str, float]]]  # dataset -> seed -> metric key -> accuracy
Statistic = Callable[[Sequence[int]], Mapping[str, float]]

EXACT_LIMIT = 100_000
DRAWS = 20_000


def hm(b: float, n: float) -> float:
    """Harmonic mean of base and new accuracy (0 when both are 0)."""
    return 0.0 if b + n == 0 else 2.0 * b * n / (b + n)


def seed_mean(cell: Mapping[int, Mapping[str, float]], key: str, seeds: Sequence[int]) -> float:
    """Mean of one metric over `seeds` (repeats count as often as they appear)."""
    return statistics.fmean(cell[s][key] for s in seeds)


def seed_std(cell: Mapping[int, Mapping[str, float]], key: str) -> float | None:
    """Sample standard deviation (n - 1) over the cell's seeds; None with fewer than two."""
    values = [m[key] for m in cell.values()]
    return statistics.stdev(values) if len(values) > 1 else None


def seed_hms(cell: Mapping[int, Mapping[str, float]]) -> list[float]:
    """Per-seed base-to-new HMs (what `--std` spreads for a dataset's HM)."""
    return [hm(m["base"], m["new"]) for m in cell.values()]


def aggregate(task: str, cells: Cells, names: Sequence[str], seeds: Sequence[int]) -> dict[str, float]:
    """The protocol's headline numbers from the seed means over `seeds`.

    `names` are the datasets (base2new, few_shot) or the target evaluation names (transfer, whose
    `cells` hold the one source dataset)."""
    if task == "base2new":
        b = statistics.fmean(seed_mean(cells[d], "base", seeds) for d in names)
        n = statistics.fmean(seed_mean(cells[d], "new", seeds) for d in names)
        return {"base": b, "new": n, "hm": hm(b, n)}
    if task == "transfer":
        (source,) = cells.keys()
        return {"average": statistics.fmean(seed_mean(cells[source], t, seeds) for t in names)}
    return {"average": statistics.fmean(seed_mean(cells[d], "test", seeds) for d in names)}


def resamples(seeds: Sequence[int]) -> list[tuple[int, ...]]:
    """Every ordered resample of `seeds` when few enough, else a fixed pseudo-random set."""
    n = len(seeds)
    if n ** n <= EXACT_LIMIT:
        return list(itertools.product(seeds, repeat=n))
    rng = random.Random(0)
    return [tuple(rng.choice(seeds) for _ in range(n)) for _ in range(DRAWS)]


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(lower, upper): smallest values whose empirical CDF reaches (1-level)/2 and (1+level)/2."""
    ordered = sorted(values)
    m = len(ordered)
    tail = (1.0 - level) / 2.0
    low = max(math.ceil(tail * m - 1e-9) - 1, 0)
    high = min(max(math.ceil((1.0 - tail) * m - 1e-9) - 1, 0), m - 1)
    return ordered[low], ordered[high]


def bootstrap(statistic: Statistic, seeds: Sequence[int], level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile interval of every number `statistic(resampled seeds)` returns."""
    draws = [statistic(r) for r in resamples(list(seeds))]
    return {key: percentile_interval([d[key] for d in draws], level) for key in draws[0]}


def common_seeds(cells: Cells, names: Sequence[str] | None = None) -> list[int]:
    """Seeds present for every dataset in `names` (all of `cells` when None), sorted."""
    keys = list(cells) if names is None else [n for n in names if n in cells]
    sets = [set(cells[k]) for k in keys]
    return sorted(set.intersection(*sets)) if sets else []


__all__ = ["aggregate", "bootstrap", "common_seeds", "hm", "percentile_interval", "resamples", "seed_hms",
           "seed_mean", "seed_std"]
