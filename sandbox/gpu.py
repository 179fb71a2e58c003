"""GPU watch: peak GPU memory of the job's processes, mean utilisation, hottest temperature.

A thread samples NVML (the nvidia-ml-py package, `import pynvml`) twice a second. GPU
memory is counted per process when NVML reports the job's own pids. Inside a container
NVML reports host pids that mean nothing here; then the watch falls back to the memory
used on the device minus what was used when the job started. Without pynvml, a driver
or a device, the watch says "no GPU" and everything else goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil

SAMPLE_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 2.0
MB = 2**20

_nvml_lock = threading.Lock()
_nvml_state: tuple[object | None, str] | None = None


def nvml() -> tuple[object | None, str]:
    """(pynvml, "") once NVML is initialised in this process, else (None, why not)."""
    global _nvml_state
    with _nvml_lock:
        if _nvml_state is None:
            _nvml_state = _init_nvml()
        return _nvml_state


def _init_nvml() -> tuple[object | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "no GPU: pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError, or a library that fails to load  # noqa: BLE001
        return None, f"no GPU: NVML is unavailable ({exc})"
    return pynvml, ""


@dataclass(frozen=True)
class GpuReport:
    peak_vram_mb: float | None
    util_percent: float | None
    max_temp_c: float | None
    note: str


def _select_devices(nv, visible: str | None) -> list:
    count = nv.nvmlDeviceGetCount()
    if visible is None:
        return [nv.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    handles = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.isdigit() and int(entry) < count:
            handles.append(nv.nvmlDeviceGetHandleByIndex(int(entry)))
        elif entry.startswith(("GPU-", "MIG-")):
            handles.append(nv.nvmlDeviceGetHandleByUUID(entry))
        else:
            break  # CUDA ignores every entry after an invalid one
    return handles


class GpuWatch:
    """Samples the GPUs the job can see while it runs. start(), then stop() for the report."""

    def __init__(self, visible_devices: str | None, interval: float = SAMPLE_SECONDS):
        self._visible = visible_devices
        self._interval = interval
        self._pids: Callable[[], frozenset[int]] = frozenset
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list = []
        self._baseline: list[int] = []
        self._peak = 0
        self._utils: list[float] = []
        self._max_temp: float | None = None
        self._device_level = False
        self._note = ""
        self.current_vram_mb = 0.0

    def start(self, pids: Callable[[], frozenset[int]]) -> None:
        self._pids = pids
        self._thread = threading.Thread(target=self._loop, name="ar-gpu-watch", daemon=True)
        self._thread.start()

    def stop(self) -> GpuReport:
        self._stop.set()
        if self._thread:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                return GpuReport(None, None, None, "GPU watch: NVML did not answer in time")
        if not self._handles:
            return GpuReport(None, None, None, self._note or "no GPU")
        util = sum(self._utils) / len(self._utils) if self._utils else None
        return GpuReport(round(self._peak / MB, 1), util, self._max_temp, self._note)

    def _loop(self) -> None:
        nv, why = nvml()
        if nv is None:
            self._note = why
            return
        try:
            handles = _select_devices(nv, self._visible)
            if not handles:
                self._note = "no GPU: NVML found no device visible to the job"
                return
            self._baseline = [nv.nvmlDeviceGetMemoryInfo(h).used for h in handles]
            self._handles = handles
            self._note = f"per-process GPU memory on {len(handles)} device(s)"
            while True:
                self._sample(nv)
                if self._stop.wait(self._interval):
                    break
        except Exception as exc:  # a GPU that falls off the bus must not stop the job  # noqa: BLE001
            self._note = f"GPU watch stopped: {exc}"

    def _sample(self, nv) -> None:
        pids = self._pids()
        total, utils = 0, []
        for index, handle in enumerate(self._handles):
            total += self._job_memory(nv, handle, self._baseline[index], pids)
            utils.append(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            temp = nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
            self._max_temp = temp if self._max_temp is None else max(self._max_temp, temp)
        self._utils.append(sum(utils) / len(utils))
        self._peak = max(self._peak, total)
        self.current_vram_mb = total / MB

    def _job_memory(self, nv, handle, baseline: int, pids: frozenset[int]) -> int:
        running = {}
        for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
            running[proc.pid] = proc.usedGpuMemory
        ours = [used for pid, used in running.items() if pid in pids]
        if ours and all(used is not None for used in ours):
            return sum(ours)
        unknown = [pid for pid in running if not psutil.pid_exists(pid)]
        if ours or unknown or self._device_level:
            # Memory per process is not available, or NVML sees another pid namespace.
            if not self._device_level:
                self._device_level = True
                self._note = (
                    "device GPU memory minus the baseline at start (job pids not visible to NVML)"
                )
            return max(0, nv.nvmlDeviceGetMemoryInfo(handle).used - baseline)
        return 0
