"""One job's processes as the kernel groups them: what they hold, and ending all of them.

    group = JobGroup(cgroup=JobCgroup.create(...) or None, pid_namespace=True)
    popen = subprocess.Popen(launcher + ["--report", str(group.report_fd)], pass_fds=...)
    group.launched(popen.pid)
    group.refresh(); group.memory_bytes(); group.cpu_seconds(); group.kill(grace)

The strongest grouping the machine offers decides; the weaker ones stay as a fallback:

  control group  (cgroup.py) memory and CPU as the kernel charges them, its OOM kills,
                 cgroup.kill; complete whatever the job's processes do
  PID namespace  (nsinit.py) SIGKILL to the launcher kills the namespace's init, and the
                 kernel then kills every process in it: no fork outruns it
  process tree   (proctree.py) /proc listings: membership by descent, session and orphan
                 adoption; always kept, for the job.pid record, the process count and the
                 launcher itself, and the only grouping where the kernel offers neither

With a PID namespace two processes of the launcher run beside the job: the launcher
(outside) and the namespace's init. They are ar's, not the job's: the process count and
the polled memory leave them out (a control group's charge includes their few MB).
"""

from __future__ import annotations

import os

from sandbox.cgroup import JobCgroup
from sandbox.proctree import ProcTree

MAX_REPORT_BYTES = 64
MB = 2**20


class JobGroup:
    """Create before starting the job (the tree notes who was there before), then launched()."""

    def __init__(self, cgroup: JobCgroup | None, pid_namespace: bool) -> None:
        self.tree = ProcTree()
        self.cgroup = cgroup
        self.pid_namespace = pid_namespace
        self.root: int | None = None
        self.init: int | None = None  # the namespace's init, once seen
        self.peak_memory = 0  # bytes: the highest memory_verdict() saw
        # The launcher writes `left N` here: what init killed when the job's first process ended.
        self._report_r, self.report_fd = os.pipe() if pid_namespace else (None, None)

    def launched(self, root: int) -> None:
        self.root = root
        self.tree.attach(root)
        if self.report_fd is not None:
            os.close(self.report_fd)  # the launcher holds the only write end now
            self.report_fd = None

    def refresh(self) -> frozenset[int]:
        """Bring the membership up to date (each poll); every member, the launcher's too."""
        members = self.tree.refresh()
        self.tree.reap()
        if self.pid_namespace and self.init is None:
            self.init = next((pid for pid, stat in self.tree.stats.items()
                              if stat.ppid == self.root), None)  # fmt: skip
        return members

    def launcher_pids(self) -> set[int]:
        """The launcher and the namespace's init: ar's processes beside the job."""
        return {self.root, self.init} if self.pid_namespace else set()

    def processes(self) -> int:
        """The job's processes alive now."""
        return len(set(self.tree.alive()) - self.launcher_pids())

    def memory_bytes(self) -> int:
        """The kernel's charge where there is a control group, else the processes' RSS."""
        charged = self.cgroup.memory_bytes() if self.cgroup else None
        if charged is not None:
            return charged
        return self.tree.rss_bytes(exclude=self.launcher_pids())

    def pss_bytes(self) -> int:
        """The processes' PSS: RSS counts the pages they share after a fork once each."""
        return self.tree.pss_bytes(exclude=self.launcher_pids())

    def charged(self) -> bool:
        """Whether memory_bytes() is the kernel's charge (else polled RSS, PSS)."""
        return self.cgroup is not None and "memory" in self.cgroup.dirs

    def memory_verdict(self, cap_mb: float | None) -> str | None:
        """Why the job must die for its memory now, or None; keeps peak_memory up to date.

        With a control group the kernel holds the cap: an OOM kill inside the group is the
        verdict, and the peak is then the kernel's high-water mark of the charge."""
        oom_kills = self.cgroup.oom_kills() if self.cgroup else 0
        if oom_kills:
            peak = self.cgroup.peak_bytes() or 0
            self.peak_memory = max(self.peak_memory, peak)
            where = f"at the memory cap of {cap_mb:g} MB" if cap_mb else "(the machine's memory)"
            return (f"killed: the kernel's OOM killer ended {oom_kills} process(es) {where}; "
                    f"{peak / MB:.0f} MB charged at the peak")  # fmt: skip
        memory = self.memory_bytes()
        if cap_mb and memory > cap_mb * MB and not self.charged():
            memory = self.pss_bytes()  # RSS counts shared pages twice; PSS decides
        self.peak_memory = max(self.peak_memory, memory)
        if cap_mb and memory > cap_mb * MB:
            return f"killed: {memory / MB:.0f} MB of memory, above the cap of {cap_mb:g} MB"
        return None

    def cpu_seconds(self) -> float:
        """CPU time of the job so far, children that already exited included."""
        counted = self.cgroup.cpu_seconds() if self.cgroup else None
        return self.tree.cpu_seconds() if counted is None else counted

    def kill(self, grace: float) -> set[int]:
        """SIGTERM the job and wait up to `grace` s; then SIGKILL all of it. The pids signalled.

        cgroup.kill first where there is one; then the tree's rounds, whose SIGKILL to the
        launcher tears the PID namespace down with everything in it.
        """
        signalled = self.tree.terminate(grace) if grace > 0 else set()
        stray = self.cgroup.pids() if self.cgroup else set()
        if self.cgroup:
            self.cgroup.kill()
        return signalled | stray | self.tree.kill(grace=0)

    def left_in_namespace(self) -> int:
        """How many processes init killed when the job's first process ended (0 without a
        PID namespace). Read once the launcher has exited."""
        if self._report_r is None:
            return 0
        os.set_blocking(self._report_r, False)
        try:
            text = os.read(self._report_r, MAX_REPORT_BYTES).decode("ascii", errors="replace")
        except BlockingIOError:
            return 0
        word, _, count = text.strip().partition(" ")
        return int(count) if word == "left" and count.isdigit() else 0

    def close(self) -> None:
        for fd in (self._report_r, self.report_fd):
            if fd is not None:
                os.close(fd)
        self._report_r = self.report_fd = None
        if self.cgroup:
            self.cgroup.remove()
