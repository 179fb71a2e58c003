"""The scheduler with several experiments in flight: real git, real ledger, a scripted agent,
and a backend that trains nothing (the door swapped: results are given, and so is the
order in which experiments end)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e import git

from autoresearch_cli.agents.base import AgentError, CallRecord, Proposal
from autoresearch_cli.backends.base import Backend, Ended, Slot, SlotPool
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.template import set_constants
from autoresearch_cli.research import session as runs
from autoresearch_cli.research.evidence import Evidence
from autoresearch_cli.research.pipeline import REPLACED_PREFIX
from autoresearch_cli.research.scheduler import Scheduler

BASELINE_BPB = 2.0


class ScriptedAgent:
    """Sets MATRIX_LR to the next value of its script (a dict: those constants; an exception
    is raised instead), and records one model call per proposal through the record_call it
    was handed."""

    def __init__(self, values):
        self.values = list(values)
        self.failures: list[str | None] = []

    def propose(self, train_py, program_md, history, failure=None, record_call=None):
        value = self.values.pop(0)
        if isinstance(value, Exception):
            raise value
        self.failures.append(failure)
        if record_call is not None:
            record_call(CallRecord(model="scripted", prompt="[]", reply=f"lr {value}",
                                   prompt_tokens=1, completion_tokens=1, cost_usd=0.001,
                                   cost_note=None, latency_s=0.0, error=None, attempt=1))
        changes = value if isinstance(value, dict) else {"MATRIX_LR": value}
        description = ", ".join(f"{name} -> {new}" for name, new in changes.items())
        return Proposal(description, set_constants(
            train_py, {name: repr(new) for name, new in changes.items()}), "mutation")


class ScriptedWorkers(SlotPool):
    """A Backend that trains nothing. Ends the experiment `pick` chooses among those
    running, with the result scripted for its MATRIX_LR (or, keyed by tuples of (name,
    value), for the first set of constants its train.py has); `during(pool)` runs before
    each end, as a job would while it trains."""

    def __init__(self, slots, results, pick="first", during=None, offsets=None):
        super().__init__(slots)
        self.results = results
        self.offsets = offsets or {}  # slot class -> what it adds to every val_bpb
        self.pick = pick
        self.during = during
        self.running: dict[int, tuple[Slot, object]] = {}
        self.ended: list[int] = []
        self.specs: dict[int, object] = {}

    def _slot_of(self, running):
        return running[0]

    def start(self, exp_id, slot, spec):
        assert Path(spec.code_dir, "train.py").is_file()
        self.running[exp_id] = (slot, spec)
        self.specs[exp_id] = spec

    def wait(self, timeout):
        if self.during is not None:
            self.during(self)
        ids = list(self.running)
        exp_id = ids[0] if self.pick == "first" else ids[-1]
        slot, spec = self.running.pop(exp_id)
        train_py = Path(spec.code_dir, "train.py").read_text()
        self.ended.append(exp_id)
        result = dict(self._result(train_py))
        if result["val_bpb"] is not None:
            result["val_bpb"] += self.offsets.get(slot.slot_class, 0.0)
        return [Ended(exp_id, slot, result)]

    def _result(self, train_py):
        for key, result in self.results.items():
            wanted = key if isinstance(key, tuple) else (("MATRIX_LR", key),)
            if all(re.search(rf"^{name} = {re.escape(repr(value))}\b", train_py, re.MULTILINE)
                   for name, value in wanted):
                return result
        raise AssertionError("no scripted result for this train.py")

    def stop_all(self):
        stopped = list(self.running)
        self.running.clear()
        return stopped


def ok(bpb):
    return {"status": "ok", "val_bpb": bpb, "holdout_bpb": bpb, "reason": None}


CRASH_LOG = ("step 3 loss 4.1\nTraceback (most recent call last):\n"
             '  File "/run/code/train.py", line 2, in <module>\n'
             '  File "/usr/lib/python3.11/x.py", line 9, in f\n'
             "ValueError: boom\n\x1b[2Jthe job's secret: read from somewhere\n")


def crash(reason):
    return {"status": "crash", "val_bpb": None, "reason": reason, "log_tail": CRASH_LOG}


SLOTS = [Slot(0, "cpu", cpus=(0,)), Slot(1, "cpu", cpus=(1,))]


@pytest.fixture
def session(micro_ws):
    with runs.session(micro_ws, "test") as current:
        tip = micro_ws.tip()
        exp_id = current.ledger.start_experiment("baseline", tip, "baseline", None, status="running")
        current.ledger.finish(exp_id, "ok", ok(BASELINE_BPB), sha=tip,
                              slot_class=SLOTS[0].slot_class)
        yield current


def schedule(current, agent, n, pool, events=None):
    def on_event(kind, **details):
        if events is not None:
            events.append((kind, details))

    assert isinstance(pool, Backend)  # the scripted pool implements the protocol
    return Scheduler(current, pool, agent, "scripted", n, on_event=on_event).run()


def rows(current):
    return [vars(run) for run in current.ledger.runs()]


def experiments(current):
    return [row for row in rows(current) if row["kind"] != "baseline"]


def best_mean(current):
    return Evidence.load(current.ledger).best().mean


@pytest.mark.parametrize("pick", ["first", "last"])
def test_two_workers_finishing_in_either_order(session, pick):
    """A (1.9) and B (1.8) both start from the baseline (2.0). Whichever ends first is
    kept; the other is judged against the best at that moment: B after A is kept (and A
    stays reachable), A after B is discarded."""
    root, base = session.ws.root, session.ws.tip()
    pool = ScriptedWorkers(SLOTS, {0.05: ok(1.9), 0.06: ok(1.8)}, pick=pick)
    outcome = schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool)

    assert outcome.started == 2 and outcome.stopped_because is None
    a, b, combined = experiments(session)
    # both beat their parent: their combination is tried, and both set MATRIX_LR
    assert combined["kind"] == "combination" and combined["status"] == "invalid"
    assert f"the changes of #{a['id']} and #{b['id']} conflict" in combined["reason"]
    assert a["parent_sha"] == b["parent_sha"] == base  # they ran at the same time
    assert sorted(pool.ended) == [a["id"], b["id"]]  # each ended, and once (no run of the conflict)
    assert pool.ended == ([a["id"], b["id"]] if pick == "first" else [b["id"], a["id"]])
    assert b["decision"] == "keep"
    assert git(root, "rev-parse", "autoresearch/test") == b["sha"]  # the tip is the best
    if pick == "first":
        assert a["decision"] == "keep"
        assert git(root, "rev-parse", f"{REPLACED_PREFIX}{a['sha']}") == a["sha"]
        assert [e.sha for e in session.ledger.events("keep")] == [a["sha"], b["sha"]]
    else:
        assert a["decision"] == "discard"
        assert git(root, "rev-parse", f"refs/ar/discarded/{a['id']}") == a["sha"]
        assert [e.sha for e in session.ledger.events("keep")] == [b["sha"]]
    assert git(root, "status", "--porcelain") == ""  # the checkout followed the branch
    assert not any(session.ws.worktrees_dir.iterdir())


def test_a_concurrent_keep_never_moves_the_tip_backwards(session):
    """Three candidates of one parent all beat it; they end best first. Only the first
    moves the branch; the later ones are discarded against it, not against their parent."""
    pool = ScriptedWorkers([*SLOTS, Slot(2, "cpu", cpus=(0,))],
                           {0.05: ok(1.7), 0.06: ok(1.8), 0.07: ok(1.9)}, pick="first")
    outcome = schedule(session, ScriptedAgent([0.05, 0.06, 0.07]), 3, pool)
    assert outcome.started == 3
    rows = [r for r in experiments(session) if r["kind"] == "experiment"]
    assert [r["decision"] for r in rows] == ["keep", "discard", "discard"]
    assert session.ws.tip() == rows[0]["sha"]
    assert best_mean(session) == 1.7


def test_a_crash_gets_one_repair_that_sees_the_failure(session):
    pool = ScriptedWorkers(SLOTS[:1], {0.05: crash("train.py exited with code 1"),
                                       0.06: crash("again")})
    agent = ScriptedAgent([0.05, 0.06])
    schedule(session, agent, 1, pool)

    first, repair = experiments(session)
    assert first["status"] == "crash" and first["decision"] is None
    assert repair["kind"] == "repair" and repair["repair_of"] == first["id"]
    assert agent.failures[0] is None
    told = agent.failures[1]  # what ar extracted from the log, never the log itself
    assert "train.py exited with code 1" in told and "exception: ValueError: boom" in told
    assert "train.py line 2" in told and "secret" not in told and "\x1b" not in told
    assert repair["status"] == "crash"  # repair_attempts = 1: no repair of the repair
    assert session.ws.tip() == first["parent_sha"]


def test_model_calls_are_recorded_against_the_experiment_that_made_them(session):
    pool = ScriptedWorkers(SLOTS, {0.05: ok(2.1), 0.06: ok(2.2), 0.07: ok(2.3)}, pick="last")
    schedule(session, ScriptedAgent([0.05, 0.06, 0.07]), 3, pool)
    rows = experiments(session)
    calls = session.ledger.llm_calls()
    assert [(c["experiment_id"], c["reply"]) for c in calls] == [
        (row["id"], f"lr {row['description'].split()[-1]}") for row in rows]
    assert all(row["cost_usd"] == pytest.approx(0.001) for row in rows)


def test_a_ref_moved_while_two_jobs_ran_invalidates_both_and_is_put_back(session):
    root, base = session.ws.root, session.ws.tip()

    def sneak(pool):
        if len(pool.running) == 2 and not gitops.try_rev_parse(root, "refs/heads/sneaky"):
            gitops.update_ref(root, "refs/heads/sneaky", base, None)

    pool = ScriptedWorkers(SLOTS, {0.05: ok(1.5), 0.06: ok(1.6)}, during=sneak)
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool)
    rows = experiments(session)
    assert [r["status"] for r in rows] == ["invalid", "invalid"]
    assert all("git ref refs/heads/sneaky" in r["reason"] for r in rows)
    assert gitops.try_rev_parse(root, "refs/heads/sneaky") is None
    assert session.ws.tip() == base


def test_the_agent_stopping_lets_the_running_experiment_finish(session):
    pool = ScriptedWorkers(SLOTS, {0.05: ok(1.9)})
    events = []
    outcome = schedule(session, ScriptedAgent([0.05, AgentError("no API key")]), 5, pool, events)
    assert outcome.stopped_because == "no API key"
    running, stopped = experiments(session)
    assert running["decision"] == "keep" and session.ws.tip() == running["sha"]
    assert stopped["status"] == "invalid" and "no API key" in stopped["reason"]
    assert [d["exp_id"] for kind, d in events if kind == "done"] == [stopped["id"], running["id"]]


def test_two_concurrent_winners_are_combined_on_the_tip(session):
    """A (MATRIX_LR, 1.9) and B (WEIGHT_DECAY, 1.95) both beat the baseline (2.0); A ends
    first and is kept, B is discarded against it. Their combination runs on A with B's
    change applied too, and wins."""
    base = session.ws.tip()
    results = {(("MATRIX_LR", 0.05), ("WEIGHT_DECAY", 0.3)): ok(1.8),
               (("MATRIX_LR", 0.05),): ok(1.9), (("WEIGHT_DECAY", 0.3),): ok(1.95)}
    pool = ScriptedWorkers(SLOTS, results, pick="first")
    agent = ScriptedAgent([{"MATRIX_LR": 0.05}, {"WEIGHT_DECAY": 0.3}])
    outcome = schedule(session, agent, 2, pool)

    assert outcome.started == 2 and agent.values == []  # the combination asked no agent
    a, b, combined = experiments(session)
    assert (a["decision"], b["decision"]) == ("keep", "discard")
    assert a["parent_sha"] == b["parent_sha"] == base
    assert combined["kind"] == "combination" and combined["parent_sha"] == a["sha"]
    assert f"#{a['id']}" in combined["description"] and f"#{b['id']}" in combined["description"]
    assert combined["decision"] == "keep" and session.ws.tip() == combined["sha"]
    train_py = gitops.show_file(session.ws.root, combined["sha"], "train.py").decode()
    assert "MATRIX_LR = 0.05" in train_py and "WEIGHT_DECAY = 0.3" in train_py
    assert gitops.changed_files(session.ws.root, a["sha"], combined["sha"]) == ["train.py"]


GPU = Slot(1, "cuda", gpu="0", slot_class="cuda:H100")


def test_a_slot_class_without_a_score_of_the_tip_measures_it_first(session):
    """The baseline was measured on one core only. The GPU slot first measures the tip
    (1.5 there), and its candidate (1.6 there) is judged against that, not against the
    CPU's 2.0."""
    pool = ScriptedWorkers([GPU], {0.04: ok(2.0), 0.06: ok(2.1)}, offsets={"cuda:H100": -0.5})
    events = []
    schedule(session, ScriptedAgent([0.06]), 1, pool, events)
    measured, b = rows(session)[1:]
    assert measured["kind"] == "baseline" and measured["sha"] == b["parent_sha"]
    assert (measured["slot_class"], measured["val_bpb"]) == ("cuda:H100", 1.5)
    assert (b["slot_class"], b["val_bpb"], b["decision"]) == ("cuda:H100", 1.6, "discard")
    judged = {d["exp_id"]: d.get("judgement") for kind, d in events if kind == "done"}
    assert judged[b["id"]].best_runs == (1.5,)
    assert session.ws.tip() == b["parent_sha"]


