"""One experiment, from its proposal to its decision, in typed stages:

    Task (a parent, maybe a failure to repair)
      -> Proposal (the agent's new train.py)
      -> Candidate (its commit: sha, worktree, run dir)
      -> Result (result.json after ar's own checks)
      -> Decision (keep, discard, or none for a failed run)

The keep rule is keeprule.judge, a pure function of the runs' numbers; a candidate it
cannot decide yet gets confirmation runs (new seeds) before its row is settled. Each stage that acts is a short
sequence of calls to the doors (ledger, gitops). Which experiments run, on which parent
and how many at once is the scheduler's business (loop.py); this module owns one.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoresearch_cli import gitops, keeprule
from autoresearch_cli.agents.base import (
    Agent,
    AgentError,
    HistoryItem,
    Parent,
    Proposal,
    ProposalError,
)
from autoresearch_cli.keeprule import CONFIRM, DISCARD, KEEP, Judgement
from autoresearch_cli.ledger import IN_FLIGHT, failed, mean_bpb_by_sha
from autoresearch_cli.runs import (
    RefGuard,
    Session,
    add_worktree,
    discard_weights,
    invalidate,
    job_tampering,
)

REPLACED_PREFIX = "refs/ar/replaced/"  # a best that a concurrent keep replaced stays here

# --- the rules: pure functions of numbers -----------------------------------------------


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
    return non_research_change(train_py, parent_train_py)


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

    @property
    def kind(self) -> str:
        if self.measure:
            return "remeasure" if self.remeasure else "baseline"
        if self.confirms is not None:
            return "confirmation"
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
    best_bpb: float | None  # what it was judged against: the best's mean when it finished
    judgement: Judgement | None = None  # the keep test; None for failed runs and measures
    settled: int | None = None  # the experiment this run decided (itself, or the confirmed)


def open_experiment(current: Session, task: Task, agent_name: str) -> int:
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


def checkout(current: Session, exp_id: int, task: Task, slot_class: str) -> Candidate:
    """A run of an existing commit: the parent itself (a measurement), or a candidate
    again (a confirmation, a disturbed run repeated), checked out to run on `slot_class`."""
    ws = current.ws
    sha = task.parent.sha if task.measure else task.sha
    assert sha is not None
    worktree = add_worktree(current, exp_id, sha)
    description = task.description or (f"re-measure of the best on {slot_class}" if task.remeasure
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
    return Result(details["status"], details.get("val_bpb"), details)


def record(current: Session, guard: RefGuard, candidate: Candidate, result: Result) -> Decision:
    """Record a run and judge what it decides, against the best at this moment.

    A candidate's first run is judged by the keep test: keep, discard, or confirm (its row
    stays undecided and the scheduler runs it again with a new seed). A confirmation run
    re-judges the candidate it confirms with all its runs and settles that row. The branch
    moves (compare-and-swap) only to a kept commit; a replaced best stays reachable.
    """
    ws, ledger, task = current.ws, current.ledger, candidate.task
    tip = ws.tip()
    best_bpb = best_on(current, tip, candidate.slot_class)
    if task.measure or task.confirms is not None:
        discard_weights(candidate.run_dir)  # the commit's weights, if kept, are elsewhere
        ledger.finish(candidate.exp_id, result.status, None, result.details, sha=candidate.sha)
        current.export()
        gitops.worktree_remove(ws.root, candidate.worktree)
        if task.confirms is None:
            return Decision(candidate.exp_id, None, result, best_bpb)
        original = ledger.get(task.confirms)
        if result.status != "ok":
            verdict = keeprule.Judgement(DISCARD, f"discarded: a confirmation run (#"
                                         f"{candidate.exp_id}) ended {result.status}", (), ())
        else:
            verdict = judgement(current, candidate.sha, candidate.slot_class)
        if verdict.verdict != CONFIRM:
            settle(current, guard, original, verdict)
        return Decision(candidate.exp_id, verdict.verdict, result, best_bpb, verdict,
                        settled=task.confirms if verdict.verdict != CONFIRM else None)
    tested = None
    if result.status == "ok" and result.val_bpb is not None and math.isfinite(result.val_bpb):
        ledger.finish(candidate.exp_id, result.status, None, result.details, sha=candidate.sha)
        tested = judgement(current, candidate.sha, candidate.slot_class)
        settle(current, guard, ledger.get(candidate.exp_id), tested)
    else:
        discard_weights(candidate.run_dir)
        ledger.finish(candidate.exp_id, result.status, None, result.details, sha=candidate.sha)
    current.export()
    gitops.worktree_remove(ws.root, candidate.worktree)
    verdict = tested.verdict if tested else None
    return Decision(candidate.exp_id, verdict, result, best_bpb, tested,
                    settled=candidate.exp_id if verdict in (KEEP, DISCARD) else None)


def judgement(current: Session, sha: str, slot_class: str, against: str | None = None) -> Judgement:
    """The keep test of commit `sha` (its ok runs on `slot_class`) against `against` (the
    branch tip when None), with the noise measured on that hardware."""
    ledger = current.ledger
    best = against or current.ws.tip()
    best_runs = ledger.runs_of(best, slot_class) or ledger.runs_of(best)
    _, baseline_std, _ = ledger.baseline_stats(slot_class)
    rule = keeprule.Rule.from_config(current.config["keep"], baseline_std)
    measured = keeprule.noise(ledger.noise_groups(slot_class))
    return keeprule.judge(ledger.runs_of(sha, slot_class), best_runs, measured, rule)


def settle(current: Session, guard: RefGuard, row: dict[str, Any], tested: Judgement) -> None:
    """Act on a judgement of the experiment in `row`: keep (the branch moves to its
    commit), discard (its weights go), or confirm (nothing yet: its evidence so far)."""
    ws, ledger = current.ws, current.ledger
    evidence = json.dumps(tested.as_dict(), sort_keys=True)
    if tested.verdict == CONFIRM:
        ledger.update(row["id"], evidence=evidence)
        return
    if tested.verdict == KEEP:
        tip = ws.tip()
        if row["parent_sha"] != tip:  # a concurrent keep moved the tip meanwhile
            guard.update(f"{REPLACED_PREFIX}{tip}", tip, None)
        guard.update(ws.branch_ref(), row["sha"], tip)
        guard.delete(f"{gitops.DISCARDED_PREFIX}{row['id']}")
        gitops.sync_checkout(ws.root, ws.branch, tip, row["sha"])
    else:
        discard_weights(ws.runs_dir / str(row["id"]))
    ledger.settle(row["id"], tested.verdict, evidence)
    ledger.update(row["id"], reason=tested.reason)


def set_aside(current: Session, candidate: Candidate, result: Result, reason: str) -> None:
    """A run that got too little of the machine: recorded as disturbed, never judged."""
    details = dict(result.details, status="disturbed", reason=reason)
    discard_weights(candidate.run_dir)
    current.ledger.finish(candidate.exp_id, "disturbed", None, details, sha=candidate.sha)
    current.ledger.add_event("disturbed", candidate.sha, f"experiment #{candidate.exp_id}: {reason}")
    current.export()
    gitops.worktree_remove(current.ws.root, candidate.worktree)


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
