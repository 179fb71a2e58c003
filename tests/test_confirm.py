"""Keeps that hold up, through the scheduler: confirmation runs, re-measures of the best,
disturbed runs set aside (real git and ledger; a backend that trains nothing and answers
each run of a commit with the next value of its script)."""

from __future__ import annotations

import json

import pytest
from test_scheduler import SLOTS, ScriptedAgent, ScriptedWorkers, experiments, ok, rows, schedule

from autoresearch_cli.doors.config import with_keep
from autoresearch_cli.research import session as runs
from autoresearch_cli.research.evidence import Evidence
from autoresearch_cli.research.scheduler import Scheduler

pytestmark = pytest.mark.sequential  # ar's default keep rule and disturbed thresholds

ONE = [SLOTS[0]]
BASELINE_RUNS = (2.00, 2.01, 1.99, 2.00, 2.015, 1.985)  # the noise: ~0.011, df 5


class NoisyWorkers(ScriptedWorkers):
    """Each run of a commit gets the next result of its script (a list per MATRIX_LR)."""

    def __init__(self, slots, scripts, **kwargs):
        super().__init__(slots, {key: None for key in scripts}, **kwargs)
        self.scripts = {key: list(values) for key, values in scripts.items()}
        self.seeds: list[int] = []

    def start(self, exp_id, slot, spec):
        self.seeds.append(spec.seed)
        super().start(exp_id, slot, spec)

    def _result(self, train_py):
        for key in self.scripts:
            if f"MATRIX_LR = {key!r}" in train_py:
                value = self.scripts[key].pop(0)
                return value if isinstance(value, dict) else ok(value)
        raise AssertionError("no scripted result for this train.py")


def set_keep(current, **changes):
    """[keep] of this session, changed as a human would in ar.toml."""
    current.settings = with_keep(current.settings, **changes)


@pytest.fixture
def session(micro_ws):
    """A workspace whose baseline ran six times on cpu:1 (the noise is measured), under
    ar's default keep rule."""
    with runs.session(micro_ws, "test") as current:
        set_keep(current, rule="sequential")
        tip = micro_ws.tip()
        for value in BASELINE_RUNS:
            exp_id = current.ledger.start_experiment("baseline", tip, "baseline", None,
                                                     status="running")
            current.ledger.finish(exp_id, "ok", ok(value), sha=tip,
                                  slot_class=SLOTS[0].slot_class)
        yield current


def evidence(row):
    return json.loads(row["evidence"])


def commit_values(current, sha):
    return Evidence.load(current.ledger).commit(sha, SLOTS[0].slot_class).values


def test_a_clear_win_is_kept_after_one_run_and_the_new_best_is_re_measured(session):
    pool = NoisyWorkers(ONE, {0.05: [1.90, 1.93], 0.06: [2.05]})
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool)
    a, remeasure, b = experiments(session)
    assert (a["kind"], a["decision"], a["val_bpb"]) == ("experiment", "keep", 1.90)
    assert evidence(a)["runs"] == [1.90] and evidence(a)["verdict"] == "keep"
    assert session.ws.tip() == a["sha"]
    # the best is a mean: its re-measure is a ledger row, and the mean moved with it
    assert (remeasure["kind"], remeasure["sha"], remeasure["val_bpb"]) == ("remeasure", a["sha"], 1.93)
    assert Evidence.load(session.ledger).best().mean == pytest.approx(1.915)
    # every run had its own seed
    assert len(set(pool.seeds)) == 3 and a["seed"] != remeasure["seed"]
    # the next candidate is judged against that mean
    assert b["decision"] == "discard" and evidence(b)["best_runs"] == [1.90, 1.93]


