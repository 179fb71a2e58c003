import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from autoresearch_cli.agents import CallRecord
from autoresearch_cli.errors import ArError, BusyError, WorkspaceError
from autoresearch_cli.ledger import (
    MIGRATIONS,
    TSV_HEADER,
    Ledger,
    ledger_path,
    now,
    process_alive,
)
from autoresearch_cli.ledger import (
    kept as kept_row,
)
from autoresearch_cli.lock import ExperimentLock

SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c" * 40
SHA_D = "d" * 40


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / ".ar" / "ledger.db") as opened:
        yield opened


def add(ledger, kind="experiment", parent=SHA_A, sha=SHA_B, status="ok", decision="discard",
        val_bpb=1.0, description="try something", **result):
    experiment_id = ledger.start_experiment(kind, parent, description, "random")
    ledger.update(experiment_id, sha=sha)
    ledger.finish(experiment_id, status, decision,
                  {"status": status, "val_bpb": val_bpb, **result})
    return experiment_id


def test_migrations_apply_on_a_fresh_database_and_reopen_is_idempotent(tmp_path):
    path = tmp_path / "deep" / "ledger.db"
    with Ledger(path) as first:
        assert first.schema_version == len(MIGRATIONS)
        experiment_id = first.start_experiment("baseline", None, "baseline", "none")
    with Ledger(path) as again:
        assert again.schema_version == len(MIGRATIONS)
        assert [row["id"] for row in again.experiments()] == [experiment_id]
    db = sqlite3.connect(path)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"experiments", "llm_calls", "events"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_newer_schema_or_a_foreign_file_is_refused(tmp_path):
    newer = tmp_path / "newer.db"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(WorkspaceError, match="newer"):
        Ledger(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(WorkspaceError, match="not a database"):
        Ledger(garbage)


def test_env_var_relocates_the_ledger(tmp_path, monkeypatch):
    monkeypatch.delenv("AR_LEDGER_PATH", raising=False)
    assert ledger_path(tmp_path) == tmp_path / ".ar" / "ledger.db"
    monkeypatch.setenv("AR_LEDGER_PATH", str(tmp_path / "elsewhere.db"))
    assert ledger_path(tmp_path) == tmp_path / "elsewhere.db"


def test_finish_fills_metrics_from_result_json(ledger):
    gpu = add(ledger, val_bpb=0.99, peak_vram_mb=2048, peak_rss_mb=512, holdout_bpb=1.01,
              training_seconds=300.1, num_steps=950, num_params_M=50.3, mfu_percent=39.8)
    cpu = add(ledger, sha=SHA_C, val_bpb=1.2, peak_vram_mb=0, peak_rss_mb=1536)
    row = ledger.get(gpu)
    assert (row["memory_gb"], row["holdout_bpb"], row["num_steps"]) == (2.0, 1.01, 950)
    assert row["status"] == "ok" and row["decision"] == "discard" and row["finished_at"]
    assert row["pid"] == os.getpid() and row["host"] == socket.gethostname()
    assert '"val_bpb": 0.99' in row["result_json"]
    assert ledger.get(cpu)["memory_gb"] == 1.5


def test_update_rejects_unknown_columns_ids_and_values(ledger):
    experiment_id = ledger.start_experiment("experiment", SHA_A, "x", "random")
    with pytest.raises(ValueError, match="pid"):
        ledger.update(experiment_id, pid=1)
    with pytest.raises(ValueError, match="status"):
        ledger.update(experiment_id, status="great")
    with pytest.raises(ValueError, match="finish"):
        ledger.update(experiment_id, decision="keep")
    with pytest.raises(ArError, match="#999"):
        ledger.update(999, status="running")
    with pytest.raises(ArError, match="#999"):
        ledger.get(999)


def test_a_keep_needs_a_sha_and_a_failed_keep_writes_nothing(ledger):
    experiment_id = ledger.start_experiment("experiment", SHA_A, "x", "random")
    with pytest.raises(ValueError, match="cannot be kept"):
        ledger.finish(experiment_id, "ok", "keep", {"status": "ok", "val_bpb": 0.9})
    row = ledger.get(experiment_id)
    assert row["status"] == "proposing" and row["val_bpb"] is None
    assert ledger.events() == []


def test_experiments_are_newest_last_and_limited(ledger):
    ids = [ledger.start_experiment("experiment", SHA_A, f"e{n}", "random") for n in range(5)]
    assert [row["id"] for row in ledger.experiments()] == ids
    assert [row["id"] for row in ledger.experiments(limit=2)] == ids[-2:]
    assert ledger.experiments(limit=0) == []


KILLED_WRITER = """
    import os, sys
    from autoresearch_cli.ledger import Ledger
    ledger = Ledger(sys.argv[1])
    experiment_id = ledger.start_experiment("experiment", "a" * 40, "doomed", "random")
    ledger.update(experiment_id, status="running", sha="b" * 40)
    print(experiment_id, flush=True)
    os.kill(os.getpid(), 9)
"""


def test_a_sigkilled_run_is_found_and_marked_interrupted(tmp_path):
    path = tmp_path / "ledger.db"
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(path)],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    experiment_id = int(killed.stdout)
    with Ledger(path) as ledger:
        mine = ledger.start_experiment("experiment", SHA_A, "alive", "random", status="running")
        interrupted = ledger.mark_interrupted()
        assert [row["id"] for row in interrupted] == [experiment_id]
        assert interrupted[0]["sha"] == SHA_B and interrupted[0]["status"] == "interrupted"
        row = ledger.get(experiment_id)
        assert row["status"] == "interrupted" and "ended while" in row["reason"]
        assert ledger.get(mine)["status"] == "running"
        assert [event["kind"] for event in ledger.events()] == ["interrupted"]
        assert ledger.mark_interrupted() == []


