"""Helpers for end-to-end tests that drive the real `ar` executable."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

AR = str(Path(sys.executable).with_name("ar"))


def ar(*args: str, cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([AR, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def rows(ws_root: Path) -> list[dict]:
    db = sqlite3.connect(ws_root / ".ar" / "ledger.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM experiments ORDER BY id")]
    finally:
        db.close()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def start_and_kill_mid_training(args: list[str], ws_root: Path, timeout: float = 120,
                                sig: int = signal.SIGKILL) -> tuple[int, int]:
    """Start `ar ARGS`, wait until a training job is running, send ar `sig`; return the job's
    pid and ar's exit code."""
    proc = subprocess.Popen([AR, *args], cwd=ws_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    job_pid = None
    while time.monotonic() < deadline and job_pid is None:
        for pid_file in (ws_root / ".ar" / "runs").glob("*/job.pid"):
            if pid_file.read_text().strip() and (pid_file.parent / "train.log").exists():
                log = (pid_file.parent / "train.log").read_text(errors="replace")
                if "step " in log:
                    job_pid = int(pid_file.read_text().split()[0])
        time.sleep(0.1)
    assert job_pid is not None, "the training job never started"
    os.kill(proc.pid, sig)
    return job_pid, proc.wait(timeout=60)


def wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def result_json(ws_root: Path, exp_id: int) -> dict:
    return json.loads((ws_root / ".ar" / "runs" / str(exp_id) / "result.json").read_text())


def search_replace_reply(train_py: str) -> str:
    """A model's reply that raises MATRIX_LR by 25% with one SEARCH/REPLACE block."""
    line = next(ln for ln in train_py.splitlines() if ln.startswith("MATRIX_LR = "))
    value = re.match(r"MATRIX_LR = ([0-9.]+)", line).group(1)
    new_line = line.replace(value, repr(float(value) * 1.25), 1)
    return (f"Description: raise MATRIX_LR by 25%\n\n<<<<<<< SEARCH\n{line}\n=======\n"
            f"{new_line}\n>>>>>>> REPLACE\n")
