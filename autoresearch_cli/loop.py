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

from autoresearch_cli import gitops, pipeline
from autoresearch_cli.agents.base import Agent, AgentError, Parent, choose_parent
from autoresearch_cli.errors import ArError
from autoresearch_cli.ledger import kept, mean_bpb_by_sha
from autoresearch_cli.pipeline import Candidate, Rejected, Task
from autoresearch_cli.runs import (
    Events,
    RefGuard,
    Session,
    _quiet,
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
            on_event: Events = _quiet, workers: int | None = None) -> IterateOutcome:
    """Run `n` new experiments (None: until interrupted or the agent stops), `workers` at
    once (None: one per visible GPU, or one on CPU)."""
    require_data(current.ws)
    device = current.config["profile"].get("device", "auto")
    slots = plan_slots(workers or default_workers(device), device)
    ensure_baseline(current, on_event)
    return Scheduler(current, agent, agent_name, n, slots, on_event).run()


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
    measured: set[tuple[str, str]] = field(default_factory=set)  # (sha, slot class) tried
    waiting: list[tuple[Candidate, pipeline.Result]] = field(default_factory=list)  # for one
    pool: LocalWorkers | None = None  # the backend (tests give one that runs nothing)

    def __post_init__(self) -> None:
        self.pool = self.pool or LocalWorkers(self.slots)
        self.guard = RefGuard(self.current.ws.root)
        self.repair_attempts = int(self.current.config["agent"]["repair_attempts"])

    def run(self) -> IterateOutcome:
        try:
            while True:
                self._fill_slots()
                if not self.pool.running:
                    if not self.waiting:
                        return self.outcome
                    self._judge_waiting(force=True)  # a measurement failed: judge as we can
                    continue
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

    def _measurement(self, slot: Slot) -> Task | None:
        """A run of the tip on `slot`'s class when the tip has a score, but none from that
        class, and something is to be judged there: like is compared only with like."""
        tip = self._tip()
        key = (tip.sha, slot.slot_class)
        if tip.val_bpb is None or key in self.measured:
            return None
        if self.current.ledger.bpb_of(tip.sha, slot.slot_class) is not None:
            return None
        if not self._has_work() and not any(c.slot_class == slot.slot_class
                                            for c, _ in self.waiting):
            return None
        self.measured.add(key)
        return Task(tip, measure=True)

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
        if task.measure:
            measurement = pipeline.checkout_parent(current, exp_id, task, slot.slot_class)
            self.on_event("start", exp_id=exp_id, index=max(self.outcome.started - 1, 0),
                          total=self.n, description=measurement.description, sha=task.parent.sha)
            self._run(measurement, slot)
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
        spec = experiment_spec(self.current, candidate.run_dir, candidate.worktree)
        self.ticks += 1
        self.started_tick[candidate.exp_id] = self.ticks
        self.running[candidate.exp_id] = candidate
        self.pool.start(candidate.exp_id, slot, dataclasses.replace(spec, device=slot.device))
        self.on_event("training", exp_id=candidate.exp_id, budget=spec.time_budget,
                      slot=slot.label)

    def _rejected(self, rejected: Rejected) -> None:
        self.on_event("done", exp_id=rejected.exp_id, decision=None,
                      result={"status": "invalid", "reason": rejected.reason, "val_bpb": None})

    # --- finishing -----------------------------------------------------------------------

    def _finish(self, ended: Ended) -> None:
        candidate = self.running.pop(ended.exp_id)
        moved = self.guard.restore()  # a ref moved by a job: every run in flight is suspect
        for other in self.running:
            self.suspects.setdefault(other, []).extend(moved)
        tampered = moved + self.suspects.pop(ended.exp_id, [])
        result = pipeline.check(self.current, candidate, ended.result, tampered)
        if not candidate.task.measure and self._unmeasured(candidate.slot_class):
            self.waiting.append((candidate, result))  # judged once the tip is measured there
            return
        self._judge(candidate, result)
        self._judge_waiting()

    def _unmeasured(self, slot_class: str) -> bool:
        """Whether the tip's score on `slot_class` is still to come (or to be asked for)."""
        tip = self._tip()
        if tip.val_bpb is None or self.current.ledger.bpb_of(tip.sha, slot_class) is not None:
            return False
        in_flight = any(c.task.measure and c.sha == tip.sha and c.slot_class == slot_class
                        for c in self.running.values())
        return in_flight or (tip.sha, slot_class) not in self.measured

    def _judge_waiting(self, force: bool = False) -> None:
        for candidate, result in list(self.waiting):
            if force or not self._unmeasured(candidate.slot_class):
                self.waiting.remove((candidate, result))
                self._judge(candidate, result)

    def _judge(self, candidate: Candidate, result: pipeline.Result) -> None:
        decision = pipeline.record(self.current, self.guard, candidate, result)
        self.on_event("done", exp_id=candidate.exp_id, result=result.details,
                      decision=decision.verdict, best_bpb=decision.best_bpb,
                      baseline=candidate.task.measure)
        task = candidate.task
        if task.measure:
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
        parent_bpb = pipeline.best_on(self.current, task.parent.sha, candidate.slot_class)
        beat_parent = pipeline.decide(decision.result.status, decision.result.val_bpb,
                                      parent_bpb, decision.threshold) == pipeline.KEEP
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
