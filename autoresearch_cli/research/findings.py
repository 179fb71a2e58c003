"""What the evidence says about the research done: which kept steps carry the gain
(ablations) and whether the gain holds at another budget (transfers).

Both read research/evidence.py and nothing else: a step's contribution is `gain(variant,
best)`, the paired gain of the best over the best with that step reverted, on the seeds
both ran on; a transfer's gain is `gain(baseline, best)` on the class that names the
budget (`cpu:2@120s`), set against the same gain at the profile's budget on the same
hardware. Pure: nothing here writes or runs anything (research/studies.py runs them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from autoresearch_cli.doors.records import Run, at_other_budget, hardware_of
from autoresearch_cli.research.evidence import CommitEvidence, Evidence, Gain, gain

# "experiment #12 removed from <sha>" | "experiment #12 not removed from <sha>: why"
_ABLATION = re.compile(r"^experiment #(?P<step>\d+) (?P<how>removed|not removed) from "
                       r"(?P<best>[0-9a-f]{7,40})(?:: (?P<why>.*))?$")
HOLDS, SHRINKS, GROWS, UNKNOWN = "holds", "shrinks", "grows", "unknown"


def ablation_detail(step_id: int, best_sha: str, why: str | None = None) -> str:
    """The detail of an `ablation` event (doors/records.py): parsed back by `ablations`."""
    if why is None:
        return f"experiment #{step_id} removed from {best_sha}"
    return f"experiment #{step_id} not removed from {best_sha}: {why}"


@dataclass(frozen=True)
class Ablation:
    """The best with one kept step reverted, paired with the best on the same seeds."""

    step: Run  # the kept experiment whose change was removed
    variant: CommitEvidence | None  # its runs on the best's class (None: it did not revert)
    why_not: str | None  # why the step could not be removed cleanly
    carried: Gain | None  # best over variant: what the step carries (positive: it helps)
    share: float | None  # carried / the whole gain, baseline -> best


def ablations(evidence: Evidence) -> list[Ablation]:
    """The latest ablation of each kept step of the current best, in chain order."""
    best = evidence.best()
    if best is None:
        return []
    latest: dict[int, tuple[str | None, str | None]] = {}
    for event in evidence.events:
        found = _ABLATION.match(event.detail or "") if event.kind == "ablation" else None
        if found and best.sha.startswith(found["best"]):
            latest[int(found["step"])] = (event.sha, found["why"])
    total = evidence.gain()
    found_steps = []
    for step in evidence.chain()[1:]:
        made = evidence.proposer(step.sha)
        if made is None or made.id not in latest:
            continue
        sha, why = latest[made.id]
        variant = evidence.commit(sha, best.slot_class) if sha else None
        carried = gain(variant, best) if variant is not None and variant.runs else None
        share = (carried.value / total.value
                 if carried is not None and total is not None and total.value else None)
        found_steps.append(Ablation(made, variant, why, carried, share))
    return found_steps


@dataclass(frozen=True)
class Transfer:
    """Baseline and best at another budget, paired, against the gain at the profile's."""

    slot_class: str  # e.g. cpu:2@120s
    baseline: CommitEvidence
    best: CommitEvidence
    gain: Gain | None  # at that budget
    reference: Gain | None  # at the profile's budget, on the same hardware

    @property
    def verdict(self) -> str:
        return transfer_verdict(self.gain, self.reference)

    @property
    def ratio(self) -> float | None:
        """The gain at this budget as a multiple of the gain at the profile's."""
        if self.gain is None or self.reference is None or not self.reference.value:
            return None
        return self.gain.value / self.reference.value


def transfer_verdict(at_budget: Gain | None, reference: Gain | None) -> str:
    """holds, shrinks or grows: whether the gain at another budget differs from the gain
    at the profile's by more than their intervals allow (their half-widths combined in
    quadrature, as for two independent estimates: the runs at two budgets share seeds
    but not their luck); unknown while either has no interval (one pair or none)."""
    if at_budget is None or reference is None:
        return UNKNOWN
    if at_budget.half_width is None or reference.half_width is None:
        return UNKNOWN
    difference = at_budget.value - reference.value
    if abs(difference) <= math.hypot(at_budget.half_width, reference.half_width):
        return HOLDS
    return GROWS if difference > 0 else SHRINKS


def transfers(evidence: Evidence) -> list[Transfer]:
    """One Transfer per class at another budget on which the baseline or the best ran."""
    start, best = evidence.baseline_sha, evidence.best_sha
    if start is None or best is None:
        return []
    found = []
    for slot_class in evidence.classes():
        if not at_other_budget(slot_class):
            continue
        assert slot_class is not None
        before, after = evidence.commit(start, slot_class), evidence.commit(best, slot_class)
        if not before.runs and not after.runs:
            continue
        hardware = hardware_of(slot_class)
        reference = gain(evidence.commit(start, hardware), evidence.commit(best, hardware))
        found.append(Transfer(slot_class, before, after, gain(before, after), reference))
    return found
