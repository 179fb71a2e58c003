"""The session that owns a workspace's experiments: the experiment lock, the ledger,
recovery after a kill, the checks every run goes through afterwards (protected files,
git refs through a RefGuard, the ledger), and the spec the sandbox is handed. Every run
trains through a backend (backends/); nothing trains in this process.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.config import Settings
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.doors.lock import ExperimentLock, lock_path
from autoresearch_cli.doors.records import Run
from autoresearch_cli.doors.workspace import PROTECTED_FILES, Workspace
from autoresearch_cli.errors import DataError
from autoresearch_cli.research.evidence import Evidence
from autoresearch_cli.research.export import export_tsv

Events = Callable[..., None]  # on_event(kind: str, **details): the CLI renders them


def quiet(kind: str, **details: Any) -> None:
    return None


@dataclass
class Session:
    """What a command that runs experiments holds: the workspace, its settings, the ledger
    and the experiment lock."""

    ws: Workspace
    settings: Settings
    ledger: Ledger
    recovered: list[Run] = field(default_factory=list)
    _evidence: tuple[tuple[int, int], Evidence] | None = field(default=None, repr=False)

    def evidence(self) -> Evidence:
        """What the ledger says now, read as evidence (research/evidence.py). Read again
        only after a write: this process is the ledger's only writer while it holds the
        experiment lock (a job that writes it anyway is caught by data_version)."""
        key = (self.ledger.writes, self.ledger.data_version())
        if self._evidence is None or self._evidence[0] != key:
            self._evidence = (key, Evidence.load(self.ledger))
        return self._evidence[1]

    def export(self) -> None:
        """results.tsv, the original's five columns, from the evidence as it stands."""
        export_tsv(self.evidence(), self.ws.results_tsv)


@contextmanager
def session(ws: Workspace, command: str) -> Iterator[Session]:
    """Take the workspace's experiment lock, open the ledger and clean up after any ar
    that was killed while it ran experiments here."""
    settings = ws.settings()
    with ExperimentLock(lock_path(ws.root), command=command):
        with Ledger.for_workspace(ws.root) as ledger:
            current = Session(ws, settings, ledger)
            current.recovered = recover(current)
            yield current


def recover(current: Session) -> list[Run]:
    """Mark runs of a dead ar as interrupted, kill their jobs, remove their worktrees."""
    rows = current.ledger.mark_interrupted()
    for row in rows:
        kill_stray_job(current.ws.runs_dir / str(row.id))
    # we hold the lock: no worktree under .ar/worktrees belongs to a live run
    if current.ws.worktrees_dir.exists():
        for stray in current.ws.worktrees_dir.iterdir():
            gitops.worktree_remove(current.ws.root, stray)
    gitops.git(current.ws.root, "worktree", "prune", check=False)
    if rows:
        current.export()
    return rows


def kill_stray_job(run_dir: Path) -> int:
    """Kill the job of an ar that died (listed in run_dir/job.pid; reused pids are spared)."""
    from sandbox.proctree import kill_recorded

    return kill_recorded(run_dir / "job.pid")


def require_data(ws: Workspace) -> None:
    if not (ws.data_dir / "manifest.json").is_file():
        raise DataError("no prepared data in this workspace: run `ar prepare` first")


def protected_changes(ws: Workspace, worktree: Path, sha: str) -> list[str]:
    """Protected files whose bytes on disk in `worktree` differ from the branch's."""
    changed = []
    for name in PROTECTED_FILES:
        committed = gitops.show_file(ws.root, sha, name)
        on_disk = (worktree / name).read_bytes() if (worktree / name).is_file() else None
        if committed != on_disk:
            changed.append(name)
    return changed


def experiment_spec(current: Session, run_dir: Path, worktree: Path, seed: int,
                    device: str | None = None, time_budget: float | None = None):
    """What the sandbox runs for one commit, from ar.toml's profile and sandbox tables;
    `seed` is the run's (ar's alone), `device` the slot's (default: the profile's),
    `time_budget` the training seconds (default: the profile's; `ar transfer` scales it)."""
    from sandbox.spec import ExperimentSpec, JobLimits

    profile, box = current.settings.profile, current.settings.sandbox
    return ExperimentSpec(
        code_dir=str(worktree.resolve()), run_dir=str(run_dir.resolve()),
        data_dir=str(current.ws.data_dir.resolve()), time_budget=float(time_budget or profile.time_budget),
        startup_allowance=float(profile.startup_allowance), eval_tokens=int(profile.eval_tokens),
        seq_len=int(profile.max_seq_len), eval_timeout=float(profile.eval_timeout),
        device=device or profile.device, seed=int(seed),
        limits=JobLimits(max_rss_mb=box.max_rss_mb, max_vram_mb=box.max_vram_mb,
                         max_file_mb=box.max_file_mb, max_open_files=box.max_open_files,
                         network=bool(box.network)),
    )


LEDGER_TAMPERED = "the ledger (.ar/ledger.db)"


def job_tampering(current: Session, worktree: Path, sha: str, ledger_version: int,
                  moved_refs: list[str]) -> list[str]:
    """What a job changed that it must not: protected files on disk, git refs (found and
    put back by the caller: `moved_refs`), the ledger (written by another connection)."""
    tampered = list(moved_refs) + protected_changes(current.ws, worktree, sha)
    if current.ledger.data_version() != ledger_version:
        tampered.append(LEDGER_TAMPERED)
    return tampered


def invalidate(result: dict[str, Any], tampered: list[str]) -> dict[str, Any]:
    """result.json's dict, made invalid when the job changed what it must not."""
    if tampered:
        result.update(status="invalid", val_bpb=None, holdout_bpb=None,
                      reason=f"the job changed {', '.join(sorted(set(tampered)))}")
    return result


class RefGuard:
    """The git refs as ar left them. ar's own moves go through it, so while several jobs
    run, a ref that anything else moved is found, and put back, at any moment."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.expected = gitops.refs(repo, "refs/")

    def update(self, ref: str, new_sha: str, expected_old: str | None) -> None:
        gitops.update_ref(self.repo, ref, new_sha, expected_old)
        self.expected[ref] = new_sha

    def delete(self, ref: str) -> None:
        gitops.delete_ref(self.repo, ref)
        self.expected.pop(ref, None)

    def restore(self) -> list[str]:
        """Put back what moved since ar last moved a ref; what moved, in words."""
        return restore_refs(self.repo, self.expected)


def restore_refs(repo: Path, before: dict[str, str]) -> list[str]:
    """Put back every ref that moved, appeared or vanished since `before`; what moved."""
    after = gitops.refs(repo, "refs/")
    moved = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    for name in moved:
        if name in before:
            gitops.update_ref(repo, name, before[name], None)
        else:
            gitops.delete_ref(repo, name)
    return [f"git ref {name}" for name in moved]


def discard_weights(run_dir: Path) -> None:
    """Keep the logs of a run that will not be kept, not its weights."""
    shutil.rmtree(run_dir / "out", ignore_errors=True)


def add_worktree(current: Session, exp_id: int, sha: str) -> Path:
    """A detached worktree of `sha` for experiment `exp_id` (.ar/worktrees/<id>)."""
    path = current.ws.worktrees_dir / str(exp_id)
    current.ws.worktrees_dir.mkdir(parents=True, exist_ok=True)
    gitops.worktree_add(current.ws.root, path, sha)
    return path
