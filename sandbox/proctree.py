"""The job's process tree: who belongs to it, how much memory it holds, and killing all of it.

The grouping of last resort (group.py): where the kernel gives a job a PID namespace or a
control group, those kill it whole and count what it holds; the tree still names the
launcher's processes, writes job.pid and counts the processes.

A process belongs to the job when it descends from the job's first process, shares a
session with a member, or is an orphan that the kernel handed to ar. The last rule needs
ar to be the child subreaper while a job runs: a grandchild that calls setsid() and loses
its parent is then reparented to ar instead of init, and cannot slip out of the tree.

Membership is sticky and cached: each poll lists /proc and reads the stat line only of
processes it has not seen before, so polling costs the same on a busy host as on an idle
one. Linux only (/proc); elsewhere psutil answers the same questions, more slowly.

While a job runs, the runner keeps a record of its processes (job.pid, see write_record);
if ar itself is killed, the next ar calls kill_recorded() on it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import psutil

PR_SET_CHILD_SUBREAPER = 36
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
HAVE_PROC = os.path.isdir("/proc/self")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
KILL_ROUNDS_SECONDS = 5.0  # SIGKILL rounds stop after this long (a process stuck in the kernel)


class Stat(NamedTuple):
    ppid: int
    pgid: int
    sid: int
    state: str  # R, S, D, Z, ...
    started: int  # clock ticks after boot; with the pid, names one process for good
    cpu_ticks: int = 0  # user + system time so far, all threads (clock ticks)
    child_ticks: int = 0  # the same of the children it reaped (and theirs, transitively)


def set_subreaper(enabled: bool) -> bool:
    """Make ar the reaper of orphaned descendants (Linux). Returns whether the kernel agreed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_dumpable(enabled: bool) -> bool:
    """Hide ar's /proc entries (environ, memory) from jobs of the same user. Returns the old value.

    A non-dumpable process can only be inspected with CAP_SYS_PTRACE in the initial user
    namespace, which a job inside its own user namespace never has.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
        libc.prctl(PR_SET_DUMPABLE, int(enabled), 0, 0, 0)
        return previous
    except (OSError, AttributeError):
        return True


def read_stat(pid: int) -> Stat | None:
    """The kernel's view of one process, or None when it is gone."""
    if not HAVE_PROC:
        try:
            proc = psutil.Process(pid)
            started = int(proc.create_time() * 100)
            times = proc.cpu_times()
            return Stat(
                proc.ppid(), os.getpgid(pid), os.getsid(pid), proc.status()[:1].upper(), started,
                int((times.user + times.system) * CLOCK_TICKS),
            )
        except (psutil.Error, OSError):
            return None
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 1024)
        finally:
            os.close(fd)
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split(b" ", 20)
    return Stat(int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode(), int(fields[19]),
                int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))


def _pids() -> set[int]:
    if not HAVE_PROC:
        return set(psutil.pids())
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        if HAVE_PROC:
            return 0
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (fork, shared libraries) are split among sharers."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return _rss_bytes(pid)