def test_a_marginal_win_is_confirmed_by_more_runs(session):
    pool = NoisyWorkers(ONE, {0.05: [1.975, 1.97, 1.975]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    rows = experiments(session)
    a, confirmations = rows[0], [row for row in rows if row["kind"] == "confirmation"]
    assert len(confirmations) >= 1 and all(row["sha"] == a["sha"] for row in confirmations)
    assert all(row["again_of"] is not None and row["decision"] is None for row in confirmations)
    assert a["decision"] == "keep" and session.ws.tip() == a["sha"]
    assert evidence(a)["runs"] == pytest.approx([1.975, 1.97, 1.975][:1 + len(confirmations)])
    assert evidence(a)["p"] < evidence(a)["look_level"]


def test_a_marginal_win_that_does_not_hold_up_is_discarded(session):
    base = session.ws.tip()
    pool = NoisyWorkers(ONE, {0.05: [1.975, 2.0]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    a, confirmation = experiments(session)
    assert confirmation["kind"] == "confirmation" and confirmation["val_bpb"] == 2.0
    assert a["decision"] == "discard" and session.ws.tip() == base
    assert evidence(a)["runs"] == [1.975, 2.0]
    assert "discarded" in a["reason"]


def test_a_clear_loss_is_discarded_after_one_run(session):
    base = session.ws.tip()
    pool = NoisyWorkers(ONE, {0.05: [2.05]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    (a,) = experiments(session)
    assert a["decision"] == "discard" and session.ws.tip() == base
    assert "no better than the best" in a["reason"]


def test_one_run_rule_keeps_what_the_test_would_confirm(session):
    set_keep(session, rule="one-run", min_delta=0.0)
    pool = NoisyWorkers(ONE, {0.05: [1.999]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    (a,) = experiments(session)
    assert a["decision"] == "keep"


def test_a_disturbed_run_is_set_aside_and_run_again(session):
    disturbed = dict(ok(1.80), cpu_share=0.45)  # a lucky score, but half the machine
    pool = NoisyWorkers(ONE, {0.05: [disturbed, dict(ok(2.04), cpu_share=0.97)]})
    events = []
    schedule(session, ScriptedAgent([0.05]), 1, pool, events)
    first, again = experiments(session)
    assert first["status"] == "disturbed" and first["decision"] is None
    assert "took 55%" in first["reason"]
    assert first["val_bpb"] is not None  # recorded, never judged
    assert again["again_of"] == first["id"] and again["sha"] == first["sha"]
    assert again["decision"] == "discard"
    assert session.ledger.events("disturbed")
    assert commit_values(session, first["sha"]) == (2.04,)  # not 1.80


def test_disturbed_runs_are_retried_a_bounded_number_of_times(session):
    set_keep(session, disturbed_retries=1)
    disturbed = dict(ok(1.80), cpu_share=0.3)
    pool = NoisyWorkers(ONE, {0.05: [disturbed, disturbed]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    rows = experiments(session)
    assert [row["status"] for row in rows] == ["disturbed", "disturbed"]
    assert all(row["decision"] is None for row in rows)


@pytest.mark.slow
def test_a_run_disturbed_by_a_busy_process_is_set_aside_and_run_again(micro_ws):
    """Real training: a busy process competes for the cores during the first experiment;
    that run is recorded as disturbed, not judged, and run again once the process is gone."""
    import subprocess
    import sys

    from autoresearch_cli.agents.random_agent import RandomAgent
    from autoresearch_cli.research.loop import baseline, iterate

    with runs.session(micro_ws, "test") as current:
        # one busy process on two cores: ~0.5; one run decides: the point is the rerun
        set_keep(current, min_share=0.65, rule="one-run")
        baseline(current, 1)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        seen = []

        def on_event(kind, **details):
            if kind == "done":
                seen.append(details["result"]["status"])
                busy.kill()  # the machine is quiet again for the rerun

        try:
            iterate(current, RandomAgent(seed=3), "random", 1, on_event)
        finally:
            busy.kill()
            busy.wait()
        first, again = [row for row in rows(current) if row["kind"] != "baseline"]
    assert first["status"] == "disturbed", first["reason"]
    assert first["cpu_share"] < 0.65 and "other processes took" in first["reason"]
    assert first["decision"] is None
    assert again["again_of"] == first["id"] and again["sha"] == first["sha"]
    assert again["status"] != "disturbed" and again["cpu_share"] >= 0.65
    assert again["decision"] in ("keep", "discard") or again["status"] != "ok"
    assert seen[0] == "disturbed"


def test_a_candidate_waiting_for_confirmation_when_ar_stopped_gets_it_next_time(session):
    def stop_at_the_confirmation(pool):
        if pool.ended:  # the first run ended; ar is stopped while its confirmation runs
            raise KeyboardInterrupt

    pool = NoisyWorkers(ONE, {0.05: [1.975]}, during=stop_at_the_confirmation)
    with pytest.raises(KeyboardInterrupt):
        schedule(session, ScriptedAgent([0.05]), 1, pool)
    a, stopped = experiments(session)
    assert a["decision"] is None and a["evidence"] and stopped["status"] == "interrupted"
    schedule(session, ScriptedAgent([]), 0, NoisyWorkers(ONE, {0.05: [1.97, 1.975]}))
    a = vars(session.ledger.run(a["id"]))
    assert a["decision"] == "keep" and evidence(a)["runs"][0] == 1.975
    resumed = [row for row in experiments(session) if row["id"] > stopped["id"]]
    assert resumed and resumed[0]["kind"] == "confirmation" and resumed[0]["sha"] == a["sha"]


def test_a_disturbed_baseline_run_is_set_aside_and_run_again(session):
    pool = NoisyWorkers(ONE, {0.04: [dict(ok(1.7), cpu_share=0.4), dict(ok(2.0), cpu_share=0.98)]})
    Scheduler(session, pool, measures=1).run()  # `ar baseline`: the tip, through the backend
    first, again = rows(session)[-2:]
    assert (first["status"], first["decision"], first["kind"]) == ("disturbed", None, "baseline")
    assert (again["status"], again["decision"], again["val_bpb"]) == ("ok", None, 2.0)
    assert again["again_of"] == first["id"]
    assert 1.7 not in commit_values(session, again["sha"])


def test_a_best_whose_runs_are_always_disturbed_cannot_hold_the_loop(session):
    """A kept commit that makes every re-measure look disturbed: its measurements are
    bounded, and the next candidate is judged with what there is."""
    lying = [dict(ok(1.9), cpu_share=0.2)] * 20
    pool = NoisyWorkers(ONE, {0.05: [1.80, *lying], 0.06: [2.2]})
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool)
    runs_of_best = [row for row in experiments(session) if row["kind"] == "remeasure"]
    assert 0 < len(runs_of_best) <= 2 * (1 + session.settings.keep.disturbed_retries) + 1
    assert all(row["status"] == "disturbed" for row in runs_of_best)
    last = experiments(session)[-1]
    assert last["kind"] == "experiment" and last["decision"] == "discard"
