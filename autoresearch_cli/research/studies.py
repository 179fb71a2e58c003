"""`ar ablate` and `ar transfer`: runs that study the research done, through the scheduler.

- **Ablation**: from the best, each kept step of the chain is removed in turn: its change
  (its parent's train.py -> its own) is reverted on the best's train.py by a three-way
  merge (gitops.merge_file). Where it reverts cleanly, the result is a commit of its own
  (reachable under refs/ar/ablation/), run on the seed indices 0..runs-1 of the best's
  class, each paired with the best's run on the same seed (the best's missing partners
  are run too, as re-measures). Where it does not, the ledger says why. An `ablation`
  event links each variant to its step (research/findings.py reads them back).
- **Transfer**: the baseline and the best at K times the profile's budget, on the same
  seed indices, recorded on a class that names the budget (`cpu:2@120s`), so that their
  scores never mix with the evidence every decision reads.

Both hand the scheduler a list of Tasks up front (its queue); their runs are of kinds
`ablation` and `transfer`, which decide.next_action only records: never a keep. A run a
commit already has on a seed is not run again, so a second call adds only what is missing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from autoresearch_cli.agents.base import Parent
from autoresearch_cli.backends.base import Backend
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.records import Run, budget_class, hardware_of
from autoresearch_cli.errors import ArError
from autoresearch_cli.research.evidence import CommitEvidence, Evidence
from autoresearch_cli.research.findings import ablation_detail
from autoresearch_cli.research.pipeline import Task, train_py_of, validate
from autoresearch_cli.research.scheduler import Events, Scheduler
from autoresearch_cli.research.session import Session, quiet

ABLATION_REFS = "refs/ar/ablation/"


@dataclass
class Plan:
    """What a study will run, and the steps it could not study (with why)."""

    tasks: list[Task] = field(default_factory=list)
    skipped: list[tuple[Run, str]] = field(default_factory=list)
    slot_class: str | None = None  # a transfer's: the class that names its budget


def run_plan(current: Session, backend: Backend, plan: Plan, on_event: Events = quiet) -> None:
    """Run every task of `plan` through the scheduler (no agent: nothing new is proposed)."""
    if not plan.tasks:
        return
    wanted = {task.slot_class for task in plan.tasks} - {None}
    offered = {slot.slot_class for slot in backend.slots}
    if not wanted <= offered:  # the scheduler would wait for a slot that never comes
        raise ArError(f"the runs must be on {', '.join(sorted(wanted))} (where the best was "
                      f"measured) but this backend's slots are {', '.join(sorted(offered))}: "
                      "choose --workers to match")
    Scheduler(current, backend, queue=deque(plan.tasks), on_event=on_event).run()


def _best(evidence: Evidence) -> CommitEvidence:
    best = evidence.best()
    if best is None or best.slot_class is None:
        raise ArError("no scored best yet: run `ar baseline` and `ar iterate` first")
    return best


# --- ablation ------------------------------------------------------------------------------


def plan_ablation(current: Session, runs: int) -> Plan:
    """Variants of the best without each kept step, and the runs that pair them with it."""
    evidence = current.evidence()
    best = _best(evidence)
    chain = evidence.chain()
    if len(chain) < 2:
        raise ArError("nothing to ablate: the best is the baseline (no kept step yet)")
    seeds = range(runs)
    tip = Parent(best.sha, best.mean, None, "")
    plan = Plan([Task(tip, measure=True, remeasure=True, seed_index=index,
                      slot_class=best.slot_class,
                      description=f"re-measure of the best on seed {index} (an ablation's partner)")
                 for index in seeds if index not in best.by_seed()])
    for step in chain[1:]:
        made = evidence.proposer(step.sha)
        if made is None or made.parent_sha is None:
            continue
        variant, why = _variant(current, evidence, made, best.sha)
        if variant is None:
            plan.skipped.append((made, why or "it does not revert"))
            continue
        have = evidence.commit(variant, best.slot_class).by_seed()
        plan.tasks += [Task(tip, sha=variant, study="ablation", seed_index=index,
                            slot_class=best.slot_class,
                            description=f"ablation: the best without #{made.id}, seed {index}")
                       for index in seeds if index not in have]
    return plan


def _variant(current: Session, evidence: Evidence, step: Run, best_sha: str) -> tuple[str | None, str | None]:
    """The commit of the best without `step`'s change (an earlier one is reused), or None
    and why it cannot be made; the ledger's `ablation` event records either."""
    known = _earlier_variant(evidence, step.id, best_sha)
    if known is not None:
        return known, None
    best_py = train_py_of(current, best_sha)
    merged, conflicts = gitops.merge_file(train_py_of(current, step.sha), best_py,
                                          train_py_of(current, step.parent_sha))
    why = None
    if conflicts:
        why = f"its change does not revert cleanly on the best ({conflicts} conflicting hunk(s))"
    elif merged == best_py:
        why = "reverting it changes nothing on the best (a later step replaced its change)"
    else:
        reason = validate(merged, best_py)
        why = f"the best without it cannot run: {reason}" if reason else None
    if why is not None:
        current.ledger.add_event("ablation", None, ablation_detail(step.id, best_sha, why))
        return None, why
    sha = _commit_variant(current, best_sha, merged, f"ablation: {best_sha[:7]} without "
                                                     f"#{step.id} ({step.description or ''})")
    current.ledger.add_event("ablation", sha, ablation_detail(step.id, best_sha))
    return sha, None


