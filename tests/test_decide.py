"""What follows a run, as a table: decide.next_action is a pure function of the evidence."""

from __future__ import annotations

import pytest

from autoresearch_cli.doors.records import Run
from autoresearch_cli.research import decide
from autoresearch_cli.research.evidence import CommitEvidence
from autoresearch_cli.research.keeprule import CONFIRM, DISCARD, KEEP, Noise, Rule

NOISE = Noise(0.01, 20, 4)
LIMITS = decide.Limits(repair_attempts=1, disturbed_retries=2, partners=True)


def commit(*values: float, sha: str = "c" * 40) -> CommitEvidence:
    """Runs on seed indices 0, 1, ..."""
    runs = tuple(Run(id=i + 1, kind="experiment", status="ok", started_at="", sha=sha,
                     val_bpb=v, seed_index=i) for i, v in enumerate(values))
    return CommitEvidence(sha, "cpu:2", runs, NOISE)


BEST = commit(2.00, 2.02, 2.01, sha="b" * 40)


@pytest.mark.parametrize(
    ("ended", "candidate", "best", "limits", "expected"),
    [
        # the keep test decides scored candidates, on the seeds both ran on
        (decide.RunEnd("experiment", "ok"), commit(1.90), BEST, LIMITS, CONFIRM),
        (decide.RunEnd("experiment", "ok"), commit(2.05), BEST, LIMITS, DISCARD),
        (decide.RunEnd("confirmation", "ok"), commit(1.980, 2.001, 1.991), BEST, LIMITS, KEEP),
        (decide.RunEnd("repair", "ok"), commit(1.980, 2.001, 1.991), BEST, LIMITS, KEEP),
        # the best has not run on the candidate's seed yet: its partner first
        (decide.RunEnd("confirmation", "ok"), commit(1.98, 2.0, 1.99, 1.99), BEST, LIMITS,
         decide.WAIT),
        (decide.RunEnd("experiment", "ok"), commit(1.90), None, LIMITS, decide.WAIT),
        (decide.RunEnd("experiment", "ok"), commit(1.90), None,
         decide.Limits(1, 2, partners=False), KEEP),  # none can come: nothing to beat
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
        (decide.RunEnd("experiment", "crash"), None, BEST, decide.Limits(0, 2), decide.DONE),
        (decide.RunEnd("experiment", "invalid"), None, BEST, LIMITS, decide.DONE),
        (decide.RunEnd("confirmation", "crash"), commit(1.985), BEST, LIMITS, DISCARD),
    ],
)
def test_next_action(ended, candidate, best, limits, expected):
    action = decide.next_action(ended, candidate, best, Rule(), limits)
    assert action.kind == expected, action.reason
    assert action.reason
    if expected == decide.WAIT:
        assert action.seeds and all(index not in (best.by_seed() if best else {})
                                    for index in action.seeds)
    if expected in (KEEP, DISCARD, CONFIRM):
        assert action.judgement is not None and action.judgement.verdict == expected


def test_every_action_is_named_once():
    assert len(set(decide.ACTIONS)) == len(decide.ACTIONS) == 8
