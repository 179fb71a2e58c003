"""Keeps that hold up, through the scheduler: paired seeds, confirmation runs, partners of
the best, a best re-judged, disturbed runs set aside (real git and ledger; a backend that
trains nothing and answers each run of a commit with the value its script gives the
run's seed index)."""

from __future__ import annotations

import json

import pytest
from test_scheduler import SLOTS, ScriptedAgent, ScriptedWorkers, experiments, ok, rows, schedule

from autoresearch_cli.doors.config import with_keep
from autoresearch_cli.research import session as runs
from autoresearch_cli.research.evidence import Evidence
from autoresearch_cli.research.scheduler import Scheduler
from autoresearch_cli.research.seeds import run_seed

pytestmark = pytest.mark.sequential  # ar's default keep rule and disturbed thresholds

ONE = [SLOTS[0]]
BASELINE_RUNS = (2.00, 2.01, 1.99, 2.00, 2.015, 1.985)  # the noise: ~0.011, df 5


class NoisyWorkers(ScriptedWorkers):
    """Each run of a commit gets the next result of its script (a list per MATRIX_LR); a
    callable script gets the run's seed index (the same seed gives the same luck)."""

    def __init__(self, slots, scripts, **kwargs):
        super().__init__(slots, {key: None for key in scripts}, **kwargs)
        self.scripts = {key: values if callable(values) else list(values)
                        for key, values in scripts.items()}
        self.seeds: list[int] = []

    def start(self, exp_id, slot, spec):
        self.seeds.append(spec.seed)
        super().start(exp_id, slot, spec)

    def wait(self, timeout):
        self._ending = self._next_seed_index()
        return super().wait(timeout)

    def _next_seed_index(self):
        ids = list(self.running)
        exp_id = ids[0] if self.pick == "first" else ids[-1]
        return SEED_INDEX.get(self.specs[exp_id].seed, -1)

    def _result(self, train_py):
        for key, script in self.scripts.items():
            if f"MATRIX_LR = {key!r}" in train_py:
                value = script(self._ending) if callable(script) else script.pop(0)
                return value if isinstance(value, dict) else ok(value)
        raise AssertionError("no scripted result for this train.py")


SEED_INDEX = {run_seed("autoresearch/test", index): index for index in range(64)}


def luck(index):
    """The seed's luck (what both commits share on a seed), as the baseline shows it."""
    return BASELINE_RUNS[index % len(BASELINE_RUNS)] - 2.0


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
        for index, value in enumerate(BASELINE_RUNS):
            exp_id = current.ledger.start_experiment("baseline", tip, "baseline", None,
                                                     status="running")
            current.ledger.finish(exp_id, "ok", ok(value), sha=tip, seed_index=index,
                                  seed=run_seed(current.ws.branch, index),
                                  slot_class=SLOTS[0].slot_class)
        yield current


def evidence(row):
    return json.loads(row["evidence"])


def commit_values(current, sha):
    return Evidence.load(current.ledger).commit(sha, SLOTS[0].slot_class).values


def test_a_steady_win_is_kept_on_paired_seeds_and_the_next_is_judged_against_it(session):
    """A gains 0.02 on every seed, whatever the seed's luck: kept once its own pairs show
    it (one run never keeps). Its runs had the baseline's seeds, in order; B, judged
    against A on seed 0, loses there and is discarded after one run."""
    jitter = (0.0, 0.001, -0.002, 0.001, 0.0, 0.0)
    pool = NoisyWorkers(ONE, {0.05: lambda k: 1.98 + luck(k) + jitter[k],
                              0.06: lambda k: 2.05 + luck(k)})
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool)
    rows_ = experiments(session)
    a = rows_[0]
    confirmations = [row for row in rows_ if row["kind"] == "confirmation"]
    b = rows_[-1]
    assert (a["kind"], a["decision"]) == ("experiment", "keep")
    assert len(confirmations) >= 1 and all(row["sha"] == a["sha"] for row in confirmations)
    judged = evidence(a)
    assert judged["seeds"] == list(range(1 + len(confirmations)))
    assert judged["gain"] == pytest.approx(0.02, abs=0.002) and judged["p"] < judged["look_level"]
    assert session.ws.tip() == a["sha"]
    # every run of A had the baseline's seed of the same index: ar chose them, in order
    assert [a["seed_index"]] + [row["seed_index"] for row in confirmations] == judged["seeds"]
    assert a["seed"] == run_seed(session.ws.branch, 0)
    # B's first run pairs with A's run on seed 0, and loses there
    assert (b["kind"], b["decision"], b["seed_index"]) == ("experiment", "discard", 0)
    assert evidence(b)["best_runs"] == [a["val_bpb"]]


