"""One experiment, from its proposal to its decision, in typed stages:

    Task (a parent, maybe a failure to repair)
      -> Proposal (the agent's new train.py)
      -> Candidate (its commit: sha, worktree, run dir)
      -> Result (result.json after ar's own checks)
      -> Decision (keep, discard, or none for a failed run)

`decide` is the keep rule, a pure function of numbers. Each stage that acts is a short
sequence of calls to the doors (ledger, gitops). Which experiments run, on which parent
and how many at once is the scheduler's business (loop.py); this module owns one.
"""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoresearch_cli import gitops
from autoresearch_cli.agents.base import (
    Agent,
    AgentError,
    HistoryItem,
    Parent,
    Proposal,
    ProposalError,
)
from autoresearch_cli.ledger import IN_FLIGHT, failed, mean_bpb_by_sha
from autoresearch_cli.runs import (
    RefGuard,
    Session,
    add_worktree,
    discard_weights,
    invalidate,
    job_tampering,
)

KEEP, DISCARD = "keep", "discard"
REPLACED_PREFIX = "refs/ar/replaced/"  # a best that a concurrent keep replaced stays here

# --- the rules: pure functions of numbers -----------------------------------------------


def min_delta(configured: float, baseline_std: float | None, baseline_runs: int) -> float:
    """How much a candidate must beat the best by: ar.toml's value, or (when negative)
    twice the std of the baseline repeats, or 0 without two repeats."""
    if configured >= 0:
        return configured
    return 2 * baseline_std if baseline_std is not None and baseline_runs >= 2 else 0.0


def decide(status: str, val_bpb: float | None, best_bpb: float | None,
           threshold: float) -> str | None:
    """keep, discard, or None when the run has no score to compare.

    A candidate is kept when it beats the best by more than `threshold` (a tie is a
    discard); with no best to beat (no evaluation of the parent, or the parent crashed)
    any ok score is kept.
    """
    if status != "ok" or val_bpb is None or not math.isfinite(val_bpb):
        return None
    if best_bpb is None:
        return KEEP
    return KEEP if val_bpb < best_bpb - threshold else DISCARD


def should_repair(status: str, repairs_so_far: int, repair_attempts: int) -> bool:
    """Whether a run that ended with `status` gets another repair from the agent."""
    return failed(status) and repairs_so_far < repair_attempts


def validate(train_py: str, parent_train_py: str) -> str | None:
    """Why a proposed train.py cannot be trained, or None when it can."""
    if train_py == parent_train_py:
        return "the proposal does not change train.py"
    try:
        ast.parse(train_py)
    except SyntaxError as exc:
        return f"train.py does not parse: line {exc.lineno}: {exc.msg}"
    if "build_model" not in train_py or "save_for_eval" not in train_py:
        return "train.py must define build_model and call prepare.save_for_eval"
    return None


# --- the stages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What the scheduler asks for: a change to `parent`, or a repair of a failed run."""

    parent: Parent
    repair_of: int | None = None
    failure: str | None = None  # why the run to repair failed, for the agent
    repairs_so_far: int = 0  # repairs before this one in the chain
    combines: tuple[int, int] | None = None  # two experiments whose changes go together
    measure: bool = False  # run the parent itself: its score on a slot class without one

    @property
    def kind(self) -> str:
        if self.measure:
            return "baseline"
        if self.combines is not None:
            return "combination"
        return "repair" if self.repair_of is not None else "experiment"


@dataclass(frozen=True)
class Rejected:
    exp_id: int
    reason: str


@dataclass(frozen=True)
class Candidate:
    exp_id: int
    task: Task
    sha: str
    description: str
    worktree: Path
    run_dir: Path
    ledger_version: int  # the ledger's data_version when it started: a job may not move it
    slot_class: str  # the hardware it runs on: it is judged against scores from the same


@dataclass(frozen=True)
class Result:
    status: str
    val_bpb: float | None
    details: dict[str, Any]  # result.json, as checked

    @property
    def failure(self) -> str | None:
        """What a repair is told: the reason and the end of the training log."""
        if not failed(self.status):
            return None
        return (f"{self.details.get('reason')}\n\nLast lines of the training log:\n"
                f"{self.details.get('log_tail') or ''}")


@dataclass(frozen=True)
class Decision:
    exp_id: int
    verdict: str | None  # keep, discard, or None (the run failed)
    result: Result
    best_bpb: float | None  # what it was judged against: the best when it finished
    threshold: float


