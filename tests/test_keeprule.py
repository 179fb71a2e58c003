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
    Rule,
    disturbed,
    judge,
    noise,
)

BEST = (2.000, 2.020, 1.990, 2.010, 2.005, 1.995)  # the best's runs on seeds 0..5


def pairs(*runs: float) -> list[tuple[int, float, float]]:
    """The candidate's runs on seeds 0, 1, ..., each with the best's run on that seed."""
    return [(index, value, BEST[index]) for index, value in enumerate(runs)]


@pytest.mark.parametrize(
    ("runs", "expected", "why"),
    [
        # one pair never keeps, however good: one run's luck is never kept
        ((1.90,), CONFIRM, "never kept"),
        # a loss or a tie on its seed: discarded after one run
        ((2.03,), DISCARD, "no better"),
        ((2.00,), DISCARD, "no better"),
        # a steady gain, the same on every seed: kept from the second pair on
        ((1.990, 2.012), CONFIRM, "needs another run"),
        ((1.990, 2.012, 1.980), KEEP, "kept"),
        # a gain that moves with the seed: more pairs, then no
        ((1.99, 2.019, 1.97, 2.012, 1.99, 1.99), DISCARD, "not shown better after 6 pairs"),
        # a gain too small for its spread to show even with max_runs pairs: futility
        ((1.999, 2.019, 1.990), DISCARD, "too small"),
        # runs on different seeds that score the same: the seed does not reach the run
        ((1.9, 1.9), DISCARD, "does not reach the run"),
    ],
)
def test_the_paired_sequential_keep_rule(runs, expected, why):
    judged = judge(pairs(*runs), Rule())
    assert judged.verdict == expected, judged.reason
    assert why in judged.reason
    assert judged.runs == runs and judged.best_runs == BEST[:len(runs)]
    assert judged.gain == pytest.approx(sum(BEST[:len(runs)]) / len(runs) - sum(runs) / len(runs))
    if len(runs) >= 2 and expected != DISCARD or "pairs" in why:
        assert judged.p is not None and 0 <= judged.p <= 1 and judged.df == len(runs) - 1


def test_the_spread_is_the_candidates_own():
    """The same mean gain: tight pairs (a change that moves little) are kept, pairs that
    spread like independent runs are not."""
    tight = [(i, b - 0.004 + 0.0005 * (-1) ** i, b) for i, b in enumerate(BEST[:3])]
    loose = [(i, b - 0.004 + 0.012 * (-1) ** i, b) for i, b in enumerate(BEST[:3])]
    assert judge(tight, Rule()).verdict == KEEP
    assert judge(loose, Rule()).verdict != KEEP


def test_min_delta_is_a_floor_on_the_improvement():
    steady = pairs(1.980, 2.000, 1.970)
    assert judge(steady, Rule()).verdict == KEEP
    assert judge(steady, Rule(min_delta=0.03)).verdict == DISCARD


def test_no_best_keeps_and_the_one_run_rule():
    assert judge([], Rule()).verdict == KEEP
    one_run = Rule(name="one-run", min_delta=0.0)
    assert judge(pairs(1.9999), one_run).verdict == KEEP
    assert judge(pairs(2.0), one_run).verdict == DISCARD
    keep = settings_of(default_config("micro", "t"))
    one_run = dataclasses.replace(keep.keep, rule="one-run", min_delta=-1)
    assert Rule.from_settings(one_run, 0.02).min_delta == pytest.approx(0.04)
    assert Rule.from_settings(dataclasses.replace(one_run, rule="sequential"), 0.02).min_delta == 0.0
    assert Rule.from_settings(dataclasses.replace(one_run, min_delta=0.01)).min_delta == 0.01


@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("tails", ["normal", "heavy"])
def test_a_change_that_does_nothing_is_kept_at_most_level_of_the_time(correlation, tails):
    """Simulated null changes, whatever their correlation with the best (a rewrite: 0; a
    constant moved a little: 0.99), with normal or heavy-tailed (Student t, 3 df) luck:
    run confirmations while the rule asks for them; the keep rate stays under `level`.
    One run deciding would keep about half of them."""
    import numpy as np

    rng = np.random.default_rng(int(correlation * 100) + (tails == "heavy"))
    rule, trials = Rule(level=0.05, max_runs=6), 2000

    def luck(size):
        if tails == "normal":
            return rng.standard_normal(size)
        return rng.standard_t(3, size) / np.sqrt(3)

    kept = one_run_kept = 0
    for _ in range(trials):
        seed_luck = luck(rule.max_runs)  # shared by both commits on a seed
        best = 2.0 + 0.01 * (np.sqrt(correlation) * seed_luck + np.sqrt(1 - correlation) * luck(rule.max_runs))
        mine = 2.0 + 0.01 * (np.sqrt(correlation) * seed_luck + np.sqrt(1 - correlation) * luck(rule.max_runs))
        one_run_kept += mine[0] < best[0]
        n = 1
        while (verdict := judge([(i, mine[i], best[i]) for i in range(n)], rule).verdict) == CONFIRM:
            n += 1
        kept += verdict == KEEP
    assert kept / trials <= 0.05
    assert one_run_kept / trials > 0.4


def test_a_best_is_rejudged_when_its_pairs_no_longer_hold():
    from autoresearch_cli.research.keeprule import no_longer_holds

    rule = Rule()
    assert no_longer_holds(pairs(1.98), rule) is None  # too few pairs to judge again
    assert no_longer_holds(pairs(1.98, 2.0, 1.97), rule) is None  # still a gain
    assert "no gain" in no_longer_holds(pairs(1.98, 2.05, 2.0), rule)
    wobbly = pairs(1.99, 2.03, 1.98, 2.02, 1.99, 2.0)  # a small gain, not shown over 6 pairs
    assert "not shown better" in no_longer_holds(wobbly, rule)


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
