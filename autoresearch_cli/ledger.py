"""The ledger: every experiment, LLM call and branch move, one SQLite row each.

Rows are written as things happen and every write is its own committed transaction, so a
kill at any moment leaves a consistent database. The schema is a numbered list of
migrations applied on open (the version lives in PRAGMA user_version).

The best result is defined by branch moves, which the ledger records as events: a kept
experiment writes a `keep` event with its sha, `ar revert` writes a `revert` event. The
best row is the one evaluated at the sha of the latest such event (the first ok baseline
when there is none), which is the tip of the research branch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import statistics
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from autoresearch_cli.errors import ArError, WorkspaceError

LEDGER_ENV = "AR_LEDGER_PATH"
BUSY_TIMEOUT_S = 30.0
# SQLite failures caused by the machine (locks held too long, full or read-only disks).
ENVIRONMENT_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_READONLY",
                      "SQLITE_IOERR", "SQLITE_CANTOPEN")
PID_CLOCK_SLACK_S = 2.0  # process start times and started_at come from different clocks

# confirmation: another run (new seed) of a candidate the keep test could not decide yet;
# remeasure: another run of the best, so that its score is a mean and not one lucky draw.
KINDS = ("baseline", "experiment", "repair", "combination", "confirmation", "remeasure")
# disturbed: the run got well under its share of the machine; it is run again, never judged.
STATUSES = ("proposing", "running", "evaluating", "ok", "crash", "timeout", "oom", "invalid",
            "interrupted", "disturbed")
IN_FLIGHT = ("proposing", "running", "evaluating")
FAILED = ("crash", "timeout", "oom")  # the run trained and failed: the agent may repair it
DECISIONS = ("keep", "discard", None)

MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: the initial schema
        """CREATE TABLE experiments (
            id INTEGER PRIMARY KEY, kind TEXT NOT NULL, parent_sha TEXT, sha TEXT,
            branch TEXT, status TEXT NOT NULL, decision TEXT, description TEXT, agent TEXT,
            val_bpb REAL, holdout_bpb REAL, memory_gb REAL, training_seconds REAL,
            total_seconds REAL, num_steps INTEGER, num_params_M REAL, mfu_percent REAL,
            reason TEXT, result_json TEXT, cost_usd REAL, pid INTEGER, host TEXT,
            started_at TEXT NOT NULL, finished_at TEXT,
            repair_of INTEGER REFERENCES experiments(id))""",
        "CREATE INDEX experiments_sha ON experiments(sha)",
        "CREATE INDEX experiments_status ON experiments(status)",
        """CREATE TABLE llm_calls (
            id INTEGER PRIMARY KEY, experiment_id INTEGER REFERENCES experiments(id),
            model TEXT, prompt TEXT, reply TEXT, prompt_tokens INTEGER,
            completion_tokens INTEGER, cost_usd REAL, cost_note TEXT, latency_s REAL,
            error TEXT, attempt INTEGER, created_at TEXT NOT NULL)""",
        "CREATE INDEX llm_calls_experiment ON llm_calls(experiment_id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY, kind TEXT NOT NULL, sha TEXT, detail TEXT,
            created_at TEXT NOT NULL)""",
    ),
    (  # 2: which limit ended an LLM call, and the prompt tokens the provider read from cache
        "ALTER TABLE llm_calls ADD COLUMN ended_by TEXT",
        "ALTER TABLE llm_calls ADD COLUMN cached_prompt_tokens INTEGER",
    ),
    (  # 3: how the run's code was confined (sandbox/confine.py levels; "none" unconfined)
        "ALTER TABLE experiments ADD COLUMN isolation TEXT",
    ),
    (  # 4: the hardware a run got (workers.Slot.slot_class): only like is compared with like
        "ALTER TABLE experiments ADD COLUMN slot_class TEXT",
    ),
    (  # 5: the seed ar gave the run, its throughput and the share of its cores it got
        # (a disturbed run is set aside), and where it ran on a cluster (backend task id)
        "ALTER TABLE experiments ADD COLUMN seed INTEGER",
        "ALTER TABLE experiments ADD COLUMN tokens_per_s REAL",
        "ALTER TABLE experiments ADD COLUMN cpu_share REAL",
        "ALTER TABLE experiments ADD COLUMN backend_task TEXT",
        "ALTER TABLE experiments ADD COLUMN node TEXT",
        # the run this one repeats (a confirmation of a candidate, a disturbed run again),
        # and the keep test's evidence (keeprule.Judgement) on the row it decided
        "ALTER TABLE experiments ADD COLUMN again_of INTEGER REFERENCES experiments(id)",
        "ALTER TABLE experiments ADD COLUMN evidence TEXT",
    ),
]

