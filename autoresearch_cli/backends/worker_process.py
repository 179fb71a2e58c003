"""Experiments in a process of their own, apart from the scheduling ar.

    python -m autoresearch_cli.backends.worker_process --slot PARENT_PID CPUS DEVICE  # a slot
    python -m autoresearch_cli.backends.worker_process SPEC PARENT_PID [CPUS]     # one run

The sandbox runs one job per process (its runner holds process-wide state), so ar runs
the experiments of each slot in a child like this one. A slot process (LocalWorkers)
lives as long as its slot: it pays for its imports and starts its warm runtime (a server
that has imported torch: sandbox/warm.py) once, then reads the path of an ExperimentSpec
(JSON) per line on stdin and runs each in turn; the one-run form (Ray's) runs one spec
and exits. The sandbox writes each run_dir/result.json; this process touches neither the
ledger nor git, which stay with the one scheduling ar.

stdout carries one JSON line per training progress report, dropped rather than waited
for when ar is busy (a job's limits are watched by the same thread), and in a slot one
`{"ended": CODE}` line when a run is over (never dropped). stderr goes to the run's
worker.log. The child dies with ar: a kill of ar sends it SIGTERM, which kills its job
like Ctrl-C.
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
SLOT_FLAG = "--slot"


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


def _write_line(payload: dict, must: bool = False) -> None:
    line = (json.dumps(payload) + "\n").encode()
    fd = sys.stdout.fileno()
    if must:  # the end of a run is waited for, never dropped
        os.set_blocking(fd, True)
    try:
        os.write(fd, line)
    except BlockingIOError:
        pass  # ar is busy; the next report will do
    finally:
        os.set_blocking(fd, False)


def _report(progress) -> None:
    _write_line({"step": progress.step, "percent": progress.percent, "loss": progress.loss,
                 "seconds_left": progress.seconds_left})  # fmt: skip


def _setup(parent_pid: int, cpus_arg: str) -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _interrupt)
    _die_with_parent(parent_pid)
    if cpus_arg:  # the sandbox plans threads for the cores it may use
        os.sched_setaffinity(0, [int(cpu) for cpu in cpus_arg.split(",")])
    os.set_blocking(sys.stdout.fileno(), False)


def run_one(spec_path: Path) -> int:
    """Run the spec at `spec_path`, its stderr in its run's worker.log; the exit code."""
    from sandbox.errors import SandboxError
    from sandbox.experiment import run_experiment
    from sandbox.spec import ExperimentSpec

    spec = ExperimentSpec.from_json(spec_path.read_text())
    _stderr_to(Path(spec.run_dir) / "worker.log")
    try:
        run_experiment(spec, on_progress=_report)
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    except SandboxError as exc:
        print(f"the sandbox failed: {exc}", file=sys.stderr)
        return FAILED_EXIT
    return 0


def _stderr_to(path: Path) -> None:
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def serve_slot(device: str) -> int:
    """Run the specs named on stdin, one per line, until stdin closes or a run fails."""
    from sandbox.experiment import prestart_warm

    prestart_warm(device)  # torch loads in the server while ar proposes the first experiment
    for line in sys.stdin:
        code = run_one(Path(line.strip()))
        _write_line({"ended": code}, must=True)
        if code != 0:
            return code
    return 0


def main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == SLOT_FLAG:
            _setup(int(argv[1]), argv[2])
            return serve_slot(argv[3])
        _setup(int(argv[1]), argv[2] if len(argv) > 2 else "")
        return run_one(Path(argv[0]))
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
