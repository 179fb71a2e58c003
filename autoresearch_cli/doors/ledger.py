"""The ledger: every experiment, LLM call and branch move, one SQLite row each.

Rows are written as things happen and every write is its own committed transaction, so a
kill at any moment leaves a consistent database. The schema (doors/schema.py) is a
numbered list of migrations applied on open (the version in PRAGMA user_version). Reads
come back typed (doors/records.py); what the rows mean for research (kept, failed, the
best) is research/evidence.py's to say. A second reader (`ar log` in another terminal, a live
page) opens the ledger read-only and never blocks the writer (WAL).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from autoresearch_cli.doors.records import (
    DECISIONS,
    IN_FLIGHT,
    KINDS,
    STATUSES,
    Event,
    Run,
)
from autoresearch_cli.doors.schema import (
    LLM_CALL_FIELDS,
    MIGRATIONS,
    RESULT_METRICS,
    UPDATABLE,
)
from autoresearch_cli.doors.text import unicode_safe
from autoresearch_cli.errors import ArError, WorkspaceError

LEDGER_ENV = "AR_LEDGER_PATH"
BUSY_TIMEOUT_S = 30.0
# SQLite failures caused by the machine (locks held too long, full or read-only disks).
ENVIRONMENT_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_READONLY",
                      "SQLITE_IOERR", "SQLITE_CANTOPEN")
PID_CLOCK_SLACK_S = 2.0  # process start times and started_at come from different clocks

class CostTotal(NamedTuple):
    """What the LLM calls cost: `usd` sums the priced calls; `unpriced` had no known cost."""

    usd: float
    calls: int
    unpriced: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


def now() -> str:
    """The current time as ISO 8601 UTC, to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ledger_path(workspace: Path) -> Path:
    """The ledger of a workspace: $AR_LEDGER_PATH when set, else WS/.ar/ledger.db."""
    override = os.environ.get(LEDGER_ENV)
    return Path(override) if override else Path(workspace) / ".ar" / "ledger.db"


def memory_gb(result: dict[str, Any]) -> float | None:
    """Peak memory in GB: GPU memory when the run used a GPU, else the process's RSS."""
    for key in ("peak_vram_mb", "peak_rss_mb"):
        value = result.get(key)
        if value:
            return float(value) / 1024
    return None


