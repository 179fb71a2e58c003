"""One experiment, from its proposal to its record, in typed stages:

    Task (a parent, maybe a failure to repair)
      -> Proposal (the agent's new train.py)
      -> Candidate (its commit: sha, worktree, run dir)
      -> Result (result.json after ar's own checks)
      -> recorded (its ledger row closed; results.tsv written)

What happens next (keep, discard, confirm, run again, repair) is decided by
research/decide.py, a pure function of the evidence; `settle` performs a verdict on the
branch and the ledger. Each stage that acts is a short sequence of calls to the doors
(ledger, gitops). Which experiments run, on which parent and how many at once is the
scheduler's business (research/scheduler.py); this module owns one.
"""

from __future__ import annotations

import ast
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoresearch_cli.agents.base import (
    Agent,
    AgentError,
    Parent,
    Proposal,
    ProposalError,
)
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.records import Run, budget_class
from autoresearch_cli.doors.text import one_line, printable, unicode_safe
from autoresearch_cli.research import history as history_of
from autoresearch_cli.research.evidence import failed
from autoresearch_cli.research.failures import failure_report
from autoresearch_cli.research.keeprule import CONFIRM, KEEP, Judgement
from autoresearch_cli.research.seeds import pinned_seed
from autoresearch_cli.research.session import (
    RefGuard,
    Session,
    add_worktree,
    discard_weights,
    invalidate,
    job_tampering,
)

REPLACED_PREFIX = "refs/ar/replaced/"
DESCRIPTION_CHARS = 200  # of a proposal's one-line description  # a best that a concurrent keep replaced stays here

# --- the rules: pure functions of numbers -----------------------------------------------


def validate(train_py: str, parent_train_py: str) -> str | None:
    """Why a proposed train.py cannot be trained, or None when it can."""
    if train_py == parent_train_py:
        return "the proposal does not change train.py"
    try:
        ast.parse(train_py)
    except SyntaxError as exc:
        return f"train.py does not parse: line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # a NUL byte
        return f"train.py does not parse: {exc}"
    if "build_model" not in train_py or "save_for_eval" not in train_py:
        return "train.py must define build_model and call prepare.save_for_eval"
    return pinned_seed(train_py) or non_research_change(train_py, parent_train_py)


# Calls whose arguments are a seed (ar owns it) or only reach the log, never the model.
SEED_CALLS = frozenset({"manual_seed", "manual_seed_all", "seed", "set_seed", "default_rng"})
OUTPUT_CALLS = frozenset({"print", "info", "debug", "warning", "write", "flush"})
# Names of constants that steer only the output: how often to print, how much to say.
OUTPUT_NAMES = ("LOG", "PRINT", "VERBOSE", "REPORT")


def non_research_change(train_py: str, parent_train_py: str) -> str | None:
    """Why a change is not research, or None when it is: a proposal that only changes
    seeds, comments, docstrings or what is printed would be kept for luck alone (runs of
    one commit with different seeds differ by the noise). Both files must parse."""
    try:
        new, old = _research_view(train_py), _research_view(parent_train_py)
    except SyntaxError:
        return None
    if new != old:
        return None
    return ("the change touches only seeds, comments, docstrings or printed output: nothing "
            "to research (ar owns the seed and gives every run its own)")


def _research_view(source: str) -> str:
    """The program with what cannot change a score blanked out: docstrings, seed values,
    the arguments of printing calls and output-only constants."""

    class Blank(ast.NodeTransformer):
        def visit_Call(self, node: ast.Call) -> ast.AST:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in SEED_CALLS or name in OUTPUT_CALLS:
                node.args, node.keywords = [], []
            return self.generic_visit(node)

        def visit_Assign(self, node: ast.Assign) -> ast.AST:
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            if names and all("SEED" in n.upper() or any(w in n.upper() for w in OUTPUT_NAMES)
                             for n in names):
                node.value = ast.Constant(None)
            return self.generic_visit(node)

        def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return None  # a docstring or a bare string
            return self.generic_visit(node)

    return ast.dump(Blank().visit(ast.parse(source)))


