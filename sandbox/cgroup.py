"""Control groups for jobs: the kernel counts, caps and kills what a job holds.

    found = support()                  # probed once per process
    group = JobCgroup.create(found, memory_max=8 << 30, tasks_max=8192)
    # the launcher joins group.join_dirs() before anything of the job runs (limits.py)
    group.memory_bytes(), group.oom_kills(), group.cpu_seconds(); group.kill(); group.remove()

Every job gets a group of its own wherever this machine lets ar make one: cgroup v2 where
it is delegated to ar's user (or ar is root), cgroup v1 hierarchies ar may write. Each
role takes the best hierarchy that offers it (a hybrid machine mixes them):

  memory  what the kernel charges the job: anonymous memory, but also memfds that are never
          mapped, tmpfs files and page tables, which belong to no process a /proc poll sees.
          The cap is the kernel's (memory.max / memory.limit_in_bytes, no swap on top): at
          the cap the kernel reclaims the job's file cache, then OOM-kills inside the group
  pids    a kernel cap on tasks, so a fork bomb stops at the cap instead of at the next poll
  cpu     the job's CPU time, its exited children included (cpu.stat, cpuacct.usage)
  kill    cgroup.kill (v2, Linux >= 5.14): every process of the group at once, no listing
          to race; elsewhere every pid cgroup.procs lists, until none is left

A group is named ar-job-<ar's pid>-<n> beneath ar's own group; groups of an ar that no
longer runs are removed when the next ar looks. Where nothing is writable, support() says
so and the runner keeps polling /proc (proctree.py): its memory cap then misses memfds
and tmpfs files, and the isolation level says so.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

DISABLE_VARIABLE = "AR_SANDBOX_CGROUP"  # "0": never make control groups
KILL_SECONDS = 5.0  # SIGKILL rounds over cgroup.procs stop after this long
REMOVE_SECONDS = 2.0  # an emptied group may take a moment to let go of its last process
STALE_AFTER_SECONDS = 60  # an empty group this old whose ar is gone is removed
# The kernel's cap on a group's tasks, per process the limits allow: threads count as
# tasks (torch starts one per core), and the cap only has to stop a fork bomb.
TASKS_PER_PROCESS = 16
GROUP_NAME = re.compile(r"^ar-(?:job-)?(\d+)(?:-\d+)?$")  # ar-job-<pid>-<n>, or a leaf ar-<pid>
_counter = itertools.count()


class CgroupError(OSError):
    """A group could not be made or set up."""


@dataclass(frozen=True)
class Hierarchy:
    version: int  # 1 or 2
    parent: Path  # ar's own group in it: job groups are made beneath
    top: bool = False  # the parent is the hierarchy's root group (free of v2's leaf rule)


@dataclass(frozen=True)
class Support:
    memory: Hierarchy | None  # charged and capped by the kernel
    pids: Hierarchy | None
    cpu: Hierarchy | None
    kill: Hierarchy | None  # cgroup.kill (v2 only)
    note: str

    @property
    def level(self) -> str | None:
        """`cgroup-v1` or `cgroup-v2`: where memory is charged; None: memory is polled."""
        return f"cgroup-v{self.memory.version}" if self.memory else None


def support() -> Support:
    """What this machine lets ar do with control groups (probed once per process)."""
    return _support(os.environ.get(DISABLE_VARIABLE, "") == "0")


@functools.cache
def _support(disabled: bool) -> Support:
    if disabled:
        why = f"no control groups: turned off by {DISABLE_VARIABLE}=0"
        return Support(None, None, None, None, why)
    if not os.path.exists("/proc/self/cgroup"):
        return Support(None, None, None, None, "no control groups on this system")
    unified, v1 = _writable_hierarchies()
    for hierarchy in [unified, *v1.values()]:
        if hierarchy:
            _remove_stale(hierarchy.parent)
    v2_controllers = _delegated(unified) if unified else set()
    memory = unified if "memory" in v2_controllers else v1.get("memory")
    pids = unified if "pids" in v2_controllers else v1.get("pids")
    cpu = unified or v1.get("cpuacct")
    kill = unified if unified and _has_kill(unified.parent) else None
    roles = {"memory": memory, "pids": pids, "cpu": cpu, "kill": kill}
    have = [f"{name} (v{hier.version})" for name, hier in roles.items() if hier]
    note = ("control groups: " + ", ".join(have)) if have else "no writable control group"
    if not memory:
        note += "; memory capped by polling /proc (memfds and tmpfs files not counted)"
    return Support(memory, pids, cpu, kill, note)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _writable_hierarchies() -> tuple[Hierarchy | None, dict[str, Hierarchy]]:
    """ar's own group in the cgroup2 hierarchy and in each v1 controller's, where writable."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    unified, v1 = None, {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        parts, (fstype, _source, options) = fields.split(), tail.split()[:3]
        root, mount_point = _unescape(parts[3]), _unescape(parts[4])
        if fstype == "cgroup2" and "" in own and unified is None:
            unified = _hierarchy(2, mount_point, root, own[""])
        elif fstype == "cgroup":
            for controller in ("memory", "pids", "cpuacct"):
                if controller in options.split(",") and controller in own and controller not in v1:
                    hierarchy = _hierarchy(1, mount_point, root, own[controller])
                    if hierarchy:
                        v1[controller] = hierarchy
    return unified, v1


