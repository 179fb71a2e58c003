"""`ar iterate --workers 2` end to end on the micro profile: two experiments at once, each in
its own process with its own core; a kill of ar while both train, and the resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from e2e import AR, ar, git, rows, wait_gone

from autoresearch_cli.backends.base import available_cpus

needs_two_cores = pytest.mark.skipif(len(available_cpus()) < 2, reason="needs two cores")


def training_jobs(root) -> dict[int, int]:
    """experiment id -> pid of its training job, for the jobs that have begun stepping."""
    jobs = {}
    for pid_file in (root / ".ar" / "runs").glob("*/job.pid"):
        log = pid_file.parent / "train.log"
        text = pid_file.read_text().strip()
        if text and log.exists() and "step " in log.read_text(errors="replace"):
            jobs[int(pid_file.parent.name)] = int(text.split()[0])
    return jobs


@needs_two_cores
def test_two_workers_run_two_experiments_at_once(micro_ws):
    """The baseline ran on both cores; a worker has one, so the tip is measured on one
    core first (like is compared with like), beside the first experiment."""
    root = micro_ws.root
    assert ar("baseline", cwd=root).returncode == 0
    done = ar("iterate", "--n", "2", "--workers", "2", "--agent", "random", "--seed", "3", cwd=root)
    assert done.returncode == 0, done.stderr + done.stdout
    baseline, measured, *later = rows(root)
    experiments = [r for r in later if r["kind"] == "experiment"]
    # if both beat the tip, their combination ran too
    assert all(r["kind"] == "combination" for r in later if r not in experiments)
    assert baseline["slot_class"] == "cpu:2"
    assert measured["kind"] == "baseline" and measured["sha"] == baseline["sha"]
    assert measured["slot_class"] == "cpu:1" and measured["status"] == "ok"
    assert [r["kind"] for r in experiments] == ["experiment", "experiment"]
    assert all(r["slot_class"] == "cpu:1" for r in experiments)
    assert done.stdout.count("training on 1 cpu") >= 3
    # the measurement and the first experiment ran at the same time, each in its own
    # process given one core
    for row in (measured, *experiments):
        result = json.loads((root / ".ar" / "runs" / str(row["id"]) / "result.json").read_text())
        assert result["cpu"]["threads"] == 1
    assert experiments[0]["started_at"] <= measured["finished_at"]
    first = experiments[0]
    if first["status"] == "ok":  # judged against the tip's score on one core
        assert first["decision"] == ("keep" if first["val_bpb"] < measured["val_bpb"] else "discard")
    kept = [r for r in later if r["decision"] == "keep"]
    tip = git(root, "rev-parse", "autoresearch/test")
    assert tip == (kept[-1]["sha"] if kept else baseline["sha"])
    assert not any((root / ".ar" / "worktrees").iterdir())
    assert git(root, "status", "--porcelain") == ""


@needs_two_cores
def test_a_kill_with_two_experiments_training_then_the_resume(micro_ws):
    root = micro_ws.root
    assert ar("baseline", cwd=root).returncode == 0
    proc = subprocess.Popen([AR, "iterate", "--workers", "2", "--agent", "random", "--seed", "7"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(jobs := training_jobs(root)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(jobs) == 2, "two training jobs never ran at once"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in jobs.values():  # the workers die with ar, and take their jobs with them
        assert wait_gone(pid, timeout=20), "a training job outlived ar"

    resumed = ar("iterate", "--n", "1", "--agent", "random", "--seed", "8", cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    for exp_id in jobs:
        assert f"experiment #{exp_id} was interrupted" in resumed.stderr
    table = rows(root)
    statuses = {r["id"]: r["status"] for r in table}
    assert all(statuses[exp_id] == "interrupted" for exp_id in jobs)
    assert all(r["status"] not in ("proposing", "running", "evaluating") for r in table)
    assert table[-1]["status"] != "interrupted"  # the resumed run went on
    assert not any((root / ".ar" / "worktrees").iterdir())
    assert "worktrees" not in git(root, "worktree", "list")
    for exp_id in jobs:  # the interrupted commits stay reachable
        row = next(r for r in table if r["id"] == exp_id)
        if row["kind"] != "baseline":  # (a measurement runs the tip itself)
            assert git(root, "rev-parse", f"refs/ar/discarded/{exp_id}") == row["sha"]
    strays = [p for p in psutil.process_iter(["cmdline"])
              if str(root) in " ".join(p.info["cmdline"] or [])
              and ("train.py" in " ".join(p.info["cmdline"] or [])
                   or "worker_process" in " ".join(p.info["cmdline"] or []))]
    assert strays == []


def test_more_workers_than_cores_is_refused(micro_ws):
    too_many = len(available_cpus()) + 1
    done = ar("iterate", "--n", "1", "--workers", str(too_many), "--agent", "random",
              cwd=micro_ws.root)
    assert done.returncode == 1
    assert "at most one worker per core" in done.stderr and "Traceback" not in done.stderr
