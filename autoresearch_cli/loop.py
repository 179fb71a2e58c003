"""`ar iterate`: the scheduler.

It chooses how many experiments run at once (one per worker slot), on which parent, which
failed runs get a repair, and when to stop. pipeline.py owns each experiment from its
proposal to its decision; workers.py runs them in child processes. This process alone
touches the ledger and git, one event at a time, so results that finish together are
judged one after the other, each against the best at that moment.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

from autoresearch_cli import gitops, keeprule, pipeline
from autoresearch_cli.agents.base import Agent, AgentError, Parent, choose_parent
from autoresearch_cli.errors import ArError
from autoresearch_cli.ledger import IN_FLIGHT, kept, mean_bpb_by_sha
from autoresearch_cli.pipeline import Candidate, Rejected, Task
from autoresearch_cli.runs import (
    Events,
    RefGuard,
    Session,
    _quiet,
    add_worktree,
    disturbance,
    experiment_spec,
    require_data,
    run_baseline,
)
from autoresearch_cli.workers import Ended, LocalWorkers, Slot, default_workers, plan_slots

POLL_S = 0.5  # the longest the scheduler waits for its workers without looking up


@dataclass
class IterateOutcome:
    started: int = 0  # new experiments (repairs not counted)
    stopped_because: str | None = None  # the agent could not go on


def parents(current: Session) -> list[Parent]:
    """The commits the next experiment may build on: the branch tip (the best) first, then
    every other kept commit, newest first, each with its score."""
    tip = current.ws.tip()
    rows = current.ledger.experiments()
    bpb_of = mean_bpb_by_sha(rows)
    tip_row = next((row for row in rows if row["sha"] == tip), None)
    found = [Parent(tip, bpb_of.get(tip), tip_row["id"] if tip_row else None,
                    (tip_row["description"] or "") if tip_row else "")]
    seen = {tip}
    for row in reversed(rows):
        if kept(row) and row["sha"] not in seen:
            seen.add(row["sha"])
            found.append(Parent(row["sha"], bpb_of.get(row["sha"]), row["id"],
                                row["description"] or ""))
    return found


def ensure_baseline(current: Session, on_event: Events) -> None:
    if current.ledger.bpb_of(current.ws.tip()) is None:
        on_event("note", message="no evaluation of the branch tip yet: running the baseline first")
        run_baseline(current, 1, on_event)


def iterate(current: Session, agent: Agent, agent_name: str, n: int | None,
            on_event: Events = _quiet, workers: int | None = None, backend: str = "local",
            address: str | None = None) -> IterateOutcome:
    """Run `n` new experiments (None: until interrupted or the agent stops), `workers` at
    once (None: one per visible GPU, or one on CPU; on Ray, one per GPU of the cluster).
    `backend`: local (child processes on this machine) or ray (tasks on a Ray cluster at
    `address`; None starts a local one)."""
    require_data(current.ws)
    device = current.config["profile"].get("device", "auto")
    if backend == "ray":
        from autoresearch_cli import ray_backend
        from autoresearch_cli.data import read_manifest

        pool = ray_backend.connect(address, workers, device, read_manifest(current.ws.data_dir),
                                   current.ws.data_dir)
        slots = pool.slots
    elif backend == "local":
        slots = plan_slots(workers or default_workers(device), device)
        pool = LocalWorkers(slots)
    else:
        raise ArError(f"unknown backend {backend!r}: choose local or ray")
    try:
        ensure_baseline(current, on_event)
        return Scheduler(current, agent, agent_name, n, slots, on_event, pool=pool).run()
    finally:
        close = getattr(pool, "close", None)  # a cluster's slots are given back at once
        if close is not None:
            close()


@dataclass
class Scheduler:
    current: Session
    agent: Agent
    agent_name: str
    n: int | None
    slots: list[Slot]
    on_event: Events
    outcome: IterateOutcome = field(default_factory=IterateOutcome)
    repairs: deque[Task] = field(default_factory=deque)  # repairs and combinations, first
    # parent sha -> (id, sha, tick it ended) of the runs that beat it: combination material
    winners: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)
    ticks: int = 0  # counts runs started and judged: tells which ran at the same time
    started_tick: dict[int, int] = field(default_factory=dict)
    running: dict[int, Candidate] = field(default_factory=dict)
    proposing: int | None = None  # the experiment whose proposal is being asked for
    suspects: dict[int, list[str]] = field(default_factory=dict)  # refs moved while it ran
    measured: dict[tuple[str, str], int] = field(default_factory=dict)  # measurements tried
    waiting: list[tuple[Candidate, pipeline.Result]] = field(default_factory=list)  # for one
    pool: LocalWorkers | None = None  # the backend (tests give one that runs nothing)

    def __post_init__(self) -> None:
        self.pool = self.pool or LocalWorkers(self.slots)
        self.guard = RefGuard(self.current.ws.root)
        self.repair_attempts = int(self.current.config["agent"]["repair_attempts"])
        self._waiting_reason: str | None = None
        self._resume_cluster_runs()
        self._resume_confirmations()

    def _resume_cluster_runs(self) -> None:
        """Runs a killed ar left on a cluster (a backend task id in their row): picked up
        again where the backend still has them, else interrupted and re-queued once."""
        ledger = self.current.ledger
        for row in ledger.experiments():
            if row["status"] not in IN_FLIGHT or not row["backend_task"]:
                continue
            parent = Parent(row["parent_sha"], ledger.bpb_of(row["parent_sha"]), None, "")
            measure = row["kind"] in ("baseline", "remeasure")
            task = Task(parent, measure=measure, remeasure=row["kind"] == "remeasure",
                        sha=None if measure else row["sha"], description=row["description"] or "",
                        confirms=self._confirmed(row) if row["kind"] == "confirmation" else None)
            worktree = self.current.ws.worktrees_dir / str(row["id"])
            candidate = Candidate(row["id"], task, row["sha"], row["description"] or "", worktree,
                                  self.current.ws.runs_dir / str(row["id"]),
                                  ledger.data_version(), row["slot_class"] or "")
            reattach = getattr(self.pool, "reattach", None)
            if reattach is not None and reattach(row["id"], row["backend_task"], row["slot_class"],
                                                 candidate.run_dir):
                if not worktree.exists():  # recovery removed it; the checks read it
                    add_worktree(self.current, row["id"], row["sha"])
                self.running[row["id"]] = candidate
                self.on_event("note", message=f"#{row['id']}: picked up again on the cluster "
                                              f"(task {row['backend_task']})")
                continue
            self._interrupted(candidate, "ar was restarted and the cluster no longer has its "
                                         f"task {row['backend_task']}", requeue=True)

    def _confirmed(self, row: dict) -> int:
        """The experiment a confirmation run confirms: up its chain of runs (again_of)."""
        while row["kind"] == "confirmation" and row["again_of"] is not None:
            row = self.current.ledger.get(row["again_of"])
        return row["id"]

    def _resume_confirmations(self) -> None:
        """Candidates a stopped ar left waiting for a confirmation run get it first."""
        in_flight = {c.task.confirms for c in self.running.values()}
        for row in self.current.ledger.experiments():
            if (row["kind"] in ("experiment", "repair", "combination") and row["status"] == "ok"
                    and row["decision"] is None and row["evidence"]
                    and row["id"] not in in_flight):
                parent = Parent(row["parent_sha"], self.current.ledger.bpb_of(row["parent_sha"]),
                                None, "")
                self.repairs.append(Task(parent, sha=row["sha"], confirms=row["id"],
                                         again_of=row["id"],
                                         description=f"confirm #{row['id']} (resumed)"))

    def run(self) -> IterateOutcome:
        try:
            while True:
                self._fill_slots()
                if not self.pool.running:
                    if not self.waiting:
                        return self.outcome
                    self._judge_waiting(force=True)  # a measurement failed: judge as we can
                    continue
                self._say_why_waiting()
                for event in self.pool.wait(POLL_S):
                    if isinstance(event, Ended):
                        self._finish(event)
                    else:
                        self.on_event("progress", exp_id=event.exp_id, progress=event.progress)
        except KeyboardInterrupt:
            self._stop_everything("interrupted by the user")
            raise
        except BaseException as exc:
            self._stop_everything(f"ar stopped: {exc}")
            raise

    def _say_why_waiting(self) -> None:
        """A cluster that cannot start queued runs (no free GPU) says so, once per reason."""
        reason = getattr(self.pool, "waiting_reason", lambda: None)()
        if reason and reason != self._waiting_reason:
            self.on_event("note", message=f"waiting: {reason}")
        self._waiting_reason = reason

    # --- starting ------------------------------------------------------------------------

    def _next_task(self) -> Task | None:
        if self.outcome.stopped_because is not None:
            return None
        if self.repairs:
            return self.repairs.popleft()
        if self.n is not None and self.outcome.started >= self.n:
            return None
        self.outcome.started += 1
        return Task(choose_parent(self.agent, parents(self.current)))

    def _tip(self) -> Parent:
        tip = self.current.ws.tip()
        return Parent(tip, self.current.ledger.bpb_of(tip), None, "")

    def _has_work(self) -> bool:
        return self.outcome.stopped_because is None and bool(
            self.repairs or self.n is None or self.outcome.started < self.n)

    def _runs_needed(self, slot_class: str) -> int:
        """Ok runs the best needs on `slot_class` before candidates there are judged: one
        under the one-run rule; else enough to measure the noise (the first baseline's
        noise_runs, with different seeds) and then best_runs, so the best is a mean."""
        keep = self.current.config["keep"]
        if keep["rule"] == "one-run":
            return 1
        measured = keeprule.noise(self.current.ledger.noise_groups(slot_class))
        if measured.df < int(keep["noise_runs"]) - 1:
            return int(keep["noise_runs"])
        return int(keep["best_runs"])

    def _measuring(self, sha: str, slot_class: str) -> int:
        return sum(1 for c in self.running.values()
                   if c.task.measure and c.sha == sha and c.slot_class == slot_class)

    def _measurement(self, slot: Slot) -> Task | None:
        """A run of the tip on `slot`'s class when it has fewer runs there than the keep
        test needs and something is to be judged there: like is compared only with like,
        and the best is a mean of runs, not its luckiest draw."""
        tip = self._tip()
        key = (tip.sha, slot.slot_class)
        if tip.val_bpb is None:
            return None
        have = len(self.current.ledger.runs_of(tip.sha, slot.slot_class))
        needed = self._runs_needed(slot.slot_class)
        tried = self.measured.get(key, 0)
        if have + self._measuring(*key) >= needed or tried >= needed + 1:  # one failure spare
            return None
        if not self._has_work() and not any(c.slot_class == slot.slot_class
                                            for c, _ in self.waiting):
            return None
        self.measured[key] = tried + 1
        return Task(tip, measure=True, remeasure=have > 0 or self._measuring(*key) > 0)

    def _fill_slots(self) -> None:
        while free := self.pool.free_slots():
            measurements = ((slot, self._measurement(slot)) for slot in free)
            slot, task = next(((s, t) for s, t in measurements if t), (free[0], None))
            task = task or self._next_task()
            if task is None:
                return
            self._start(task, slot)

    def _start(self, task: Task, slot: Slot) -> None:
        current = self.current
        exp_id = pipeline.open_experiment(current, task, self.agent_name)
        if task.measure or task.sha is not None:
            run = pipeline.checkout(current, exp_id, task, slot.slot_class)
            self.on_event("start", exp_id=exp_id, index=max(self.outcome.started - 1, 0),
                          total=self.n, description=run.description, sha=run.sha)
            self._run(run, slot)
            return
        self.proposing = exp_id
        self.on_event("start", exp_id=exp_id, index=self.outcome.started - 1, total=self.n,
                      description="(proposing)", sha=task.parent.sha)
        try:
            if task.combines is not None:
                proposal = pipeline.combine(current, exp_id, task)
            else:
                proposal = pipeline.propose(current, self.agent, exp_id, task)
        except AgentError as exc:
            self.proposing = None
            self.outcome.stopped_because = str(exc)
            self._rejected(Rejected(exp_id, f"no proposal: {exc}"))
            return
        if isinstance(proposal, Rejected):
            self.proposing = None
            self._rejected(proposal)
            return
        self.on_event("proposed", exp_id=exp_id, description=proposal.description)
        candidate = pipeline.commit(current, self.guard, exp_id, task, proposal, slot.slot_class)
        self.proposing = None
        if isinstance(candidate, Rejected):
            self._rejected(candidate)
            return
        self._run(candidate, slot)

    def _run(self, candidate: Candidate, slot: Slot) -> None:
        # Every run gets its own seed (its id): repeated runs of one commit measure the noise.
        spec = experiment_spec(self.current, candidate.run_dir, candidate.worktree,
                               seed=candidate.exp_id)
        self.current.ledger.update(candidate.exp_id, seed=candidate.exp_id)
        self.ticks += 1
        self.started_tick[candidate.exp_id] = self.ticks
        self.running[candidate.exp_id] = candidate
        task_id = self.pool.start(candidate.exp_id, slot,
                                  dataclasses.replace(spec, device=slot.device))
        if task_id:  # a cluster's id for it: a restarted ar picks the run up by it
            self.current.ledger.update(candidate.exp_id, backend_task=str(task_id))
        self.on_event("training", exp_id=candidate.exp_id, budget=spec.time_budget,
                      slot=slot.label)

    def _rejected(self, rejected: Rejected) -> None:
        self.on_event("done", exp_id=rejected.exp_id, decision=None,
                      result={"status": "invalid", "reason": rejected.reason, "val_bpb": None})

    # --- finishing -----------------------------------------------------------------------

    def _finish(self, ended: Ended) -> None:
        candidate = self.running.pop(ended.exp_id)
        if ended.result.get("node"):
            self.current.ledger.update(candidate.exp_id, node=str(ended.result["node"])[:200])
        if ended.result.get("status") == "interrupted":  # a lost node: not the code's doing
            self._interrupted(candidate, str(ended.result.get("reason") or "interrupted"),
                              requeue=bool(ended.result.get("requeue")))
            return
        moved = self.guard.restore()  # a ref moved by a job: every run in flight is suspect
        for other in self.running:
            self.suspects.setdefault(other, []).extend(moved)
        tampered = moved + self.suspects.pop(ended.exp_id, [])
        result = pipeline.check(self.current, candidate, ended.result, tampered)
        disturbed = disturbance(self.current, result.details, candidate.sha,
                                candidate.slot_class)
        if disturbed:
            self._set_aside(candidate, result, disturbed)
            return
        if not candidate.task.measure and self._unmeasured(candidate.slot_class):
            self.waiting.append((candidate, result))  # judged once the tip is measured there
            return
        self._judge(candidate, result)
        self._judge_waiting()

    def _set_aside(self, candidate: Candidate, result: pipeline.Result, reason: str) -> None:
        """A disturbed run is never judged: it is run again (at most disturbed_retries
        times in a chain), first in line."""
        pipeline.set_aside(self.current, candidate, result, reason)
        details = dict(result.details, status="disturbed", reason=reason, val_bpb=None)
        self.on_event("done", exp_id=candidate.exp_id, decision=None, result=details,
                      baseline=candidate.task.measure)
        task = candidate.task
        if task.measure:
            key = (candidate.sha, candidate.slot_class)
            self.measured[key] = max(0, self.measured.get(key, 0) - 1)  # not a failure
        if task.retries >= int(self.current.config["keep"]["disturbed_retries"]):
            if task.confirms is not None:
                original = self.current.ledger.get(task.confirms)
                pipeline.settle(self.current, self.guard, original, keeprule.Judgement(
                    keeprule.DISCARD, f"discarded: its confirmation runs were disturbed "
                    f"{task.retries + 1} times", (), ()))
            return
        if task.measure:
            return  # the next free slot measures again
        self.repairs.appendleft(dataclasses.replace(
            task, sha=candidate.sha, again_of=candidate.exp_id, retries=task.retries + 1,
            description=f"{_base(candidate.description)} (again: #{candidate.exp_id} was disturbed)"))

    def _interrupted(self, candidate: Candidate, reason: str, requeue: bool) -> None:
        """A run lost to the machine (a cluster node died): its row says why, and it runs
        again once, first in line."""
        pipeline.interrupt(self.current, candidate, candidate.exp_id, reason)
        self.on_event("done", exp_id=candidate.exp_id, decision=None, baseline=candidate.task.measure,
                      result={"status": "interrupted", "reason": reason, "val_bpb": None})
        task = candidate.task
        if task.measure:
            key = (candidate.sha, candidate.slot_class)
            self.measured[key] = max(0, self.measured.get(key, 0) - 1)
            return
        if requeue and not task.requeued:
            self.repairs.appendleft(dataclasses.replace(
                task, sha=candidate.sha, again_of=candidate.exp_id, requeued=True,
                description=f"{_base(candidate.description)} (again: #{candidate.exp_id} was interrupted)"))

    def _unmeasured(self, slot_class: str) -> bool:
        """Whether runs of the tip on `slot_class` the keep test needs are still to come."""
        tip = self._tip()
        if tip.val_bpb is None:
            return False
        have = len(self.current.ledger.runs_of(tip.sha, slot_class))
        needed = self._runs_needed(slot_class)
        if have >= needed:
            return False
        return (self._measuring(tip.sha, slot_class) > 0
                or self.measured.get((tip.sha, slot_class), 0) < needed + 1)

    def _judge_waiting(self, force: bool = False) -> None:
        for candidate, result in list(self.waiting):
            if force or not self._unmeasured(candidate.slot_class):
                self.waiting.remove((candidate, result))
                self._judge(candidate, result)

    def _judge(self, candidate: Candidate, result: pipeline.Result) -> None:
        decision = pipeline.record(self.current, self.guard, candidate, result)
        task = candidate.task
        verdict = decision.verdict
        self.on_event("done", exp_id=candidate.exp_id, result=result.details,
                      decision=verdict if task.confirms is None else None,
                      best_bpb=decision.best_bpb, baseline=task.measure or task.confirms is not None,
                      judgement=decision.judgement, settled=decision.settled)
        if verdict == keeprule.CONFIRM:  # another run of the same commit, first in line
            original = task.confirms if task.confirms is not None else candidate.exp_id
            runs = len(decision.judgement.runs) if decision.judgement else 1
            self.repairs.appendleft(Task(
                task.parent, sha=candidate.sha, confirms=original, again_of=candidate.exp_id,
                description=f"confirm #{original}: run {runs + 1}"))
            return
        if task.measure or task.confirms is not None:
            return
        if pipeline.should_repair(result.status, task.repairs_so_far, self.repair_attempts):
            self.repairs.append(Task(parents(self.current)[0], repair_of=candidate.exp_id,
                                     failure=result.failure,
                                     repairs_so_far=task.repairs_so_far + 1))
        self._maybe_combine(candidate, decision)

    def _maybe_combine(self, candidate: Candidate, decision: pipeline.Decision) -> None:
        """Two experiments of one parent that both beat it ran at the same time: try both
        changes together, on the tip (which one of them is now)."""
        task = candidate.task
        beat_parent = decision.result.status == "ok" and pipeline.judgement(
            self.current, candidate.sha, candidate.slot_class,
            against=task.parent.sha).verdict == keeprule.KEEP
        self.ticks += 1
        if task.combines is not None or not beat_parent:
            return
        # parent -> (id, sha, tick it ended) of the runs that beat it
        winners = self.winners.setdefault(task.parent.sha, [])
        tip = parents(self.current)[0]
        started = self.started_tick.get(candidate.exp_id, 0)
        for earlier_id, earlier_sha, ended in winners:
            if ended > started and tip.sha in (earlier_sha, candidate.sha):  # concurrent
                pair = (min(earlier_id, candidate.exp_id), max(earlier_id, candidate.exp_id))
                self.repairs.append(Task(tip, combines=pair))
                break
        winners.append((candidate.exp_id, candidate.sha, self.ticks))

    def _stop_everything(self, reason: str) -> None:
        """Ctrl-C, a kill or an error: stop every job, and say why in each row."""
        for exp_id in self.pool.stop_all():
            pipeline.interrupt(self.current, self.running.pop(exp_id, None), exp_id, reason)
        for candidate, _ in self.waiting:  # ended, but not judged yet: result.json stays
            pipeline.interrupt(self.current, candidate, candidate.exp_id,
                               f"{reason} (before its slot class had a score of the tip)")
        if self.proposing is not None:
            pipeline.interrupt(self.current, None, self.proposing, reason)
            worktree = self.current.ws.worktrees_dir / str(self.proposing)
            gitops.worktree_remove(self.current.ws.root, worktree)


def _base(description: str) -> str:
    """A run's description without the notes of earlier runs of it."""
    return description.split(" (again: #")[0]


def revert(current: Session, sha: str) -> tuple[str, str]:
    """Move the branch back to a kept commit; returns (old tip, new tip)."""
    row = current.ledger.row_for_sha(sha.strip().lower())
    if row is None or not row["sha"]:
        raise ArError(f"commit {sha} is not an experiment of this workspace")
    if not kept(row):
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