def _hierarchy(version: int, mount_point: str, root: str, own: str) -> Hierarchy | None:
    if own != root and not own.startswith(root.rstrip("/") + "/"):
        return None  # ar's group is not visible under this mount
    inside = own[len(root.rstrip("/")) :].lstrip("/")
    parent = Path(mount_point, inside)
    probe = parent / f"ar-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return None
    if not os.access(parent / "cgroup.procs", os.W_OK):
        return None  # a job could not be moved out of ar's group into its own (v2's rule)
    return Hierarchy(version, parent, top=not inside)


def _delegated(unified: Hierarchy) -> set[str]:
    """The controllers (of memory, pids) a job group beneath ar's v2 group will have.

    Enabled ones, or ones ar can enable: in the root group, or where ar is the only
    process of its group (it then moves into a leaf of its own, see _enable_v2).
    """
    parent = unified.parent
    try:
        available = set(_read(parent / "cgroup.controllers").split()) & {"memory", "pids"}
        enabled = set(_read(parent / "cgroup.subtree_control").split())
        others = {int(pid) for pid in _read(parent / "cgroup.procs").split()} - {os.getpid()}
    except OSError:
        return set()
    return available if unified.top or not others else available & enabled


def _has_kill(parent: Path) -> bool:
    probe = parent / f"ar-probe-{os.getpid()}"
    try:
        probe.mkdir()
        try:
            return (probe / "cgroup.kill").exists()
        finally:
            probe.rmdir()
    except OSError:
        return False


def _remove_stale(parent: Path) -> None:
    """Remove the empty groups of ar processes that are gone (a busy group refuses rmdir).

    Only old ones: a process in another PID namespace (the scorer) cannot tell whether the
    ar that named a group lives, and a new group stays empty until its job joins it.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = GROUP_NAME.match(entry.name)
        if (match and entry.is_dir() and not _alive(int(match.group(1)))
                and time.time() - entry.stat().st_mtime > STALE_AFTER_SECONDS):  # fmt: skip
            try:
                os.rmdir(entry.path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> str:
    with open(path) as handle:
        return handle.read()


def _write(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _field(path: Path, name: str) -> int:
    """The value of `name` in a flat-keyed file (memory.stat, memory.events, cpu.stat)."""
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def _enable_v2(parent: Path, wanted: set[str]) -> None:
    """Let the children of `parent` have `wanted` controllers (cgroup v2).

    A group that holds processes hands no controller down (the root excepted): where ar
    itself sits in `parent`, it first moves into a leaf of its own, ar-<pid>.
    """
    enabled = set(_read(parent / "cgroup.subtree_control").split())
    missing = sorted(wanted - enabled)
    if not missing:
        return
    request = " ".join(f"+{name}" for name in missing)
    try:
        _write(parent / "cgroup.subtree_control", request)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise CgroupError(f"cannot enable {request} in {parent}: {exc.strerror}") from None
    leaf = parent / f"ar-{os.getpid()}"
    leaf.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", "0")
    try:
        _write(parent / "cgroup.subtree_control", request)
    except OSError as exc:
        raise CgroupError(f"cannot enable {request} in {parent}: {exc.strerror}") from None


def for_job(memory_max: int | None, max_processes: int) -> tuple[JobCgroup | None, str]:
    """A job's groups where this machine gives them, and a note when memory is not charged."""
    found = support()
    if not (found.memory or found.pids or found.cpu or found.kill):
        return None, found.note
    try:
        made = JobCgroup.create(found, memory_max, max_processes * TASKS_PER_PROCESS)
    except CgroupError as exc:
        return None, f"{exc}; memory capped by polling /proc"
    return made, "" if made.level else found.note


