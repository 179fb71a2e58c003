"""The loop's side of the search: repeats turned back before any training (whichever
agent proposed them, a running experiment included), parents beyond the tip by the UCB
rule, the commit each candidate was judged against, and a deadline. Real git and ledger,
a backend that trains nothing (tests/test_scheduler.py's ScriptedWorkers)."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import pytest
from test_scheduler import BASELINE_BPB, SLOTS, ScriptedWorkers, experiments, ok

from autoresearch_cli.agents.base import Proposal
from autoresearch_cli.doors import config
from autoresearch_cli.doors.template import set_constants
from autoresearch_cli.report.tree import render_tree, tree_rows
from autoresearch_cli.research import session as runs
from autoresearch_cli.research.scheduler import Scheduler


class LiteralAgent:
    """Writes MATRIX_LR as the next literal of its script, exactly as given ("5e-2"), and
    remembers what it was told: the parent and the history's items."""

    def __init__(self, literals):
        self.literals = list(literals)
        self.told = []

    def propose(self, train_py, program_md, history, failure=None):
        literal = self.literals.pop(0)
        self.told.append((history.parent, list(history.items)))
        return Proposal(f"MATRIX_LR -> {literal}",
                        set_constants(train_py, {"MATRIX_LR": literal}), "mutation")


@pytest.fixture
def open_session(micro_ws):
    """A session on the micro workspace with [agent] settings changed, and its baseline."""
    with ExitStack() as stack:

        def opened(**agent_settings):
            if agent_settings:
                raw = config.load_raw(micro_ws.config_path)
                raw["agent"].update(agent_settings)
                config.write(micro_ws.config_path, raw)
            current = stack.enter_context(runs.session(micro_ws, "test"))
            tip = micro_ws.tip()
            exp_id = current.ledger.start_experiment("baseline", tip, "baseline", None,
                                                     status="running")
            current.ledger.finish(exp_id, "ok", ok(BASELINE_BPB), sha=tip,
                                  slot_class=SLOTS[0].slot_class)
            return current

        yield opened


@pytest.fixture
def session(open_session):
    return open_session()


def test_a_repeat_in_other_formatting_is_turned_back_before_training(session):
    pool = ScriptedWorkers(SLOTS[:1], {0.05: ok(2.1)})
    Scheduler(session, pool, LiteralAgent(["0.05", "5e-2  # the same", "0.050"]), "scripted", 3).run()
    first, again, third = experiments(session)
    assert first["status"] == "ok" and first["decision"] == "discard"
    for repeat in (again, third):
        assert repeat["status"] == "invalid" and repeat["sha"] is None  # never committed
        assert repeat["reason"].startswith(f"turned back before training: it repeats experiment "
                                           f"#{first['id']} (MATRIX_LR -> 0.05)")
        assert "scored 2.100000 over 1 run (discard" in repeat["reason"]
    assert pool.ended == [first["id"]]  # 100% of the repeats turned back: one run in all


def test_a_repeat_of_a_running_experiment_is_turned_back_too(session):
    pool = ScriptedWorkers(SLOTS, {0.05: ok(1.9)})
    agent = LiteralAgent(["0.05", "0.0500"])
    Scheduler(session, pool, agent, "scripted", 2).run()
    first, again = experiments(session)
    assert again["status"] == "invalid" and "is running now" in again["reason"]
    assert [item.status for item in agent.told[1][1]] == ["baseline", "running"]
    assert pool.ended == [first["id"]]


def test_the_rule_builds_on_the_baseline_once_the_best_was_tried_enough(open_session):
    """A (1.99) is kept over the baseline (2.0); three more on A are discarded; with
    explore 3 the fifth builds on the baseline: tried once against three times, 0.01 behind."""
    current = open_session(explore=3.0)
    results = {0.05: ok(1.99), 0.06: ok(2.2), 0.07: ok(2.3), 0.08: ok(2.4), 0.09: ok(2.5)}
    agent = LiteralAgent(["0.05", "0.06", "0.07", "0.08", "0.09"])
    Scheduler(current, ScriptedWorkers(SLOTS[:1], results), agent, "scripted", 5).run()
    a, *on_a, e = experiments(current)
    base = a["parent_sha"]
    assert a["decision"] == "keep" and all(row["parent_sha"] == a["sha"] for row in on_a)
    assert e["parent_sha"] == base and current.ws.tip() == a["sha"]
    parent = agent.told[-1][0]
    assert (parent.sha, parent.role, parent.tried) == (base, "baseline", 1)
    assert json.loads(e["evidence"])["against"] == a["sha"]  # judged against the best, not its parent
    # ar log --tree: E under the baseline beside A, the others under A
    lines = render_tree(tree_rows(current.evidence()))
    assert lines[0] == "baseline  2.000000 (1 run)"
    assert lines[1].startswith(f"├── #{a['id']} keep  1.990000") and lines[1].endswith("<- best")
    assert [line[:8] for line in lines[2:5]] == ["│   ├── ", "│   ├── ", "│   └── "]
    assert lines[5].startswith(f"└── #{e['id']} discard  2.500000")
    assert "gain -0.5100" in lines[5]  # paired with the best it was judged against


def test_explore_zero_always_builds_on_the_best(open_session):
    current = open_session(explore=0.0)
    results = {0.05: ok(1.99), 0.06: ok(2.2), 0.07: ok(2.3), 0.08: ok(2.4), 0.09: ok(2.5)}
    Scheduler(current, ScriptedWorkers(SLOTS[:1], results),
              LiteralAgent(["0.05", "0.06", "0.07", "0.08", "0.09"]), "scripted", 5).run()
    a, *rest = experiments(current)
    assert all(row["parent_sha"] == a["sha"] for row in rest)


def test_nothing_new_starts_after_the_deadline(session):
    pool = ScriptedWorkers(SLOTS[:1], {0.05: ok(1.9), 0.06: ok(1.8)})
    scheduler = Scheduler(session, pool, LiteralAgent(["0.05", "0.06"]), "scripted", 5)

    def time_passes(_pool):
        scheduler.deadline = time.monotonic() - 1  # while the first one trains

    pool.during = time_passes
    outcome = scheduler.run()
    assert outcome.time_up and outcome.started == 1 and outcome.stopped_because is None
    (only,) = experiments(session)
    assert only["decision"] == "keep"  # what ran finished and was judged
