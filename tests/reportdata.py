"""A night of research, written straight into a workspace's ledger with real commits: what
the report tests read (no training: every number is given)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.doors.template import set_constants

CLASS = "cpu:2"
BASELINE = (2.00, 2.02, 1.98, 2.01, 1.99)  # seeds 0..4
STEP_A = (1.96, 1.975, 1.94)  # MATRIX_LR 0.05, kept
STEP_B = (1.93, 1.95, 1.915)  # + WEIGHT_DECAY 0.3, kept: the best
HOLDOUT_OFFSET = 0.03  # the holdout scores a little worse, and gains a little less
HOSTILE = "<script>alert('x')</script> | *raise* LR"


@dataclass
class Night:
    shas: dict[str, str] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)


def commit(ws, parent: str, changes: dict[str, object], message: str) -> str:
    """A commit of train.py with `changes` on `parent` (a worktree, like ar's own)."""
    path = ws.worktrees_dir / f"made-{len(message)}-{parent[:7]}"
    ws.worktrees_dir.mkdir(parents=True, exist_ok=True)
    gitops.worktree_add(ws.root, path, parent)
    train_py = (path / "train.py").read_text()
    (path / "train.py").write_text(set_constants(train_py, {k: repr(v) for k, v in changes.items()}))
    sha = gitops.commit_file(path, "train.py", message)
    gitops.worktree_remove(ws.root, path)
    return sha


def add_run(ledger: Ledger, kind: str, parent: str | None, sha: str, value: float | None,
            index: int, status: str = "ok", description: str = "", holdout: float | None = None,
            reason: str | None = None, slot_class: str = CLASS) -> int:
    exp_id = ledger.start_experiment(kind, parent, description, "llm", status="running")
    ledger.update(exp_id, sha=sha, slot_class=slot_class, seed=1000 + index, seed_index=index)
    result = {"status": status, "val_bpb": value, "peak_rss_mb": 1024, "total_seconds": 12.0,
              "training_seconds": 3.0, "reason": reason}
    if value is not None:
        result["holdout_bpb"] = holdout if holdout is not None else value + HOLDOUT_OFFSET
    ledger.finish(exp_id, status, result)
    return exp_id


def night(ws) -> Night:
    """Baseline (5 runs), two kept steps (3 runs each), a discard, a crash, an invalid
    proposal, a model call per proposal."""
    made = Night()
    base = ws.tip()
    a = commit(ws, base, {"MATRIX_LR": 0.05}, "raise LR")
    b = commit(ws, a, {"WEIGHT_DECAY": 0.3}, "more decay")
    c = commit(ws, b, {"MATRIX_LR": 0.5}, "much higher LR")
    made.shas = {"base": base, "a": a, "b": b, "c": c}
    with Ledger.for_workspace(ws.root) as ledger:
        for index, value in enumerate(BASELINE):
            add_run(ledger, "baseline", base, base, value, index, description="baseline")
        made.ids["a"] = _kept(ledger, base, a, STEP_A, HOSTILE, holdout_gain=0.7)
        made.ids["b"] = _kept(ledger, a, b, STEP_B, "more decay", holdout_gain=0.5)
        made.ids["c"] = add_run(ledger, "experiment", b, c, 1.99, 0, description="much higher LR")
        ledger.settle(made.ids["c"], "discard", json.dumps({"p": 0.9}), reason="discarded: worse")
        made.ids["crash"] = add_run(ledger, "experiment", b, c, None, 0, status="crash",
                                    description="oops", reason="train.py exited with code 1: boom")
        made.ids["invalid"] = ledger.start_experiment("experiment", b, "no edit", "llm")
        ledger.finish(made.ids["invalid"], "invalid", None,
                      reason="SEARCH block did not match: closest lines were ...")
        for name in ("a", "b", "c", "crash", "invalid"):
            ledger.record_llm_call(made.ids[name], {"model": "m", "cost_usd": 0.01,
                                                    "prompt_tokens": 1000, "completion_tokens": 200})
    return made


def _kept(ledger: Ledger, parent: str, sha: str, values: tuple[float, ...], description: str,
          holdout_gain: float) -> int:
    """A kept step: its run and confirmations, its holdout runs gaining `holdout_gain` of
    what val gains over the parent's same seed."""
    first = None
    parent_values = BASELINE if parent == ledger.runs()[0].sha else STEP_A
    for index, value in enumerate(values):
        parent_holdout = parent_values[index] + HOLDOUT_OFFSET
        holdout = parent_holdout - holdout_gain * (parent_values[index] - value)
        kind = "experiment" if first is None else "confirmation"
        exp_id = add_run(ledger, kind, parent, sha, value, index, description=description,
                         holdout=holdout)
        first = first or exp_id
    ledger.settle(first, "keep", json.dumps({"p": 0.001, "look_level": 0.01,
                                             "runs": list(values)}), reason="kept")
    return first
