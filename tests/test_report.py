import json
import sys

import pytest
from rich.console import Console

from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.errors import ArError
from autoresearch_cli.report import log as report
from autoresearch_cli.report.plot import plot_progress
from autoresearch_cli.research.evidence import Evidence, outcome

SHA = {name: name * 40 for name in "abcdefg"}


def add(ledger, parent, sha, val_bpb, decision="discard", kind="experiment", status="ok",
        description="change"):
    experiment_id = ledger.start_experiment(kind, SHA.get(parent), description, "random")
    ledger.update(experiment_id, sha=SHA[sha])
    ledger.finish(experiment_id, status, {"status": status, "val_bpb": val_bpb, "peak_vram_mb": 1024})
    if decision is not None:
        ledger.settle(experiment_id, decision)
    return experiment_id


def ev(ledger):
    return Evidence.load(ledger)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.db") as opened:
        add(opened, None, "a", 1.00, decision=None, kind="baseline", description="baseline")
        add(opened, "a", "b", 0.98, decision="keep", description="raise LR")
        add(opened, "b", "c", 0.99, description="GeLU")
        add(opened, "b", "d", None, status="crash", decision=None, description="typo")
        add(opened, "b", "e", 0.95, decision="keep", description="deeper")
        opened.record_llm_call(5, {"model": "m", "cost_usd": 0.125})
        yield opened


def test_delta_is_against_the_parent_commit(ledger):
    rows = report.table_rows(ev(ledger))
    by_id = {row["id"]: row for row in rows}
    assert [row["id"] for row in rows] == [1, 2, 3, 4, 5]
    assert by_id[1]["delta_bpb"] is None and by_id[1]["outcome"] == "baseline"
    assert by_id[2]["delta_bpb"] == pytest.approx(-0.02) and by_id[2]["parent_id"] == 1
    assert by_id[3]["delta_bpb"] == pytest.approx(0.01) and by_id[3]["outcome"] == "discard"
    assert by_id[4]["delta_bpb"] is None and by_id[4]["outcome"] == "crash"
    assert by_id[5]["delta_bpb"] == pytest.approx(-0.03) and by_id[5]["cost_usd"] == 0.125
    assert by_id[5]["commit"] == "eeeeeee" and by_id[5]["memory_gb"] == 1.0
    limited = report.table_rows(ev(ledger), limit=1)
    assert [row["id"] for row in limited] == [5]
    assert limited[0]["delta_bpb"] == pytest.approx(-0.03)
    assert report.table_rows(ev(ledger), limit=0) == []


def test_best_chain_has_step_and_cumulative_improvement(ledger):
    chain = report.best_chain(ev(ledger))
    assert [step["id"] for step in chain] == [1, 2, 5]
    assert chain[0]["improvement"] is None
    assert [step["improvement"] for step in chain[1:]] == pytest.approx([0.02, 0.03])
    assert [step["cumulative_improvement"] for step in chain] == pytest.approx([0, 0.02, 0.05])
    assert chain[-1]["cumulative_percent"] == pytest.approx(5.0)
    assert report.best_chain(Evidence([])) == []


def test_best_chain_honours_a_revert(ledger):
    ledger.add_event("revert", SHA["b"], "ar revert")
    add(ledger, "b", "f", 0.97, decision="keep", description="after revert")
    chain = report.best_chain(ev(ledger))
    assert [step["id"] for step in chain] == [1, 2, 6]
    assert chain[-1]["cumulative_improvement"] == pytest.approx(0.03)


def test_json_rows_are_serialisable_and_carry_the_result(ledger):
    rows = report.json_rows(ev(ledger), limit=2)
    decoded = json.loads(json.dumps(rows))
    assert [row["id"] for row in decoded] == [4, 5]
    assert decoded[1]["result"] == {"status": "ok", "val_bpb": 0.95, "peak_vram_mb": 1024}
    assert decoded[1]["delta_bpb"] == pytest.approx(-0.03) and decoded[1]["outcome"] == "keep"
    assert "result_json" not in decoded[1]


def test_tables_and_summary_render(ledger):
    console = Console(record=True, width=200)
    console.print(report.render_table(report.table_rows(ev(ledger))))
    console.print(report.render_best_chain(report.best_chain(ev(ledger))))
    text = console.export_text()
    assert "eeeeeee" in text and "-0.030000" in text and "$0.1250" in text and "5.00%" in text
    facts = report.summary(ev(ledger), ledger.total_cost())
    assert (facts["kept"], facts["discarded"], facts["failed"]) == (2, 1, 1)
    assert facts["improvement"] == pytest.approx(0.05)
    line = report.summary_text(facts)
    assert "baseline 1.000000 (1 run) → best 0.950000 (1 run) (#5)" in line
    assert "gain +0.050000" in line and "$0.1250" in line


def test_plot_writes_a_png(ledger, tmp_path):
    target = plot_progress(ev(ledger), tmp_path / "progress.png")
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_plot_errors_are_clear(ledger, tmp_path, monkeypatch):
    with pytest.raises(ArError, match="nothing to plot"):
        plot_progress(Evidence([]), tmp_path / "empty.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ArError, match=r"pip install 'ar\[plot\]'"):
        plot_progress(ev(ledger), tmp_path / "progress.png")


def test_the_best_chain_shows_the_evidence_of_each_keep(ledger):
    """Runs, mean, spread and the test's outcome per kept step; the noise per hardware."""
    from autoresearch_cli.research.keeprule import Rule, judge

    for value in (1.02, 0.99):  # the baseline re-measured twice
        add(ledger, None, "a", value, decision=None, kind="remeasure", description="re-measure")
    for value in (0.96, 0.94):  # #5 confirmed by two more runs
        add(ledger, "b", "e", value, decision=None, kind="confirmation", description="confirm")
    tested = judge([(0, 0.95, 1.0), (1, 0.96, 1.02), (2, 0.94, 0.99)], Rule())
    ledger.update(5, evidence=json.dumps(tested.as_dict()))
    evidence = ev(ledger)
    chain = report.best_chain(evidence)
    baseline, _, best = chain
    assert (baseline["runs"], baseline["val_bpb"]) == (3, pytest.approx(1.0033, abs=1e-4))
    assert (best["runs"], best["val_bpb"], best["spread"]) == (3, pytest.approx(0.95),
                                                               pytest.approx(0.01))
    pooled = ((4.667e-4 + 2e-4) / 4) ** 0.5  # the baseline's and the best's spreads, 4 df
    assert best["half_width"] == pytest.approx(2.776 * pooled / 3 ** 0.5, rel=0.01)
    assert best["test"].startswith("p=") and "3 pairs" in best["test"]
    assert outcome(evidence.runs[-1]) == "confirmation" and outcome(evidence.runs[5]) == "remeasure"
    (line,) = report.noise_lines(evidence)
    assert "4 degrees of freedom" in line and "2 commit(s)" in line
    Console(file=sys.stdout).print(report.render_best_chain(chain))
