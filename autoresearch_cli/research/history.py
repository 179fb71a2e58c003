"""What an agent is shown of the research so far, read from the evidence.

One item per commit tried (its mean over its runs, the runs behind it, its verdict and
why, its paired evidence against the commit it was judged against), the proposals that
never ran, the runs still in flight, the measured noise, and each commit's train.py when
a reader is given: the same numbers the keep test read, so a model is never told that one
lucky run was the best. `parents` lists the commits the next experiment may build on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from autoresearch_cli.agents.base import History, HistoryItem, Parent
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.records import IN_FLIGHT, NEW_COMMIT_KINDS, Run
from autoresearch_cli.research.evidence import CommitEvidence, Evidence, gain, paired_mean
from autoresearch_cli.research.session import Session

PROMISING = 2  # candidates not shown better that may still be built on, at most
ReadTrainPy = Callable[[str], str]  # sha -> train.py as committed there


def history(evidence: Evidence, read: ReadTrainPy | None = None) -> History:
    """Every experiment, one item per commit, oldest first; with `read`, each commit's
    train.py (what agents compare a new proposal with)."""
    items: dict[object, HistoryItem] = {}
    for run in evidence.runs:
        if run.kind == "baseline" and run.sha == evidence.baseline_sha:
            if run.sha not in items and run.status not in IN_FLIGHT:
                items[run.sha] = _commit_item(evidence, run, "baseline")
            continue
        if run.kind not in NEW_COMMIT_KINDS:
            continue  # re-measures and confirmations add to their commit's evidence
        if run.status in IN_FLIGHT:
            if run.sha:  # a commit running now: a proposal must not repeat it either
                items[run.sha] = _unscored_item(run, "running")
            continue
        key: object = run.sha if run.sha and run.status == "ok" else f"#{run.id}"
        items[key] = (_commit_item(evidence, run, evidence.word(run)) if run.scored
                      else _unscored_item(run, run.status))
    best = evidence.best()
    best_item = None
    if best is not None and best.mean is not None:
        proposer = evidence.proposer(best.sha)
        label = proposer.id if proposer else "-"
        description = (proposer.description or "") if proposer else ""
        best_item = HistoryItem(label, description, best.mean, "best", None, best.n,
                                sha=best.sha, level=best.mean)
    measured = evidence.noise(best.slot_class if best else None)
    told = History(list(items.values()), measured.sigma, measured.df, best_item)
    if read is not None:
        shas = {item.sha for item in told.items} | {item.parent_sha for item in told.items}
        told.sources = {sha: read(sha) for sha in sorted(s for s in shas if s)}
    return told


def for_proposal(current: Session, parent: Parent) -> History:
    """What an agent is told before a proposal: the history, with every commit's train.py,
    and the parent its proposal builds on."""
    root = current.ws.root
    told = history(current.evidence(), read=lambda sha: _committed_train_py(root, sha))
    told.parent = parent
    return told


@lru_cache(maxsize=1024)
def _committed_train_py(root: Path, sha: str) -> str:
    """train.py at `sha` (a commit never changes: each is read once per process)."""
    return (gitops.show_file(root, sha, "train.py") or b"").decode(errors="replace")


def _commit_item(evidence: Evidence, run: Run, status: str) -> HistoryItem:
    commit = evidence.commit_of(run)
    mean = commit.mean if commit is not None and commit.mean is not None else run.val_bpb
    parent = evidence.parent_mean(run) if run.kind != "baseline" else None
    delta = mean - parent if mean is not None and parent is not None else None
    item = HistoryItem(run.id, run.description or "", mean, status, delta,
                       commit.n if commit is not None else 1,
                       None if status in ("baseline", "keep") else run.reason,
                       sha=run.sha, parent_sha=run.parent_sha, kind=run.kind, level=mean)
    if run.kind != "baseline" and commit is not None:
        _add_paired(item, commit, evidence.against(run))
    return item


def _add_paired(item: HistoryItem, commit: CommitEvidence,
                reference: CommitEvidence | None) -> None:
    """The item's gain over the commit it was judged against, and its level through them."""
    if reference is None or reference.sha == commit.sha or not reference.runs:
        return
    measured = gain(reference, commit)
    if measured is not None:
        item.gain, item.gain_half_width, item.pairs = (measured.value, measured.half_width,
                                                       measured.paired)
    item.level = paired_mean(commit, reference)


def _unscored_item(run: Run, status: str) -> HistoryItem:
    return HistoryItem(run.id, run.description or "", None, status, None, 0, run.reason,
                       sha=run.sha, parent_sha=run.parent_sha, kind=run.kind)


def parents(evidence: Evidence, tip: str) -> list[Parent]:
    """The commits the next experiment may build on: the branch tip (the best) first, then
    every other commit on the branch's record (the baseline and the keeps), newest first,
    then the few most promising candidates that were not shown better (their runs beat
    the best's on the same seeds, not by enough). Each with its mean, its level through
    its pairs with the best, its runs and how many experiments were built on it already."""
    best = evidence.on_class(tip)
    tried = Counter(run.parent_sha for run in evidence.runs if run.kind in NEW_COMMIT_KINDS)
    recorded = [run.sha for run in evidence.runs if run.sha in evidence.recorded_shas]
    shas = _unique([tip, *reversed(recorded)])
    roles = {sha: "best" if sha == tip else "baseline" if sha == evidence.baseline_sha
             else "keep" for sha in shas}
    for sha in _promising(evidence, best, set(shas)):
        shas.append(sha)
        roles[sha] = "candidate"
    return [_parent(evidence, sha, roles[sha], tried[sha], best) for sha in shas]


def _unique(shas: list[str | None]) -> list[str]:
    seen: list[str] = []
    for sha in shas:
        if sha and sha not in seen:
            seen.append(sha)
    return seen


def _promising(evidence: Evidence, best: CommitEvidence | None, taken: set[str]) -> list[str]:
    """Discarded candidates whose runs beat the best's on the seeds both ran on, lowest
    level first, at most PROMISING."""
    if best is None or best.mean is None:
        return []
    found = []
    for run in evidence.runs:
        if (run.kind not in NEW_COMMIT_KINDS or run.decision != "discard" or not run.scored
                or run.sha in taken):
            continue
        mine = evidence.commit(run.sha, best.slot_class)  # type: ignore[arg-type]
        level = paired_mean(mine, best)
        if mine.runs and level is not None and level < best.mean:
            found.append((level, run.id, run.sha))
    return [sha for _, _, sha in sorted(found)[:PROMISING]]


def _parent(evidence: Evidence, sha: str, role: str, tried: int,
            best: CommitEvidence | None) -> Parent:
    proposer = evidence.proposer(sha)
    on_class = evidence.on_class(sha)
    on_best = evidence.commit(sha, best.slot_class) if best is not None else None
    level = paired_mean(on_best, best) if on_best is not None and on_best.runs else None
    mean = on_class.mean if on_class else None
    return Parent(sha, mean, proposer.id if proposer else None,
                  (proposer.description or "") if proposer else "", tried=tried,
                  runs=on_best.n if on_best is not None else 0, role=role,
                  level=level if level is not None else mean)