def open_experiment(current: Session, task: Task, agent_name: str) -> int:
    """The ledger row of a new experiment, before anything is asked of the agent."""
    return current.ledger.start_experiment(task.kind, task.parent.sha, None, agent_name,
                                           repair_of=task.repair_of, branch=current.ws.branch)


def propose(current: Session, agent: Agent, exp_id: int, task: Task) -> Proposal | Rejected:
    """Ask the agent; its model calls are recorded against `exp_id` as they happen.

    An AgentError other than a bad proposal (auth, budget) ends the experiment as invalid
    and propagates: the scheduler stops asking.
    """
    ledger = current.ledger
    parent_train_py = _train_py(current, task.parent.sha)
    shown_train_py = parent_train_py
    if task.repair_of is not None:  # a repair starts from the train.py that failed
        failed_sha = ledger.get(task.repair_of)["sha"]
        shown_train_py = (_train_py(current, failed_sha) if failed_sha else "") or parent_train_py
    bound = {"record_call": lambda record: ledger.record_llm_call(exp_id, record)}
    try:
        proposal = agent.propose(shown_train_py, program_md(current, task.parent.sha),
                                 history(current), task.failure,
                                 **(bound if _takes_record_call(agent) else {}))
    except ProposalError as exc:
        return reject(current, exp_id, exc.reason)
    except AgentError as exc:
        ledger.finish(exp_id, "invalid", None, None, reason=f"no proposal: {exc}")
        current.export()
        raise
    ledger.update(exp_id, description=proposal.description)
    reason = validate(proposal.train_py, parent_train_py)
    if reason:
        return reject(current, exp_id, reason)
    return proposal


def combine(current: Session, exp_id: int, task: Task) -> Proposal | Rejected:
    """Both changes of two experiments that beat their common parent, on the branch tip
    (which is one of them): a three-way merge of train.py, no agent. A conflict is
    recorded as the reason the combination could not run."""
    assert task.combines is not None
    first, second = (current.ledger.get(exp_id_) for exp_id_ in task.combines)
    other = second if task.parent.sha == first["sha"] else first
    base = _train_py(current, other["parent_sha"])
    ours = _train_py(current, task.parent.sha)
    merged, conflicts = gitops.merge_file(base, ours, _train_py(current, other["sha"]))
    description = (f"combine #{first['id']} ({first['description']}) and "
                   f"#{second['id']} ({second['description']})")
    current.ledger.update(exp_id, description=description)
    if conflicts:
        return reject(current, exp_id, f"the changes of #{first['id']} and #{second['id']} "
                                       f"conflict ({conflicts} conflicting hunk(s) in train.py)")
    reason = validate(merged, ours)
    if reason:
        return reject(current, exp_id, f"the combination cannot run: {reason}")
    return Proposal(description, merged, "combination")


def _takes_record_call(agent: Agent) -> bool:
    """Whether `agent.propose` takes record_call (an agent written before it did makes no
    model calls to record, or records them itself)."""
    parameters = inspect.signature(agent.propose).parameters
    return "record_call" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def commit(current: Session, guard: RefGuard, exp_id: int, task: Task, proposal: Proposal,
           slot_class: str) -> Candidate | Rejected:
    """The proposal as a commit on its parent, in a worktree of its own, ready to run."""
    ws = current.ws
    worktree = add_worktree(current, exp_id, task.parent.sha)
    (worktree / "train.py").write_text(proposal.train_py)
    sha = gitops.commit_file(worktree, "train.py", proposal.description or f"experiment {exp_id}")
    changed = gitops.changed_files(ws.root, task.parent.sha, sha)
    if changed != ["train.py"]:
        gitops.worktree_remove(ws.root, worktree)
        return reject(current, exp_id, f"the commit changes {', '.join(changed)}")
    current.ledger.update(exp_id, sha=sha, status="running", slot_class=slot_class)
    guard.update(f"{gitops.DISCARDED_PREFIX}{exp_id}", sha, None)
    return Candidate(exp_id, task, sha, proposal.description, worktree,
                     ws.runs_dir / str(exp_id), current.ledger.data_version(), slot_class)


def checkout_parent(current: Session, exp_id: int, task: Task, slot_class: str) -> Candidate:
    """A measurement: the parent itself, checked out to run on `slot_class`."""
    ws = current.ws
    worktree = add_worktree(current, exp_id, task.parent.sha)
    description = f"baseline on {slot_class}"
    current.ledger.update(exp_id, sha=task.parent.sha, status="running", slot_class=slot_class,
                          description=description)
    return Candidate(exp_id, task, task.parent.sha, description, worktree,
                     ws.runs_dir / str(exp_id), current.ledger.data_version(), slot_class)


