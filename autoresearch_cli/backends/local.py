"""The local backend: experiments in child processes, one per slot of this machine.

A slot is what one experiment gets: a GPU (CUDA_VISIBLE_DEVICES) or, on CPU, a share of
the cores (its affinity, from which the sandbox plans the job's threads). The pool starts
a child per experiment (backends/worker_process.py), forwards its progress reports and
says when it has ended; the result is the run's result.json. Nothing here touches the
ledger or git.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoresearch_cli.backends.base import (
    WORKER_COMMAND,
    Ended,
    Progressed,
    Slot,
    SlotPool,
    plan_slots,
)
from autoresearch_cli.backends.worker_process import FAILED_EXIT
from autoresearch_cli.errors import ArError

STOP_GRACE_S = 15.0  # a child killing its job on SIGTERM, before it is killed itself


@dataclass
class Running:
    exp_id: int
    slot: Slot
    run_dir: Path
    process: subprocess.Popen
    buffer: bytes = b""
    started: float = field(default_factory=time.monotonic)


class LocalWorkers(SlotPool):
    """Child processes running experiments, at most one per slot."""

    def __init__(self, slots: list[Slot]):
        super().__init__(slots)
        self.running: dict[int, Running] = {}
        self._selector = selectors.DefaultSelector()

    def start(self, exp_id: int, slot: Slot, spec: Any) -> None:
        """Run `spec` (an ExperimentSpec for this slot) in a child process."""
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / "spec.json"
        spec_path.write_text(spec.to_json())
        (run_dir / "result.json").unlink(missing_ok=True)
        env = dict(os.environ)
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        if slot.cpus:
            env["OMP_NUM_THREADS"] = str(len(slot.cpus))
        cmd = [sys.executable, *WORKER_COMMAND, str(spec_path),
               str(os.getpid()), ",".join(map(str, slot.cpus))]
        with open(run_dir / "worker.log", "ab") as log:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=log, env=env)
        os.set_blocking(process.stdout.fileno(), False)
        self.running[exp_id] = Running(exp_id, slot, run_dir, process)
        self._selector.register(process.stdout, selectors.EVENT_READ, exp_id)

    def wait(self, timeout: float) -> list[Progressed | Ended]:
        """What happened within `timeout` seconds (sooner when something did)."""
        if not self.running:
            return []
        events: list[Progressed | Ended] = []
        for key, _ in self._selector.select(timeout):
            running = self.running[key.data]
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if chunk:
                events.extend(self._progress(running, chunk))
            else:
                events.append(self._end(running))
        return events

    def _progress(self, running: Running, chunk: bytes) -> list[Progressed]:
        from sandbox.progress import Progress

        running.buffer += chunk
        *lines, running.buffer = running.buffer.split(b"\n")
        reports = []
        for line in lines:
            try:
                reports.append(Progressed(running.exp_id, Progress(**json.loads(line))))
            except (ValueError, TypeError):
                continue
        return reports[-1:]  # only the newest matters

    def _end(self, running: Running) -> Ended:
        self._selector.unregister(running.process.stdout)
        running.process.stdout.close()
        code = running.process.wait()
        del self.running[running.exp_id]
        if code == FAILED_EXIT:  # the sandbox, not the candidate, failed: ar cannot go on
            raise ArError(last_line(running.run_dir / "worker.log"))
        return Ended(running.exp_id, running.slot, read_result(running.run_dir, code))

    def stop_all(self) -> list[int]:
        """Stop every child (each kills its job first); the ids of the experiments they ran."""
        stopped = list(self.running)
        for running in self.running.values():
            _signal(running.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for running in list(self.running.values()):
            try:
                running.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(running.process, signal.SIGKILL)
                running.process.wait()
            self._selector.unregister(running.process.stdout)
            running.process.stdout.close()
        self.running.clear()
        return stopped


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def last_line(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-1][:300]
    except (OSError, IndexError):
        return "no output"


def read_result(run_dir: Path, exit_code: int) -> dict[str, Any]:
    """The run's result.json; a crash naming the worker's last words when it wrote none."""
    try:
        return json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        last = last_line(run_dir / "worker.log")
    return {"status": "crash", "val_bpb": None, "reason": f"the worker process ended with "
            f"code {exit_code} and no result: {last}"}


def open_local(workers: int | None, device: str, **_: Any) -> LocalWorkers:
    """`--backend local`: `workers` slots on this machine (default: one per GPU, or one)."""
    from autoresearch_cli.backends.base import default_workers

    return LocalWorkers(plan_slots(workers or default_workers(device), device))