# --- the stages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What the scheduler asks for: a change to `parent`, or a repair of a failed run."""

    parent: Parent
    repair_of: int | None = None
    failure: str | None = None  # why the run to repair failed, for the agent
    repairs_so_far: int = 0  # repairs before this one in the chain
    combines: tuple[int, int] | None = None  # two experiments whose changes go together
    measure: bool = False  # run the parent itself: a score (again) on a slot class
    remeasure: bool = False  # the parent has a score there already: this run adds one
    sha: str | None = None  # run this commit as it is, no proposal (a confirmation, a rerun)
    confirms: int | None = None  # the experiment whose candidate this run confirms
    again_of: int | None = None  # the run this one repeats (disturbed, or confirmed)
    description: str = ""  # of a run of an existing commit
    retries: int = 0  # disturbed runs before this one in the chain
    requeued: bool = False  # a run of it was lost to the machine (a node died) once already
    requested: bool = False  # a measurement the user asked for (`ar baseline --repeat`)
    seed_index: int | None = None  # which of the workspace's seeds (None: the next free one)
    slot_class: str | None = None  # the hardware it must run on (None: any free slot)
    study: str | None = None  # ablation | transfer: a run of `sha` for evidence, never judged
    time_budget: float | None = None  # training seconds (None: the profile's budget)

    @property
    def kind(self) -> str:
        if self.study is not None:
            return self.study
        if self.measure:
            return "remeasure" if self.remeasure else "baseline"
        if self.confirms is not None:
            return "confirmation"
        if self.combines is not None:
            return "combination"
        return "repair" if self.repair_of is not None else "experiment"

    def run_class(self, hardware: str) -> str:
        """The class its run is recorded on: the slot's hardware, and the budget when it is
        not the profile's (so that such runs never mix with the rest)."""
        return hardware if self.time_budget is None else budget_class(hardware, self.time_budget)


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

    def failure(self, train_py: str) -> str | None:
        """What a repair is told (research/failures.py): ar's reason and what it extracted
        from the log, never the log itself."""
        if not failed(self.status):
            return None
        return failure_report(self.details.get("reason"), self.details.get("log_tail"), train_py)


def open_experiment(current: Session, task: Task, agent_name: str | None) -> int:
    """The ledger row of a new experiment, before anything is asked of the agent."""
    exp_id = current.ledger.start_experiment(task.kind, task.parent.sha, None, agent_name,
                                             repair_of=task.repair_of, branch=current.ws.branch)
    if task.again_of is not None:
        current.ledger.update(exp_id, again_of=task.again_of)
    return exp_id


def propose(current: Session, agent: Agent, exp_id: int, task: Task) -> Proposal | Rejected:
    """Ask the agent; its model calls are recorded against `exp_id` as they happen.

    An AgentError other than a bad proposal (auth, budget) ends the experiment as invalid
    and propagates: the scheduler stops asking.
    """
    ledger = current.ledger
    parent_train_py = train_py_of(current, task.parent.sha)
    shown_train_py = parent_train_py
    if task.repair_of is not None:  # a repair starts from the train.py that failed
        failed_sha = ledger.run(task.repair_of).sha
        shown_train_py = (train_py_of(current, failed_sha) if failed_sha else "") or parent_train_py
    bound = {"record_call": lambda record: ledger.record_llm_call(exp_id, record)}
    try:
        proposal = agent.propose(shown_train_py, program_md(current, task.parent.sha),
                                 history_of.history(current.evidence()), task.failure,
                                 **(bound if _takes_record_call(agent) else {}))
    except ProposalError as exc:
        return reject(current, exp_id, one_line(exc.reason))
    except AgentError as exc:
        ledger.finish(exp_id, "invalid", None, reason=one_line(f"no proposal: {exc}"))
        current.export()
        raise
    # A model wrote these: no escape sequence reaches a terminal, no NUL a commit message,
    # no lone surrogate the disk (doors/text.py).
    proposal.description = one_line(proposal.description, DESCRIPTION_CHARS) or "(no description)"
    ledger.update(exp_id, description=proposal.description)
    if unicode_safe(proposal.train_py) != proposal.train_py or "\x00" in proposal.train_py:
        return reject(current, exp_id, "the proposed train.py holds bytes that are not text "
                                       "(a NUL or invalid UTF-8)")
    reason = validate(proposal.train_py, parent_train_py)
    if reason:
        return reject(current, exp_id, reason)
    return proposal


