"""What every backend is: a pool of slots that runs ExperimentSpecs and reports events.

    backend.start(exp_id, slot, spec)   # a run of one commit on one free slot
    backend.wait(timeout)               # -> [Progressed | Ended, ...]
    backend.stop_all(); backend.close()

A slot is what one experiment gets: a GPU, or on CPU a share of the cores; its class
(`slot_class`) is the hardware a score depends on, so that like is compared with like.
The local pool (backends/local.py), the Ray pool (backends/ray.py) and the scripted pools
of the tests all implement `Backend`; the scheduler knows nothing else of them. A new
backend (SLURM, Kubernetes) is one module here and one line in backends/__init__.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from autoresearch_cli.errors import ArError

# After a python: one experiment in a process of its own (backends/worker_process.py), as
# every backend starts it, on this machine or on a node.
WORKER_COMMAND = ("-m", "autoresearch_cli.backends.worker_process")


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


@dataclass(frozen=True)
class Progressed:
    exp_id: int
    progress: Any  # sandbox.progress.Progress


@dataclass(frozen=True)
class Ended:
    exp_id: int
    slot: Slot
    result: dict[str, Any]  # result.json, or a crash that says why there is none


@runtime_checkable
class Backend(Protocol):
    """Runs experiments, at most one per slot; the scheduler's only view of the machines."""

    slots: list[Slot]

    def free_slots(self) -> list[Slot]:
        """Slots with nothing running, in order."""
        ...

    def busy(self) -> bool:
        """Whether anything is running (or has ended and not been reported yet)."""
        ...

    def start(self, exp_id: int, slot: Slot, spec: Any) -> str | None:
        """Run `spec` (sandbox.spec.ExperimentSpec) on `slot`; a task id where the run can
        outlive this process (a cluster), so that a restarted ar finds it again."""
        ...

    def wait(self, timeout: float) -> list[Progressed | Ended]:
        """What happened within `timeout` seconds (sooner when something did)."""
        ...

    def stop_all(self) -> list[int]:
        """Stop every run; the ids of the experiments stopped."""
        ...

    def close(self) -> None:
        """Give the slots back (a cluster's at once)."""
        ...

    def reattach(self, exp_id: int, task_id: str, slot_class: str, run_dir: Path) -> bool:
        """Pick up a run a killed ar left (by its task id); False when it is gone."""
        ...

    def waiting_reason(self) -> str | None:
        """Why queued runs cannot start now (no free GPU on the cluster), or None."""
        ...


class SlotPool:
    """What most backends share: `slots`, a `running` map of exp_id -> slot, and the
    optional parts of the protocol that a pool on one machine does not need."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.running: dict[int, Any] = {}

    def _slot_of(self, running: Any) -> Slot:
        return running.slot

    def free_slots(self) -> list[Slot]:
        busy = {self._slot_of(running).index for running in self.running.values()}
        return [slot for slot in self.slots if slot.index not in busy]

    def busy(self) -> bool:
        return bool(self.running)

    def close(self) -> None:
        return None

    def reattach(self, exp_id: int, task_id: str, slot_class: str, run_dir: Path) -> bool:
        return False

    def waiting_reason(self) -> str | None:
        return None
