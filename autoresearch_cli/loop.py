"""`ar iterate`: propose -> validate -> worktree + commit -> sandboxed train -> trusted
evaluation -> keep or discard -> record, as many times as asked.

The branch tip is only ever moved (by compare-and-swap) to a commit that was evaluated
here and beat the best; everything else stays reachable under refs/ar/discarded/<id>.
"""

from __future__ import annotations

import ast
import statistics
from dataclasses import dataclass
from typing import Any

from autoresearch_cli import gitops
from autoresearch_cli.errors import AgentError, ArError
from autoresearch_cli.runs import (
    Events,
    Session,
    _quiet,
    discard_weights,
    evaluate_commit,
    mark_interrupted,
    require_data,
    run_baseline,
    worktree_for,
)

CRASH_STATUSES = ("crash", "timeout", "oom")


@dataclass
class LoopStats:
    done: int = 0
    kept: int = 0
    discarded: int = 0
    crashed: int = 0
    invalid: int = 0
    stopped_because: str | None = None


def min_delta(current: Session) -> float:
    """How much an experiment must beat the best by: ar.toml's value, or (when negative)
    twice the std of the baseline repeats, or 0 without repeats."""
    configured = float(current.config["keep"]["min_delta"])
    if configured >= 0:
        return configured
    _, std, n = current.ledger.baseline_stats()
    return 2 * std if std is not None and n >= 2 else 0.0