def test_liveness_rejects_other_hosts_and_recycled_pids():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        assert process_alive(sleeper.pid, host, now())
        assert not process_alive(sleeper.pid, "some-other-host", now())
        assert not process_alive(sleeper.pid, host, "2001-01-01T00:00:00Z")
        assert process_alive(os.getpid(), host, "2001-01-01T00:00:00Z")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not process_alive(sleeper.pid, host, now())


def test_baseline_stats(ledger):
    assert ledger.baseline_stats() == (None, None, 0)
    add(ledger, kind="baseline", sha=SHA_A, decision=None, val_bpb=1.0)
    assert ledger.baseline_stats() == (1.0, None, 1)
    add(ledger, kind="baseline", sha=SHA_A, decision=None, val_bpb=1.02)
    add(ledger, kind="baseline", sha=SHA_A, decision=None, val_bpb=1.04)
    add(ledger, kind="baseline", sha=SHA_A, status="crash", decision=None, val_bpb=None)
    add(ledger, sha=SHA_B, val_bpb=0.5)
    mean, std, n = ledger.baseline_stats()
    assert n == 3 and mean == pytest.approx(1.02) and std == pytest.approx(0.02)


def test_llm_call_costs_with_an_unpriced_call(ledger):
    experiment_id = ledger.start_experiment("experiment", SHA_A, "x", "anthropic/claude")
    ledger.record_llm_call(experiment_id, {"model": "m", "prompt": [{"role": "user"}],
                                           "reply": "r", "cost_usd": 0.25, "attempt": 1})
    ledger.record_llm_call(experiment_id, {"model": "m", "cost_usd": None,
                                           "cost_note": "no price for model m"})
    ledger.record_llm_call(None, CallRecord(model="m", prompt="[]", reply=None, prompt_tokens=9,
                                            completion_tokens=0, cost_usd=0.5, cost_note=None,
                                            latency_s=1.5, error="timeout", attempt=2))
    total = ledger.total_cost()
    assert total.usd == pytest.approx(0.75) and total.calls == 3 and total.unpriced == 1
    assert ledger.get(experiment_id)["cost_usd"] == pytest.approx(0.25)
    calls = ledger.llm_calls(experiment_id)
    assert calls[0]["prompt"] == '[{"role": "user"}]' and calls[1]["cost_usd"] is None
    with pytest.raises(ValueError, match="messages"):
        ledger.record_llm_call(None, {"messages": []})


def test_best_follows_keeps_and_reverts(ledger):
    assert ledger.best() is None
    baseline = add(ledger, kind="baseline", parent=None, sha=SHA_A, decision=None, val_bpb=1.0)
    assert ledger.best()["id"] == baseline
    kept = add(ledger, sha=SHA_B, decision="keep", val_bpb=0.9)
    add(ledger, parent=SHA_B, sha=SHA_C, decision="discard", val_bpb=0.95)
    assert ledger.best()["id"] == kept
    assert [row["id"] for row in ledger.experiments() if kept_row(row)] == [baseline, kept]
    assert ledger.bpb_of(SHA_B) == 0.9 and ledger.bpb_of(SHA_C) == 0.95
    ledger.add_event("revert", SHA_A, "ar revert")
    assert ledger.best()["id"] == baseline
    after = add(ledger, parent=SHA_A, sha=SHA_D, decision="keep", val_bpb=0.97)
    assert ledger.best()["id"] == after
    assert ledger.best(tip_sha=SHA_B)["id"] == kept
    assert ledger.row_for_sha(SHA_D[:7])["id"] == after
    with pytest.raises(ArError, match="too short"):
        ledger.row_for_sha("ddd")