def check(current: Session, candidate: Candidate, raw: dict[str, Any],
          tampered: list[str]) -> Result:
    """result.json, made invalid when the job changed a protected file, a git ref (found
    by the scheduler, `tampered`) or the ledger."""
    details = invalidate(dict(raw), job_tampering(current, candidate.worktree, candidate.sha,
                                                  candidate.ledger_version, tampered))
    return Result(details["status"], details.get("val_bpb"), details)


def record(current: Session, guard: RefGuard, candidate: Candidate, result: Result) -> Decision:
    """Judge the result against the best at this moment and record it: the branch moves
    (compare-and-swap) only to a kept commit; a replaced best stays reachable."""
    ws, ledger = current.ws, current.ledger
    tip = ws.tip()
    best_bpb = best_on(current, tip, candidate.slot_class)
    threshold = current_min_delta(current, candidate.slot_class)
    verdict = None if candidate.task.measure else decide(result.status, result.val_bpb,
                                                         best_bpb, threshold)
    if verdict == KEEP:
        if candidate.task.parent.sha != tip:  # a concurrent keep moved the tip meanwhile
            guard.update(f"{REPLACED_PREFIX}{tip}", tip, None)
        guard.update(ws.branch_ref(), candidate.sha, tip)
        guard.delete(f"{gitops.DISCARDED_PREFIX}{candidate.exp_id}")
        gitops.sync_checkout(ws.root, ws.branch, tip, candidate.sha)
    else:
        discard_weights(candidate.run_dir)
    ledger.finish(candidate.exp_id, result.status, verdict, result.details, sha=candidate.sha)
    current.export()
    gitops.worktree_remove(ws.root, candidate.worktree)
    return Decision(candidate.exp_id, verdict, result, best_bpb, threshold)


def interrupt(current: Session, candidate: Candidate | None, exp_id: int,
              reason: str = "interrupted by the user") -> None:
    """An experiment stopped before its end: its row says why, its worktree goes."""
    current.ledger.update(exp_id, status="interrupted", reason=reason)
    current.export()
    if candidate is not None:
        gitops.worktree_remove(current.ws.root, candidate.worktree)


def reject(current: Session, exp_id: int, reason: str) -> Rejected:
    current.ledger.finish(exp_id, "invalid", None, None, reason=reason)
    return Rejected(exp_id, reason)


# --- the scores a decision reads, and what the agent is shown ---------------------------


def best_on(current: Session, sha: str, slot_class: str) -> float | None:
    """The score of `sha` measured on `slot_class`; its score on any class when it has no
    such measurement (the scheduler measures first, so only a failed measurement leaves
    none)."""
    measured = current.ledger.bpb_of(sha, slot_class)
    return measured if measured is not None else current.ledger.bpb_of(sha)


def current_min_delta(current: Session, slot_class: str | None = None) -> float:
    _, std, runs = current.ledger.baseline_stats(slot_class)
    return min_delta(float(current.config["keep"]["min_delta"]), std, runs)


def history(current: Session) -> list[HistoryItem]:
    """Every finished experiment, with its delta against its parent's score."""
    rows = current.ledger.experiments()
    bpb_of = mean_bpb_by_sha(rows)  # one pass: history is built before every proposal
    items = []
    for row in rows:
        if row["status"] in IN_FLIGHT:
            continue
        parent = bpb_of.get(row["parent_sha"])
        delta = row["val_bpb"] - parent if row["val_bpb"] is not None and parent is not None else None
        status = row["decision"] or row["status"]
        if row["kind"] == "baseline" and row["status"] == "ok":
            status = "baseline"
        items.append(HistoryItem(row["id"], row["description"] or "", row["val_bpb"], status, delta))
    return items


def program_md(current: Session, sha: str) -> str:
    """The human's instructions: the workspace's program.md as it is on disk now, so an
    edit steers the next proposal; the committed one if the file is gone."""
    path = current.ws.root / "program.md"
    if path.is_file():
        return path.read_text()
    return (gitops.show_file(current.ws.root, sha, "program.md") or b"").decode()


def _train_py(current: Session, sha: str) -> str:
    return (gitops.show_file(current.ws.root, sha, "train.py") or b"").decode()
