"""One experiment in a process of its own: `python -m autoresearch_cli.backends.worker_process SPEC`.

The sandbox runs one job per process (its runner holds process-wide state), so ar runs
each experiment of `ar iterate --workers N` in a child like this one. The child reads an
ExperimentSpec (JSON), runs it, and the sandbox writes run_dir/result.json; the child
touches neither the ledger nor git, which stay with the one scheduling ar.

stdout carries one JSON line per training progress report, dropped rather than waited
for when ar is busy (a job's limits are watched by the same thread). The child dies
with ar: a kill of ar sends it SIGTERM, which kills its job like Ctrl-C.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
INTERRUPTED_EXIT = 130
FAILED_EXIT = 3  # the sandbox itself failed; the reason is on stderr


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: recovery still kills the job later
        return
    if os.getppid() != parent_pid:  # ar died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _report(progress) -> None:
    line = json.dumps({"step": progress.step, "percent": progress.percent, "loss": progress.loss,
                       "seconds_left": progress.seconds_left}) + "\n"
    try:
        os.write(sys.stdout.fileno(), line.encode())
    except BlockingIOError:
        pass  # ar is busy; the next report will do


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _interrupt)
    spec_path, parent_pid = Path(argv[0]), int(argv[1])
    cpus = [int(cpu) for cpu in argv[2].split(",")] if len(argv) > 2 and argv[2] else None
    _die_with_parent(parent_pid)
    if cpus:
        os.sched_setaffinity(0, cpus)  # the sandbox plans threads for the cores it may use
    os.set_blocking(sys.stdout.fileno(), False)

    from sandbox.errors import SandboxError
    from sandbox.experiment import run_experiment
    from sandbox.spec import ExperimentSpec

    spec = ExperimentSpec.from_json(spec_path.read_text())
    try:
        run_experiment(spec, on_progress=_report)
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    except SandboxError as exc:
        print(f"the sandbox failed: {exc}", file=sys.stderr)
        return FAILED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
