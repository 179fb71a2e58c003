"""The local backend: experiments in child processes, one per slot of this machine.

A slot is what one experiment gets: a GPU (CUDA_VISIBLE_DEVICES) or, on CPU, a share of
the cores (its affinity, from which the sandbox plans the job's threads). Each slot has
one child process for as long as the pool lives (backends/worker_process.py `--slot`):
it imports the sandbox and starts its warm runtime once, then runs the experiments it is
handed in turn. The pool forwards their progress reports and says when each has ended;
the result is the run's result.json. Nothing here touches the ledger or git.
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
from autoresearch_cli.backends.worker_process import FAILED_EXIT, SLOT_FLAG
from autoresearch_cli.errors import ArError

STOP_GRACE_S = 15.0  # a child killing its job on SIGTERM, before it is killed itself
CLOSE_GRACE_S = 5.0  # an idle slot process leaving when its input closes


@dataclass
class Running:
    exp_id: int
    slot: Slot
    run_dir: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


@dataclass
class SlotProcess:
    """A slot's child process and what it has said so far."""

    process: subprocess.Popen
    buffer: bytes = b""


class LocalWorkers(SlotPool):
    """One child process per slot, running at most one experiment at a time."""

    def __init__(self, slots: list[Slot]):
        super().__init__(slots)
        self.running: dict[int, Running] = {}
        self._children: dict[int, SlotProcess] = {}  # slot index -> its process
        self._selector = selectors.DefaultSelector()

    def start(self, exp_id: int, slot: Slot, spec: Any) -> None:
        """Run `spec` (an ExperimentSpec for this slot) in the slot's child process."""
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / "spec.json"
        spec_path.write_text(spec.to_json())
        (run_dir / "result.json").unlink(missing_ok=True)
        child = self._children.get(slot.index) or self._start_slot(slot, run_dir)
        try:
            child.process.stdin.write(f"{spec_path}\n".encode())
            child.process.stdin.flush()
        except OSError:  # it died between two runs: the run ends as a crash naming why
            pass
        self.running[exp_id] = Running(exp_id, slot, run_dir, child.process)

    def _start_slot(self, slot: Slot, run_dir: Path) -> SlotProcess:
        env = dict(os.environ)
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        if slot.cpus:
            env["OMP_NUM_THREADS"] = str(len(slot.cpus))
        cmd = [sys.executable, *WORKER_COMMAND, SLOT_FLAG,
               str(os.getpid()), ",".join(map(str, slot.cpus)), slot.device]  # fmt: skip
        with open(run_dir / "worker.log", "ab") as log:  # until the child takes the run's own
            process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=log, env=env)  # fmt: skip
        os.set_blocking(process.stdout.fileno(), False)
        child = self._children[slot.index] = SlotProcess(process)
        self._selector.register(process.stdout, selectors.EVENT_READ, slot.index)
        return child

    def wait(self, timeout: float) -> list[Progressed | Ended]:
        """What happened within `timeout` seconds (sooner when something did)."""
        if not self.running:
            return []
        events: list[Progressed | Ended] = []
        for key, _ in self._selector.select(timeout):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            events.extend(self._heard(key.data, chunk))
        return events

    def _running_on(self, index: int) -> Running | None:
        return next((run for run in self.running.values() if run.slot.index == index), None)

    def _heard(self, index: int, chunk: bytes) -> list[Progressed | Ended]:
        """Events from what slot `index`'s process wrote (b"": it exited)."""
        child, running = self._children[index], self._running_on(index)
        if not chunk:
            code = self._forget(index)
            return [self._ended(running, code)] if running else []
        child.buffer += chunk
        *lines, child.buffer = child.buffer.split(b"\n")
        progress, ended = None, []
        for message in filter(None, map(_parse, lines)):
            if running is None:
                continue
            if "ended" in message:
                ended.append(self._ended(running, message["ended"]))
                running = progress = None
            else:
                progress = self._progressed(running, message) or progress  # the newest matters
        return [*([progress] if progress else []), *ended]

    def _progressed(self, running: Running, message: dict) -> Progressed | None:
        from sandbox.progress import Progress

        try:
            return Progressed(running.exp_id, Progress(**message))
        except TypeError:
            return None

    def _ended(self, running: Running, code: Any) -> Ended:
        del self.running[running.exp_id]
        if code == FAILED_EXIT:  # the sandbox, not the candidate, failed: ar cannot go on
            raise ArError(last_line(running.run_dir / "worker.log"))
        return Ended(running.exp_id, running.slot, read_result(running.run_dir, code))

    def _forget(self, index: int) -> int:
        """Reap slot `index`'s process (it closed its output); its exit code."""
        child = self._children.pop(index)
        self._selector.unregister(child.process.stdout)
        for stream in (child.process.stdout, child.process.stdin):
            try:
                stream.close()
            except OSError:
                pass
        return child.process.wait()

    def stop_all(self) -> list[int]:
        """Stop every child (each kills its job first); the ids of the experiments they ran."""
        stopped = list(self.running)
        for child in self._children.values():
            _signal(child.process, signal.SIGTERM)
        self._reap(STOP_GRACE_S)
        self.running.clear()
        return stopped

    def close(self) -> None:
        """Let the idle slot processes go: each leaves when its input closes."""
        for child in self._children.values():
            try:
                child.process.stdin.close()
            except OSError:
                pass
        self._reap(CLOSE_GRACE_S)

    def _reap(self, grace: float) -> None:
        """Wait up to `grace` seconds in all for every child to end; kill what is left."""
        deadline = time.monotonic() + grace
        for index, child in list(self._children.items()):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(child.process, signal.SIGKILL)
            self._forget(index)


def _parse(line: bytes) -> dict | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


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
