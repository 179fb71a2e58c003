"""The keep rule and the disturbed-run rule, as tables of numbers (keeprule.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from autoresearch_cli.doors.config import default_config, settings_of
from autoresearch_cli.research.keeprule import (
    CONFIRM,
    DISCARD,
    KEEP,
    Disturbance,
    Noise,
    Rule,
    disturbed,
    judge,
    noise,
)

MEASURED = Noise(sigma=0.01, df=10, commits=3)  # runs of one commit differ by ~0.01
BEST = (2.00, 2.00)  # the best's two runs


@pytest.mark.parametrize(
    ("runs", "expected", "why"),
    [
        # a clear win: kept after one run
        ((1.95,), KEEP, "kept"),
        # a clear loss, or a tie: discarded after one run
        ((2.03,), DISCARD, "no better"),
        ((2.00,), DISCARD, "no better"),
        # a marginal win: one run cannot tell, another is asked for...
        ((1.975,), CONFIRM, "needs another run"),
        # ...and confirmed by it
        ((1.975, 1.972), KEEP, "kept"),
        # ...or not: the mean of two runs is too close to the best to show with three
        ((1.975, 1.995), DISCARD, "too small"),
        # three runs, still not shown better: discarded (max_runs)
        ((1.985, 1.99, 1.98), DISCARD, "not shown better after 3 runs"),
        # a win too small to show even with max_runs runs: no confirmation is wasted on it
        ((1.992,), DISCARD, "too small"),
    ],
)
def test_the_sequential_keep_rule(runs, expected, why):
    judged = judge(runs, BEST, MEASURED, Rule())
    assert judged.verdict == expected
    assert why in judged.reason
    assert judged.mean == pytest.approx(sum(runs) / len(runs))
    assert judged.best_mean == pytest.approx(2.0)
    assert judged.p is not None and 0 <= judged.p <= 1


def test_the_test_is_stricter_with_less_noise_measured():
    """The same numbers with noise measured from fewer runs (df 2): Student's t is wider."""
    assert judge((1.975, 1.972), BEST, MEASURED, Rule()).verdict == KEEP
    assert judge((1.975, 1.972), BEST, Noise(0.01, 2, 1), Rule()).verdict == DISCARD


def test_min_delta_is_a_floor_on_the_improvement():
    clear = judge((1.95,), BEST, MEASURED, Rule())
    assert clear.verdict == KEEP
    assert judge((1.95,), BEST, MEASURED, Rule(min_delta=0.06)).verdict == DISCARD


def test_no_best_keeps_and_unmeasured_noise_falls_back_to_one_run():
    assert judge((2.5,), (), MEASURED, Rule()).verdict == KEEP
    unmeasured = Noise(None, 0, 0)
    assert judge((1.999,), BEST, unmeasured, Rule()).verdict == KEEP
    assert "noise not measured" in judge((1.999,), BEST, unmeasured, Rule()).reason
    assert judge((1.999,), BEST, unmeasured, Rule(min_delta=0.01)).verdict == DISCARD


def test_the_one_run_rule():
    one_run = Rule(name="one-run", min_delta=0.0)
    assert judge((1.9999,), BEST, MEASURED, one_run).verdict == KEEP
    assert judge((2.0,), BEST, MEASURED, one_run).verdict == DISCARD
    keep = settings_of(default_config("micro", "t"))
    one_run = dataclasses.replace(keep.keep, rule="one-run", min_delta=-1)
    assert Rule.from_settings(one_run, 0.02).min_delta == pytest.approx(0.04)
    assert Rule.from_settings(dataclasses.replace(one_run, rule="sequential"), 0.02).min_delta == 0.0
    assert Rule.from_settings(dataclasses.replace(one_run, min_delta=0.01)).min_delta == 0.01


def test_the_false_keep_rate_stays_under_the_level():
    """A change that does nothing, judged many times on simulated noise: kept at most
    `level` of the time (Bonferroni over the looks), whereas one run keeps about half."""
    import random

    rng = random.Random(0)
    sigma, rule, trials = 0.01, Rule(level=0.05, max_runs=3), 2000
    kept = one_run_kept = 0
    for _ in range(trials):
        best = [2.0 + rng.gauss(0, sigma) for _ in range(2)]
        runs = [2.0 + rng.gauss(0, sigma)]
        one_run_kept += runs[0] < sum(best) / 2
        while (verdict := judge(runs, best, Noise(sigma, 20, 5), rule).verdict) == CONFIRM:
            runs.append(2.0 + rng.gauss(0, sigma))
        kept += verdict == KEEP
    assert kept / trials <= 0.05
    assert one_run_kept / trials > 0.4


@pytest.mark.parametrize(
    ("groups", "sigma", "df"),
    [
        ([], None, 0),
        ([[2.0]], None, 0),  # one run of a commit measures nothing
        ([[2.0, 2.02]], math.sqrt(0.0002), 1),
        ([[2.0, 2.02], [1.9, 1.9, 1.93]], math.sqrt((0.0002 + 0.0006) / 3), 3),
    ],
)
def test_noise_is_pooled_over_commits_run_more_than_once(groups, sigma, df):
    measured = noise(groups)
    assert measured.df == df
    assert measured.sigma == (None if sigma is None else pytest.approx(sigma))


@pytest.mark.parametrize(
    ("share", "tokens_per_s", "same_code", "why"),
    [
        (0.97, 20000, [21000, 20500], None),  # a quiet run
        (0.5, 20000, [], "took 50%"),  # another process held half the cores
        (None, 9000, [21000, 20500], "43%"),  # the same code, at 43% of its usual speed
        (0.95, 9000, [], None),  # new code may be slower on purpose
        (0.95, 15000, [20000], None),  # 75% of usual: within min_throughput
    ],
)
def test_disturbed_runs(share, tokens_per_s, same_code, why):
    reason = disturbed(share, tokens_per_s, same_code, Disturbance())
    assert (reason is None) if why is None else (why in reason)