def _earlier_variant(evidence: Evidence, step_id: int, best_sha: str) -> str | None:
    wanted = ablation_detail(step_id, best_sha)
    return next((event.sha for event in reversed(evidence.events)
                 if event.kind == "ablation" and event.sha and event.detail == wanted), None)


def _commit_variant(current: Session, parent: str, train_py: str, message: str) -> str:
    """A commit of `train_py` on `parent`, kept reachable (ablation commits are evaluated,
    and every evaluated commit stays reachable)."""
    worktree = current.ws.worktrees_dir / f"ablation-{parent[:12]}"
    current.ws.worktrees_dir.mkdir(parents=True, exist_ok=True)
    gitops.worktree_remove(current.ws.root, worktree)  # one a killed ar left
    gitops.worktree_add(current.ws.root, worktree, parent)
    try:
        (worktree / "train.py").write_text(train_py)
        sha = gitops.commit_file(worktree, "train.py", message)
    finally:
        gitops.worktree_remove(current.ws.root, worktree)
    gitops.update_ref(current.ws.root, f"{ABLATION_REFS}{sha}", sha, None)
    return sha


# --- transfer ------------------------------------------------------------------------------


def plan_transfer(current: Session, factor: float, runs: int) -> Plan:
    """Runs of the baseline and the best at `factor` times the budget, pair by pair, and
    the class they are recorded on (plan.slot_class)."""
    if factor <= 0:
        raise ArError(f"--budget-factor must be positive, got {factor:g}")
    evidence = current.evidence()
    best = _best(evidence)
    if evidence.baseline_sha is None or evidence.baseline_sha == best.sha:
        raise ArError("nothing to transfer: the best is the baseline (no kept step yet)")
    hardware = hardware_of(best.slot_class) or ""
    budget = float(current.settings.profile.time_budget) * factor
    slot_class = budget_class(hardware, budget)
    plan = Plan(slot_class=slot_class)
    for index in range(runs):  # pair by pair: a stopped transfer leaves whole pairs
        for name, sha in (("baseline", evidence.baseline_sha), ("best", best.sha)):
            if index in evidence.commit(sha, slot_class).by_seed():
                continue
            plan.tasks.append(Task(Parent(sha, None, None, ""), sha=sha, study="transfer",
                                   seed_index=index, slot_class=hardware, time_budget=budget,
                                   description=f"transfer: the {name} at {budget:g} s "
                                               f"({factor:g}x the budget), seed {index}"))
    return plan
