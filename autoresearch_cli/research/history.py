"""What an agent is shown of the research so far, read from the evidence.

One line per commit tried (its mean over its runs, the runs behind it, its verdict and
why), the proposals that never ran, and the measured noise: the same numbers the keep
test read, so a model is never told that one lucky run was the best.
"""

from __future__ import annotations

from autoresearch_cli.agents.base import History, HistoryItem, Parent
from autoresearch_cli.doors.records import IN_FLIGHT, NEW_COMMIT_KINDS, Run
from autoresearch_cli.research.evidence import Evidence


def history(evidence: Evidence) -> History:
    """Every finished experiment, one item per commit, oldest first."""
    items: dict[object, HistoryItem] = {}
    for run in evidence.runs:
        if run.status in IN_FLIGHT:
            continue
        if run.kind == "baseline" and run.sha == evidence.baseline_sha:
            if run.sha not in items:
                items[run.sha] = _commit_item(evidence, run, "baseline")
            continue
        if run.kind not in NEW_COMMIT_KINDS:
            continue  # re-measures and confirmations add to their commit's evidence
        key: object = run.sha if run.sha and run.status == "ok" else f"#{run.id}"
        items[key] = (_commit_item(evidence, run, evidence.word(run)) if run.scored
                      else _unscored_item(run))
    best = evidence.best()
    best_item = None
    if best is not None and best.mean is not None:
        proposer = evidence.proposer(best.sha)
        label = proposer.id if proposer else "-"
        description = (proposer.description or "") if proposer else ""
        best_item = HistoryItem(label, description, best.mean, "best", None, best.n)
    measured = evidence.noise(best.slot_class if best else None)
    return History(list(items.values()), measured.sigma, measured.df, best_item)


def _commit_item(evidence: Evidence, run: Run, status: str) -> HistoryItem:
    commit = evidence.commit_of(run)
    mean = commit.mean if commit is not None and commit.mean is not None else run.val_bpb
    parent = evidence.parent_mean(run) if run.kind != "baseline" else None
    delta = mean - parent if mean is not None and parent is not None else None
    return HistoryItem(run.id, run.description or "", mean, status, delta,
                       commit.n if commit is not None else 1,
                       None if status in ("baseline", "keep") else run.reason)


def _unscored_item(run: Run) -> HistoryItem:
    return HistoryItem(run.id, run.description or "", None, run.status, None, 0, run.reason)


def parents(evidence: Evidence, tip: str) -> list[Parent]:
    """The commits the next experiment may build on: the branch tip (the best) first, then
    every other commit on the branch's record, newest first, each with its mean."""
    found, seen = [], set()
    for sha in [tip, *reversed([run.sha for run in evidence.runs
                                if run.sha in evidence.recorded_shas])]:
        if sha in seen:
            continue
        seen.add(sha)
        proposer = evidence.proposer(sha)
        on_class = evidence.on_class(sha)
        found.append(Parent(sha, on_class.mean if on_class else None,
                            proposer.id if proposer else None,
                            (proposer.description or "") if proposer else ""))
    return found
