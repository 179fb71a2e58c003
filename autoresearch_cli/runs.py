"""Running commits: the session that owns a workspace's experiments, recovery after a
kill, the checks every run goes through afterwards (protected files, git refs through a
RefGuard, the ledger), the spec the sandbox is handed, and `ar baseline` (runs of the
tip in this process; `ar iterate` runs its experiments in worker processes, workers.py).
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoresearch_cli import gitops, keeprule
from autoresearch_cli.errors import ArError, DataError
from autoresearch_cli.ledger import Ledger
from autoresearch_cli.lock import ExperimentLock, lock_path
from autoresearch_cli.workspace import PROTECTED_FILES, Workspace

Events = Callable[..., None]  # on_event(kind: str, **details): the CLI renders them


def _quiet(kind: str, **details: Any) -> None:
    return None


@dataclass
class Session:
    """What a command that runs experiments holds: the workspace, its settings, the ledger
    and the experiment lock."""

    ws: Workspace
    config: dict[str, Any]
    ledger: Ledger
    recovered: list[dict[str, Any]] = field(default_factory=list)

    def export(self) -> None:
        self.ledger.export_tsv(self.ws.results_tsv)


@contextmanager
def session(ws: Workspace, command: str) -> Iterator[Session]:
    """Take the workspace's experiment lock, open the ledger and clean up after any ar
    that was killed while it ran experiments here."""
    config = ws.config()
    with ExperimentLock(lock_path(ws.root), command=command):
        with Ledger.for_workspace(ws.root) as ledger:
            current = Session(ws, config, ledger)
            current.recovered = recover(current)
            yield current


def recover(current: Session) -> list[dict[str, Any]]:
    """Mark runs of a dead ar as interrupted, kill their jobs, remove their worktrees."""
    rows = current.ledger.mark_interrupted()
    for row in rows:
        kill_stray_job(current.ws.runs_dir / str(row["id"]))
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


def experiment_spec(current: Session, run_dir: Path, worktree: Path, seed: int = 0):
    """What the sandbox runs for one commit, from ar.toml's profile and sandbox tables;
    `seed` is the run's (ar gives each run its own: the experiment's id)."""
    from sandbox.spec import ExperimentSpec, JobLimits

    profile, box = current.config["profile"], current.config["sandbox"]
    return ExperimentSpec(
        code_dir=str(worktree.resolve()), run_dir=str(run_dir.resolve()),
        data_dir=str(current.ws.data_dir.resolve()), time_budget=float(profile["time_budget"]),
        startup_allowance=float(profile["startup_allowance"]),
        eval_tokens=int(profile["eval_tokens"]), seq_len=int(profile["max_seq_len"]),
        eval_timeout=float(profile["eval_timeout"]), device=profile.get("device", "auto"),
        seed=int(seed), limits=JobLimits(max_rss_mb=box["max_rss_mb"], max_vram_mb=box["max_vram_mb"],
                         max_file_mb=box["max_file_mb"], max_open_files=box["max_open_files"],
                         network=bool(box["network"])),
    )  # fmt: skip


def evaluate_commit(
    current: Session, exp_id: int, sha: str, worktree: Path, on_event: Events = _quiet
) -> dict[str, Any]:
    """Train and evaluate the commit checked out in `worktree`; return result.json's dict.

    Whatever the job did, ar checks afterwards that the protected files, every git ref
    and the ledger are as ar left them; a run that changed one is invalid (and a moved ref
    is put back).
    """
    from sandbox.errors import SandboxError
    from sandbox.experiment import run_experiment

    run_dir = current.ws.runs_dir / str(exp_id)
    current.ledger.update(exp_id, status="running", seed=exp_id)
    on_event("training", exp_id=exp_id, budget=current.config["profile"]["time_budget"])
    refs_before = gitops.refs(current.ws.root, "refs/")
    ledger_before = current.ledger.data_version()
    try:
        result = run_experiment(
            experiment_spec(current, run_dir, worktree, seed=exp_id),
            on_progress=lambda progress: on_event("progress", exp_id=exp_id, progress=progress),
        ).as_dict()
    except SandboxError as exc:
        raise ArError(f"the sandbox failed: {exc}") from None
    moved = restore_refs(current.ws.root, refs_before)
    return invalidate(result, job_tampering(current, worktree, sha, ledger_before, moved))


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


@contextmanager
def worktree_for(current: Session, exp_id: int, sha: str) -> Iterator[Path]:
    path = add_worktree(current, exp_id, sha)
    try:
        yield path
    finally:
        gitops.worktree_remove(current.ws.root, path)


def mark_interrupted(current: Session, exp_id: int) -> None:
    current.ledger.update(exp_id, status="interrupted", reason="interrupted by the user")
    current.export()


@dataclass
class BaselineSummary:
    sha: str
    results: list[dict[str, Any]]

    @property
    def values(self) -> list[float]:
        return [r["val_bpb"] for r in self.results if r["status"] == "ok"]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


def disturbance(current: Session, result: dict[str, Any], sha: str, slot_class: str) -> str | None:
    """Why a run of `sha` got too little of the machine to be judged (keeprule's rule, with
    ar.toml's thresholds and the same commit's earlier throughput there), or None."""
    if result.get("status") not in ("ok", "timeout"):
        return None
    same_code = current.ledger.runs_of(sha, slot_class, "tokens_per_s")
    return keeprule.run_disturbance(result, same_code,
                                    keeprule.Disturbance.from_config(current.config["keep"]))


def run_baseline(current: Session, repeat: int, on_event: Events = _quiet) -> BaselineSummary:
    """Train and evaluate the branch tip `repeat` times, each run a ledger row."""
    require_data(current.ws)
    from autoresearch_cli.workers import machine_class

    tip = current.ws.tip()
    slot_class = machine_class(current.config["profile"].get("device", "auto"))
    summary = BaselineSummary(sha=tip, results=[])
    limits = keeprule.Disturbance.from_config(current.config["keep"])
    retries = 0
    index = 0
    while index < repeat:
        exp_id = current.ledger.start_experiment(
            "baseline", parent_sha=tip, description="baseline", agent=None,
            status="running", branch=current.ws.branch,
        )
        current.ledger.update(exp_id, sha=tip, slot_class=slot_class)
        on_event("start", exp_id=exp_id, index=index, total=repeat, description="baseline", sha=tip)
        try:
            with worktree_for(current, exp_id, tip) as worktree:
                result = evaluate_commit(current, exp_id, tip, worktree, on_event)
        except KeyboardInterrupt:
            mark_interrupted(current, exp_id)
            raise
        disturbed = disturbance(current, result, tip, slot_class)
        if disturbed and retries < limits.retries:  # set aside, never counted: run again
            retries += 1
            result = dict(result, status="disturbed", reason=disturbed)
            current.ledger.finish(exp_id, "disturbed", None, result, sha=tip)
            current.ledger.add_event("disturbed", tip, f"experiment #{exp_id}: {disturbed}")
            current.export()
            on_event("done", exp_id=exp_id, result=dict(result, val_bpb=None), decision=None,
                     baseline=True)
            continue
        decision = "keep" if result["status"] == "ok" else None
        current.ledger.finish(exp_id, result["status"], decision, result, sha=tip)
        current.export()
        summary.results.append(result)
        on_event("done", exp_id=exp_id, result=result, decision=decision, baseline=True)
        index += 1
    return summary
