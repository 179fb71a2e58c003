"""`ar baseline` end to end: real worktree, real sandboxed training, trusted evaluation."""

from __future__ import annotations

from e2e import ar, git, result_json, rows, start_and_kill_mid_training, wait_gone

from autoresearch_cli.doors.lock import ExperimentLock, lock_path


def test_baseline_trains_evaluates_and_records(micro_ws):
    done = ar("baseline", cwd=micro_ws.root)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "baseline val_bpb" in done.stdout
    (row,) = rows(micro_ws.root)
    assert row["kind"] == "baseline" and row["status"] == "ok"
    assert row["sha"] == git(micro_ws.root, "rev-parse", "autoresearch/test")
    result = result_json(micro_ws.root, row["id"])
    assert result["val_bpb"] == row["val_bpb"] and 0 < result["val_bpb"] < 20
    assert result["holdout_bpb"] > 0
    for key in ("training_seconds", "total_seconds", "peak_rss_mb", "num_steps", "num_params_M"):
        assert result[key] is not None, key
    assert result["total_seconds"] >= result["training_seconds"]
    lines = (micro_ws.root / "results.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert lines[1].split("\t")[3] == "keep"
    assert not any((micro_ws.root / ".ar" / "worktrees").iterdir())


def test_baseline_repeat_reports_mean_and_std(micro_ws):
    done = ar("baseline", "--repeat", "2", cwd=micro_ws.root)
    assert done.returncode == 0, done.stderr
    assert "±" in done.stdout and "(2 runs)" in done.stdout and "std " in done.stdout
    assert [r["status"] for r in rows(micro_ws.root)] == ["ok", "ok"]


def test_a_second_command_is_refused_while_one_runs(micro_ws):
    with ExperimentLock(lock_path(micro_ws.root), command="ar iterate"):
        refused = ar("baseline", cwd=micro_ws.root)
    assert refused.returncode == 1
    assert "another ar command" in refused.stderr and "ar iterate" in refused.stderr
    assert not (micro_ws.root / ".ar" / "ledger.db").exists()  # refused before any record


def test_baseline_without_data_says_to_prepare(micro_ws):
    import shutil

    shutil.rmtree(micro_ws.data_dir)
    done = ar("baseline", cwd=micro_ws.root)
    assert done.returncode == 1
    assert "ar prepare" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigkill_during_baseline_is_reported_and_the_next_baseline_works(micro_ws):
    job_pid, _ = start_and_kill_mid_training(["baseline"], micro_ws.root)
    (row,) = rows(micro_ws.root)
    assert row["status"] == "running"
    again = ar("baseline", cwd=micro_ws.root)
    assert again.returncode == 0, again.stderr
    assert f"experiment #{row['id']} was interrupted" in again.stderr
    assert wait_gone(job_pid), "the killed ar's training job is still running"
    statuses = [r["status"] for r in rows(micro_ws.root)]
    assert statuses == ["interrupted", "ok"]
    assert not any((micro_ws.root / ".ar" / "worktrees").iterdir())
    assert git(micro_ws.root, "worktree", "list").count("\n") == 0