def mean_bpb_by_sha(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each commit's val_bpb: the mean over its ok evaluations (baseline repeats)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row["sha"] and row["status"] == "ok" and row["val_bpb"] is not None:
            values.setdefault(row["sha"], []).append(row["val_bpb"])
    return {sha: statistics.fmean(bpbs) for sha, bpbs in values.items()}


def reference_bpb(current: Session, sha: str) -> float | None:
    """val_bpb of one commit (the branch tip, in practice)."""
    return mean_bpb_by_sha(current.ledger.experiments()).get(sha)


def history(current: Session) -> list[Any]:
    from autoresearch_cli.agents import HistoryItem

    rows = current.ledger.experiments()
    bpb_of = mean_bpb_by_sha(rows)  # one pass: history is built before every proposal
    items = []
    for row in rows:
        if row["status"] in ("proposing", "running", "evaluating"):
            continue
        parent = bpb_of.get(row["parent_sha"])
        delta = row["val_bpb"] - parent if row["val_bpb"] is not None and parent is not None else None
        status = row["decision"] or row["status"]
        if row["kind"] == "baseline" and row["status"] == "ok":
            status = "baseline"
        items.append(HistoryItem(row["id"], row["description"] or "", row["val_bpb"], status, delta))
    return items


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


def ensure_baseline(current: Session, on_event: Events) -> float | None:
    tip = current.ws.tip()
    best = reference_bpb(current, tip)
    if best is None:
        on_event("note", message="no evaluation of the branch tip yet: running the baseline first")
        run_baseline(current, 1, on_event)
        best = reference_bpb(current, tip)
    return best


def iterate(
    current: Session,
    agent: Any,
    agent_name: str,
    n: int | None,
    on_event: Events = _quiet,
) -> LoopStats:
    """Run `n` experiments (None: until interrupted or the agent stops)."""
    require_data(current.ws)
    stats = LoopStats()
    ensure_baseline(current, on_event)
    repair_attempts = int(current.config["agent"]["repair_attempts"])
    while n is None or stats.done < n:
        try:
            outcome = _one_experiment(current, agent, agent_name, stats, n, None, None, on_event)
            attempts = 0
            while outcome and outcome[0] in CRASH_STATUSES and attempts < repair_attempts:
                attempts += 1
                failure_id, failure = outcome[1], outcome[2]
                outcome = _one_experiment(current, agent, agent_name, stats, n, failure_id, failure, on_event)
        except AgentError as exc:
            stats.stopped_because = str(exc)
            break
    return stats


def _one_experiment(current, agent, agent_name, stats, n, repair_of, failure, on_event):
    """One proposal through to a decision. Returns (status, id, failure text) or None."""
    from autoresearch_cli.agents import ProposalError

    ws, ledger = current.ws, current.ledger
    tip = ws.tip()
    best_bpb = reference_bpb(current, tip)
    parent_train_py = (gitops.show_file(ws.root, tip, "train.py") or b"").decode()
    shown_train_py = parent_train_py
    if repair_of is not None:  # a repair starts from the train.py that failed
        failed_sha = ledger.get(repair_of)["sha"]
        shown_train_py = (gitops.show_file(ws.root, failed_sha, "train.py") or b"").decode() or parent_train_py
    program_md = _program_md(current, tip)
    kind = "repair" if repair_of else "experiment"
    exp_id = ledger.start_experiment(kind, tip, None, agent_name, repair_of=repair_of, branch=ws.branch)
    current.current_experiment = exp_id
    stats.done += 1
    on_event("start", exp_id=exp_id, index=stats.done - 1, total=n, description="(proposing)", sha=tip)
    try:
        try:
            proposal = agent.propose(shown_train_py, program_md, history(current), failure)
        except ProposalError as exc:
            return _reject(current, stats, exp_id, exc.reason, on_event)
        except AgentError as exc:  # the agent cannot go on (auth, model, budget): stop the loop
            ledger.finish(exp_id, "invalid", None, None, reason=f"no proposal: {exc}")
            stats.invalid += 1
            raise
        ledger.update(exp_id, description=proposal.description)
        on_event("proposed", exp_id=exp_id, description=proposal.description)
        reason = validate(proposal.train_py, parent_train_py)
        if reason:
            return _reject(current, stats, exp_id, reason, on_event)
        with worktree_for(current, exp_id, tip) as worktree:
            (worktree / "train.py").write_text(proposal.train_py)
            sha = gitops.commit_file(worktree, "train.py", proposal.description or f"experiment {exp_id}")
            changed = gitops.changed_files(ws.root, tip, sha)
            if changed != ["train.py"]:
                return _reject(current, stats, exp_id, f"the commit changes {', '.join(changed)}", on_event)
            ledger.update(exp_id, sha=sha)
            gitops.update_ref(ws.root, f"{gitops.DISCARDED_PREFIX}{exp_id}", sha, None)
            result = evaluate_commit(current, exp_id, sha, worktree, on_event)
    except KeyboardInterrupt:
        mark_interrupted(current, exp_id)
        raise
    return _decide(current, stats, exp_id, tip, sha, best_bpb, result, on_event)


def _program_md(current: Session, tip: str) -> str:
    """The human's instructions: the workspace's program.md as it is on disk now, so an
    edit steers the next proposal; the committed one if the file is gone."""
    path = current.ws.root / "program.md"
    if path.is_file():
        return path.read_text()
    return (gitops.show_file(current.ws.root, tip, "program.md") or b"").decode()


def _reject(current, stats, exp_id, reason, on_event):
    current.ledger.finish(exp_id, "invalid", None, None, reason=reason)
    stats.invalid += 1
    on_event("done", exp_id=exp_id, result={"status": "invalid", "reason": reason, "val_bpb": None}, decision=None)
    return ("invalid", exp_id, reason)


def _decide(current, stats, exp_id, tip, sha, best_bpb, result, on_event):
    ws, ledger = current.ws, current.ledger
    status = result["status"]
    decision = None
    if status == "ok":
        threshold = min_delta(current)
        if best_bpb is None or result["val_bpb"] < best_bpb - threshold:
            decision = "keep"
        else:
            decision = "discard"
    if decision == "keep":
        gitops.update_ref(ws.root, ws.branch_ref(), sha, tip)  # compare-and-swap
        gitops.delete_ref(ws.root, f"{gitops.DISCARDED_PREFIX}{exp_id}")
        gitops.sync_checkout(ws.root, ws.branch, tip, sha)
        stats.kept += 1
    else:
        discard_weights(ws.runs_dir / str(exp_id))
        if status == "ok":
            stats.discarded += 1
        elif status == "invalid":
            stats.invalid += 1
        else:
            stats.crashed += 1
    ledger.finish(exp_id, status, decision, result, sha=sha)
    current.export()
    on_event("done", exp_id=exp_id, result=result, decision=decision, best_bpb=best_bpb)
    failure = None
    if status in ("crash", "timeout", "oom"):
        failure = f"{result.get('reason')}\n\nLast lines of the training log:\n{result.get('log_tail') or ''}"
    return (status, exp_id, failure)


def revert(current: Session, sha: str) -> tuple[str, str]:
    """Move the branch back to a kept commit; returns (old tip, new tip)."""
    row = current.ledger.row_for_sha(sha.strip().lower())
    if row is None or not row["sha"]:
        raise ArError(f"commit {sha} is not an experiment of this workspace")
    kept = row["status"] == "ok" and (row["decision"] == "keep" or row["kind"] == "baseline")
    if not kept:
        what = row["decision"] or row["status"]
        raise ArError(f"commit {gitops.short(row['sha'])} was never kept ({what}); only kept commits can be restored")
    ws = current.ws
    tip = ws.tip()
    if row["sha"] == tip:
        raise ArError(f"commit {gitops.short(tip)} is already the tip of {ws.branch}")
    gitops.update_ref(ws.root, ws.branch_ref(), row["sha"], tip)
    gitops.sync_checkout(ws.root, ws.branch, tip, row["sha"])
    current.ledger.add_event("revert", row["sha"], f"from {tip}")
    current.export()
    return tip, row["sha"]
