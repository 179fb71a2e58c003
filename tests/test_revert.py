"""`ar revert`: real commits and ledger rows, no training (the rule under test is revert's)."""

from __future__ import annotations

from e2e import ar, git

from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.research.evidence import Evidence


def record(ledger, kind, parent, sha, val_bpb, decision):
    exp_id = ledger.start_experiment(kind, parent, f"{kind} {val_bpb}", "random", status="running")
    ledger.update(exp_id, sha=sha)
    ledger.finish(exp_id, "ok", {"status": "ok", "val_bpb": val_bpb}, sha=sha)
    if kind != "baseline":
        ledger.settle(exp_id, decision)


def commit_change(root, text):
    with (root / "train.py").open("a") as handle:
        handle.write(f"# {text}\n")
    return gitops.commit_all(root, text)


def test_revert_moves_back_to_kept_commits_only(micro_ws):
    root = micro_ws.root
    base = micro_ws.tip()
    better = commit_change(root, "better")
    worse = commit_change(root, "worse")
    gitops.git(root, "reset", "--hard", "--quiet", better)
    with Ledger.for_workspace(root) as ledger:
        record(ledger, "baseline", base, base, 3.0, "keep")
        record(ledger, "experiment", base, better, 2.9, "keep")
        record(ledger, "experiment", better, worse, 3.1, "discard")

    refused = ar("revert", worse[:7], cwd=root)
    assert refused.returncode == 1 and "never kept (discard)" in refused.stderr
    assert "already the tip" in ar("revert", better, cwd=root).stderr
    assert "not an experiment" in ar("revert", "0123456789abcdef", cwd=root).stderr
    assert git(root, "rev-parse", "autoresearch/test") == better

    moved = ar("revert", base[:8], cwd=root)
    assert moved.returncode == 0, moved.stderr
    assert git(root, "rev-parse", "autoresearch/test") == base
    assert git(root, "status", "--porcelain") == ""  # the checkout followed the branch
    assert "# better" not in (root / "train.py").read_text()
    with Ledger.for_workspace(root) as ledger:
        evidence = Evidence.load(ledger)
        assert evidence.best_sha == base  # later experiments compare against it
        assert [e.sha for e in ledger.events("revert")] == [base]
        assert evidence.best().mean == 3.0
    # the kept commit reverted away from is still kept, and can be restored
    assert ar("revert", better[:7], cwd=root).returncode == 0
    assert git(root, "rev-parse", "autoresearch/test") == better