class JobCgroup:
    """One job's groups (one directory per hierarchy used): made before it starts, removed
    after it ended. Every reading comes from the kernel's files, never from the job."""

    def __init__(self, found: Support, dirs: dict[str, Path]) -> None:
        self.found = found
        self.dirs = dirs  # role ("memory", "pids", "cpu", "kill") -> the group's directory

    @classmethod
    def create(cls, found: Support, memory_max: int | None, tasks_max: int) -> JobCgroup:
        """Groups for one job, with the kernel's caps set. CgroupError when refused."""
        name = f"ar-job-{os.getpid()}-{next(_counter)}"
        roles = {role: hier for role, hier in
                 (("memory", found.memory), ("pids", found.pids), ("cpu", found.cpu),
                  ("kill", found.kill)) if hier}  # fmt: skip
        group = cls(found, {})
        try:
            for hier in {hier.parent: hier for hier in roles.values()}.values():
                served = {role for role, other in roles.items() if other == hier}
                if hier.version == 2:
                    _enable_v2(hier.parent, served & {"memory", "pids"})
                (hier.parent / name).mkdir()
                group.dirs.update({role: hier.parent / name for role in served})
            group._set_caps(memory_max, tasks_max)
        except OSError as exc:
            group.remove()
            raise CgroupError(f"cannot make the job's control group: {exc}") from None
        return group

    def _set_caps(self, memory_max: int | None, tasks_max: int) -> None:
        if "pids" in self.dirs:
            _write(self.dirs["pids"] / "pids.max", str(tasks_max))
        memory = self.dirs.get("memory")
        if memory is None or not memory_max:
            return
        if self.found.memory.version == 2:
            _write(memory / "memory.max", str(memory_max))
            if (memory / "memory.swap.max").exists():
                _write(memory / "memory.swap.max", "0")  # swapping is not a way past the cap
            _write(memory / "memory.oom.group", "1")  # the OOM killer takes the whole job
        else:
            _write(memory / "memory.limit_in_bytes", str(memory_max))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(memory_max))

    @property
    def level(self) -> str | None:
        return self.found.level if "memory" in self.dirs else None

    def join_dirs(self) -> list[str]:
        """The directories the launcher joins (one per hierarchy)."""
        return sorted({str(path) for path in self.dirs.values()})

    def memory_bytes(self) -> int | None:
        """The charge the kernel could not reclaim: all of it but the inactive file cache."""
        memory = self.dirs.get("memory")
        if memory is None:
            return None
        if self.found.memory.version == 2:
            usage, cache = int(_read(memory / "memory.current")), "inactive_file"
        else:
            usage, cache = int(_read(memory / "memory.usage_in_bytes")), "total_inactive_file"
        return max(0, usage - _field(memory / "memory.stat", cache))

    def peak_bytes(self) -> int | None:
        """The kernel's high-water mark of the charge (memory.peak needs Linux >= 5.19)."""
        memory = self.dirs.get("memory")
        if memory is None:
            return None
        v2 = self.found.memory.version == 2
        peak = memory / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
        return int(_read(peak)) if peak.exists() else None

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended inside the group."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        if self.found.memory.version == 2:
            return _field(memory / "memory.events", "oom_kill")
        return _field(memory / "memory.oom_control", "oom_kill")

    def cpu_seconds(self) -> float | None:
        """CPU time of every process that ever ran in the group, exited ones included."""
        cpu = self.dirs.get("cpu")
        if cpu is None:
            return None
        if self.found.cpu.version == 2:
            return _field(cpu / "cpu.stat", "usage_usec") / 1e6
        return int(_read(cpu / "cpuacct.usage")) / 1e9

    def pids(self) -> set[int]:
        """Every process in the group now, however it got away from its parents."""
        directory = next(iter(self.dirs.values()), None)
        if directory is None:
            return set()
        try:
            return {int(pid) for pid in _read(directory / "cgroup.procs").split()}
        except OSError:
            return set()

    def kill(self) -> None:
        """SIGKILL everything in the group: at once with cgroup.kill, else round by round."""
        if "kill" in self.dirs:
            try:
                _write(self.dirs["kill"] / "cgroup.kill", "1")
                return
            except OSError:
                pass
        deadline = time.monotonic() + KILL_SECONDS
        while (pids := self.pids() - {os.getpid()}) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        """Remove the groups (once their processes are gone; the charges go to the parent)."""
        deadline = time.monotonic() + REMOVE_SECONDS
        for directory in set(self.dirs.values()):
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break  # left for the next ar to remove (_remove_stale)
                    time.sleep(0.01)
        self.dirs = {}
