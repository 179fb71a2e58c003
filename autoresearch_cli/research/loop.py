"""The research commands' cores: `ar iterate`, `ar baseline`, `ar revert`, and the
studies of what was found (`ar ablate`, `ar transfer`: research/studies.py plans them).

Every training goes through a backend (backends/), baseline runs included, so each
command works the same on this machine and on a cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from autoresearch_cli.agents.base import Agent
from autoresearch_cli.backends import DataAccess, open_backend
from autoresearch_cli.backends.base import Backend
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.data import prepare_data, read_manifest
from autoresearch_cli.errors import ArError
from autoresearch_cli.research import studies
from autoresearch_cli.research.evidence import CommitEvidence
from autoresearch_cli.research.scheduler import Events, Outcome, Scheduler
from autoresearch_cli.research.session import Session, quiet, require_data


def connect(current: Session, backend: str, workers: int | None,
            address: str | None) -> Backend:
    """The backend `backend` for this workspace's profile and data."""
    require_data(current.ws)
    data = DataAccess(current.ws.data_dir, read_manifest(current.ws.data_dir), prepare_data)
    return open_backend(backend, workers=workers, device=current.settings.profile.device,
                        data=data, address=address)


def iterate(current: Session, agent: Agent, agent_name: str, n: int | None,
            on_event: Events = quiet, workers: int | None = None, backend: str = "local",
            address: str | None = None, hours: float | None = None) -> Outcome:
    """Run `n` new experiments (None: until interrupted, out of time or money), `workers`
    at once (None: one per visible GPU, or one on CPU; on Ray, one per GPU of the
    cluster). After `hours` nothing new starts; what runs finishes and is recorded. A
    model never ends the loop by saying it is done (agents/llm.py asks it for the next
    experiment)."""
    deadline = time.monotonic() + hours * 3600 if hours is not None else None
    pool = connect(current, backend, workers, address)
    try:
        if current.evidence().on_class(current.ws.tip()) is None:
            on_event("note", message="no evaluation of the branch tip yet: running the "
                                     "baseline first")
            Scheduler(current, pool, measures=1, on_event=on_event, deadline=deadline).run()
        return Scheduler(current, pool, agent, agent_name, n, on_event=on_event,
                         deadline=deadline).run()
    finally:
        pool.close()  # a cluster's slots are given back at once


@dataclass(frozen=True)
class BaselineSummary:
    sha: str
    asked: int  # runs asked for
    evidence: CommitEvidence | None  # the tip's runs, all of them, on its main class


def baseline(current: Session, repeat: int, on_event: Events = quiet, backend: str = "local",
             workers: int | None = None, address: str | None = None) -> BaselineSummary:
    """Train and evaluate the branch tip `repeat` times through `backend`, each run a
    ledger row; a disturbed run is run again (bounded) and never counted."""
    pool = connect(current, backend, workers, address)
    try:
        Scheduler(current, pool, measures=repeat, on_event=on_event).run()
    finally:
        pool.close()
    tip = current.ws.tip()
    return BaselineSummary(tip, repeat, current.evidence().on_class(tip))


def study(current: Session, plan: studies.Plan, on_event: Events = quiet, backend: str = "local",
          workers: int | None = None, address: str | None = None) -> None:
    """Run a study's planned runs (an ablation, a transfer) through `backend`."""
    if not plan.tasks:
        return
    pool = connect(current, backend, workers, address)
    try:
        studies.run_plan(current, pool, plan, on_event)
    finally:
        pool.close()


def revert(current: Session, sha: str) -> tuple[str, str]:
    """Move the branch back to a commit on its record (the baseline or a keep); returns
    (old tip, new tip)."""
    evidence = current.evidence()
    wanted = sha.strip().lower()
    if len(wanted) < 7:
        raise ArError(f"commit {sha!r} is too short: give at least 7 characters")
    matches = {run.sha for run in evidence.runs if run.sha and run.sha.startswith(wanted)}
    if not matches:
        raise ArError(f"commit {sha} is not an experiment of this workspace")
    if len(matches) > 1:
        raise ArError(f"commit {sha!r} is ambiguous in the ledger")
    target = matches.pop()
    if target not in evidence.recorded_shas:
        made = evidence.proposer(target)
        what = (made.decision or made.status) if made else "never evaluated"
        raise ArError(f"commit {gitops.short(target)} was never kept ({what}); only kept "
                      "commits can be restored")
    ws = current.ws
    tip = ws.tip()
    if target == tip:
        raise ArError(f"commit {gitops.short(tip)} is already the tip of {ws.branch}")
    gitops.update_ref(ws.root, ws.branch_ref(), target, tip)
    gitops.sync_checkout(ws.root, ws.branch, tip, target)
    current.ledger.add_event("revert", target, f"from {tip}")
    current.export()
    return tip, target


def runs_model_code(current: Session, model_backed: bool, is_model_backed,
                    explore: float = 0.0) -> bool:
    """Whether this command may run train.py a model wrote: the agent is model-backed, or
    a commit it may build on descends from one a model-backed agent proposed
    (`is_model_backed(agent name)`; a name ar does not know counts as one). It builds on
    the branch tip, and with `explore` > 0 on any commit the search offers (agents/parents:
    the keeps, the baseline, and discarded candidates, which any of them may become)."""
    if model_backed:
        return True
    evidence = current.evidence()
    starts = [current.ws.tip(), *(evidence.proposed if explore > 0 else ())]
    clean: set[str] = set()  # commits whose ancestry holds no model's code
    for start in starts:
        sha, path = start, []
        while sha and sha not in clean and sha not in path and sha != evidence.baseline_sha:
            run = evidence.proposer(sha)
            if run is None or run.kind == "baseline":
                break
            if is_model_backed(run.agent):
                return True
            path.append(sha)
            sha = run.parent_sha
        clean.update(path)
    return False
