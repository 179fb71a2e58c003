"""results.tsv: the original's five columns, one line per commit that reached a verdict.

    commit  val_bpb  memory_gb  status  description

The baseline and every kept commit are `keep`, every other decided commit `discard`, each
with the mean val_bpb of its runs on the class it was judged on (what the decision read,
not one lucky run); a run that trained and failed is `crash` with 0.000000 and 0.0, as
the original writes it, the cause noted in the description. Undecided, invalid,
interrupted, disturbed and in-flight runs have no verdict and are left out, and so are
runs that only add evidence to a commit (re-measures, confirmations).
"""

from __future__ import annotations

import os
from pathlib import Path

from autoresearch_cli.doors.records import NEW_COMMIT_KINDS, Run
from autoresearch_cli.errors import WorkspaceError
from autoresearch_cli.research.evidence import Evidence, failed

TSV_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")


def tsv_lines(evidence: Evidence) -> list[str]:
    lines = ["\t".join(TSV_HEADER)]
    baseline_done = False
    for run in evidence.runs:
        if run.kind == "baseline" and run.sha == evidence.baseline_sha and not baseline_done:
            if run.scored:  # one line for the baseline commit, its mean over all its runs
                baseline_done = True
                lines.append(_line(run, "keep", evidence))
        elif run.kind in NEW_COMMIT_KINDS and run.scored and run.decision in ("keep", "discard"):
            lines.append(_line(run, run.decision, evidence))
        elif run.kind in NEW_COMMIT_KINDS and run.sha and failed(run.status):
            description = _flat(run.description)
            if run.status != "crash":
                description = f"{description} ({run.status})".strip()
            lines.append(f"{run.sha[:7]}\t0.000000\t0.0\tcrash\t{description}")
    return lines


def _line(run: Run, status: str, evidence: Evidence) -> str:
    commit = evidence.commit_of(run)
    value = commit.mean if commit is not None and commit.mean is not None else run.val_bpb
    return (f"{run.sha[:7]}\t{value:.6f}\t{run.memory_gb or 0.0:.1f}\t{status}\t"  # type: ignore[index]
            f"{_flat(run.description)}")


def _flat(text: str | None) -> str:
    return " ".join((text or "").split())


def export_tsv(evidence: Evidence, path: str | os.PathLike[str]) -> int:
    """Write results.tsv atomically; returns the number of lines below the header."""
    lines = tsv_lines(evidence)
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
    return len(lines) - 1


def write_text_atomic(target: Path, text: str) -> None:
    """Write `text` to `target` whole or not at all (a reader never sees half of it)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise WorkspaceError(f"cannot write {target}: {exc}") from exc