def test_export_tsv_has_the_original_five_columns(ledger, tmp_path):
    add(ledger, kind="baseline", parent=None, sha=SHA_A, decision=None, val_bpb=0.9979,
        peak_vram_mb=45056)
    add(ledger, sha=SHA_B, decision="keep", val_bpb=0.9932, peak_vram_mb=45260.8,
        description="increase\tLR\nto 0.04")
    add(ledger, sha=SHA_C, decision="discard", val_bpb=1.005, peak_vram_mb=45056)
    add(ledger, sha=SHA_D, status="oom", decision="discard", val_bpb=None, peak_vram_mb=80000,
        description="double width")
    add(ledger, sha="e" * 40, status="crash", decision=None, val_bpb=None, description="typo")
    add(ledger, sha=None, status="invalid", decision=None, val_bpb=None)
    running = ledger.start_experiment("experiment", SHA_A, "still going", "random")
    ledger.update(running, sha="f" * 40, status="running")
    target = tmp_path / "results.tsv"
    assert ledger.export_tsv(target) == 5
    lines = target.read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert tuple(lines[0].split("\t")) == TSV_HEADER
    assert all(len(line.split("\t")) == 5 for line in lines)
    assert lines[1:] == [
        "aaaaaaa\t0.997900\t44.0\tkeep\ttry something",
        "bbbbbbb\t0.993200\t44.2\tkeep\tincrease LR to 0.04",
        "ccccccc\t1.005000\t44.0\tdiscard\ttry something",
        "ddddddd\t0.000000\t0.0\tcrash\tdouble width (oom)",
        "eeeeeee\t0.000000\t0.0\tcrash\ttypo",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


LOCK_HOLDER = """
    import sys, time
    from autoresearch_cli.lock import ExperimentLock
    lock = ExperimentLock(sys.argv[1], command="ar iterate")
    lock.acquire()
    print("held", flush=True)
    time.sleep(60)
"""

LOCK_CONTENDER = """
    import sys
    from autoresearch_cli.errors import BusyError
    from autoresearch_cli.lock import ExperimentLock
    try:
        with ExperimentLock(sys.argv[1], command="ar run"):
            print("acquired")
    except BusyError as exc:
        print("busy:", exc)
"""


def test_the_lock_refuses_a_second_holder_and_dies_with_a_killed_one(tmp_path):
    path = tmp_path / ".ar" / "experiment.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCK_HOLDER), str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        contender = [sys.executable, "-c", textwrap.dedent(LOCK_CONTENDER), str(path)]
        busy = subprocess.run(contender, capture_output=True, text=True, timeout=60)
        assert busy.stdout.strip() == (f"busy: another ar command (pid {holder.pid}: ar iterate)"
                                       " is running experiments in this workspace")
        with pytest.raises(BusyError, match=f"pid {holder.pid}"):
            ExperimentLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = subprocess.run(contender, capture_output=True, text=True, timeout=60)
    assert after.stdout.strip() == "acquired"
    with ExperimentLock(path, command="ar iterate") as lock:
        assert path.read_text() == f"{os.getpid()}\nar iterate\n"
        with pytest.raises(BusyError, match=f"pid {os.getpid()}: ar iterate"):
            ExperimentLock(path).acquire()
    assert lock._handle is None
    with ExperimentLock(path):
        pass


def test_concurrent_writers_wait_instead_of_failing(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    writer = """
        import sys
        from autoresearch_cli.ledger import Ledger
        ledger = Ledger(sys.argv[1])
        for n in range(20):
            ledger.record_llm_call(None, {"model": "m", "cost_usd": 0.01})
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer), str(path)])
             for _ in range(3)]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0]
    with Ledger(path) as ledger:
        assert ledger.total_cost().calls == 60


def test_a_ledger_locked_too_long_is_a_workspace_error(tmp_path, monkeypatch):
    import autoresearch_cli.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(WorkspaceError, match="database is locked"):
            ledger.add_event("note", None, "blocked")
        other.execute("ROLLBACK")
        other.close()
        ledger.add_event("note", None, "after")
        assert [event["detail"] for event in ledger.events()] == ["after"]


def test_scores_and_noise_by_slot_class(ledger):
    """A commit's score, and the baseline noise, counted on one slot class: like with like."""
    for value, slot_class in ((2.0, "cpu:2"), (2.2, "cpu:2"), (2.6, "cpu:1"), (1.8, None)):
        exp_id = add(ledger, kind="baseline", parent=SHA_A, sha=SHA_A, decision=None,
                     val_bpb=value)
        ledger.update(exp_id, slot_class=slot_class)
    assert ledger.bpb_of(SHA_A, "cpu:2") == pytest.approx(2.1)
    assert ledger.bpb_of(SHA_A, "cpu:1") == 2.6
    assert ledger.bpb_of(SHA_A, "cuda:H100") is None
    assert ledger.bpb_of(SHA_A) == pytest.approx(2.15)
    mean, std, runs = ledger.baseline_stats("cpu:1")  # its own runs and those of no class
    assert runs == 2 and mean == pytest.approx(2.2)
    assert ledger.baseline_stats()[2] == 4
