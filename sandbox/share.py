"""The share of its cores a job got: how much of their time other processes left it.

A time-budgeted score depends on the compute the run got. On a shared machine another
process can take half the cores for part of a run, and the run then trains fewer steps
and scores worse for a reason that has nothing to do with its code. The runner samples,
while the job runs, the busy time of the cores the job may use (/proc/stat) and the CPU
time of the job itself; what others took is the difference. share = 1 - others / (cores x
wall): 1.0 on a quiet machine whatever the job's thread count, about 0.5 when a busy
process held one of two cores throughout.

The job's CPU time must include its children that exited between two samples, or a job
could make itself look disturbed at will (and be re-run with a new seed) by burning CPU in
short-lived children: it is its control group's counter where there is one (cgroup.py),
else its processes' own and reaped children's time (proctree.py; in a PID namespace the
namespace's init reaps every orphan). Only the kernel's counters are read: nothing the
job prints or writes enters the figure.
"""

from __future__ import annotations

import os
import time

import psutil

MIN_WINDOW_S = 1.0  # shorter jobs get no share: the counters tick at 10 ms


def _busy_seconds(cpus: list[int]) -> float:
    """Time the given cores spent on anything but idling (steal included: a hypervisor
    that took the core also took it from the job)."""
    per_cpu = psutil.cpu_times(percpu=True)
    busy = 0.0
    for cpu in cpus:
        if cpu < len(per_cpu):
            t = per_cpu[cpu]
            busy += (t.user + t.nice + t.system + getattr(t, "irq", 0.0)
                     + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0))
    return busy


class ShareWatch:
    """Samples taken at the runner's polls; `share()` at the end."""

    def __init__(self) -> None:
        try:
            self.cpus = sorted(os.sched_getaffinity(0))  # the job inherits this set
        except AttributeError:
            self.cpus = list(range(os.cpu_count() or 1))
        self.available = os.path.isdir("/proc/self")
        self.first: tuple[float, float, float] | None = None  # (monotonic, busy, job)
        self.last: tuple[float, float, float] | None = None

    def sample(self, job_cpu_seconds: float) -> None:
        """One sample; `job_cpu_seconds`: the job's CPU time so far (group.JobGroup)."""
        if not self.available:
            return
        point = (time.monotonic(), _busy_seconds(self.cpus), job_cpu_seconds)
        if self.first is None:
            self.first = point
        self.last = point

    def job_seconds(self) -> float | None:
        """The job's CPU time at the last sample."""
        return None if self.last is None else round(self.last[2], 3)

    def share(self) -> float | None:
        """1 - (others' busy time) / (cores x wall) over the sampled window; None when
        too short to say."""
        if self.first is None or self.last is None:
            return None
        wall = self.last[0] - self.first[0]
        if wall < MIN_WINDOW_S:
            return None
        others = (self.last[1] - self.first[1]) - (self.last[2] - self.first[2])
        taken = others / (len(self.cpus) * wall)
        return round(min(1.0, max(0.0, 1.0 - taken)), 3)
