"""One record of a commit's evidence, read by everything: `ar log` (table, --best, --json,
the summary), the plot, the live view, results.tsv and the prompt name the same best, with
the same mean, on a ledger with re-measures, a confirmed keep, a discarded lucky run, a
disturbed run and a revert."""

from __future__ import annotations

import json
import statistics

import pytest

from autoresearch_cli.agents.prompt import history_section
from autoresearch_cli.display import Display
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.report import log as report
from autoresearch_cli.report.plot import plot_data
from autoresearch_cli.research.evidence import Evidence, outcome
from autoresearch_cli.research.export import tsv_lines
from autoresearch_cli.research.history import history, parents

SHA = {name: name * 40 for name in "abcdef"}
CLASS = "cpu:2"
BASELINE = (2.00, 2.02, 1.98, 2.01, 1.99)
BEST_RUNS = (1.95, 1.96, 1.955, 1.965)  # B: its run, a confirmation, two re-measures


SEEDS: dict[str, int] = {}  # each commit's next seed index, as ar gives them


def run(ledger, kind, parent, sha, value, status="ok", description="", again_of=None):
    exp_id = ledger.start_experiment(kind, SHA.get(parent), description, "llm", status="running")
    index = SEEDS.get(sha, 0)
    if status == "ok":
        SEEDS[sha] = index + 1
    ledger.update(exp_id, sha=SHA[sha], slot_class=CLASS, seed=1000 + index, seed_index=index)
    if again_of is not None:
        ledger.update(exp_id, again_of=again_of)
    ledger.finish(exp_id, status, {"status": status, "val_bpb": value, "peak_rss_mb": 1024})
    return exp_id


@pytest.fixture
def ws_ledger(micro_ws):
    SEEDS.clear()
    with Ledger.for_workspace(micro_ws.root) as ledger:
        for value in BASELINE:
            run(ledger, "baseline", "a", "a", value, description="baseline")
        b = run(ledger, "experiment", "a", "b", BEST_RUNS[0], description="raise LR")
        ledger.update(b, evidence='{"verdict": "confirm"}')
        run(ledger, "confirmation", "a", "b", BEST_RUNS[1], again_of=b)
        ledger.settle(b, "keep", json.dumps({"p": 0.001, "look_level": 0.0167,
                                             "runs": list(BEST_RUNS[:2])}), reason="kept")
        for value in BEST_RUNS[2:]:
            run(ledger, "remeasure", "b", "b", value, description="re-measure")
        c = run(ledger, "experiment", "b", "c", 1.90, description="lucky seed")  # the lowest run
        run(ledger, "confirmation", "b", "c", 1.99, again_of=c)
        ledger.settle(c, "discard", json.dumps({"p": 0.4}), reason="discarded: not shown better")
        run(ledger, "experiment", "b", "d", 1.80, status="disturbed", description="half the cores")
        e = run(ledger, "experiment", "b", "e", 1.93, description="later reverted")
        ledger.settle(e, "keep", json.dumps({"p": 0.01}), reason="kept")
        ledger.add_event("revert", SHA["b"], f"from {SHA['e']}")
        yield ledger, {"b": b, "c": c, "e": e}


