"""One experiment run: train.py confined in the sandbox, then the trusted scorer, then result.json.

    result = run_experiment(spec)      # spec: sandbox.spec.ExperimentSpec

The training job may read its code, train.bin and the tokenizer, and write only its
output directory and a private tmp; it cannot reach the network, the evaluation splits,
the ledger, the repository or the user's files (sandbox/confine.py). The scorer
(sandbox/evaluate.py) is trusted: it never imports train.py, starts from an environment
and a private directory of its own (nothing the job set or wrote: scorer_env), and runs
the model in confined workers of its own. Every number in result.json comes from this process's clock,
the sandbox's monitors or the scorer; what train.py prints is only used for figures it
alone can know (steps, MFU, tokens), and never for val_bpb.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandbox import compilecache, confine, evalbatch, phases, warm
from sandbox.cpu import (
    ISA_ENV_VARS,
    QUIET_WAIT_POLICY,
    CpuPlan,
    available_cores,
    plan_cpu,
    thread_env,
)
from sandbox.errors import InvalidModel
from sandbox.evaluate import data_shape
from sandbox.files import write_json_atomic
from sandbox.runner import Limits, RunResult, job_env, run
from sandbox.spec import ExperimentResult, ExperimentSpec

SUMMARY_KEYS = ("num_steps", "mfu_percent", "total_tokens_M", "num_params_M", "depth")
SUMMARY_LINE = re.compile(r"^([a-zA-Z_]+):\s+(-?[0-9.]+)\s*$")
EVAL_DATA_FILES = ("val.bin", "holdout.bin", "token_bytes.npy", "manifest.json")
TRAINING_DATA_FILES = ("train.bin", "tokenizer.pkl")  # all the training job may read of the data
WARM_WAIT_S = 60.0  # for a warm server still starting (it takes what a cold start takes)
# A CPU plan is reused, without sampling the load again (0.5 s), this long after a run in
# this process that had its cores to itself all along (share.py) on all of them.
QUIET_REUSE_S = 120.0
QUIET_SHARE = 0.95
_quiet: dict[str, tuple[float, CpuPlan]] = {}  # device -> (when, plan) of such a run


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch  # the runner's own process already pays this import

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def parse_summary(log_text: str) -> dict[str, float]:
    """The `key: value` lines after the last `---` line of a training log."""
    _, sep, tail = log_text.rpartition("\n---\n")
    figures: dict[str, float] = {}
    if not sep:
        return figures
    for line in tail.splitlines():
        match = SUMMARY_LINE.match(line.strip())
        if match and match.group(1) in SUMMARY_KEYS:
            figures[match.group(1)] = float(match.group(2))
    return figures


def eval_data_digest(data_dir: Path) -> dict[str, str]:
    """Hashes of the files the scorer reads; a change during the run is caught."""
    digests = {}
    for name in EVAL_DATA_FILES:
        path = data_dir / name
        if path.exists():
            with path.open("rb") as handle:
                digests[name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def make_eval_data_read_only(data_dir: Path) -> None:
    """Where the kernel cannot confine the job, stops a non-root job rewriting the data."""
    for name in EVAL_DATA_FILES:
        path = data_dir / name
        if path.exists() and path.stat().st_mode & 0o222:
            path.chmod(0o444)


def _limits(spec: ExperimentSpec, wall_seconds: float) -> Limits:
    box = spec.limits
    return Limits(wall_seconds=wall_seconds, max_rss_mb=box.max_rss_mb,
                  max_vram_mb=box.max_vram_mb, max_file_mb=box.max_file_mb,
                  max_open_files=box.max_open_files, network=box.network)  # fmt: skip


def _read_tail(path: Path, max_bytes: int = 256 * 1024) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _failure(train: RunResult, budget_kill: float) -> tuple[str, str]:
    last = next((ln for ln in reversed(train.log_tail.splitlines()) if ln.strip()), "")
    if train.reason == "timeout":
        return "timeout", f"killed at the hard limit of {budget_kill:.0f} s"
    if train.reason in ("rss", "vram"):
        which = "memory" if train.reason == "rss" else "GPU memory"
        return "oom", f"killed for exceeding the {which} cap"
    if train.reason == "disk":
        return "crash", "killed: the job was filling the disk"
    if train.reason == "procs":
        return "crash", "killed: the job started too many processes"
    if train.reason == "signal":
        return "crash", f"train.py died from a signal ({train.exit_code}): {last[:200]}"
    return "crash", f"train.py exited with code {train.exit_code}: {last[:200]}"


def run_experiment(spec: ExperimentSpec, on_progress: Callable | None = None) -> ExperimentResult:
    """Train spec.code_dir's train.py, score it, write and return run_dir/result.json."""
    begun = time.monotonic()
    code_dir, run_dir, data_dir = Path(spec.code_dir), Path(spec.run_dir), Path(spec.data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir, tmp_dir = run_dir / "out", run_dir / "tmp"
    out_dir.mkdir(exist_ok=True)
    tmp_dir.mkdir(exist_ok=True)
    device = resolve_device(spec.device)
    _own_server_settled()  # before the load is sampled: its imports are not competition
    settled = time.monotonic()
    rows = scorer_rows(spec, device)  # measured on a machine's first run (seconds), then cached
    cpu = _cpu_plan(device)  # after it: the load sample sees the machine as the job will
    planned = time.monotonic()
    hard_kill = spec.time_budget + spec.startup_allowance
    env = job_env({
        "AR_DATA_DIR": str(data_dir.resolve()), "AR_OUTPUT_DIR": str(out_dir.resolve()),
        "AR_TIME_BUDGET": str(spec.time_budget), "AR_DEVICE": device, "AR_SEED": str(spec.seed),
        "HOME": str(tmp_dir.resolve()), "TMPDIR": str(tmp_dir.resolve()),
        **compilecache.cache_env((tmp_dir / "compile").resolve()), **cpu.env,
    })  # fmt: skip
    runtime = _warm_runtime(device, env)
    served = time.monotonic()
    result = ExperimentResult(device=device, seed=spec.seed, cpu=cpu.as_record())
    make_eval_data_read_only(data_dir)
    data_digest = eval_data_digest(data_dir)
    confinement = None
    if spec.confine:
        readable = [code_dir] + [data_dir / name for name in TRAINING_DATA_FILES
                                 if (data_dir / name).exists()]  # fmt: skip
        confinement = confine.Confinement(
            read=tuple(str(p.resolve()) for p in readable),
            write=(str(out_dir.resolve()), str(tmp_dir.resolve())),
            gpu=device == "cuda",
        )
    train = run(
        [spec.python, "train.py"], cwd=code_dir, env=env, limits=_limits(spec, hard_kill),
        log_path=run_dir / "train.log", on_progress=on_progress, confinement=confinement,
        runtime=runtime, phases=True,
    )  # fmt: skip
    if train.reason == "interrupted":
        raise KeyboardInterrupt
    result.training_seconds = round(train.wall_seconds, 2)
    result.peak_rss_mb, result.peak_vram_mb = train.peak_rss_mb, train.peak_vram_mb
    result.gpu_util_percent, result.network_isolated = (
        train.gpu_util_percent,
        train.network_isolated,
    )
    result.isolation, result.isolation_note = train.isolation, train.isolation_note
    result.cpu_share = train.cpu_share
    result.log_tail = train.log_tail
    for key, value in parse_summary(_read_tail(run_dir / "train.log")).items():
        setattr(result, key, value)
    if result.total_tokens_M and train.wall_seconds > 0:
        result.tokens_per_s = round(result.total_tokens_M * 1e6 / train.wall_seconds, 1)
    if train.reason != "ok":
        result.status, result.reason = _failure(train, hard_kill)
    elif eval_data_digest(data_dir) != data_digest:
        result.status, result.reason = (
            "invalid",
            (
                "the job modified the evaluation data in .ar/data; rebuild it with `ar prepare --force`"
            ),
        )
    elif not (out_dir / "model.pt").is_file() or not (out_dir / "config.json").is_file():
        result.status, result.reason = (
            "invalid",
            ("train.py saved no weights: it must end with prepare.save_for_eval(model, config)"),
        )
    else:
        result.status, result.reason = _score(spec, run_dir, device, cpu.env, result, runtime,
                                              rows)  # fmt: skip
    shutil.rmtree(tmp_dir, ignore_errors=True)
    result.total_seconds = round(time.monotonic() - begun, 2)
    before = {"plan": planned - settled, "server": settled - begun + served - planned}
    result.timing = _timing(train, before, result)
    _remember_plan(device, cpu, result.cpu_share)
    if result.status != "ok":
        result.val_bpb = result.holdout_bpb = None
    write_json_atomic(run_dir / "result.json", result.as_dict(), sort_keys=True)
    return result


def _cpu_plan(device: str) -> CpuPlan:
    """The CPU plan for a job: sampled now (plan_cpu), or the plan of the last run here if
    that run had all its cores to itself until QUIET_REUSE_S ago: its share watch, over
    its whole run, saw the machine quiet; a competitor since then makes this run disturbed
    (share.py), as one arriving a second after a fresh sample would."""
    when, plan = _quiet.get(device, (0.0, None))
    if plan is None or time.monotonic() - when > QUIET_REUSE_S:
        return plan_cpu(device)
    return dataclasses.replace(plan, reason=f"{plan.reason}; reused: the last run here had its "
                                            "cores to itself")  # fmt: skip


def _own_server_settled() -> None:
    """Wait for this process's warm server if it is starting: its imports keep a core busy
    for seconds, and a load sample taken meanwhile would plan the job for a machine half
    taken (one thread, then a disturbed run at two thirds of the throughput)."""
    runtime = warm.current()
    if runtime is not None and runtime.pid is not None:
        runtime.wait_ready(WARM_WAIT_S)


def _remember_plan(device: str, cpu: CpuPlan, share: float | None) -> None:
    if share is not None and share >= QUIET_SHARE and cpu.threads >= available_cores():
        _quiet[device] = (time.monotonic(), cpu)
    else:
        _quiet.pop(device, None)


def prestart_warm(device: str = "auto") -> None:
    """Start this process's warm server now for the jobs it will run (a slot's), with the
    threads of a quiet machine; a run whose plan differs restarts it (sandbox/warm.py)."""
    device = resolve_device(device)
    if warm.wanted(device == "cuda"):
        quiet = thread_env(available_cores(), QUIET_WAIT_POLICY)
        isa = {name: os.environ[name] for name in ISA_ENV_VARS if os.environ.get(name)}
        warm.runtime().prestart(job_env({**quiet, **isa}))


def _warm_runtime(device: str, env: dict[str, str]) -> warm.Runtime | None:
    """This process's warm runtime, its server ready for jobs with `env`; None: cold. A
    server still starting is waited for: a cold job would import what it is importing,
    and both would share the cores meanwhile."""
    if not warm.wanted(device == "cuda"):
        return None
    runtime = warm.runtime()
    runtime.prestart(env)
    runtime.wait_ready(WARM_WAIT_S)
    return runtime


def _timing(train: RunResult, before: dict[str, float], result: ExperimentResult) -> dict:
    """Where the run's wall time went, on ar's clock (sandbox/phases.py): what came before
    the job (the CPU plan, waiting for the warm server), the training job's phases as it reported
    them (untrusted, bounded by the hard kill), the scorer's fixed part and its arithmetic
    (the batches), and what was left (the sandbox's own)."""
    spans = phases.durations(train.phases or {}, train.wall_seconds)
    score = result.eval_seconds or 0.0
    arithmetic = (result.eval_timing or {}).get("scoring")
    accounted = sum(before.values()) + train.wall_seconds + score
    return {
        **{name: round(seconds, 3) for name, seconds in before.items()}, **spans, "score": score,
        "score_arithmetic": arithmetic,
        "score_fixed": round(score - arithmetic, 3) if arithmetic is not None else None,
        "other": round(max(0.0, (result.total_seconds or 0.0) - accounted), 3),
        "total": result.total_seconds, "reported": sorted(train.phases or {}),
        "launch": {"job": train.launch, "scorer": result.eval_launch},
    }  # fmt: skip


def scorer_env(cpu_env: dict[str, str], home: Path) -> dict[str, str]:
    """The trusted scorer's environment: ar's own harmless variables (runner.job_env), the
    threads and precision of the CPU plan, and `home`, a fresh private directory, as HOME
    and TMPDIR. Nothing the training job set or wrote: not its HOME or TMPDIR (the run's
    tmp), nor its compiler caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, and on CUDA
    the driver's JIT cache under $HOME/.nv)."""
    return job_env({**cpu_env, "HOME": str(home), "TMPDIR": str(home)})


def scorer_command(spec: ExperimentSpec, run_dir: Path, device: str, fork_workers: bool = False,
                   batch_rows: int | None = None) -> list[str]:  # fmt: skip
    """The trusted scorer of the weights in run_dir/out, run from the installed package;
    `fork_workers`: it starts warm and forks its model workers (sandbox/warm.py);
    `batch_rows`: rows per batch (None: the scorer's own pick)."""
    return [
        spec.python, "-I", "-m", "sandbox.evaluate",
        "--code-dir", str(Path(spec.code_dir).resolve()),
        "--weights-dir", str((run_dir / "out").resolve()),
        "--data-dir", str(Path(spec.data_dir).resolve()),
        "--eval-tokens", str(int(spec.eval_tokens)), "--seq-len", str(int(spec.seq_len)),
        "--device", device, "--log-dir", str(run_dir.resolve()),
        "--timeout", str(spec.eval_timeout), "--out", str(run_dir / "eval.json"),
        *(() if spec.confine else ("--no-confine",)),
        *(("--fork-workers",) if fork_workers else ()),
        *(("--batch-size", str(batch_rows)) if batch_rows else ()),
    ]  # fmt: skip


def scorer_rows(spec: ExperimentSpec, device: str) -> int | None:
    """Rows per batch of the scorer's workers: on CPU measured for this machine and shape
    (sandbox/evalbatch.py, seconds once, then cached); None on CUDA or when unmeasured."""
    if device != "cpu":
        return None
    try:
        vocab, _ = data_shape(Path(spec.data_dir))
    except InvalidModel:
        return None  # the scorer says what is wrong with the data
    return evalbatch.rows_per_batch(int(spec.seq_len), vocab)


def _score(spec: ExperimentSpec, run_dir: Path, device: str, cpu_env: dict[str, str],
           result: ExperimentResult, runtime: warm.Runtime | None,
           rows: int | None) -> tuple[str, str | None]:  # fmt: skip
    """Run the trusted scorer (itself unconfined: it never runs the candidate's code) in a
    fresh private directory, its HOME, removed afterwards; record what it says in `result`."""
    eval_json = run_dir / "eval.json"
    eval_json.unlink(missing_ok=True)
    home = Path(tempfile.mkdtemp(prefix="ar-score-"))
    started = time.monotonic()
    warm_scorer = runtime is not None and runtime.wait_ready(WARM_WAIT_S)
    command = scorer_command(spec, run_dir, device, warm_scorer and device == "cpu" and spec.confine,
                             rows)  # fmt: skip
    try:
        # A PID namespace of its own: the CUDA model workers share it (see confine.py). The
        # scorer confines its workers itself, so it gets ar's AR_SANDBOX_* switches.
        evaluation = run(command, cwd=home, env={**scorer_env(cpu_env, home), **confine.switches()},
                         limits=_limits(spec, spec.eval_timeout + 5), log_path=run_dir / "eval.log",
                         pid_namespace=True, runtime=runtime)  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    result.eval_seconds = round(time.monotonic() - started, 2)
    result.eval_launch = evaluation.launch
    if evaluation.reason == "interrupted":
        raise KeyboardInterrupt
    if evaluation.peak_vram_mb is not None:
        result.peak_vram_mb = max(result.peak_vram_mb or 0, evaluation.peak_vram_mb)
    if evaluation.reason == "timeout":
        return "timeout", f"the evaluation took longer than {spec.eval_timeout:g} s"
    if evaluation.reason in ("rss", "vram"):
        return "oom", "the evaluation exceeded the memory cap"
    try:
        if eval_json.is_symlink() or not eval_json.is_file():
            raise FileNotFoundError(eval_json)
        scored = json.loads(eval_json.read_text())
    except (OSError, json.JSONDecodeError):
        tail = evaluation.log_tail.strip().splitlines()
        return (
            "invalid",
            f"the evaluation wrote no result: {tail[-1][:200] if tail else 'no output'}",
        )
    return _record_eval(scored, result)


def _record_eval(scored: dict, result: ExperimentResult) -> tuple[str, str | None]:
    result.eval_tokens = scored.get("val_tokens")
    result.eval_note = scored.get("note")
    result.twin_rows = scored.get("twin_rows")
    result.probe_power = scored.get("probe_power")
    result.causality_max_diff = scored.get("causality_max_diff")
    result.worker_isolation = scored.get("worker_isolation")
    result.eval_timing = scored.get("timing") if isinstance(scored.get("timing"), dict) else None
    if scored.get("num_params_M") is not None:
        result.num_params_M = scored["num_params_M"]
    if scored.get("status") != "ok":
        return "invalid", scored.get("reason") or "the evaluation rejected the model"
    result.val_bpb, result.holdout_bpb = scored["val_bpb"], scored["holdout_bpb"]
    return "ok", None
