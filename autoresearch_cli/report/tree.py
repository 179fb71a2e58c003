"""`ar log --tree`: the experiments as the tree they form, each under the commit it built on.

Agents may build on any commit (agents/parents.py), so the research is a tree: the
baseline at the root, every experiment under its parent, the best marked. Each line is
one experiment: its outcome, its commit's mean over its runs with its interval, and its
paired gain over the best it was judged against. Re-measures and confirmations add to
their commit's numbers and get no line of their own. Read from the evidence
(research/evidence.py), like `ar log`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from autoresearch_cli.doors.records import IN_FLIGHT, NEW_COMMIT_KINDS, Run
from autoresearch_cli.research.evidence import Evidence, gain

DESCRIPTION_CHARS = 70


def tree_rows(evidence: Evidence) -> list[dict[str, Any]]:
    """One row per experiment, depth first from the baseline, each with its depth and its
    parent's experiment id (the baseline's row has id "baseline")."""
    children: dict[str | None, list[Run]] = defaultdict(list)
    made_by: dict[str, Run] = {}
    for run in evidence.runs:
        if run.kind in NEW_COMMIT_KINDS:
            children[run.parent_sha].append(run)
            if run.sha:
                made_by.setdefault(run.sha, run)
    rows: list[dict[str, Any]] = []
    root = evidence.baseline_sha
    if root is not None:
        rows.append(_baseline_row(evidence, root))
        _walk(evidence, children, root, 1, "baseline", rows, set())
    orphans = [sha for sha in children if sha != root and sha not in made_by]
    for sha in orphans:  # built on a commit no experiment made (a hand-made keep)
        rows.append({"id": (sha or "?")[:7], "depth": 0, "parent": None, "outcome": "commit",
                     "commit": (sha or "")[:7], "val_bpb": None, "runs": 0,
                     "half_width": None, "gain": None, "gain_half_width": None,
                     "best": False, "description": "a commit no experiment made"})
        _walk(evidence, children, sha, 1, (sha or "?")[:7], rows, set())
    return rows


def _walk(evidence: Evidence, children: dict[str | None, list[Run]], sha: str | None,
          depth: int, parent_id: object, rows: list[dict[str, Any]], seen: set[str]) -> None:
    if sha is None or sha in seen:
        return
    seen.add(sha)
    for run in children.get(sha, []):
        rows.append(_row(evidence, run, depth, parent_id))
        if run.sha and run.sha != sha:
            _walk(evidence, children, run.sha, depth + 1, run.id, rows, seen)


def _baseline_row(evidence: Evidence, sha: str) -> dict[str, Any]:
    commit = evidence.on_class(sha)
    return {"id": "baseline", "depth": 0, "parent": None, "outcome": "baseline",
            "commit": sha[:7], "val_bpb": commit.mean if commit else None,
            "runs": commit.n if commit else 0,
            "half_width": commit.half_width if commit else None, "gain": None,
            "gain_half_width": None, "best": sha == evidence.best_sha, "description": ""}


def _row(evidence: Evidence, run: Run, depth: int, parent_id: object) -> dict[str, Any]:
    commit = evidence.commit_of(run) if run.scored else None
    against = evidence.against(run) if commit is not None else None
    paired = gain(against, commit) if commit is not None and against is not None and against.runs else None
    word = "running" if run.status in IN_FLIGHT else evidence.word(run)
    return {"id": run.id, "depth": depth, "parent": parent_id, "outcome": word,
            "commit": (run.sha or "")[:7], "val_bpb": commit.mean if commit else None,
            "runs": commit.n if commit else 0,
            "half_width": commit.half_width if commit else None,
            "gain": paired.value if paired else None,
            "gain_half_width": paired.half_width if paired else None,
            "best": bool(run.sha) and run.sha == evidence.best_sha,
            "description": run.description or "",
            "reason": None if run.scored else run.reason}


def render_tree(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as text lines with tree branches drawn (├──, └──, │)."""
    lines = []
    open_levels: list[bool] = []  # per depth: whether more siblings follow
    for index, row in enumerate(rows):
        depth = row["depth"]
        last = not any(later["depth"] == depth for later in _until_shallower(rows, index, depth))
        del open_levels[depth:]
        prefix = "".join("│   " if more else "    " for more in open_levels[1:])
        branch = ("└── " if last else "├── ") if depth > 0 else ""
        open_levels.append(not last)
        lines.append(prefix + branch + _text(row))
    return lines


def _until_shallower(rows: list[dict[str, Any]], index: int, depth: int) -> list[dict[str, Any]]:
    following = []
    for row in rows[index + 1:]:
        if row["depth"] < depth:
            break
        following.append(row)
    return following


def _text(row: dict[str, Any]) -> str:
    name = "baseline" if row["id"] == "baseline" else f"#{row['id']} {row['outcome']}"
    parts = [name]
    if row["val_bpb"] is not None:
        spread = f" ± {row['half_width']:.4f}" if row["half_width"] is not None else ""
        parts.append(f"{row['val_bpb']:.6f}{spread} ({row['runs']} run{'s' * (row['runs'] != 1)})")
    if row["gain"] is not None:
        spread = f" ± {row['gain_half_width']:.4f}" if row["gain_half_width"] is not None else ""
        parts.append(f"gain {row['gain']:+.4f}{spread}")
    text = " ".join(row["description"].split())[:DESCRIPTION_CHARS]
    if text:
        parts.append(text)
    elif row.get("reason"):
        parts.append(f"({' '.join(str(row['reason']).split())[:DESCRIPTION_CHARS]})")
    if row["best"]:
        parts.append("<- best")
    return "  ".join(part for part in parts if part)