# Columns `update` may set; id, pid, host and started_at belong to start_experiment.
UPDATABLE = (
    "kind", "parent_sha", "sha", "branch", "status", "decision", "description", "agent",
    "val_bpb", "holdout_bpb", "memory_gb", "training_seconds", "total_seconds", "num_steps",
    "num_params_M", "mfu_percent", "reason", "result_json", "cost_usd", "finished_at",
    "repair_of", "isolation", "slot_class", "seed", "tokens_per_s", "cpu_share", "backend_task",
    "node", "again_of", "evidence",
)
# result.json keys copied verbatim into columns of the same name.
RESULT_METRICS = ("val_bpb", "holdout_bpb", "training_seconds", "total_seconds", "num_steps",
                  "num_params_M", "mfu_percent", "isolation", "tokens_per_s", "cpu_share")
LLM_CALL_FIELDS = ("model", "prompt", "reply", "prompt_tokens", "completion_tokens", "cost_usd",
                   "cost_note", "latency_s", "error", "attempt", "ended_by",
                   "cached_prompt_tokens")
TSV_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")


class CostTotal(NamedTuple):
    """What the LLM calls cost: `usd` sums the priced calls; `unpriced` had no known cost."""

    usd: float
    calls: int
    unpriced: int


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


def failed(status: str | None) -> bool:
    """Whether a run trained and failed (crash, timeout, oom): a repair can follow."""
    return status in FAILED


def kept(row: dict[str, Any]) -> bool:
    """Whether an experiment row is on the research branch's record: an ok baseline or an
    ok experiment that was kept."""
    return row["status"] == "ok" and (row["decision"] == "keep" or row["kind"] == "baseline")


