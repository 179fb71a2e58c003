"""`ar ablate` and `ar transfer` for real: sandboxed micro trainings, two at a time (one
pair each: a micro run takes about 25 s here), on a chain written into the ledger (its
own scores on a seed index the studies do not use, so every pair below is of real runs)."""

from __future__ import annotations

import json

import pytest
from reportdata import add_run, commit

from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.research.evidence import Evidence

pytestmark = pytest.mark.slow
CLASS = "cpu:1"  # what --workers 2 gives each run on two cores
APART = 7  # the chain's own seed index


@pytest.fixture
def kept_step(micro_ws):
    """baseline -> one kept step (a smaller MATRIX_LR), by the random agent."""
    base = micro_ws.tip()
    step = commit(micro_ws, base, {"MATRIX_LR": 0.03}, "lower LR")
    with Ledger.for_workspace(micro_ws.root) as ledger:
        for sha, value, kind in ((base, 2.0, "baseline"), (step, 1.9, "experiment")):
            exp_id = add_run(ledger, kind, base, sha, value, APART, slot_class=CLASS)
            ledger.update(exp_id, agent="random")
        ledger.settle(exp_id, "keep", json.dumps({"p": 0.001}), reason="kept")
    gitops.update_ref(micro_ws.root, micro_ws.branch_ref(), step, base)
    return micro_ws, base, step


def test_ablate_for_real(kept_step, cli):
    ws, base, step = kept_step
    result = cli("ablate", "--runs", "1", "--workers", "2")
    assert result.exit_code == 0, result.output
    with Ledger.for_workspace(ws.root, read_only=True) as ledger:
        evidence = Evidence.load(ledger)
    runs = [run for run in evidence.runs if run.id > 2]
    assert sorted((run.kind, run.seed_index, run.status) for run in runs) == [
        ("ablation", 0, "ok"), ("remeasure", 0, "ok")]
    (ablation,) = [run for run in runs if run.kind == "ablation"]
    assert ablation.parent_sha == step and ablation.sha not in (base, step)
    assert all(run.slot_class == CLASS and run.val_bpb > 0 for run in runs)
    assert ws.tip() == step and "the step carries" in result.output
    report = cli("report")
    assert report.exit_code == 0, report.output
    assert "Which steps carry the gain" in (ws.state_dir / "report" / "report.md").read_text()


def test_transfer_for_real(kept_step, cli):
    ws, base, step = kept_step
    result = cli("transfer", "--budget-factor", "1.5", "--runs", "1", "--workers", "2")
    assert result.exit_code == 0, result.output
    with Ledger.for_workspace(ws.root, read_only=True) as ledger:
        runs = [run for run in ledger.runs() if run.kind == "transfer"]
    assert sorted((run.sha == step, run.seed_index) for run in runs) == [(False, 0), (True, 0)]
    assert {run.slot_class for run in runs} == {"cpu:1@4.5s"}
    assert all(run.status == "ok" and run.training_seconds >= 4.5 for run in runs), [
        (run.status, run.training_seconds, run.reason) for run in runs]
    assert "cpu:1@4.5s" in result.output