def test_every_view_names_the_same_best_with_the_same_mean(ws_ledger, micro_ws, cli):
    ledger, ids = ws_ledger
    evidence = Evidence.load(ledger)
    mean = statistics.fmean(BEST_RUNS)

    best = evidence.best()
    assert (best.sha, best.n, best.mean) == (SHA["b"], 4, pytest.approx(mean))
    assert min(r.val_bpb for r in evidence.runs if r.val_bpb) == 1.80  # not the best: disturbed
    # ar log --best: the chain ends at B, a mean over its four runs
    chain = report.best_chain(evidence)
    assert [step["commit"] for step in chain] == [SHA["a"][:7], SHA["b"][:7]]
    assert (chain[-1]["val_bpb"], chain[-1]["runs"]) == (pytest.approx(mean), 4)
    assert chain[0]["val_bpb"] == pytest.approx(statistics.fmean(BASELINE))
    # the summary line
    facts = report.summary(evidence)
    assert (facts["best_id"], facts["best_runs"]) == (ids["b"], 4)
    assert facts["best_bpb"] == pytest.approx(mean)
    paired = statistics.fmean(a - b for a, b in zip(BASELINE, BEST_RUNS, strict=False))
    assert facts["improvement"] == pytest.approx(paired)  # on the four seeds both ran on
    assert facts["improvement_paired"] == 4
    assert f"best {mean:.6f}" in report.summary_text(facts)
    # the table: deltas against the parent's mean, not one run
    rows = {row["id"]: row for row in report.table_rows(evidence)}
    assert rows[ids["c"]]["delta_bpb"] == pytest.approx(1.90 - mean)
    assert rows[ids["c"]]["commit_mean"] == pytest.approx(1.945) and rows[ids["c"]]["outcome"] == "discard"
    # --json
    items = {item["id"]: item for item in report.json_rows(evidence)}
    assert items[ids["b"]]["commit_mean"] == pytest.approx(mean) and items[ids["b"]]["commit_runs"] == 4
    # the plot's data: one dot per scored run, the best line ends at the incumbent's mean
    drawn = plot_data(evidence)
    assert len(drawn.runs) == sum(1 for r in evidence.runs if r.scored) == 12
    assert drawn.best_sha == SHA["b"] and drawn.best_mean == pytest.approx(mean)
    assert drawn.best_line[-1][1] == pytest.approx(mean)
    assert [p.kind for p in drawn.commits] == ["baseline", "keep", "other", "keep"]
    # the report (ar report): the same best, its mean, the same gain
    from autoresearch_cli.report.facts import build

    told_report = build(evidence, ledger.total_cost())
    assert told_report.val.best.sha == SHA["b"] and told_report.val.best.mean == pytest.approx(mean)
    assert told_report.val.gain.value == pytest.approx(facts["improvement"])
    assert [step.row["commit"] for step in told_report.steps] == [SHA["b"][:7]]
    # the live view
    with Display(live=False, standing=lambda: (evidence.baseline(), evidence.best())) as shown:
        assert f"best {mean:.6f}" in shown.status_line() and "(4 runs)" in shown.status_line()
    # the prompt's history: each commit's mean, runs and verdict, and the noise
    told = history(evidence)
    assert told.best.val_bpb == pytest.approx(mean) and told.best.runs == 4
    assert told.noise == pytest.approx(evidence.noise(CLASS).sigma)
    text = history_section(told)
    assert f"{mean:.6f} over 4 runs" in text and "1.945000 (2)" in text
    assert "differ by about" in text and "disturbed" in text
    assert [p.sha for p in parents(evidence, SHA["b"])] == [SHA["b"], SHA["e"], SHA["a"]]
    # results.tsv: one line per decided commit, each with its mean
    lines = tsv_lines(evidence)
    assert lines[1].split("\t")[:2] == ["aaaaaaa", f"{statistics.fmean(BASELINE):.6f}"]
    assert lines[2].split("\t")[:2] == ["bbbbbbb", f"{mean:.6f}"]
    assert len(lines) == 5  # header, A, B, C, E: no line for re-measures and confirmations

    # and the command line prints the same numbers, from a read-only ledger
    table = cli("log")
    assert table.exit_code == 0, table.output
    assert f"best {mean:.6f}" in table.output and f"(#{ids['b']})" in table.output
    chain_json = json.loads(cli("log", "--best", "--json").output)
    assert chain_json[-1]["val_bpb"] == pytest.approx(mean) and chain_json[-1]["runs"] == 4


def test_outcome_words_and_the_noise():
    from autoresearch_cli.doors.records import Run

    def made(**fields):
        return Run(id=1, kind=fields.pop("kind", "experiment"), status=fields.pop("status", "ok"),
                   started_at="", **fields)

    assert outcome(made(kind="baseline")) == "baseline"
    assert outcome(made(kind="remeasure")) == "remeasure"
    assert outcome(made(decision="keep")) == "keep"
    assert outcome(made(evidence="{}")) == "pending"
    assert outcome(made(status="crash")) == "crash"
    assert outcome(made()) == "ok"
    evidence = Evidence([])
    assert evidence.best() is None and evidence.gain() is None and evidence.chain() == []