def test_a_marginal_win_is_confirmed_by_more_runs(session):
    gains = (0.006, 0.004, 0.007, 0.005, 0.006, 0.005)
    pool = NoisyWorkers(ONE, {0.05: lambda k: 2.0 + luck(k) - gains[k]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    rows_ = experiments(session)
    a, confirmations = rows_[0], [row for row in rows_ if row["kind"] == "confirmation"]
    assert len(confirmations) >= 2 and all(row["again_of"] is not None for row in confirmations)
    assert a["decision"] == "keep" and session.ws.tip() == a["sha"]
    assert evidence(a)["p"] < evidence(a)["look_level"]


def test_a_win_that_moves_with_the_seed_is_discarded(session):
    """Better on seed 0 by luck, worse on seed 1: no gain over its pairs."""
    base = session.ws.tip()
    pool = NoisyWorkers(ONE, {0.05: [1.975, 2.04]})
    schedule(session, ScriptedAgent([0.05]), 1, pool)
    a, confirmation = experiments(session)
    assert confirmation["kind"] == "confirmation" and confirmation["seed_index"] == 1
    assert a["decision"] == "discard" and session.ws.tip() == base
    assert evidence(a)["runs"] == [1.975, 2.04] and evidence(a)["best_runs"] == [2.00, 2.01]
    assert "no better" in a["reason"]


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
    assert again["seed_index"] == first["seed_index"] == 0  # run again on its own seed
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

    steady = lambda k: 1.98 + luck(k) + 0.001 * (k % 2)  # noqa: E731
    pool = NoisyWorkers(ONE, {0.05: steady}, during=stop_at_the_confirmation)
    with pytest.raises(KeyboardInterrupt):
        schedule(session, ScriptedAgent([0.05]), 1, pool)
    a, stopped = experiments(session)
    assert a["decision"] is None and a["evidence"] and stopped["status"] == "interrupted"
    schedule(session, ScriptedAgent([]), 0, NoisyWorkers(ONE, {0.05: steady}))
    a = vars(session.ledger.run(a["id"]))
    assert a["decision"] == "keep" and evidence(a)["runs"][0] == pytest.approx(1.98)
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
    kept_runs = {0: 1.98, 1: 1.99}  # A is kept on seeds 0 and 1; any later run of it lies
    pool = NoisyWorkers(ONE, {
        0.05: lambda k: ok(kept_runs[k]) if k in kept_runs else dict(ok(1.9), cpu_share=0.2),
        0.06: lambda k: 1.95 + 0.001 * k,  # B needs partners on seeds A never ran on
    })
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool)
    runs_of_best = [row for row in experiments(session) if row["kind"] == "remeasure"]
    bound = 6 + 2 * (1 + session.settings.keep.disturbed_retries)
    assert 0 < len(runs_of_best) <= bound
    assert all(row["status"] == "disturbed" for row in runs_of_best)
    b = [row for row in experiments(session) if row["kind"] == "experiment"][-1]
    assert b["decision"] in ("keep", "discard")  # judged on the pairs there are: the loop ended


def test_a_best_that_does_not_hold_on_more_seeds_is_rejudged(session):
    """A is kept on seeds 0 and 1. B, built on it, needs A on seed 2, where A is much
    worse than the baseline: A's pairs with its parent show no gain any more, so the
    branch goes back to the baseline, with the reason in the ledger; B is then judged
    against the baseline."""
    base = session.ws.tip()
    a_runs = {0: 1.98, 1: 1.991, 2: 2.05}
    b_runs = {0: 1.96, 1: 1.973}
    pool = NoisyWorkers(ONE, {0.05: lambda k: a_runs[k],
                              0.06: lambda k: b_runs.get(k, 1.97 + luck(k) + 0.001 * k)})
    events = []
    schedule(session, ScriptedAgent([0.05, 0.06]), 2, pool, events)
    a = experiments(session)[0]
    assert a["decision"] == "keep" and "re-judged later: its 3 pairs" in a["reason"]
    (rejudged,) = session.ledger.events("rejudged")
    assert rejudged.sha == base and f"experiment #{a['id']}" in rejudged.detail
    evidence_now = Evidence.load(session.ledger)
    assert evidence_now.word(evidence_now.run(a["id"])) == "rejudged"
    assert any("re-judged" in d.get("message", "") for kind, d in events if kind == "note")
    b = [row for row in experiments(session) if row["kind"] == "experiment"][-1]
    assert evidence(b)["best_runs"][:3] == [2.00, 2.01, 1.99]  # judged against the baseline