class ProcTree:
    """The processes of one job. Create it before starting the job, then attach() the root.

    adopt_orphans: count ar's own new children in other sessions as members (they are the
    job's orphans while ar is the subreaper). Off when killing a dead ar's job.
    """

    def __init__(self, adopt_orphans: bool = True) -> None:
        self.me = os.getpid()
        self.my_sid = os.getsid(0)
        self.adopt_orphans = adopt_orphans
        self.root: int | None = None
        self.members: set[int] = set()
        self.stats: dict[int, Stat] = {}
        self.reaped_cpu_seconds = 0.0  # of members ar reaped itself (orphans it adopted)
        self._before = _pids()  # never members, whatever they do later
        self._foreign: set[int] = set()

    def attach(self, root: int) -> None:
        self.root = root
        self.members = {root}
        self._before.discard(root)

    def _belongs(self, stat: Stat, sids: set[int]) -> bool:
        if stat.ppid in self.members or stat.sid in sids or stat.pgid in sids:
            return True
        return self.adopt_orphans and stat.ppid == self.me and stat.sid != self.my_sid

    def refresh(self, full: bool = False) -> frozenset[int]:
        """Bring the member set up to date; `full` also re-examines every known outsider."""
        pids = _pids()
        self._before &= pids
        self.members &= pids
        self._foreign = set() if full else self._foreign & pids
        sids = {self.root} if self.root else set()
        for pid in list(self.members):
            stat = read_stat(pid)
            if stat:
                self.stats[pid] = stat
                sids.add(stat.sid)
        unknown = {
            pid: read_stat(pid)
            for pid in sorted(pids - self.members - self._foreign - self._before)
        }
        changed = True
        while changed:  # a child may be listed before its parent is known to belong
            changed = False
            for pid, stat in list(unknown.items()):
                if stat and self._belongs(stat, sids):
                    self.members.add(pid)
                    self.stats[pid] = stat
                    sids.add(stat.sid)
                    del unknown[pid]
                    changed = True
        self._foreign |= {pid for pid, stat in unknown.items() if stat}
        self.stats = {pid: stat for pid, stat in self.stats.items() if pid in self.members}
        return frozenset(self.members)

    def alive(self) -> list[int]:
        """Members that are not zombies."""
        return [
            pid for pid in self.members if pid in self.stats and self.stats[pid].state not in "ZX"
        ]

    def rss_bytes(self, exclude: set[int] = frozenset()) -> int:
        return sum(_rss_bytes(pid) for pid in self.alive() if pid not in exclude)

    def pss_bytes(self, exclude: set[int] = frozenset()) -> int:
        return sum(_pss_bytes(pid) for pid in self.alive() if pid not in exclude)

    def cpu_seconds(self) -> float:
        """CPU time of the job so far, as of the last refresh: each member's own and that of
        the children it reaped, plus the orphans ar reaped. A child that lived and exited
        between two refreshes is in its reaper's count."""
        ticks = sum(stat.cpu_ticks + stat.child_ticks for stat in self.stats.values())
        return ticks / CLOCK_TICKS + self.reaped_cpu_seconds

    def reap(self) -> None:
        """Collect the exit status of members that are ar's children, except the root."""
        for pid in list(self.members):
            if pid == self.root:
                continue
            try:
                reaped, _status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # not ar's child (yet): its own parent reaps it
            if reaped == pid:
                self.members.discard(pid)
                self.stats.pop(pid, None)
                self.reaped_cpu_seconds += usage.ru_utime + usage.ru_stime

    def terminate(self, grace: float) -> set[int]:
        """SIGTERM everything and wait up to `grace` s for it to end; the pids signalled."""
        signalled = self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive_after_refresh():
            time.sleep(0.02)
        return signalled

    def kill(self, grace: float) -> set[int]:
        """SIGTERM everything, wait up to `grace` s, then SIGKILL until nothing is left.

        Every round re-examines all of /proc, so a process forked meanwhile is caught in
        the next one (a process that forks and exits faster than a listing can still slip
        through: the kernel's groupings close that, see group.py). Returns the pids signalled.
        """
        signalled = self.terminate(grace) if grace > 0 else set()
        deadline = time.monotonic() + KILL_ROUNDS_SECONDS
        while time.monotonic() < deadline:
            if not self._alive_after_refresh():
                break
            signalled |= self._signal_all(signal.SIGKILL)
            time.sleep(0.005)
        self.reap()
        return signalled

    def _alive_after_refresh(self) -> list[int]:
        self.refresh(full=True)
        self.reap()
        return [pid for pid in self.alive() if pid != self.me]

    def _signal_all(self, signum: int) -> set[int]:
        sent = set()
        for pid in self._alive_after_refresh():
            try:
                os.kill(pid, signum)
                if signum == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)  # a stopped process must run to see SIGTERM
                sent.add(pid)
            except ProcessLookupError:
                pass
        return sent


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def write_record(path: Path, root: int, stats: dict[int, Stat]) -> None:
    """job.pid: the root pid first (`<root> <started> <boot id>`), then `<pid> <started>` lines."""
    root_started = stats[root].started if root in stats else 0
    lines = [f"{root} {root_started} {_boot_id()}"]
    lines += [f"{pid} {stat.started}" for pid, stat in sorted(stats.items()) if pid != root]
    fd, spare = tempfile.mkstemp(dir=path.parent, prefix=".job-pid-")
    with open(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(spare, path)


def kill_recorded(path: Path) -> int:
    """Kill what a dead ar's job.pid lists, with the job's session and descendants.

    A pid counts only while it still names the same process (same boot, same start
    time), so a reused pid is never killed. Returns how many processes were signalled.
    """
    try:
        first, *rest = path.read_text().splitlines()
        root, root_started, boot = first.split()
        recorded = {int(pid): int(started) for pid, started in (line.split() for line in rest)}
    except (OSError, ValueError):
        return 0
    if boot != _boot_id():
        return 0
    recorded[int(root)] = int(root_started)
    now = {pid: read_stat(pid) for pid in recorded}
    victims = {pid for pid, stat in now.items() if stat and stat.started == recorded[pid]}
    # While any process of the session lives, its id cannot be handed out again.
    root_now = now[int(root)]
    session = int(root) if root_now is None or root_now.started == int(root_started) else None
    return _kill_from_outside(session, victims)


def _kill_from_outside(session: int | None, victims: set[int]) -> int:
    tree = ProcTree(adopt_orphans=False)
    tree._before = set()
    tree.root = session
    tree.members = set(victims)
    return len(tree.kill(grace=0))
