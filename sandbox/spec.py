"""What the sandbox is asked to run, and what it answers: typed, and serializable as JSON.

An ExperimentSpec names the commit's files, the data, the limits, the device and the
seed; sandbox.experiment.run_experiment(spec) trains, scores and returns an
ExperimentResult. Both round-trip through JSON, so a backend can ship a spec to another
process or machine and the result back, and nothing here knows about ar's workspace.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RESULT_STATUSES = ("ok", "crash", "timeout", "oom", "invalid")


@dataclass(frozen=True)
class JobLimits:
    max_rss_mb: float = 8192  # the whole process tree
    max_vram_mb: float = 0  # 0: no cap beyond the device
    max_file_mb: float = 2048  # the largest file a job may write
    max_open_files: int = 4096
    network: bool = False  # False: no network, loopback of the host included


@dataclass(frozen=True)
class ExperimentSpec:
    code_dir: str  # the commit's files: train.py, prepare.py, ar.toml, program.md
    run_dir: str  # logs, out/ (weights) and result.json are written here
    data_dir: str  # from `ar prepare`: the job reads train.bin and the tokenizer only
    time_budget: float  # training seconds
    startup_allowance: float  # on top of the budget before the hard kill
    eval_tokens: int  # tokens the scorer scores in each of val and holdout
    seq_len: int
    eval_timeout: float  # seconds the whole evaluation may take
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # handed to the job as AR_SEED
    limits: JobLimits = field(default_factory=JobLimits)
    confine: bool = True  # False only where the user allowed unconfined runs
    python: str = sys.executable

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExperimentSpec:
        raw = json.loads(text)
        raw["limits"] = JobLimits(**raw.get("limits", {}))
        return cls(**raw)


@dataclass
class ExperimentResult:
    """result.json: every number comes from ar's clock, the sandbox's monitors or the
    trusted scorer; train.py's own summary only gives steps, MFU and tokens."""

    status: str = "invalid"  # one of RESULT_STATUSES
    reason: str | None = None
    val_bpb: float | None = None
    holdout_bpb: float | None = None
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_vram_mb: float | None = None
    gpu_util_percent: float | None = None
    cpu_share: float | None = None  # of its cores' time, what other processes left the job
    tokens_per_s: float | None = None  # training throughput (tokens from train.py's summary)
    mfu_percent: float | None = None
    num_steps: float | None = None
    num_params_M: float | None = None
    total_tokens_M: float | None = None
    depth: float | None = None
    eval_tokens: int | None = None
    eval_seconds: float | None = None
    eval_timing: dict[str, float] | None = None  # the scorer's: ready (fixed), scoring (batches)
    eval_launch: str | None = None  # how the scorer started: "warm", "cold", "cold: why"
    eval_note: str | None = None
    twin_rows: int | None = None  # rows the scorer ran for its probes alone
    # the chance that the probes catch a model looking ahead at k positions per row, by k
    probe_power: dict[str, float] | None = None
    causality_max_diff: float | None = None
    network_isolated: bool | None = None
    isolation: str | None = None  # how the training job was confined
    isolation_note: str | None = None
    worker_isolation: str | None = None  # how the model workers of the scorer were confined
    cpu: dict[str, Any] | None = None  # threads and precision the job was given
    device: str | None = None
    seed: int | None = None
    log_tail: str | None = None
    # where the wall time went, on ar's clock: plan, start, warmup, train, save, score, other
    # (experiment.py's _timing; the job's phases as it reported them: sandbox/phases.py)
    timing: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentResult:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})
