"""What follows a run, as a table: decide.next_action is a pure function of the evidence."""

from __future__ import annotations

import pytest

from autoresearch_cli.doors.records import Run
from autoresearch_cli.research import decide
from autoresearch_cli.research.evidence import CommitEvidence
from autoresearch_cli.research.keeprule import CONFIRM, DISCARD, KEEP, Noise, Rule

NOISE = Noise(0.01, 20, 4)
LIMITS = decide.Limits(repair_attempts=1, disturbed_retries=2, best_runs_needed=2)


def commit(*values: float, sha: str = "c" * 40) -> CommitEvidence:
    runs = tuple(Run(id=i, kind="experiment", status="ok", started_at="", sha=sha, val_bpb=v)
                 for i, v in enumerate(values, start=1))
    return CommitEvidence(sha, "cpu:2", runs, NOISE)


BEST = commit(2.00, 2.00, 2.01, sha="b" * 40)


@pytest.mark.parametrize(
    ("ended", "candidate", "best", "limits", "expected"),
    [
        # the keep test decides scored candidates
        (decide.RunEnd("experiment", "ok"), commit(1.90), BEST, LIMITS, KEEP),
        (decide.RunEnd("experiment", "ok"), commit(2.05), BEST, LIMITS, DISCARD),
        (decide.RunEnd("experiment", "ok"), commit(1.980), BEST, LIMITS, CONFIRM),
        (decide.RunEnd("confirmation", "ok"), commit(1.980, 1.981), BEST, LIMITS, KEEP),
        (decide.RunEnd("repair", "ok"), commit(1.90), BEST, LIMITS, KEEP),
        # a best with too few runs on this hardware: judge later
        (decide.RunEnd("experiment", "ok"), commit(1.90), commit(2.0, sha="b" * 40), LIMITS,
         decide.WAIT),
        (decide.RunEnd("experiment", "ok"), commit(1.90), commit(2.0, sha="b" * 40),
         decide.Limits(1, 2, 0), KEEP),  # no more runs of the best are coming: judge now
        # measurements only add evidence
        (decide.RunEnd("baseline", "ok"), commit(2.0), None, LIMITS, decide.RECORD),
        (decide.RunEnd("remeasure", "ok"), commit(2.0), BEST, LIMITS, decide.RECORD),
        # disturbed runs are run again, a bounded number of times, never judged
        (decide.RunEnd("experiment", "ok", disturbed="disturbed: 40%"), commit(1.5), BEST,
         LIMITS, decide.RERUN),
        (decide.RunEnd("remeasure", "ok", disturbed="disturbed", retries=1), commit(2.0), BEST,
         LIMITS, decide.RERUN),
        (decide.RunEnd("experiment", "ok", disturbed="disturbed", retries=2), commit(1.5), BEST,
         LIMITS, decide.DONE),
        (decide.RunEnd("confirmation", "ok", disturbed="disturbed", retries=2), commit(1.5), BEST,
         LIMITS, DISCARD),
        # failures: a repair while attempts remain
        (decide.RunEnd("experiment", "crash"), None, BEST, LIMITS, decide.REPAIR),
        (decide.RunEnd("experiment", "timeout"), None, BEST, LIMITS, decide.REPAIR),
        (decide.RunEnd("repair", "oom", repairs_so_far=1), None, BEST, LIMITS, decide.DONE),
        (decide.RunEnd("experiment", "crash"), None, BEST, decide.Limits(0, 2, 2), decide.DONE),
        (decide.RunEnd("experiment", "invalid"), None, BEST, LIMITS, decide.DONE),
        (decide.RunEnd("confirmation", "crash"), commit(1.985), BEST, LIMITS, DISCARD),
    ],
)
def test_next_action(ended, candidate, best, limits, expected):
    action = decide.next_action(ended, candidate, best, NOISE, Rule(), limits)
    assert action.kind == expected
    assert action.reason
    if expected in (KEEP, DISCARD, CONFIRM):
        assert action.judgement is not None and action.judgement.verdict == expected


def test_every_action_is_named_once():
    assert len(set(decide.ACTIONS)) == len(decide.ACTIONS) == 8
