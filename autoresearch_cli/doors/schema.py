"""The ledger's schema: a numbered list of migrations, applied in order when a ledger
opens (doors/ledger.py; the version lives in PRAGMA user_version), and the columns each
write may set. A migration, once released, never changes: a new column is a new one.
"""

from __future__ import annotations

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
    (  # 6: which of the workspace's seeds a run got: runs of two commits on the same seed
        # index share their initialisation and data order (paired evidence)
        "ALTER TABLE experiments ADD COLUMN seed_index INTEGER",
    ),
]

# Columns `update` may set; id, pid, host and started_at belong to start_experiment.
UPDATABLE = (
    "kind", "parent_sha", "sha", "branch", "status", "decision", "description", "agent",
    "val_bpb", "holdout_bpb", "memory_gb", "training_seconds", "total_seconds", "num_steps",
    "num_params_M", "mfu_percent", "reason", "result_json", "cost_usd", "finished_at",
    "repair_of", "isolation", "slot_class", "seed", "tokens_per_s", "cpu_share", "backend_task",
    "node", "again_of", "evidence", "seed_index",
)
# result.json keys copied verbatim into columns of the same name.
RESULT_METRICS = ("val_bpb", "holdout_bpb", "training_seconds", "total_seconds", "num_steps",
                  "num_params_M", "mfu_percent", "isolation", "tokens_per_s", "cpu_share")
LLM_CALL_FIELDS = ("model", "prompt", "reply", "prompt_tokens", "completion_tokens", "cost_usd",
                   "cost_note", "latency_s", "error", "attempt", "ended_by",
                   "cached_prompt_tokens")
