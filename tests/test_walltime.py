"""`ar log --timing`: where each run's wall time went (autoresearch_cli/report/walltime.py)."""

from __future__ import annotations

import json

from rich.console import Console

from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.doors.records import Run
from autoresearch_cli.report import walltime

TIMING = {"plan": 0.5, "server": 0.0, "start": 0.09, "warmup": 0.33,
          "train": 60.2, "save": 0.18, "score": 6.1, "score_arithmetic": 5.4,
          "score_fixed": 0.7, "other": 0.02, "total": 67.42,
          "launch": {"job": "warm", "scorer": "warm"}}  # fmt: skip


def run(run_id: int, timing: dict | None, kind: str = "experiment") -> Run:
    result = {"status": "ok", **({"timing": timing} if timing else {})}
    return Run(id=run_id, kind=kind, status="ok", started_at="2026-12-04T00:00:00Z",
               result_json=json.dumps(result))  # fmt: skip


def test_each_run_shows_its_phases_and_the_share_that_trained():
    rows = walltime.timing_rows([run(1, TIMING), run(2, None), run(3, {**TIMING, "launch": {
        "job": "cold: the warm server is still starting", "scorer": "warm"}})])  # fmt: skip
    assert [row["id"] for row in rows] == [1, 3]  # a run without a record is left out
    first = rows[0]
    assert first["train"] == 60.2 and first["server"] == 0.0 and first["launch"] == "warm"
    assert round(first["train_share"], 3) == round(60.2 / 67.42, 3)
    assert rows[1]["launch"] == "job cold, scorer warm"
    line = walltime.timing_summary(rows)
    assert line.startswith("2 run(s): training took 89.3%") and "score batches 5.40 s" in line
    Console(width=200, record=True).print(walltime.render_timing(rows))


def test_ar_log_timing_reads_the_ledger(micro_ws, cli):
    with Ledger.for_workspace(micro_ws.root) as ledger:
        exp_id = ledger.start_experiment("baseline", None, "baseline", None, status="running")
        ledger.finish(exp_id, "ok", {"status": "ok", "val_bpb": 2.0, "timing": TIMING})
    shown = cli("log", "--timing", cwd=micro_ws.root)
    assert shown.exit_code == 0, shown.output
    assert "warm-up" in shown.output and "training took 89.3%" in shown.output
    as_json = cli("log", "--timing", "--json", cwd=micro_ws.root)
    assert json.loads(as_json.output)[0]["train"] == 60.2