def _check(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, not {value!r}")


def _started_epoch(started_at: str) -> float:
    return datetime.strptime(started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def process_alive(pid: int | None, host: str | None, started_at: str) -> bool:
    """Whether the process that started a row still runs (on this host, not a reused pid)."""
    if pid is None or host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # A process created after the row was started holds a recycled pid.
        return process.create_time() <= _started_epoch(started_at) + PID_CLOCK_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def storable(value: Any) -> Any:
    """A value SQLite can store: text with lone surrogates (a model's reply may hold them)
    gets them replaced; everything else as it is."""
    return unicode_safe(value) if isinstance(value, str) else value


def _insert_event(db: sqlite3.Connection, kind: str, sha: str | None, detail: str | None) -> int:
    cursor = db.execute("INSERT INTO events (kind, sha, detail, created_at) VALUES (?, ?, ?, ?)",
                        (kind, sha, storable(detail), now()))
    return int(cursor.lastrowid)


class Ledger:
    """One workspace's SQLite ledger. Every method that writes commits before it returns.

    `read_only`: for a reader beside a running ar (`ar log`, a live page): it never takes
    a write lock, never migrates, and refuses a ledger that does not exist yet."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.writes = 0  # transactions this connection committed: a cache key for readers
        self._lock = threading.RLock()
        try:
            if read_only:
                if not self.path.is_file():
                    raise WorkspaceError(f"no ledger at {self.path} yet: run `ar baseline` or "
                                         "`ar iterate` first")
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S,
                                           isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise WorkspaceError(f"cannot open the ledger {self.path}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        try:
            if read_only:
                self._check_readable()
            else:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._migrate()
        except WorkspaceError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise WorkspaceError(f"cannot use the ledger {self.path}: {exc}") from exc

    def _check_readable(self) -> None:
        version = self.schema_version
        if version != len(MIGRATIONS):
            newer = "newer than this ar knows: upgrade ar" if version > len(MIGRATIONS) else (
                "older than this ar: any ar command that runs experiments upgrades it")
            raise WorkspaceError(f"{self.path} has schema version {version}, {newer}")

    @classmethod
    def for_workspace(cls, workspace: Path, read_only: bool = False) -> Ledger:
        return cls(ledger_path(workspace), read_only=read_only)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def data_version(self) -> int:
        """SQLite's counter of commits made by *other* connections: if it moved while a job
        ran, something besides this ar wrote the ledger."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a locked or unwritable database becomes a WorkspaceError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                self.writes += 1
            except sqlite3.OperationalError as exc:
                if not getattr(exc, "sqlite_errorname", "").startswith(ENVIRONMENT_ERRORS):
                    raise
                raise WorkspaceError(f"cannot write the ledger {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        if self.schema_version == len(MIGRATIONS):
            return
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise WorkspaceError(
                    f"{self.path} has schema version {version}, newer than this ar knows "
                    f"({len(MIGRATIONS)}): upgrade ar")
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, tuple(params))]

    # --- experiments -----------------------------------------------------------------

    def start_experiment(self, kind: str, parent_sha: str | None, description: str | None,
                         agent: str | None, repair_of: int | None = None,
                         status: str = "proposing", branch: str | None = None) -> int:
        """Record a new experiment owned by this process; returns its id."""
        _check("kind", kind, KINDS)
        _check("status", status, IN_FLIGHT)
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO experiments (kind, parent_sha, branch, status, description, agent,"
                " pid, host, started_at, repair_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, parent_sha, branch, status, storable(description), agent, os.getpid(),
                 socket.gethostname(), now(), repair_of))
            return int(cursor.lastrowid)

    def update(self, experiment_id: int, **fields: Any) -> None:
        """Set some columns of one experiment. A keep is recorded only through `settle`."""
        if fields.get("decision") == "keep":
            raise ValueError("record a keep with settle(), which also moves the best")
        with self._transaction() as db:
            self._update(db, experiment_id, fields)

    def _update(self, db: sqlite3.Connection, experiment_id: int, fields: dict[str, Any]) -> None:
        unknown = sorted(set(fields) - set(UPDATABLE))
        if unknown:
            raise ValueError(f"not updatable experiment columns: {', '.join(unknown)}")
        if "status" in fields:
            _check("status", fields["status"], STATUSES)
        if "decision" in fields:
            _check("decision", fields["decision"], DECISIONS)
        if "kind" in fields:
            _check("kind", fields["kind"], KINDS)
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        cursor = db.execute(f"UPDATE experiments SET {assignments} WHERE id = ?",
                            (*map(storable, fields.values()), experiment_id))
        if cursor.rowcount == 0:
            raise ArError(f"no experiment #{experiment_id} in the ledger")

    def finish(self, experiment_id: int, status: str, result: dict[str, Any] | None,
               **fields: Any) -> None:
        """Close an experiment: its final status and the metrics of result.json. Extra
        columns (sha, reason, ...) may be given. Decisions come with settle()."""
        _check("status", status, STATUSES)
        values: dict[str, Any] = {"status": status, "finished_at": now()}
        if result is not None:
            values.update({key: result.get(key) for key in RESULT_METRICS})
            values["memory_gb"] = memory_gb(result)
            values["reason"] = result.get("reason")
            values["result_json"] = json.dumps(result, sort_keys=True)
        values.update(fields)
        with self._transaction() as db:
            self._update(db, experiment_id, values)

    def mark_interrupted(self) -> list[Run]:
        """Mark in-flight experiments whose process is gone as 'interrupted'; return them.

        Call it while holding the ExperimentLock. Rows of a live process on this host are
        left alone; a row from another host counts as gone, since flock guards one host.
        """
        with self._transaction() as db:
            rows = [Run.from_row(row) for row in db.execute(
                f"SELECT * FROM experiments WHERE status IN ({', '.join('?' * len(IN_FLIGHT))})"
                " ORDER BY id", IN_FLIGHT)]
            # A run on a cluster (a backend task id) may outlive ar: `ar iterate` picks it
            # up again or interrupts it (research/scheduler.py).
            gone = [run for run in rows if not run.backend_task
                    and not process_alive(run.pid, run.host, run.started_at)]
            marked = []
            for run in gone:
                reason = (f"interrupted: ar process {run.pid} on {run.host} ended while "
                          f"the experiment was {run.status}")
                db.execute("UPDATE experiments SET status = 'interrupted', reason = ? "
                           "WHERE id = ?", (reason, run.id))
                _insert_event(db, "interrupted", run.sha, f"experiment #{run.id}: {reason}")
                marked.append(dataclasses.replace(run, status="interrupted", reason=reason))
            return marked

    def runs(self, limit: int | None = None) -> list[Run]:
        """Experiments in the order they started (newest last); the last `limit` if given."""
        if limit is None:
            rows = self._rows("SELECT * FROM experiments ORDER BY id")
        else:
            rows = self._rows("SELECT * FROM (SELECT * FROM experiments ORDER BY id DESC "
                              "LIMIT ?) ORDER BY id", (max(limit, 0),))
        return [Run.from_row(row) for row in rows]

    def run(self, experiment_id: int) -> Run:
        rows = self._rows("SELECT * FROM experiments WHERE id = ?", (experiment_id,))
        if not rows:
            raise ArError(f"no experiment #{experiment_id} in the ledger")
        return Run.from_row(rows[0])

    def settle(self, experiment_id: int, decision: str, evidence: str | None = None,
               reason: str | None = None) -> None:
        """The decision on a finished ok experiment (its own first run, or confirmation
        runs, decided it); a keep moves the best (a `keep` event) in the same transaction."""
        _check("decision", decision, ("keep", "discard"))
        with self._transaction() as db:
            row = db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
            if row is None or row["status"] != "ok" or row["val_bpb"] is None or not row["sha"]:
                raise ValueError(f"experiment #{experiment_id} cannot be decided: it needs "
                                 "status ok, a val_bpb and a sha")
            fields = {"decision": decision, "evidence": evidence}
            if reason is not None:
                fields["reason"] = reason
            self._update(db, experiment_id, fields)
            if decision == "keep":
                _insert_event(db, "keep", row["sha"], f"experiment #{experiment_id}")

    # --- LLM calls and events --------------------------------------------------------

    def record_llm_call(self, experiment_id: int | None, record: Any) -> int:
        """Store one LLM call (a dict or dataclass with LLM_CALL_FIELDS) and add its cost to
        its experiment's cost_usd."""
        if dataclasses.is_dataclass(record):
            record = dataclasses.asdict(record)
        unknown = sorted(set(record) - set(LLM_CALL_FIELDS))
        if unknown:
            raise ValueError(f"unknown LLM call fields: {', '.join(unknown)}")
        values = {key: record.get(key) for key in LLM_CALL_FIELDS}
        for key in ("prompt", "reply"):
            if values[key] is not None and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        values = {key: storable(value) for key, value in values.items()}
        with self._transaction() as db:
            cursor = db.execute(
                f"INSERT INTO llm_calls (experiment_id, {', '.join(LLM_CALL_FIELDS)}, created_at)"
                f" VALUES (?, {', '.join('?' * len(LLM_CALL_FIELDS))}, ?)",
                (experiment_id, *values.values(), now()))
            if experiment_id is not None:
                db.execute("UPDATE experiments SET cost_usd = (SELECT SUM(cost_usd) FROM "
                           "llm_calls WHERE experiment_id = ?) WHERE id = ?",
                           (experiment_id, experiment_id))
            return int(cursor.lastrowid)

    def llm_calls(self, experiment_id: int | None = None) -> list[dict[str, Any]]:
        if experiment_id is None:
            return self._rows("SELECT * FROM llm_calls ORDER BY id")
        return self._rows("SELECT * FROM llm_calls WHERE experiment_id = ? ORDER BY id",
                          (experiment_id,))

    def total_cost(self) -> CostTotal:
        row = self._rows("SELECT COALESCE(SUM(cost_usd), 0.0) AS usd, COUNT(*) AS calls, "
                         "COUNT(*) - COUNT(cost_usd) AS unpriced, "
                         "COALESCE(SUM(prompt_tokens), 0) AS prompt, "
                         "COALESCE(SUM(completion_tokens), 0) AS completion FROM llm_calls")[0]
        return CostTotal(float(row["usd"]), int(row["calls"]), int(row["unpriced"]),
                         int(row["prompt"]), int(row["completion"]))

    def add_event(self, kind: str, sha: str | None, detail: str | None = None) -> int:
        """Record an event; a `revert` or `rejudged` to a sha makes that commit the best."""
        with self._transaction() as db:
            return _insert_event(db, kind, sha, detail)

    def events(self, kind: str | None = None) -> list[Event]:
        if kind is None:
            rows = self._rows("SELECT * FROM events ORDER BY id")
        else:
            rows = self._rows("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,))
        return [Event.from_row(row) for row in rows]
