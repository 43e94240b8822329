"""Seed statistics: the bootstrap interval against hand computations."""

import itertools
import statistics

import pytest

from benchsuite.report.stats import aggregate, bootstrap, hm, percentile_interval, seed_std


def _b2n(per_dataset):
    """{dataset: [(base, new) for seeds 1, 2, 3]} -> cells."""
    return {d: {s + 1: {"base": b, "new": n} for s, (b, n) in enumerate(v)} for d, v in per_dataset.items()}


def test_base2new_interval_is_the_hm_of_the_single_seed_averages_when_one_seed_dominates():
    cells = _b2n({"a": [(70, 60), (72, 61), (75, 66)], "b": [(80, 50), (81, 52), (85, 55)]})
    ci = bootstrap(lambda seeds: aggregate("base2new", cells, ["a", "b"], seeds), [1, 2, 3])
    # 27 resamples; the 2.5% and 97.5% points are the minimum and maximum. Every number rises
    # with the seed, so the extremes are "seed 1 three times" and "seed 3 three times":
    low_b, low_n = (70 + 80) / 2, (60 + 50) / 2
    high_b, high_n = (75 + 85) / 2, (66 + 55) / 2
    assert ci["base"] == pytest.approx((75.0, 80.0))
    assert ci["new"] == pytest.approx((low_n, high_n))
    assert ci["hm"] == pytest.approx((2 * low_b * low_n / (low_b + low_n), 2 * high_b * high_n / (high_b + high_n)))
    point = aggregate("base2new", cells, ["a", "b"], [1, 2, 3])
    b, n = (72.333333 + 82) / 2, (62.333333 + 52.333333) / 2
    assert point["hm"] == pytest.approx(2 * b * n / (b + n), abs=1e-4)  # HM of the means, not mean of HMs


def test_seeds_are_resampled_jointly_across_datasets():
    # per seed the two datasets cancel out: the average is 10 under every joint resample, while
    # resampling each dataset on its own would spread it from 0 to 20
    cells = {"a": {1: {"test": 0.0}, 2: {"test": 10.0}, 3: {"test": 20.0}},
             "b": {1: {"test": 20.0}, 2: {"test": 10.0}, 3: {"test": 0.0}}}
    ci = bootstrap(lambda seeds: aggregate("few_shot", cells, ["a", "b"], seeds), [1, 2, 3])
    assert ci["average"] == pytest.approx((10.0, 10.0))


def test_percentile_rule_at_a_narrower_level_matches_a_hand_enumeration():
    values = {1: 0.0, 2: 3.0, 3: 9.0}
    means = sorted(sum(values[s] for s in r) / 3 for r in itertools.product([1, 2, 3], repeat=3))
    # 27 means; 25% -> ceil(6.75) = 7th smallest, 75% -> ceil(20.25) = 21st smallest
    cells = {"x": {s: {"test": v} for s, v in values.items()}}
    ci = bootstrap(lambda seeds: aggregate("few_shot", cells, ["x"], seeds), [1, 2, 3], level=0.5)
    assert ci["average"] == (means[6], means[20])
    # by hand: sums of 3 draws from {0, 3, 9} with multiplicities 0:1 3:3 6:3 9:4 12:6 15:3 18:3 ...
    # cumulative 1, 4, 7, 11, 17, 20, 23: the 7th is sum 6 (mean 2), the 21st sum 18 (mean 6)
    assert means[6] == pytest.approx(2.0) and means[20] == pytest.approx(6.0)


def test_transfer_average_excludes_the_source_and_std_uses_n_minus_one():
    cells = {"src": {1: {"src": 99.0, "t1": 10.0, "t2": 30.0}, 2: {"src": 1.0, "t1": 20.0, "t2": 40.0}}}
    assert aggregate("transfer", cells, ["t1", "t2"], [1, 2]) == {"average": 25.0}
    assert seed_std(cells["src"], "t1") == pytest.approx(statistics.stdev([10.0, 20.0]))
    assert seed_std({1: {"t": 5.0}}, "t") is None
    assert percentile_interval([3.0, 1.0, 2.0, 4.0]) == (1.0, 4.0)
    assert hm(0.0, 0.0) == 0.0