def mean_bpb_by_sha(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Each commit's val_bpb: the mean over its ok evaluations (baseline repeats)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row["sha"] and row["status"] == "ok" and row["val_bpb"] is not None:
            values.setdefault(row["sha"], []).append(row["val_bpb"])
    return {sha: statistics.fmean(bpbs) for sha, bpbs in values.items()}


def reference_row(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Of the rows that evaluated one sha, the one that speaks for it.

    An ok row beats a failed one, a kept row or baseline beats a discarded one, and among
    equals the earliest wins (repeated baseline runs of one commit resolve to the first).
    """
    def rank(row: dict[str, Any]) -> tuple[bool, bool, int]:
        return (row["status"] != "ok", not kept(row), row["id"])

    ranked = sorted(rows, key=rank)
    return ranked[0] if ranked else None


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


def _insert_event(db: sqlite3.Connection, kind: str, sha: str | None, detail: str | None) -> int:
    cursor = db.execute("INSERT INTO events (kind, sha, detail, created_at) VALUES (?, ?, ?, ?)",
                        (kind, sha, detail, now()))
    return int(cursor.lastrowid)


class Ledger:
    """One workspace's SQLite ledger. Every method that writes commits before it returns."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise WorkspaceError(f"cannot open the ledger {self.path}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        try:
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

    @classmethod
    def for_workspace(cls, workspace: Path) -> Ledger:
        return cls(ledger_path(workspace))

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
                (kind, parent_sha, branch, status, description, agent, os.getpid(),
                 socket.gethostname(), now(), repair_of))
            return int(cursor.lastrowid)

    def update(self, experiment_id: int, **fields: Any) -> None:
        """Set some columns of one experiment. A keep is recorded only through `finish`."""
        if fields.get("decision") == "keep":
            raise ValueError("record a keep with finish(), which also moves the best")
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
                            (*fields.values(), experiment_id))
        if cursor.rowcount == 0:
            raise ArError(f"no experiment #{experiment_id} in the ledger")

    def finish(self, experiment_id: int, status: str, decision: str | None,
               result: dict[str, Any] | None, **fields: Any) -> None:
        """Close an experiment: its final status, decision and the metrics of result.json.

        A keep needs an ok status, a val_bpb and a sha, and moves the best (a `keep` event
        is written in the same transaction). Extra columns (sha, reason, ...) may be given.
        """
        _check("status", status, STATUSES)
        values: dict[str, Any] = {"status": status, "decision": decision, "finished_at": now()}
        if result is not None:
            values.update({key: result.get(key) for key in RESULT_METRICS})
            values["memory_gb"] = memory_gb(result)
            values["reason"] = result.get("reason")
            values["result_json"] = json.dumps(result, sort_keys=True)
        values.update(fields)
        with self._transaction() as db:
            self._update(db, experiment_id, values)
            if decision == "keep":
                row = db.execute("SELECT * FROM experiments WHERE id = ?",
                                 (experiment_id,)).fetchone()
                if status != "ok" or row["val_bpb"] is None or not row["sha"]:
                    raise ValueError(f"experiment #{experiment_id} cannot be kept: it needs "
                                     "status ok, a val_bpb and a sha")
                _insert_event(db, "keep", row["sha"], f"experiment #{experiment_id}")

    def mark_interrupted(self) -> list[dict[str, Any]]:
        """Mark in-flight experiments whose process is gone as 'interrupted'; return them.

        Call it while holding the ExperimentLock. Rows of a live process on this host are
        left alone; a row from another host counts as gone, since flock guards one host.
        """
        with self._transaction() as db:
            rows = [dict(row) for row in db.execute(
                f"SELECT * FROM experiments WHERE status IN ({', '.join('?' * len(IN_FLIGHT))})"
                " ORDER BY id", IN_FLIGHT)]
            # A run on a cluster (a backend task id) may outlive ar: `ar iterate` picks it
            # up again or interrupts it (loop.Scheduler).
            gone = [row for row in rows if not row["backend_task"]
                    and not process_alive(row["pid"], row["host"], row["started_at"])]
            for row in gone:
                reason = (f"interrupted: ar process {row['pid']} on {row['host']} ended while "
                          f"the experiment was {row['status']}")
                db.execute("UPDATE experiments SET status = 'interrupted', reason = ? "
                           "WHERE id = ?", (reason, row["id"]))
                _insert_event(db, "interrupted", row["sha"], f"experiment #{row['id']}: {reason}")
                row.update(status="interrupted", reason=reason)
            return gone

    def experiments(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Experiments in the order they started (newest last); the last `limit` if given."""
        if limit is None:
            return self._rows("SELECT * FROM experiments ORDER BY id")
        return self._rows("SELECT * FROM (SELECT * FROM experiments ORDER BY id DESC LIMIT ?)"
                          " ORDER BY id", (max(limit, 0),))

    def get(self, experiment_id: int) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM experiments WHERE id = ?", (experiment_id,))
        if not rows:
            raise ArError(f"no experiment #{experiment_id} in the ledger")
        return rows[0]

    def bpb_of(self, sha: str, slot_class: str | None = None) -> float | None:
        """The val_bpb of one commit: the mean of its ok evaluations (those on `slot_class`
        when given), None without one."""
        if slot_class is None:
            rows = self._rows("SELECT sha, status, val_bpb FROM experiments WHERE sha = ?", (sha,))
        else:
            rows = self._rows("SELECT sha, status, val_bpb FROM experiments WHERE sha = ? AND "
                              "slot_class = ?", (sha, slot_class))
        return mean_bpb_by_sha(rows).get(sha)

    def runs_of(self, sha: str, slot_class: str | None = None,
                column: str = "val_bpb") -> list[float]:
        """`column` (val_bpb, tokens_per_s) of every ok run of one commit (on `slot_class`
        when given), oldest first. Disturbed runs are not ok and never count."""
        if column not in ("val_bpb", "tokens_per_s"):
            raise ValueError(f"runs_of reads val_bpb or tokens_per_s, not {column!r}")
        sql = f"SELECT {column} FROM experiments WHERE sha = ? AND status = 'ok' AND {column} IS NOT NULL"
        params: tuple[Any, ...] = (sha,)
        if slot_class is not None:
            sql += " AND slot_class = ?"
            params += (slot_class,)
        return [row[column] for row in self._rows(sql + " ORDER BY id", params)]

    def noise_groups(self, slot_class: str | None = None) -> list[list[float]]:
        """val_bpb of the ok runs of each commit run more than once (on `slot_class`): the
        same code with different seeds, from which keeprule.noise() measures the noise."""
        sql = "SELECT sha, val_bpb FROM experiments WHERE status = 'ok' AND val_bpb IS NOT NULL AND sha IS NOT NULL"
        params: tuple[Any, ...] = ()
        if slot_class is not None:
            sql += " AND slot_class = ?"
            params = (slot_class,)
        groups: dict[str, list[float]] = {}
        for row in self._rows(sql + " ORDER BY id", params):
            groups.setdefault(row["sha"], []).append(row["val_bpb"])
        return [runs for runs in groups.values() if len(runs) >= 2]

    def settle(self, experiment_id: int, decision: str, evidence: str | None = None) -> None:
        """The decision on a finished ok experiment that waited for confirmation runs; a
        keep moves the best (a `keep` event) in the same transaction."""
        _check("decision", decision, ("keep", "discard"))
        with self._transaction() as db:
            row = db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
            if row is None or row["status"] != "ok" or row["val_bpb"] is None or not row["sha"]:
                raise ValueError(f"experiment #{experiment_id} cannot be decided: it needs "
                                 "status ok, a val_bpb and a sha")
            self._update(db, experiment_id, {"decision": decision, "evidence": evidence})
            if decision == "keep":
                _insert_event(db, "keep", row["sha"], f"experiment #{experiment_id}")

    def row_for_sha(self, sha: str) -> dict[str, Any] | None:
        """The row that speaks for a commit (a full sha or a prefix of 7+ characters)."""
        if len(sha) < 7:
            raise ArError(f"commit {sha!r} is too short: give at least 7 characters")
        rows = self._rows("SELECT * FROM experiments WHERE substr(sha, 1, ?) = ?",
                          (len(sha), sha.lower()))
        if len({row["sha"] for row in rows}) > 1:
            raise ArError(f"commit {sha!r} is ambiguous in the ledger")
        return reference_row(rows)

    def best_sha(self) -> str | None:
        """The sha of the latest branch move (keep or revert), None before any."""
        rows = self._rows("SELECT sha FROM events WHERE kind IN ('keep', 'revert') "
                          "ORDER BY id DESC LIMIT 1")
        return rows[0]["sha"] if rows else None

    def best(self, tip_sha: str | None = None) -> dict[str, Any] | None:
        """The ok row at the tip of the branch: `tip_sha` when given, else the latest keep or
        revert, else the first ok baseline. None when that commit has no ok evaluation."""
        sha = tip_sha or self.best_sha()
        if sha is None:
            rows = self._rows("SELECT * FROM experiments WHERE kind = 'baseline' AND "
                              "status = 'ok' AND val_bpb IS NOT NULL ORDER BY id LIMIT 1")
            return rows[0] if rows else None
        row = self.row_for_sha(sha)
        return row if row is not None and row["status"] == "ok" else None

    def baseline_stats(self, slot_class: str | None = None) -> tuple[float | None, float | None, int]:
        """(mean, sample std, n) of val_bpb over ok baseline runs (on `slot_class` or of no
        recorded class, when given); std is None below n=2."""
        sql = ("SELECT val_bpb FROM experiments WHERE kind = 'baseline' AND status = 'ok' "
               "AND val_bpb IS NOT NULL")
        params: tuple[Any, ...] = ()
        if slot_class is not None:
            sql += " AND (slot_class = ? OR slot_class IS NULL)"
            params = (slot_class,)
        values = [row["val_bpb"] for row in self._rows(sql + " ORDER BY id", params)]
        if not values:
            return None, None, 0
        std = statistics.stdev(values) if len(values) >= 2 else None
        return statistics.fmean(values), std, len(values)

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
                         "COUNT(*) - COUNT(cost_usd) AS unpriced FROM llm_calls")[0]
        return CostTotal(float(row["usd"]), int(row["calls"]), int(row["unpriced"]))

    def add_event(self, kind: str, sha: str | None, detail: str | None = None) -> int:
        """Record an event; a `revert` to a sha makes that commit's row the best."""
        with self._transaction() as db:
            return _insert_event(db, kind, sha, detail)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            return self._rows("SELECT * FROM events ORDER BY id")
        return self._rows("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,))

    # --- export ----------------------------------------------------------------------

    def export_tsv(self, path: str | os.PathLike[str]) -> int:
        """Write results.tsv in the original's five columns, atomically; returns the row count.

        Exported are the experiments that trained a commit to a verdict: ok rows as keep
        (baselines and kept) or discard; crash, timeout and oom rows as crash, with
        0.000000 and 0.0 as the original, the cause noted in the description. Invalid
        proposals never ran and interrupted or in-flight runs have no verdict: left out.
        """
        lines = ["\t".join(TSV_HEADER)]
        for row in self.experiments():
            line = tsv_line(row)
            if line is not None:
                lines.append(line)
        target = Path(path)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
                handle.write("\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise WorkspaceError(f"cannot write {target}: {exc}") from exc
        return len(lines) - 1


def tsv_line(row: dict[str, Any]) -> str | None:
    """One results.tsv line for an experiment row, None when it is not exported."""
    if not row["sha"] or not (row["status"] == "ok" or failed(row["status"])):
        return None
    description = " ".join((row["description"] or "").split())
    if row["status"] == "ok" and row["val_bpb"] is not None:
        status = "keep" if kept(row) else "discard"
        val_bpb, memory = row["val_bpb"], row["memory_gb"] or 0.0
    else:
        status, val_bpb, memory = "crash", 0.0, 0.0
        if row["status"] != "crash":
            description = f"{description} ({row['status']})".strip()
    return f"{row['sha'][:7]}\t{val_bpb:.6f}\t{memory:.1f}\t{status}\t{description}"