def test_a_result_waits_for_the_new_tip_to_be_measured_on_its_class(session):
    """Both classes know the baseline. A (CPU) is kept while B runs on the GPU; B then
    waits until A is measured on the GPU (1.4) and is discarded against it (1.45), where
    A's CPU score (1.9) would have kept it."""
    root, base = session.ws.root, session.ws.tip()
    exp_id = session.ledger.start_experiment("baseline", base, "baseline", None, status="running")
    session.ledger.finish(exp_id, "ok", ok(1.5), sha=base, slot_class=GPU.slot_class)
    pool = ScriptedWorkers([SLOTS[0], GPU], {0.05: ok(1.9), 0.06: ok(1.95)},
                           pick="first", offsets={"cuda:H100": -0.5})
    events = []
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool, events)
    a, b, measured, combined = rows(session)[2:]
    assert a["decision"] == "keep" and a["slot_class"] == "cpu:1"
    assert measured["kind"] == "remeasure" and measured["sha"] == a["sha"]  # a run of the best
    assert combined["kind"] == "combination"  # B beat its parent too, at the same time
    assert (measured["slot_class"], measured["val_bpb"]) == ("cuda:H100", 1.4)
    assert (b["slot_class"], b["val_bpb"], b["decision"]) == ("cuda:H100", 1.45, "discard")
    done = [(d["exp_id"], d["action"]) for kind, d in events if kind == "done"]
    measured_done = next(i for i, (exp_id, _) in enumerate(done) if exp_id == measured["id"])
    assert done.index((b["id"], "discard")) > measured_done  # judged once the measure is in
    assert gitops.rev_parse(root, "autoresearch/test") == a["sha"]


class OldestParentAgent(ScriptedAgent):
    """Builds on the oldest commit it is offered, not the tip."""

    def __init__(self, values):
        super().__init__(values)
        self.offered = []

    def choose_parent(self, parents):
        self.offered.append([(parent.sha, parent.val_bpb) for parent in parents])
        return parents[-1]


def test_an_agent_may_build_on_any_kept_commit(session):
    base = session.ws.tip()
    pool = ScriptedWorkers(SLOTS[:1], {0.05: ok(1.9), 0.06: ok(1.85)})
    agent = OldestParentAgent([0.05, 0.06])
    schedule(session, agent, 2, pool)
    a, b = experiments(session)
    assert agent.offered[0] == [(base, BASELINE_BPB)]
    assert agent.offered[1] == [(a["sha"], 1.9), (base, BASELINE_BPB)]  # the tip first
    assert a["parent_sha"] == base and b["parent_sha"] == base  # B built on the baseline
    assert b["decision"] == "keep" and session.ws.tip() == b["sha"]  # judged against A
