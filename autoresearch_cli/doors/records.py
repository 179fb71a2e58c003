"""What the ledger stores, typed: one Run per experiment row, one Event per branch move.

The vocabulary of the schema lives here (kinds, statuses, decisions); what they *mean*
for research (which run is kept, which failed, what "the best" is) is decided in one
place above, research/evidence.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

# baseline: a run of the branch tip before any experiment; experiment, repair,
# combination: a new commit; confirmation: another run of a candidate the keep test could
# not decide yet; remeasure: another run of the best (or the baseline), for a mean;
# ablation: the best with one kept step reverted (`ar ablate`); transfer: the baseline or
# the best at a multiple of the budget (`ar transfer`).
KINDS = ("baseline", "experiment", "repair", "combination", "confirmation", "remeasure",
         "ablation", "transfer")
NEW_COMMIT_KINDS = ("experiment", "repair", "combination")  # the runs that propose a change
MEASURE_KINDS = ("baseline", "remeasure")  # runs of a commit that is already on the branch
# Runs that study the research done (`ar ablate`, `ar transfer`): they add evidence and
# never decide anything, whatever they score.
STUDY_KINDS = ("ablation", "transfer")
# disturbed: the run got well under its share of the machine; it is run again, never judged.
STATUSES = ("proposing", "running", "evaluating", "ok", "crash", "timeout", "oom", "invalid",
            "interrupted", "disturbed")
IN_FLIGHT = ("proposing", "running", "evaluating")
FAILED = ("crash", "timeout", "oom")  # the run trained and failed: the agent may repair it
DECISIONS = ("keep", "discard", None)
# Events that move the research branch; the latest one names its tip.
BRANCH_MOVES = ("keep", "revert", "rejudged")
# An `ablation` event names a commit made by reverting one kept step from the best
# (detail: "experiment #<step> removed from <best sha>"), or a step that would not revert
# (no sha; detail: "experiment #<step> not removed from <best sha>: <why>").
STUDY_EVENTS = ("ablation",)


def budget_class(slot_class: str, seconds: float) -> str:
    """The class of runs on `slot_class` hardware at a budget other than the profile's
    (`cpu:2@120s`): their scores are never compared with the profile's."""
    return f"{slot_class}@{seconds:g}s"


def hardware_of(slot_class: str | None) -> str | None:
    """The hardware part of a class (`cpu:2@120s` -> `cpu:2`)."""
    return slot_class.split("@", 1)[0] if slot_class else slot_class


def budget_of(slot_class: str | None) -> float | None:
    """The budget a class names (`cpu:2@120s` -> 120.0), None for the profile's."""
    if not slot_class or "@" not in slot_class:
        return None
    try:
        return float(slot_class.rsplit("@", 1)[1].removesuffix("s"))
    except ValueError:
        return None


def at_other_budget(slot_class: str | None) -> bool:
    """Whether a class names a budget other than the profile's (a transfer's runs)."""
    return bool(slot_class) and "@" in slot_class  # type: ignore[operator]


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Run:
    """One experiment row: a proposal, and the training and scoring of one commit."""

    id: int
    kind: str
    status: str
    started_at: str
    decision: str | None = None
    parent_sha: str | None = None
    sha: str | None = None
    branch: str | None = None
    description: str | None = None
    agent: str | None = None
    val_bpb: float | None = None
    holdout_bpb: float | None = None
    memory_gb: float | None = None
    training_seconds: float | None = None
    total_seconds: float | None = None
    num_steps: int | None = None
    num_params_M: float | None = None
    mfu_percent: float | None = None
    reason: str | None = None
    result_json: str | None = None
    cost_usd: float | None = None
    pid: int | None = None
    host: str | None = None
    finished_at: str | None = None
    repair_of: int | None = None
    isolation: str | None = None
    slot_class: str | None = None
    seed: int | None = None
    tokens_per_s: float | None = None
    cpu_share: float | None = None
    backend_task: str | None = None
    node: str | None = None
    again_of: int | None = None
    evidence: str | None = None  # the keep test's judgement (JSON) on the row it decided
    seed_index: int | None = None  # which of the workspace's seeds the run got

    @classmethod
    def from_row(cls, row: Any) -> Run:
        names = {f.name for f in fields(cls)}
        return cls(**{key: row[key] for key in row.keys() if key in names})

    @property
    def scored(self) -> bool:
        """It trained to the end and the trusted scorer gave it a finite val_bpb."""
        return (self.status == "ok" and self.sha is not None and self.val_bpb is not None
                and math.isfinite(self.val_bpb))

    @property
    def judgement(self) -> dict[str, Any] | None:
        """The keep test's evidence, parsed (None when the row holds none)."""
        return _json(self.evidence)

    @property
    def result(self) -> dict[str, Any] | None:
        """result.json as the run wrote it, parsed."""
        return _json(self.result_json)


@dataclass(frozen=True)
class Event:
    id: int
    kind: str  # keep | revert | rejudged | interrupted | disturbed | unconfined | ...
    sha: str | None
    detail: str | None
    created_at: str

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls(row["id"], row["kind"], row["sha"], row["detail"], row["created_at"])
