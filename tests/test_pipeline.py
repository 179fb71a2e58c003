"""The rules of one experiment, as tables: keep or discard, the threshold, repairs, validation."""

from __future__ import annotations

import math

import pytest

from autoresearch_cli.pipeline import DISCARD, KEEP, decide, min_delta, should_repair, validate


@pytest.mark.parametrize(
    ("status", "val_bpb", "best_bpb", "threshold", "expected"),
    [
        # beats the best by more than the threshold
        ("ok", 1.90, 2.00, 0.0, KEEP),
        ("ok", 1.90, 2.00, 0.05, KEEP),
        # within the threshold, or exactly on it: not enough
        ("ok", 1.96, 2.00, 0.05, DISCARD),
        ("ok", 1.95, 2.00, 0.05, DISCARD),
        # a tie with the best is a discard, with or without a threshold
        ("ok", 2.00, 2.00, 0.0, DISCARD),
        # worse
        ("ok", 2.10, 2.00, 0.0, DISCARD),
        # no best to beat (no baseline, or the parent crashed): any score is kept
        ("ok", 2.10, None, 0.0, KEEP),
        ("ok", 9.99, None, 0.5, KEEP),
        # a failed run has no score: no decision, whatever the best
        ("crash", None, 2.00, 0.0, None),
        ("timeout", None, None, 0.0, None),
        ("oom", None, 2.00, 0.0, None),
        ("invalid", None, 2.00, 0.0, None),
        # an ok status without a finite score cannot be compared
        ("ok", None, 2.00, 0.0, None),
        ("ok", math.nan, 2.00, 0.0, None),
        ("ok", math.inf, 2.00, 0.0, None),
    ],
)
def test_the_keep_rule(status, val_bpb, best_bpb, threshold, expected):
    assert decide(status, val_bpb, best_bpb, threshold) == expected


@pytest.mark.parametrize(
    ("configured", "std", "runs", "expected"),
    [
        (0.01, 0.5, 5, 0.01),  # a value in ar.toml wins
        (0.0, 0.5, 5, 0.0),
        (-1.0, 0.02, 2, 0.04),  # negative: twice the std of the baseline repeats
        (-1.0, 0.02, 5, 0.04),
        (-1.0, None, 1, 0.0),  # one baseline run measures no noise
        (-1.0, None, 0, 0.0),  # no baseline at all
    ],
)
def test_the_threshold(configured, std, runs, expected):
    assert min_delta(configured, std, runs) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("status", "repairs_so_far", "repair_attempts", "expected"),
    [
        ("crash", 0, 1, True),
        ("timeout", 0, 1, True),
        ("oom", 0, 2, True),
        ("crash", 1, 2, True),
        ("crash", 1, 1, False),  # the attempts are used up
        ("crash", 0, 0, False),  # repairs switched off
        ("ok", 0, 1, False),  # nothing to repair
        ("invalid", 0, 1, False),  # never trained: the agent was told already
        ("interrupted", 0, 1, False),
    ],
)
def test_repairs(status, repairs_so_far, repair_attempts, expected):
    assert should_repair(status, repairs_so_far, repair_attempts) is expected


GOOD = "def build_model(config):\n    pass\n\nprepare.save_for_eval(None, None)\n"


@pytest.mark.parametrize(
    ("train_py", "reason"),
    [
        (GOOD.replace("pass", "return 1"), None),
        (GOOD, "does not change"),
        ("def build_model(:\n", "does not parse: line 1"),
        ("x = 1\n", "must define build_model"),
    ],
)
def test_validation(train_py, reason):
    found = validate(train_py, GOOD)
    assert (found is None) if reason is None else (reason in found)
