"""The local backend: experiments in child processes, one per slot of this machine.

A slot is what one experiment gets: a GPU (CUDA_VISIBLE_DEVICES) or, on CPU, a share of
the cores (its affinity, from which the sandbox plans the job's threads). The pool starts
a child per experiment (autoresearch_cli.worker_process), forwards its progress reports
and says when it has ended; the result is the run's result.json. Nothing here touches the
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

from autoresearch_cli.errors import ArError
from autoresearch_cli.worker_process import FAILED_EXIT

STOP_GRACE_S = 15.0  # a child killing its job on SIGTERM, before it is killed itself


@dataclass(frozen=True)
class Slot:
    index: int
    device: str  # auto | cpu | cuda
    cpus: tuple[int, ...] = ()  # cores the experiment may use; () for all
    gpu: str | None = None  # its CUDA_VISIBLE_DEVICES
    slot_class: str = ""  # the hardware, for comparing like with like ("" : computed)

    def __post_init__(self) -> None:
        if not self.slot_class:
            object.__setattr__(self, "slot_class", slot_class_of(self.device, self.cpus, self.gpu))

    @property
    def label(self) -> str:
        if self.gpu is not None:
            return f"gpu {self.gpu}"
        return f"{len(self.cpus)} cpu" if self.cpus else "all cpus"


def visible_gpus() -> list[str]:
    """The CUDA devices ar may use: CUDA_VISIBLE_DEVICES when set, else what NVML counts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"]
    from sandbox.gpu import nvml

    nv, _ = nvml()
    if nv is None:
        return []
    try:
        return [str(index) for index in range(nv.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 (NVML raises its own error types)
        return []


def gpu_name(gpu: str) -> str:
    """The model of one visible GPU (its CUDA_VISIBLE_DEVICES entry), "cuda" if unknown."""
    from sandbox.gpu import nvml

    nv, _ = nvml()
    try:
        handle = (nv.nvmlDeviceGetHandleByUUID(gpu) if gpu.startswith(("GPU-", "MIG-"))
                  else nv.nvmlDeviceGetHandleByIndex(int(gpu)))
        name = nv.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 (no NVML, or its own error types)
        return "cuda"


def slot_class_of(device: str, cpus: tuple[int, ...] = (), gpu: str | None = None) -> str:
    """What a time-budgeted score depends on: the GPU model, or on CPU the cores a run
    gets (all of them when `cpus` is empty)."""
    if device == "cuda" or gpu is not None:
        if gpu is None:
            gpus = visible_gpus()
            gpu = gpus[0] if gpus else None
        return f"cuda:{gpu_name(gpu) if gpu is not None else 'cuda'}"
    return f"cpu:{len(cpus) or len(available_cpus())}"


def machine_class(device: str) -> str:
    """The slot class of a run given the whole machine (`ar baseline`, one worker)."""
    if device == "auto":
        device = "cuda" if visible_gpus() else "cpu"
    return slot_class_of(device)


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def default_workers(device: str) -> int:
    """One per visible GPU when experiments run on CUDA; one on CPU."""
    if device == "cpu":
        return 1
    return max(1, len(visible_gpus()))


def plan_slots(workers: int, device: str) -> list[Slot]:
    """`workers` slots: a GPU each on CUDA, else an equal share of the cores each."""
    if workers < 1:
        raise ArError("--workers must be at least 1")
    gpus = [] if device == "cpu" else visible_gpus()
    if gpus:
        if workers > len(gpus):
            raise ArError(f"--workers {workers}: only {len(gpus)} GPU(s) visible; one experiment per GPU")
        return [Slot(index, "cuda", gpu=gpus[index]) for index in range(workers)]
    if device == "cuda":
        raise ArError("the profile asks for cuda but no GPU is visible")
    cpus = available_cpus()
    if workers > len(cpus):
        raise ArError(f"--workers {workers}: this machine lets ar use {len(cpus)} cores; "
                      "at most one worker per core")
    if workers == 1:
        return [Slot(0, device)]
    share = len(cpus) // workers
    return [Slot(index, "cpu", cpus=tuple(cpus[index * share:(index + 1) * share]))
            for index in range(workers)]


@dataclass
class Running:
    exp_id: int
    slot: Slot
    run_dir: Path
    process: subprocess.Popen
    buffer: bytes = b""
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Progressed:
    exp_id: int
    progress: Any  # sandbox.progress.Progress


@dataclass(frozen=True)
class Ended:
    exp_id: int
    slot: Slot
    result: dict[str, Any]  # result.json, or a crash that says why there is none


class LocalWorkers:
    """Child processes running experiments, at most one per slot."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.running: dict[int, Running] = {}
        self._selector = selectors.DefaultSelector()

    def free_slots(self) -> list[Slot]:
        busy = {running.slot.index for running in self.running.values()}
        return [slot for slot in self.slots if slot.index not in busy]

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
        cmd = [sys.executable, "-m", "autoresearch_cli.worker_process", str(spec_path),
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