def combine(current: Session, exp_id: int, task: Task) -> Proposal | Rejected:
    """Both changes of two experiments that beat their common parent, on the branch tip
    (which is one of them): a three-way merge of train.py, no agent. A conflict is
    recorded as the reason the combination could not run."""
    assert task.combines is not None
    first, second = (current.ledger.run(exp_id_) for exp_id_ in task.combines)
    other = second if task.parent.sha == first.sha else first
    base = train_py_of(current, other.parent_sha)
    ours = train_py_of(current, task.parent.sha)
    merged, conflicts = gitops.merge_file(base, ours, train_py_of(current, other.sha))
    description = (f"combine #{first.id} ({first.description}) and "
                   f"#{second.id} ({second.description})")
    current.ledger.update(exp_id, description=description)
    if conflicts:
        return reject(current, exp_id, f"the changes of #{first.id} and #{second.id} "
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


def checkout(current: Session, exp_id: int, task: Task, slot_class: str) -> Candidate:
    """A run of an existing commit: the parent itself (a measurement), or a candidate
    again (a confirmation, a disturbed run repeated), checked out to run on `slot_class`."""
    ws = current.ws
    sha = task.parent.sha if task.measure else task.sha
    assert sha is not None
    worktree = add_worktree(current, exp_id, sha)
    description = task.description or (f"re-measure on {slot_class}" if task.remeasure
                                       else f"baseline on {slot_class}")
    current.ledger.update(exp_id, sha=sha, status="running", slot_class=slot_class,
                          description=description)
    return Candidate(exp_id, task, sha, description, worktree, ws.runs_dir / str(exp_id),
                     current.ledger.data_version(), slot_class)


def check(current: Session, candidate: Candidate, raw: dict[str, Any],
          tampered: list[str]) -> Result:
    """result.json, made invalid when the job changed a protected file, a git ref (found
    by the scheduler, `tampered`) or the ledger."""
    details = invalidate(dict(raw), job_tampering(current, candidate.worktree, candidate.sha,
                                                  candidate.ledger_version, tampered))
    for key in ("reason", "log_tail", "isolation_note", "eval_note"):  # the run wrote these
        if isinstance(details.get(key), str):
            details[key] = printable(details[key])
    return Result(str(details.get("status")), details.get("val_bpb"), details)


def record(current: Session, candidate: Candidate, result: Result,
           disturbed: str | None = None) -> None:
    """Close the run's ledger row: its status (`disturbed` when it got too little of the
    machine: set aside, never judged) and result.json's figures; an unscored run's weights
    go (a kept commit's weights are its first scored run's)."""
    ws, ledger = current.ws, current.ledger
    details = dict(result.details)
    status = result.status
    if disturbed:
        status = "disturbed"
        details.update(status=status, reason=disturbed)
        ledger.add_event("disturbed", candidate.sha, f"experiment #{candidate.exp_id}: {disturbed}")
    task = candidate.task
    if status != "ok" or task.measure or task.confirms is not None or task.study is not None:
        discard_weights(candidate.run_dir)
    ledger.finish(candidate.exp_id, status, details, sha=candidate.sha)
    current.export()
    gitops.worktree_remove(ws.root, candidate.worktree)


def settle(current: Session, guard: RefGuard, exp_id: int, tested: Judgement) -> None:
    """Act on the keep test's verdict on experiment `exp_id`: keep (the branch moves to its
    commit, compare-and-swap; a replaced best stays reachable), discard (its weights go),
    or confirm (nothing yet: its evidence so far is stored on its row)."""
    ws, ledger = current.ws, current.ledger
    evidence = json.dumps(tested.as_dict(), sort_keys=True)
    if tested.verdict == CONFIRM:
        ledger.update(exp_id, evidence=evidence)
        return
    run = ledger.run(exp_id)
    if tested.verdict == KEEP:
        tip = ws.tip()
        if run.parent_sha != tip:  # a concurrent keep moved the tip meanwhile
            guard.update(f"{REPLACED_PREFIX}{tip}", tip, None)
        guard.update(ws.branch_ref(), run.sha, tip)
        guard.delete(f"{gitops.DISCARDED_PREFIX}{run.id}")
        gitops.sync_checkout(ws.root, ws.branch, tip, run.sha)
    else:
        discard_weights(ws.runs_dir / str(run.id))
    ledger.settle(run.id, tested.verdict, evidence, reason=tested.reason)
    current.export()


def rejudge(current: Session, guard: RefGuard, kept: Run, reason: str) -> None:
    """The best no longer holds: the branch goes back to the commit it was built on, a
    `rejudged` event names both, and the kept row says why (its decision stays: it was
    kept, on the evidence of its time)."""
    ws = current.ws
    tip = ws.tip()
    guard.update(ws.branch_ref(), kept.parent_sha, tip)
    gitops.sync_checkout(ws.root, ws.branch, tip, kept.parent_sha)
    current.ledger.add_event("rejudged", kept.parent_sha, f"experiment #{kept.id}: {reason}")
    current.ledger.update(kept.id, reason=f"{kept.reason or 'kept'}; re-judged later: {reason}")
    current.export()


def interrupt(current: Session, candidate: Candidate | None, exp_id: int,
              reason: str = "interrupted by the user") -> None:
    """An experiment stopped before its end: its row says why, its worktree goes."""
    current.ledger.update(exp_id, status="interrupted", reason=reason)
    current.export()
    if candidate is not None:
        gitops.worktree_remove(current.ws.root, candidate.worktree)


def reject(current: Session, exp_id: int, reason: str) -> Rejected:
    current.ledger.finish(exp_id, "invalid", None, reason=reason)
    return Rejected(exp_id, reason)


def program_md(current: Session, sha: str) -> str:
    """The human's instructions: the workspace's program.md as it is on disk now, so an
    edit steers the next proposal; the committed one if the file is gone."""
    path = current.ws.root / "program.md"
    if path.is_file():
        return path.read_text()
    return (gitops.show_file(current.ws.root, sha, "program.md") or b"").decode()


def train_py_of(current: Session, sha: str | None) -> str:
    """train.py as committed at `sha` (empty when there is none)."""
    if not sha:
        return ""
    return (gitops.show_file(current.ws.root, sha, "train.py") or b"").decode()
