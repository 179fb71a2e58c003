"""The job's process tree: who belongs to it, how much memory it holds, and killing all of it.

A process belongs to the job when it descends from the job's first process, shares a
session with a member, or is an orphan that the kernel handed to ar. The last rule needs
ar to be the child subreaper while a job runs: a grandchild that calls setsid() and loses
its parent is then reparented to ar instead of init, and cannot slip out of the tree.

Membership is sticky and cached: each poll lists /proc and reads the stat line only of
processes it has not seen before, so polling costs the same on a busy host as on an idle
one. Linux only (/proc); elsewhere psutil answers the same questions, more slowly.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
HAVE_PROC = os.path.isdir("/proc/self")
KILL_ROUNDS_SECONDS = 5.0  # SIGKILL rounds stop after this long (a process stuck in the kernel)


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


def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, pgid, sid, state) of a process, or None when it is gone."""
    if not HAVE_PROC:
        try:
            proc = psutil.Process(pid)
            return proc.ppid(), os.getpgid(pid), os.getsid(pid), proc.status()[:1].upper()
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
    fields = data[data.rfind(b")") + 2 :].split(b" ", 5)
    return int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode()


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
    """The processes of one job. Create it before starting the job, then attach() the root."""

    def __init__(self) -> None:
        self.me = os.getpid()
        self.my_sid = os.getsid(0)
        self.root: int | None = None
        self.members: set[int] = set()
        self._before = _pids()  # never members, whatever they do later
        self._foreign: set[int] = set()
        self._states: dict[int, str] = {}

    def attach(self, root: int) -> None:
        self.root = root
        self.members = {root}
        self._before.discard(root)

    def _belongs(self, stat: tuple[int, int, int, str], sids: set[int]) -> bool:
        ppid, pgid, sid, _ = stat
        if ppid in self.members or sid in sids or pgid in sids:
            return True
        return ppid == self.me and sid != self.my_sid  # an orphan handed to ar

    def refresh(self, full: bool = False) -> frozenset[int]:
        """Bring the member set up to date; `full` also re-examines every known outsider."""
        pids = _pids()
        self._before &= pids
        self.members &= pids
        self._foreign = set() if full else self._foreign & pids
        unknown = sorted(pids - self.members - self._foreign - self._before)
        sids = {self.root} if self.root else set()
        for pid in list(self.members):
            stat = _stat(pid)
            if stat:
                sids.add(stat[2])
                self._states[pid] = stat[3]
        stats = {pid: _stat(pid) for pid in unknown}
        changed = True
        while changed:  # a child may be listed before its parent is known to belong
            changed = False
            for pid, stat in list(stats.items()):
                if stat and self._belongs(stat, sids):
                    self.members.add(pid)
                    self._states[pid] = stat[3]
                    sids.add(stat[2])
                    del stats[pid]
                    changed = True
        self._foreign |= {pid for pid, stat in stats.items() if stat}
        self._states = {pid: state for pid, state in self._states.items() if pid in self.members}
        return frozenset(self.members)

    def alive(self) -> list[int]:
        """Members that are not zombies."""
        return [pid for pid in self.members if self._states.get(pid, "R") not in "ZX"]

    def rss_bytes(self) -> int:
        return sum(_rss_bytes(pid) for pid in self.alive())

    def pss_bytes(self) -> int:
        return sum(_pss_bytes(pid) for pid in self.alive())

    def reap(self) -> None:
        """Collect the exit status of members that are ar's children, except the root."""
        for pid in list(self.members):
            if pid == self.root:
                continue
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    self.members.discard(pid)
            except ChildProcessError:
                pass  # not ar's child (yet): its own parent reaps it

    def kill(self, grace: float) -> int:
        """SIGTERM everything, wait up to `grace` s, then SIGKILL until nothing is left.

        Every round re-examines all of /proc, so a process forked meanwhile is caught in
        the next one. Returns how many processes were signalled.
        """
        signalled: set[int] = set()
        if grace > 0:
            signalled |= self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._alive_after_refresh():
                time.sleep(0.02)
        deadline = time.monotonic() + KILL_ROUNDS_SECONDS
        while time.monotonic() < deadline:
            if not self._alive_after_refresh():
                break
            signalled |= self._signal_all(signal.SIGKILL)
            time.sleep(0.005)
        self.reap()
        return len(signalled)

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
