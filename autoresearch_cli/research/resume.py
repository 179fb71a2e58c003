"""Picking up after a stopped ar: the work its ledger rows still owe.

A killed ar leaves rows in flight (on a cluster they may still run: a backend task id in
the row) and scored candidates without a verdict. The scheduler (research/scheduler.py)
reattaches or re-queues the first and judges the second first; this module rebuilds, from
a row alone, the Task and Candidate it would have held.
"""

from __future__ import annotations

from autoresearch_cli.agents.base import Parent
from autoresearch_cli.doors.records import (
    MEASURE_KINDS,
    NEW_COMMIT_KINDS,
    STUDY_KINDS,
    Run,
    budget_of,
)
from autoresearch_cli.research.pipeline import Candidate, Task
from autoresearch_cli.research.session import Session


def task_of(current: Session, run: Run) -> Task:
    """The Task that started `run`, as far as its row tells (a study run keeps its kind and
    its budget, so that a run again is never recorded as another kind or class)."""
    parent = Parent(run.parent_sha or "", None, None, "")
    measure = run.kind in MEASURE_KINDS
    return Task(parent, measure=measure, remeasure=run.kind == "remeasure",
                sha=None if measure else run.sha, description=run.description or "",
                study=run.kind if run.kind in STUDY_KINDS else None,
                time_budget=budget_of(run.slot_class),
                confirms=confirmed(current, run) if run.kind == "confirmation" else None)


def confirmed(current: Session, run: Run) -> int:
    """The experiment a confirmation run confirms: up its chain of runs (again_of)."""
    while run.kind == "confirmation" and run.again_of is not None:
        run = current.ledger.run(run.again_of)
    return run.id


def candidate_of(current: Session, run: Run, task: Task) -> Candidate:
    return Candidate(run.id, task, run.sha or "", run.description or "",
                     current.ws.worktrees_dir / str(run.id), current.ws.runs_dir / str(run.id),
                     current.ledger.data_version(), run.slot_class or "")


def undecided(current: Session, busy: set[int | None]) -> list[Candidate]:
    """Scored candidates a stopped ar left without a verdict (waiting for the best's runs,
    or for a confirmation run), but those in `busy` (running, or being confirmed)."""
    return [candidate_of(current, run, Task(Parent(run.parent_sha or "", None, None, ""), sha=run.sha))
            for run in current.ledger.runs()
            if run.kind in NEW_COMMIT_KINDS and run.scored and run.decision is None
            and run.id not in busy]
