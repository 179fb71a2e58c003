"""What happens after a run ends: one pure function of its evidence and the rules.

    action = next_action(ended, candidate, best, noise, rule, limits)

returns one of

- KEEP / DISCARD: the keep test (keeprule.judge) decided the candidate's commit;
- CONFIRM: the test cannot decide yet: another run of the same commit on the next seed;
- RERUN: the run got too little of the machine (disturbed): the same run again, bounded
  by `disturbed_retries`, never judged;
- REPAIR: the run trained and failed (crash, timeout, oom): the agent may fix it, bounded
  by `repair_attempts`;
- WAIT: the best has not run yet on some seed the candidate ran on (its partner): those
  runs first (`seeds`), then judge;
- RECORD: a measurement of a commit already on the branch (baseline, re-measure), or a
  run that studies the research (ablation, transfer): it only adds evidence, never a
  verdict;
- DONE: nothing more to do for it (an invalid proposal, a failure with no repair left, a
  disturbed run out of retries).

The scheduler performs the action (research/scheduler.py); it does not decide.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autoresearch_cli.doors.records import MEASURE_KINDS, STUDY_KINDS
from autoresearch_cli.research.evidence import CommitEvidence, failed, missing_partners, pairs
from autoresearch_cli.research.keeprule import (
    CONFIRM,
    DISCARD,
    KEEP,
    Judgement,
    Rule,
    judge,
)

RERUN, REPAIR, WAIT, RECORD, DONE = "rerun", "repair", "wait", "record", "done"
ACTIONS = (KEEP, DISCARD, CONFIRM, RERUN, REPAIR, WAIT, RECORD, DONE)


@dataclass(frozen=True)
class RunEnd:
    """A run as the scheduler saw it end, after ar's own checks."""

    kind: str  # records.KINDS: baseline, remeasure, experiment, ..., ablation, transfer
    status: str  # ok, crash, timeout, oom, invalid (tampering found by ar included)
    disturbed: str | None = None  # why it got too little of the machine, if it did
    retries: int = 0  # disturbed runs before this one in its chain
    repairs_so_far: int = 0  # repairs before this one in its chain


@dataclass(frozen=True)
class Limits:
    repair_attempts: int = 1
    disturbed_retries: int = 2
    partners: bool = True  # runs of the best on missing seeds may still come: wait for them


@dataclass(frozen=True)
class Action:
    kind: str  # one of ACTIONS
    reason: str
    judgement: Judgement | None = None  # the keep test, for KEEP, DISCARD and CONFIRM
    seeds: tuple[int, ...] = ()  # for WAIT: the seed indices the best must run on


def next_action(ended: RunEnd, candidate: CommitEvidence | None, best: CommitEvidence | None,
                rule: Rule, limits: Limits) -> Action:
    """What to do now about the run that ended (see the module's docstring). `candidate`
    and `best` are their runs on the candidate's hardware class."""
    if ended.disturbed:
        return _disturbed(ended, limits)
    if ended.kind in MEASURE_KINDS:
        return Action(RECORD, "a measurement of a commit on the branch")
    if ended.kind in STUDY_KINDS:  # never judged: an ablation beating the best keeps nothing
        return Action(RECORD, f"an {ended.kind} run: evidence for the report, never a verdict")
    if ended.status != "ok" or candidate is None or not candidate.runs:
        return _not_scored(ended, limits)
    missing = missing_partners(candidate, best)
    if missing and limits.partners:
        seeds = ", ".join(map(str, missing))
        return Action(WAIT, f"waiting for the best's run on seed {seeds} (its partner)",
                      seeds=tuple(missing))
    verdict = judge(pairs(candidate, best), rule)
    if verdict.verdict == CONFIRM and (candidate.n >= rule.max_runs or missing):
        # its runs cannot all be paired (the best's runs there failed): more of them would
        # not be either, and every loop that runs work again is bounded
        reason = (f"discarded: not shown better after {candidate.n} runs, "
                  f"{len(verdict.runs)} of them paired with the best's: {verdict.reason}")
        verdict = dataclasses.replace(verdict, verdict=DISCARD, reason=reason)
    return Action(verdict.verdict, verdict.reason, verdict)


def _disturbed(ended: RunEnd, limits: Limits) -> Action:
    if ended.retries < limits.disturbed_retries:
        return Action(RERUN, f"{ended.disturbed}: run again ({ended.retries + 1} of "
                             f"{limits.disturbed_retries})")
    if ended.kind == "confirmation":
        reason = f"discarded: its confirmation runs were disturbed {ended.retries + 1} times"
        return Action(DISCARD, reason, Judgement(DISCARD, reason, (), ()))
    return Action(DONE, f"{ended.disturbed}: not run again after {ended.retries} retries")


def _not_scored(ended: RunEnd, limits: Limits) -> Action:
    if ended.kind == "confirmation":  # the candidate it confirms cannot be shown better
        reason = f"discarded: a confirmation run ended {ended.status}"
        return Action(DISCARD, reason, Judgement(DISCARD, reason, (), ()))
    if failed(ended.status) and ended.repairs_so_far < limits.repair_attempts:
        return Action(REPAIR, f"the run ended {ended.status}: the agent may repair it")
    return Action(DONE, f"the run ended {ended.status}")
