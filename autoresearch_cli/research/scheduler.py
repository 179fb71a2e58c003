"""The scheduler: which run next, on which slot, and acting on what each run decides.

It fills the backend's free slots: runs of the best where the keep test needs them
(measurements), work already owed (confirmations, runs again, repairs, combinations),
then new experiments from the agent. When a run ends it records it (pipeline.record),
asks decide.next_action what follows, and performs that: a verdict on the branch
(pipeline.settle), another run queued first in line, or a wait for the best's runs. It
decides nothing itself. This process alone touches the ledger and git, one event at a
time, so results that finish together are judged one after the other, each against the
best at that moment. Every loop that runs work again is bounded.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from autoresearch_cli.agents.base import Agent, AgentError, Parent, choose_parent
from autoresearch_cli.backends.base import Backend, Ended, Slot
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.records import IN_FLIGHT, NEW_COMMIT_KINDS, hardware_of
from autoresearch_cli.research import decide, keeprule, pipeline, resume
from autoresearch_cli.research.evidence import CommitEvidence, Evidence, pairs
from autoresearch_cli.research.history import parents
from autoresearch_cli.research.measurements import Measurements
from autoresearch_cli.research.pipeline import Candidate, Rejected, Task
from autoresearch_cli.research.seeds import run_seed
from autoresearch_cli.research.session import (
    RefGuard,
    Session,
    add_worktree,
    experiment_spec,
    quiet,
)

POLL_S = 0.5  # the longest the scheduler waits for its backend without looking up
Events = Callable[..., None]


@dataclass
class Outcome:
    started: int = 0  # new experiments (repairs not counted)
    stopped_because: str | None = None  # the agent could not go on


@dataclass
class Scheduler:
    """Runs `n` new experiments (None: until interrupted) and `measures` runs of the tip
    asked for up front (`ar baseline --repeat`), through `backend`; `queue` may hold runs
    asked for up front too (`ar ablate`, `ar transfer`: given commits on given seeds)."""

    current: Session
    backend: Backend
    agent: Agent | None = None
    agent_name: str | None = None
    n: int | None = 0
    measures: int = 0
    on_event: Events = quiet
    outcome: Outcome = field(default_factory=Outcome)
    queue: deque[Task] = field(default_factory=deque)  # work owed, before new experiments
    running: dict[int, Candidate] = field(default_factory=dict)
    waiting: list[Candidate] = field(default_factory=list)  # recorded, to judge later
    proposing: int | None = None  # the experiment whose proposal is being asked for
    suspects: dict[int, list[str]] = field(default_factory=dict)  # refs moved while it ran
    # parent sha -> (id, sha, tick it ended) of the runs that beat it: combination material
    winners: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)
    ticks: int = 0  # counts runs started and judged: tells which ran at the same time
    started_tick: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.guard = RefGuard(self.current.ws.root)
        self.keep = self.current.settings.keep
        self.measurements = Measurements.from_settings(self.keep)
        self._waiting_reason: str | None = None
        tip = self._tip()
        for index in range(self.measures):
            self.queue.append(self._measure_task(tip, requested=True, index=index))
        self._resume_cluster_runs()
        self._resume_undecided()

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> Outcome:
        try:
            self._judge_waiting()
            while True:
                self._fill_slots()
                if not self.backend.busy():
                    if not self.waiting:
                        return self.outcome
                    self._judge_waiting(force=True)  # a measurement failed: judge as we can
                    continue
                self._say_why_waiting()
                for event in self.backend.wait(POLL_S):
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
        reason = self.backend.waiting_reason()
        if reason and reason != self._waiting_reason:
            self.on_event("note", message=f"waiting: {reason}")
        self._waiting_reason = reason

    # --- what runs next ------------------------------------------------------------------

    def _tip(self, evidence: Evidence | None = None) -> Parent:
        tip = self.current.ws.tip()
        on_class = (evidence or self.current.evidence()).on_class(tip)
        return Parent(tip, on_class.mean if on_class else None, None, "")

    def _measure_task(self, tip: Parent, requested: bool = False, index: int = 0,
                      seed_index: int | None = None, slot_class: str | None = None) -> Task:
        evidence = self.current.evidence()
        is_baseline = evidence.baseline_sha in (None, tip.sha)
        label = "baseline" if is_baseline else "re-measure of the best"
        if seed_index is not None:
            label += f" on seed {seed_index} (a partner)"
        elif requested and self.measures > 1:
            label += f" ({index + 1} of {self.measures})"
        return Task(tip, measure=True, remeasure=not is_baseline, requested=requested,
                    description=label, seed_index=seed_index, slot_class=slot_class)

    def _measuring(self, sha: str, slot_class: str) -> int:
        started = sum(1 for c in self.running.values()
                      if c.task.measure and c.sha == sha and c.slot_class == slot_class)
        return started + sum(1 for task in self.queue if task.measure and task.parent.sha == sha
                             and task.slot_class in (None, slot_class))

    def _measurement(self, slot: Slot, evidence: Evidence) -> Task | None:
        """A run of the tip on `slot`'s class when it has fewer runs there than the keep
        test needs and something is to be judged there."""
        tip = self._tip(evidence)
        if tip.val_bpb is None or self.agent is None:  # nothing to judge: only what was asked
            return None
        key = (tip.sha, slot.slot_class)
        have = evidence.commit(*key).n
        needed = self.measurements.runs_needed(evidence, slot.slot_class)
        if have + self._measuring(*key) >= needed or not self.measurements.may_measure(*key):
            return None
        if not self._has_work() and not any(c.slot_class == slot.slot_class for c in self.waiting):
            return None
        return self._measure_task(tip, slot_class=slot.slot_class)

    def _partners(self, evidence: Evidence, slot_class: str, seeds: tuple[int, ...]) -> bool:
        """Queue runs of the best on the seeds a candidate ran on (first in line); whether
        any are still coming (False: the bound is reached, judge with what there is)."""
        tip = self._tip(evidence)
        coming = False
        for index in seeds:
            if self._partner_coming(tip.sha, slot_class, index):
                coming = True
            elif self.measurements.may_measure(tip.sha, slot_class, index):
                self.queue.appendleft(self._measure_task(tip, seed_index=index, slot_class=slot_class))
                self.measurements.count(tip.sha, slot_class, index)  # counted when queued
                coming = True
        return coming

    def _partner_coming(self, sha: str, slot_class: str, index: int) -> bool:
        if any(sha == commit and cls == slot_class and seed == index
               for commit, cls, seed in self.measurements.in_flight.values()):
            return True
        return any(task.measure and task.parent.sha == sha and task.seed_index == index
                   and task.slot_class == slot_class for task in self.queue)

    def _has_work(self) -> bool:
        return self.outcome.stopped_because is None and bool(
            self.queue or self.n is None or self.outcome.started < (self.n or 0))

    def _next_task(self, slot: Slot) -> Task | None:
        for task in self.queue:  # work owed first, on the hardware it is owed on
            if task.slot_class in (None, slot.slot_class):
                self.queue.remove(task)
                return task
        if self.outcome.stopped_because is not None or self.agent is None:
            return None
        if self.n is not None and self.outcome.started >= self.n:
            return None
        self.outcome.started += 1
        evidence = self.current.evidence()
        return Task(choose_parent(self.agent, parents(evidence, self.current.ws.tip())))

    def _fill_slots(self) -> None:
        """Give every free slot its next run: a measurement owed there, else work owed on
        its hardware, else a new experiment; stop when no free slot gets anything."""
        started = True
        while started:
            started = False
            for slot in self.backend.free_slots():
                task = self._measurement(slot, self.current.evidence()) or self._next_task(slot)
                if task is not None:
                    self._start(task, slot)
                    started = True
                    break  # the free slots changed: look again

    # --- starting ------------------------------------------------------------------------

    def _start(self, task: Task, slot: Slot) -> None:
        current = self.current
        exp_id = pipeline.open_experiment(current, task, self.agent_name)
        if task.measure or task.sha is not None:
            run = pipeline.checkout(current, exp_id, task, task.run_class(slot.slot_class))
            if task.measure and task.seed_index is None:  # partners are counted when queued
                self.measurements.count(run.sha, slot.slot_class)
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
                assert self.agent is not None
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
        # A commit's k-th run on a class gets the workspace's k-th seed: paired with the
        # best's run k (research/measurements.py); a disturbed run again gets its own.
        index = candidate.task.seed_index
        if index is None:
            index = self.measurements.next_seed(self.current.evidence(), candidate.sha,
                                                slot.slot_class)
        seed = run_seed(self.current.ws.branch, index)
        self.measurements.start(candidate.exp_id, candidate.sha, slot.slot_class, index)
        spec = experiment_spec(self.current, candidate.run_dir, candidate.worktree, seed,
                               device=slot.device, time_budget=candidate.task.time_budget)
        self.current.ledger.update(candidate.exp_id, seed=seed, seed_index=index)
        self.ticks += 1
        self.started_tick[candidate.exp_id] = self.ticks
        self.running[candidate.exp_id] = candidate
        task_id = self.backend.start(candidate.exp_id, slot, spec)
        if task_id:  # a cluster's id for it: a restarted ar picks the run up by it
            self.current.ledger.update(candidate.exp_id, backend_task=str(task_id))
        self.on_event("training", exp_id=candidate.exp_id, budget=spec.time_budget,
                      slot=slot.label)

    def _rejected(self, rejected: Rejected) -> None:
        self.on_event("done", exp_id=rejected.exp_id, action=decide.DONE,
                      result={"status": "invalid", "reason": rejected.reason, "val_bpb": None})

    # --- finishing -----------------------------------------------------------------------

    def _finish(self, ended: Ended) -> None:
        candidate = self.running.pop(ended.exp_id)
        seed_index = self.measurements.end(ended.exp_id)
        candidate = dataclasses.replace(
            candidate, task=dataclasses.replace(candidate.task, seed_index=seed_index))
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
        disturbed = self._disturbance(candidate, result)
        pipeline.record(self.current, candidate, result, disturbed)
        shown = dict(result.details, status="disturbed", reason=disturbed) if disturbed else result.details
        self._decide(candidate, shown, disturbed)
        self._judge_waiting()

    def _disturbance(self, candidate: Candidate, result: pipeline.Result) -> str | None:
        """Why the run got too little of the machine to be judged (keeprule's rule, with
        ar.toml's thresholds and the same commit's throughput on its class), or None."""
        if result.status not in ("ok", "timeout"):
            return None
        evidence = self.current.evidence()
        same_code = [run.tokens_per_s for run in evidence.commit(candidate.sha, candidate.slot_class).runs
                     if run.tokens_per_s]
        return keeprule.run_disturbance(result.details, same_code,
                                        keeprule.Disturbance.from_settings(self.keep))

    def _decide(self, candidate: Candidate, result: dict, disturbed: str | None = None,
                force: bool = False) -> None:
        """Ask decide.next_action what the ended run calls for, and do it."""
        task, evidence = candidate.task, self.current.evidence()
        ended = decide.RunEnd(task.kind, "ok" if disturbed else str(result.get("status")),
                              disturbed, task.retries, task.repairs_so_far)
        mine = evidence.commit(candidate.sha, candidate.slot_class)
        best = self._best_for(evidence, candidate.slot_class, not force)
        limits = decide.Limits(self.current.settings.agent.repair_attempts,
                               self.keep.disturbed_retries, partners=not force)
        action = decide.next_action(ended, mine, best, self._rule(evidence), limits)
        if action.kind == decide.WAIT and not self._partners(evidence, candidate.slot_class,
                                                             action.seeds):
            best = self._best_for(evidence, candidate.slot_class, False)
            action = decide.next_action(ended, mine, best, self._rule(evidence),
                                        dataclasses.replace(limits, partners=False))
        if action.kind == decide.WAIT:
            self.waiting.append(candidate)
            self.on_event("done", exp_id=candidate.exp_id, result=result, action=action.kind,
                          reason=action.reason, measure=False)
            return
        judged = task.confirms if task.confirms is not None else candidate.exp_id
        if action.kind in (keeprule.KEEP, keeprule.DISCARD, keeprule.CONFIRM):
            pipeline.settle(self.current, self.guard, judged, action.judgement)
        self.on_event("done", exp_id=candidate.exp_id, result=result, action=action.kind,
                      judgement=action.judgement, settled=judged, measure=task.measure,
                      reason=action.reason)
        self._follow_up(candidate, action, result)

    def _best_for(self, evidence: Evidence, slot_class: str, measuring: bool) -> CommitEvidence | None:
        """The best's runs on `slot_class`; when it has none there and none are coming (its
        measurements failed), on its main class: a candidate is never kept for want of
        anything to beat."""
        on_class = evidence.commit(self.current.ws.tip(), slot_class)
        return on_class if on_class.runs or measuring else evidence.on_class(self.current.ws.tip())

    def _rule(self, evidence: Evidence) -> keeprule.Rule:
        start = evidence.baseline()
        return keeprule.Rule.from_settings(self.keep, start.std if start else None)

    def _follow_up(self, candidate: Candidate, action: decide.Action, result: dict) -> None:
        task = candidate.task
        if action.kind == keeprule.CONFIRM:  # another run of the same commit, first in line
            judged = task.confirms if task.confirms is not None else candidate.exp_id
            runs = len(action.judgement.runs) if action.judgement else 1
            self.queue.appendleft(Task(task.parent, sha=candidate.sha, confirms=judged,
                                       again_of=candidate.exp_id, slot_class=candidate.slot_class,
                                       description=f"confirm #{judged}: run {runs + 1}"))
        elif action.kind == decide.RERUN:
            if task.measure and not task.requested:
                return  # the next free slot measures again, within the bound
            self.queue.appendleft(dataclasses.replace(  # on the same seed and hardware
                task, sha=None if task.measure else candidate.sha, again_of=candidate.exp_id,
                retries=task.retries + 1, slot_class=hardware_of(candidate.slot_class),
                description=f"{_base(candidate.description)} (again: #{candidate.exp_id} was disturbed)"))
        elif action.kind == decide.REPAIR:
            failed = pipeline.Result(str(result.get("status")), None, result)
            self.queue.append(Task(self._tip(), repair_of=candidate.exp_id,
                                   failure=failed.failure(pipeline.train_py_of(self.current, candidate.sha)),
                                   repairs_so_far=task.repairs_so_far + 1))
        elif action.kind == decide.RECORD and task.measure:
            self._check_best_holds(candidate.slot_class)
        if task.kind in NEW_COMMIT_KINDS and action.kind in (keeprule.KEEP, keeprule.DISCARD):
            self._maybe_combine(candidate)

    def _check_best_holds(self, slot_class: str) -> None:
        """A best is re-judged when it gains runs: once its pairs with its parent no longer
        support the keep (keeprule.holds), the branch goes back to the parent, and the
        ledger says why."""
        evidence = self.current.evidence()
        tip = self.current.ws.tip()
        made = evidence.proposer(tip)
        if made is None or not evidence.is_keep(made) or not made.parent_sha:
            return
        shared = pairs(evidence.commit(tip, slot_class), evidence.commit(made.parent_sha, slot_class))
        reason = keeprule.no_longer_holds(shared, self._rule(evidence))
        if reason is None:
            return
        pipeline.rejudge(self.current, self.guard, made, reason)
        self.on_event("note", message=f"#{made.id} re-judged: {reason}; the branch is back at "
                                      f"{made.parent_sha[:7]}")

    def _maybe_combine(self, candidate: Candidate) -> None:
        """Two experiments of one parent that both beat it ran at the same time: try both
        changes together, on the tip (which one of them is now)."""
        task, evidence = candidate.task, self.current.evidence()
        self.ticks += 1
        parent = evidence.commit(task.parent.sha, candidate.slot_class)
        mine = evidence.commit(candidate.sha, candidate.slot_class)
        if task.combines is not None or not mine.runs or not parent.runs:
            return
        # material for a combination: its runs beat the parent's on the same seeds
        lax = dataclasses.replace(self._rule(evidence), name="one-run")
        beat = keeprule.judge(pairs(mine, parent), lax).verdict == keeprule.KEEP
        if not beat:
            return
        winners = self.winners.setdefault(task.parent.sha, [])
        tip = self._tip(evidence)
        started = self.started_tick.get(candidate.exp_id, 0)
        for earlier_id, earlier_sha, ended in winners:
            if ended > started and tip.sha in (earlier_sha, candidate.sha):  # concurrent
                pair = (min(earlier_id, candidate.exp_id), max(earlier_id, candidate.exp_id))
                self.queue.append(Task(tip, combines=pair))
                break
        winners.append((candidate.exp_id, candidate.sha, self.ticks))

    def _judge_waiting(self, force: bool = False) -> None:
        for candidate in list(self.waiting):
            self.waiting.remove(candidate)
            run = self.current.ledger.run(candidate.exp_id)
            self._decide(candidate, {"status": run.status, "val_bpb": run.val_bpb,
                                     "reason": run.reason}, force=force)

    def _interrupted(self, candidate: Candidate, reason: str, requeue: bool) -> None:
        """A run lost to the machine (a cluster node died): its row says why, and it runs
        again once, first in line."""
        pipeline.interrupt(self.current, candidate, candidate.exp_id, reason)
        self.on_event("done", exp_id=candidate.exp_id, action=decide.DONE, measure=candidate.task.measure,
                      result={"status": "interrupted", "reason": reason, "val_bpb": None})
        task = candidate.task
        if requeue and not task.requeued and not task.measure:
            self.queue.appendleft(dataclasses.replace(
                task, sha=candidate.sha, again_of=candidate.exp_id, requeued=True,
                description=f"{_base(candidate.description)} (again: #{candidate.exp_id} was interrupted)"))

    def _stop_everything(self, reason: str) -> None:
        """Ctrl-C, a kill or an error: stop every job, and say why in each row. Runs that
        ended and wait for their verdict stay recorded: the next `ar iterate` judges them."""
        for exp_id in self.backend.stop_all():
            pipeline.interrupt(self.current, self.running.pop(exp_id, None), exp_id, reason)
        if self.proposing is not None:
            pipeline.interrupt(self.current, None, self.proposing, reason)
            worktree = self.current.ws.worktrees_dir / str(self.proposing)
            gitops.worktree_remove(self.current.ws.root, worktree)

    # --- picking up after a stop ----------------------------------------------------------

    def _resume_cluster_runs(self) -> None:
        """Runs a killed ar left on a cluster (a backend task id in their row): picked up
        again where the backend still has them, else interrupted and re-queued once."""
        for run in self.current.ledger.runs():
            if run.status not in IN_FLIGHT or not run.backend_task:
                continue
            candidate = resume.candidate_of(self.current, run, resume.task_of(self.current, run))
            if self.backend.reattach(run.id, run.backend_task, run.slot_class or "",
                                     candidate.run_dir):
                if not candidate.worktree.exists():  # recovery removed it; the checks read it
                    add_worktree(self.current, run.id, run.sha or "")
                self.running[run.id] = candidate
                self.on_event("note", message=f"#{run.id}: picked up again on the cluster "
                                              f"(task {run.backend_task})")
                continue
            self._interrupted(candidate, "ar was restarted and the cluster no longer has its "
                                         f"task {run.backend_task}", requeue=True)

    def _resume_undecided(self) -> None:
        """Scored candidates a stopped ar left without a verdict are judged again first."""
        busy = {c.task.confirms for c in self.running.values()} | set(self.running)
        self.waiting.extend(resume.undecided(self.current, busy))


def _base(description: str) -> str:
    """A run's description without the notes of earlier runs of it."""
    return description.split(" (again: #")[0]
