import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from autoresearch_cli.agents import CallRecord
from autoresearch_cli.doors.ledger import (
    Ledger,
    ledger_path,
    now,
    process_alive,
)
from autoresearch_cli.doors.lock import ExperimentLock
from autoresearch_cli.doors.records import Run
from autoresearch_cli.doors.schema import MIGRATIONS
from autoresearch_cli.errors import ArError, BusyError, WorkspaceError

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
    ledger.finish(experiment_id, status, {"status": status, "val_bpb": val_bpb, **result})
    if decision is not None:
        ledger.settle(experiment_id, decision)
    return experiment_id


def test_migrations_apply_on_a_fresh_database_and_reopen_is_idempotent(tmp_path):
    path = tmp_path / "deep" / "ledger.db"
    with Ledger(path) as first:
        assert first.schema_version == len(MIGRATIONS)
        experiment_id = first.start_experiment("baseline", None, "baseline", "none")
    with Ledger(path) as again:
        assert again.schema_version == len(MIGRATIONS)
        assert [run.id for run in again.runs()] == [experiment_id]
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
    run = ledger.run(gpu)
    assert isinstance(run, Run)
    assert (run.memory_gb, run.holdout_bpb, run.num_steps) == (2.0, 1.01, 950)
    assert run.status == "ok" and run.decision == "discard" and run.finished_at
    assert run.pid == os.getpid() and run.host == socket.gethostname()
    assert run.result["val_bpb"] == 0.99 and run.scored
    assert ledger.run(cpu).memory_gb == 1.5


def test_update_rejects_unknown_columns_ids_and_values(ledger):
    experiment_id = ledger.start_experiment("experiment", SHA_A, "x", "random")
    with pytest.raises(ValueError, match="pid"):
        ledger.update(experiment_id, pid=1)
    with pytest.raises(ValueError, match="status"):
        ledger.update(experiment_id, status="great")
    with pytest.raises(ValueError, match="settle"):
        ledger.update(experiment_id, decision="keep")
    with pytest.raises(ArError, match="#999"):
        ledger.update(999, status="running")
    with pytest.raises(ArError, match="#999"):
        ledger.run(999)


def test_a_keep_needs_a_scored_run_and_a_failed_keep_writes_nothing(ledger):
    experiment_id = ledger.start_experiment("experiment", SHA_A, "x", "random")
    ledger.finish(experiment_id, "ok", {"status": "ok", "val_bpb": 0.9})
    with pytest.raises(ValueError, match="cannot be decided"):
        ledger.settle(experiment_id, "keep")  # no sha
    run = ledger.run(experiment_id)
    assert run.status == "ok" and run.decision is None and not run.scored
    assert ledger.events() == []
    ledger.update(experiment_id, sha=SHA_B)
    ledger.settle(experiment_id, "keep", '{"p": 0.01}', reason="kept: clear win")
    run = ledger.run(experiment_id)
    assert run.decision == "keep" and run.judgement == {"p": 0.01} and run.reason == "kept: clear win"
    assert [(e.kind, e.sha) for e in ledger.events()] == [("keep", SHA_B)]


def test_experiments_are_newest_last_and_limited(ledger):
    ids = [ledger.start_experiment("experiment", SHA_A, f"e{n}", "random") for n in range(5)]
    assert [run.id for run in ledger.runs()] == ids
    assert [run.id for run in ledger.runs(limit=2)] == ids[-2:]
    assert ledger.runs(limit=0) == []


def test_a_reader_opens_the_ledger_read_only_beside_a_writer(tmp_path):
    path = tmp_path / "ledger.db"
    with pytest.raises(WorkspaceError, match="no ledger"):
        Ledger(path, read_only=True)
    with Ledger(path) as writer:
        first = writer.start_experiment("baseline", None, "baseline", None)
        with Ledger(path, read_only=True) as reader:
            assert [run.id for run in reader.runs()] == [first]
            second = writer.start_experiment("experiment", SHA_A, "while reading", "random")
            assert [run.id for run in reader.runs()] == [first, second]  # sees new rows
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader._db.execute("DELETE FROM experiments")
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.execute("PRAGMA user_version = 1")
    db.close()
    with pytest.raises(WorkspaceError, match="older than this ar"):
        Ledger(old, read_only=True)


KILLED_WRITER = """
    import os, sys
    from autoresearch_cli.doors.ledger import Ledger
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
        assert [run.id for run in interrupted] == [experiment_id]
        assert interrupted[0].sha == SHA_B and interrupted[0].status == "interrupted"
        run = ledger.run(experiment_id)
        assert run.status == "interrupted" and "ended while" in run.reason
        assert ledger.run(mine).status == "running"
        assert [event.kind for event in ledger.events()] == ["interrupted"]
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
    assert ledger.run(experiment_id).cost_usd == pytest.approx(0.25)
    calls = ledger.llm_calls(experiment_id)
    assert calls[0]["prompt"] == '[{"role": "user"}]' and calls[1]["cost_usd"] is None
    with pytest.raises(ValueError, match="messages"):
        ledger.record_llm_call(None, {"messages": []})


LOCK_HOLDER = """
    import sys, time
    from autoresearch_cli.doors.lock import ExperimentLock
    lock = ExperimentLock(sys.argv[1], command="ar iterate")
    lock.acquire()
    print("held", flush=True)
    time.sleep(60)
"""

LOCK_CONTENDER = """
    import sys
    from autoresearch_cli.errors import BusyError
    from autoresearch_cli.doors.lock import ExperimentLock
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
        from autoresearch_cli.doors.ledger import Ledger
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
    import autoresearch_cli.doors.ledger as ledger_module

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
        assert [event.detail for event in ledger.events()] == ["after"]
