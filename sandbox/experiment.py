"""One experiment run: train.py in the sandbox, then the trusted evaluation, then result.json.

Every number in result.json comes from this process's clock, the sandbox's monitors or
the trusted evaluator. What train.py prints is only used for figures it alone can know
(steps, MFU, tokens), and never for val_bpb.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.files import write_json_atomic
from sandbox.runner import Limits, RunResult, job_env, run

RESULT_STATUSES = ("ok", "crash", "timeout", "oom", "invalid")
SUMMARY_KEYS = ("num_steps", "mfu_percent", "total_tokens_M", "num_params_M", "depth")
SUMMARY_LINE = re.compile(r"^([a-zA-Z_]+):\s+(-?[0-9.]+)\s*$")


def _limits(config: dict[str, Any], wall_seconds: float) -> Limits:
    box = config["sandbox"]
    return Limits(
        wall_seconds=wall_seconds,
        max_rss_mb=box["max_rss_mb"],
        max_vram_mb=box["max_vram_mb"],
        max_file_mb=box["max_file_mb"],
        max_open_files=box["max_open_files"],
        network=bool(box["network"]),
    )


def _device(config: dict[str, Any]) -> str:
    device = config["profile"].get("device", "auto")
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


def _read_tail(path: Path, max_bytes: int = 256 * 1024) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _failure_reason(train: RunResult, budget_kill: float) -> tuple[str, str]:
    last = next((ln for ln in reversed(train.log_tail.splitlines()) if ln.strip()), "")
    if train.reason == "timeout":
        return "timeout", f"killed at the hard limit of {budget_kill:.0f} s"
    if train.reason in ("rss", "vram"):
        which = "memory (RSS)" if train.reason == "rss" else "GPU memory"
        return "oom", f"killed for exceeding the {which} cap"
    if train.reason == "disk":
        return "crash", "killed: the job was filling the disk"
    if train.reason == "procs":
        return "crash", "killed: the job started too many processes"
    if train.reason == "signal":
        return "crash", f"train.py died from a signal ({train.exit_code}): {last[:200]}"
    return "crash", f"train.py exited with code {train.exit_code}: {last[:200]}"


EVAL_DATA_FILES = ("val.bin", "holdout.bin", "token_bytes.npy", "manifest.json")


def eval_data_digest(data_dir: Path) -> dict[str, str]:
    """Hashes of the files the trusted evaluation reads; a job that rewrites any of them is
    caught before its evaluation."""
    digests = {}
    for name in EVAL_DATA_FILES:
        path = data_dir / name
        if path.exists():
            with path.open("rb") as handle:
                digests[name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def make_eval_data_read_only(data_dir: Path) -> None:
    """Stops a job run by a non-root user from rewriting the evaluation data at all."""
    for name in EVAL_DATA_FILES:
        path = data_dir / name
        if path.exists() and path.stat().st_mode & 0o222:
            path.chmod(0o444)


def run_experiment(
    worktree: Path,
    run_dir: Path,
    config: dict[str, Any],
    data_dir: Path,
    on_progress: Callable | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Train `worktree`'s train.py, evaluate it, write and return run_dir/result.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "out"
    out_dir.mkdir(exist_ok=True)
    profile = config["profile"]
    device = _device(config)
    budget = float(profile["time_budget"])
    hard_kill = budget + float(profile["startup_allowance"])
    env = job_env(
        {
            "AR_DATA_DIR": str(data_dir.resolve()),
            "AR_OUTPUT_DIR": str(out_dir.resolve()),
            "AR_TIME_BUDGET": str(profile["time_budget"]),
            "AR_DEVICE": device,
        }
    )
    result: dict[str, Any] = {key: None for key in (
        "val_bpb", "holdout_bpb", "training_seconds", "total_seconds", "peak_vram_mb",
        "peak_rss_mb", "mfu_percent", "num_steps", "num_params_M", "total_tokens_M",
        "reason", "log_tail", "eval_tokens", "eval_note", "gpu_util_percent",
        "network_isolated",
    )}  # fmt: skip
    make_eval_data_read_only(data_dir)
    data_digest = eval_data_digest(data_dir)
    started = time.monotonic()
    train = run(
        [python, "train.py"], cwd=worktree, env=env, limits=_limits(config, hard_kill),
        log_path=run_dir / "train.log", on_progress=on_progress,
    )
    if train.reason == "interrupted":
        raise KeyboardInterrupt
    result.update(
        training_seconds=round(train.wall_seconds, 2),
        peak_rss_mb=train.peak_rss_mb,
        peak_vram_mb=train.peak_vram_mb,
        gpu_util_percent=train.gpu_util_percent,
        network_isolated=train.network_isolated,
        log_tail=train.log_tail,
    )
    result.update(parse_summary(_read_tail(run_dir / "train.log")))
    status, reason = "ok", None
    if train.reason != "ok":
        status, reason = _failure_reason(train, hard_kill)
    elif eval_data_digest(data_dir) != data_digest:
        status, reason = "invalid", (
            "the job modified the evaluation data in .ar/data; rebuild it with `ar prepare --force`"
        )
    elif not (out_dir / "model.pt").is_file() or not (out_dir / "config.json").is_file():
        status, reason = "invalid", "train.py saved no weights: it must end with prepare.save_for_eval(model, config)"
    else:
        status, reason = _evaluate(worktree, run_dir, out_dir, data_dir, config, device, env, python, result)
    result.update(status=status, reason=reason, total_seconds=round(time.monotonic() - started, 2))
    if status != "ok":
        result["val_bpb"] = result["holdout_bpb"] = None
    write_json_atomic(run_dir / "result.json", result, sort_keys=True)
    return result


def _evaluate(worktree, run_dir, out_dir, data_dir, config, device, env, python, result) -> tuple[str, str | None]:
    profile = config["profile"]
    eval_json = run_dir / "eval.json"
    cmd = [
        python, "-I", "-m", "sandbox.evaluate",
        "--code-dir", str(worktree.resolve()), "--weights-dir", str(out_dir.resolve()),
        "--data-dir", str(data_dir.resolve()), "--eval-tokens", str(int(profile["eval_tokens"])),
        "--seq-len", str(int(profile["max_seq_len"])), "--device", device, "--out", str(eval_json),
    ]  # fmt: skip
    evaluation = run(
        cmd, cwd=run_dir, env=env, limits=_limits(config, float(profile["eval_timeout"])),
        log_path=run_dir / "eval.log",
    )
    if evaluation.reason == "interrupted":
        raise KeyboardInterrupt
    if evaluation.peak_vram_mb is not None:
        result["peak_vram_mb"] = max(result["peak_vram_mb"] or 0, evaluation.peak_vram_mb)
    if evaluation.reason == "timeout":
        return "timeout", f"the evaluation took longer than {profile['eval_timeout']} s"
    if evaluation.reason in ("rss", "vram"):
        return "oom", "the evaluation exceeded the memory cap"
    try:
        if eval_json.is_symlink() or not eval_json.is_file():
            raise FileNotFoundError(eval_json)
        scored = json.loads(eval_json.read_text())
    except (OSError, json.JSONDecodeError):
        tail = evaluation.log_tail.strip().splitlines()
        return "invalid", f"the evaluation wrote no result: {tail[-1][:200] if tail else 'no output'}"
    if scored.get("status") != "ok":
        return "invalid", scored.get("reason") or "the evaluation rejected the model"
    result.update(
        val_bpb=scored["val_bpb"],
        holdout_bpb=scored["holdout_bpb"],
        eval_tokens=scored.get("val_tokens"),
        eval_note=scored.get("note"),
        num_params_M=scored.get("num_params_M", result.get("num_params_M")),
    )
    return "ok", None
