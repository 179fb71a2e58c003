"""Runs one job under hard limits and tells how it ended.

    result = run([sys.executable, "train.py"], cwd=worktree, env=job_env({"AR_TIME_BUDGET": "300"}),
                 limits=Limits(wall_seconds=330, max_rss_mb=8192), log_path=run_dir / "train.log")

The job starts in its own session through the launcher (limits.py), which applies the
kernel's limits in the child (largest file, open files, no network; with a `confinement`,
Landlock: what it may read and write, no TCP, no other processes) and execs the command.
Where the machine allows, the job runs in a control group of its own (cgroup.py: the
kernel charges and caps its memory, memfds and tmpfs files included, counts its CPU and
kills it whole) and in a PID namespace of its own (nsinit.py: it sees only its own
processes, and dies with the namespace); group.py holds the three groupings together.
stdout and stderr go straight to the log file. ar watches from outside five times a
second: wall clock, memory (the kernel's charge, else the tree's RSS and PSS), the
kernel's OOM kills, GPU memory, free disk, number of processes, size of the log. Crossing
a limit kills the whole job, grandchildren that called setsid() included, and the result
says why. Nothing the job prints can change the outcome: the reason comes from ar's own
clock, the kernel's counters and the exit status.

One job at a time per ar process: while a job runs, ar is the reaper of its orphans (in
a PID namespace, the namespace's init is), and job.pid beside the log lists the job's
processes, so that the next ar can kill them (proctree.kill_recorded) if this one is
killed (the launcher's death already ends a job in a PID namespace).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sandbox import cgroup, confine, inprocess, warm
from sandbox.disks import filesystems, free_mb_at
from sandbox.errors import SandboxConfigError, SandboxError
from sandbox.gpu import GpuWatch
from sandbox.group import JobGroup
from sandbox.phases import PHASE_VARIABLE, PhaseChannel
from sandbox.proctree import KILL_ROUNDS_SECONDS, set_dumpable, set_subreaper, write_record
from sandbox.progress import (
    SLACK,
    LogFollower,
    Progress,
    append_lines,
    create_log,
    drop_middle,
    keep_head_and_tail,
    read_tail,
    restore_name,
)
from sandbox.share import ShareWatch

MB = 2**20
POLL_SECONDS = 0.2
RECORD_NAME = "job.pid"  # beside the log while the job runs: what to kill if ar dies
TERM_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL, when the job is not eating the host
# The only variables of ar's environment a job inherits. API keys and tokens never pass.
ENV_ALLOW = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TMPDIR",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "LD_LIBRARY_PATH",
)  # fmt: skip
REASONS = ("ok", "crash", "timeout", "rss", "vram", "disk", "procs", "signal", "interrupted")

AUTO = "auto"  # run()'s runtime: this process's warm runtime, if any, where allowed
_active = threading.Lock()


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 600.0  # hard kill, counted from the start of the job
    max_rss_mb: float | None = None  # the job's memory (see group.py); None or 0: no cap
    max_vram_mb: float | None = None  # GPU memory of the job; None or 0: no cap
    max_file_mb: float = 2048  # largest file the job may write, its log included (kernel)
    max_open_files: int = 4096
    max_log_mb: float = 50  # beyond this the log keeps its head and tail, drops the middle
    max_processes: int = 512  # processes in the tree at once
    min_free_disk_mb: float = 256  # kill when free space where the job writes drops below
    network: bool = False  # False: offline where the kernel allows it
    user_namespace: bool = True  # False only for a driver that fails in one; weakens the limits

    def __post_init__(self) -> None:
        if not self.wall_seconds > 0:
            raise SandboxConfigError(f"the wall-clock limit must be positive, got {self.wall_seconds}")
        if not self.max_file_mb > 0 or not self.max_log_mb > 0:
            raise SandboxConfigError("max_file_mb and max_log_mb must be positive")
        if self.max_open_files < 16 or self.max_processes < 1:
            raise SandboxConfigError("max_open_files must be at least 16 and max_processes at least 1")


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # negative: the signal that ended the job's first process
    reason: str  # one of REASONS
    wall_seconds: float
    peak_rss_mb: float
    peak_vram_mb: float | None  # None: no GPU was watched
    gpu_util_percent: float | None
    gpu_max_temp_c: float | None
    gpu_note: str
    network_isolated: bool
    network_note: str
    log_tail: str
    note: str = ""  # what ar did and why, in words
    peak_processes: int = 0
    log_dropped_mb: float = 0.0
    last_progress: Progress | None = None
    isolation: str = "none"  # confine.Support.level as applied to this job
    isolation_note: str = ""
    cpu_share: float | None = None  # the share of its cores other processes left it (share.py)
    cpu_seconds: float | None = None  # the job's CPU time, its exited children included
    launch: str = "cold"  # "warm" (sandbox/warm.py), "cold", or "cold: why not warm"
    phases: dict[str, float] | None = None  # phase -> seconds after the start (phases.py)


def job_env(extra: dict[str, str]) -> dict[str, str]:
    """An environment for a job: a few harmless variables of ar's own, then `extra`."""
    env = {name: os.environ[name] for name in ENV_ALLOW if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({name: str(value) for name, value in extra.items()})
    return env


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    limits: Limits,
    log_path: Path,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    confinement: confine.Confinement | None = None,
    pass_fds: tuple[int, ...] = (),
    pid_namespace: bool | None = None,
    runtime: warm.Runtime | None | str = AUTO,
    phases: bool = False,
) -> RunResult:
    """Run `cmd` to its end or to a limit; setting `stop` ends it with reason `interrupted`.

    `confinement`: what the job may read and write (confine.py); None leaves its files and
    processes unconfined. `pass_fds`: descriptors the job inherits (pipes, memfds).
    `pid_namespace`: a PID namespace of its own where the kernel gives one; None: when
    confined (the trusted scorer asks for one: its CUDA model workers share it).
    `runtime`: where a Python command starts warm (sandbox/warm.py); AUTO: this process's
    if it has one, where AR_SANDBOX_WARM allows it; None: cold. `phases`: the job may report its phases
    (sandbox/phases.py) and the result says when ar saw each.
    An exception inside (KeyboardInterrupt, or one raised by on_progress) kills the whole
    tree before it propagates.
    """
    if not cmd:
        raise SandboxError("the sandbox needs a command to run")
    if runtime == AUTO:
        wanted = warm.wanted(confinement is not None and confinement.gpu)
        runtime = warm.current() if wanted else None
    if not _active.acquire(blocking=False):
        raise SandboxError("another sandbox job is already running in this process")
    group = None
    try:
        memory_max = int(limits.max_rss_mb * MB) if limits.max_rss_mb else None
        job_cgroup, cgroup_note = cgroup.for_job(memory_max, limits.max_processes)
        applied = confine.plan(
            confinement, network=limits.network, user_namespace=limits.user_namespace,
            pid_namespace=confinement is not None if pid_namespace is None else pid_namespace,
            cgroup=job_cgroup.level if job_cgroup else None,
        )  # fmt: skip
        group = JobGroup(job_cgroup, "pid" in (applied.namespaces or "").split("+"))
        launcher = confine.launch_cmd(
            applied, cmd, fsize_bytes=int(limits.max_file_mb * MB),
            nofile=limits.max_open_files, parent_pid=os.getpid(),
            cgroups=tuple(job_cgroup.join_dirs()) if job_cgroup else (),
            report_fd=group.report_fd,
        )  # fmt: skip
        fds = (*pass_fds, *([group.report_fd] if group.report_fd is not None else []))
        channel = PhaseChannel() if phases else None
        if channel:
            env = {**env, PHASE_VARIABLE: str(channel.write_fd)}
            fds = (*fds, channel.write_fd)
        start = warm.Start(launcher, Path(cwd), env, fds, runtime if inprocess.parse(cmd) else None)
        return _run(start, applied, group, cgroup_note, limits, Path(log_path), on_progress, stop,
                    channel)  # fmt: skip
    finally:
        if group:
            group.close()
        _active.release()


def _run(start, applied, group, cgroup_note, limits, log_path, on_progress, stop,
         channel) -> RunResult:  # fmt: skip
    log_fd = create_log(log_path)
    reaper = set_subreaper(True)
    dumpable = set_dumpable(False)
    watch = None
    try:
        started = time.monotonic()
        try:
            popen, launch = start.launch(log_fd)
        except OSError as exc:
            raise SandboxError(f"cannot start the job in {start.cwd}: {exc}") from exc
        group.launched(popen.pid)
        if channel:
            channel.started(started)
        try:
            watch = _Watch(popen, group, limits, start.cwd, log_fd, log_path, start.env, started,
                           on_progress, stop, channel)  # fmt: skip
            watch.until_exit()
        except BaseException:
            _kill_job(group, popen, grace=0)
            raise
        return replace(watch.result(applied, cgroup_note, reaper), launch=launch,
                       phases=channel.seen() if channel else None)  # fmt: skip
    finally:
        if watch:
            watch.close()
        if channel:
            channel.close()
        os.close(log_fd)
        set_subreaper(False)
        set_dumpable(dumpable)


def _kill_job(group: JobGroup, popen, grace: float) -> bool:
    """Kill the whole job and reap the root. A second Ctrl-C meanwhile does not cut it short.

    Returns False when the root outlived every SIGKILL.
    """
    for _attempt in range(3):
        try:
            group.kill(grace)
            popen.wait(KILL_ROUNDS_SECONDS)
            return True
        except KeyboardInterrupt:
            grace = 0
        except subprocess.TimeoutExpired:
            return False
    return popen.poll() is not None


def _pidfd_poller(pid: int) -> tuple[int, select.poll] | None:
    """A poll object that wakes when the process exits (Linux 5.3+), else None."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return pidfd, poller


class _Watch:
    """The monitoring of one running job, and what it saw."""

    def __init__(self, popen, group, limits, cwd, log_fd, log_path, env, started, on_progress,
                 stop, channel):  # fmt: skip
        self.popen, self.group, self.limits = popen, group, limits
        self.log_fd, self.log_path = log_fd, log_path
        self.started, self.on_progress, self.stop = started, on_progress, stop
        tmp = env.get("TMPDIR") or tempfile.gettempdir()
        self.disks = filesystems([cwd, log_path.parent, Path(tmp), Path("/dev/shm")])
        self.members: frozenset[int] = frozenset()
        self.record_path = log_path.with_name(RECORD_NAME)
        self.gpu = GpuWatch(env.get("CUDA_VISIBLE_DEVICES"))
        self.gpu.start(lambda: self.members - self.group.launcher_pids())
        self.follower = LogFollower(log_fd)
        self.exit_poller = _pidfd_poller(popen.pid)
        self.kill_reason: str | None = None
        self.notes: list[str] = []
        self.peak_processes = 1
        self.dropped = 0
        self.last_progress: Progress | None = None
        self.ended = started
        self.share = ShareWatch()
        self.channel = channel
        if channel and self.exit_poller:  # a phase wakes the watch: ar's clock reads it at once
            self.exit_poller[1].register(channel.read_fd, select.POLLIN)

    def until_exit(self) -> None:
        deadline = self.started + self.limits.wall_seconds
        while self.popen.poll() is None:
            now = time.monotonic()
            verdict = self._check(now)
            if verdict:
                self.kill(*verdict)
                return
            self._wait(max(0.0, min(POLL_SECONDS, deadline - now)))
        self.ended = time.monotonic()

    def _wait(self, seconds: float) -> None:
        if self.exit_poller:
            self.exit_poller[1].poll(seconds * 1000)
        else:
            try:
                self.popen.wait(seconds)
            except subprocess.TimeoutExpired:
                pass
        if self.channel and self.channel.listening:
            self.channel.read()
            if not self.channel.listening:  # exhausted: no more wake-ups
                if self.exit_poller:
                    self.exit_poller[1].unregister(self.channel.read_fd)
                self.channel.stop()

    def _check(self, now: float) -> tuple[str, str, float] | None:
        """(reason, note, grace) when the job must die now, else None."""
        limits = self.limits
        if now - self.started >= limits.wall_seconds:
            wall = f"killed at the wall-clock limit of {limits.wall_seconds:g} s"
            return "timeout", wall, TERM_GRACE_SECONDS
        if self.stop is not None and self.stop.is_set():
            return "interrupted", "stopped by ar", TERM_GRACE_SECONDS
        members = self.group.refresh()
        self.share.sample(self.group.cpu_seconds())
        if members != self.members:
            self.members = members
            self._record()
        processes = self.group.processes()
        self.peak_processes = max(self.peak_processes, processes)
        if processes > limits.max_processes:
            return "procs", f"killed: {processes} processes, above the cap of {limits.max_processes}", 0
        verdict = self.group.memory_verdict(limits.max_rss_mb)
        if verdict:
            return "rss", verdict, 0
        vram = self.gpu.current_vram_mb
        if limits.max_vram_mb and vram > limits.max_vram_mb:
            return (
                "vram",
                f"killed: {vram:.0f} MB of GPU memory, above the cap of {limits.max_vram_mb:g} MB",
                TERM_GRACE_SECONDS,
            )
        for path in self.disks:
            free_mb = free_mb_at(path)
            if free_mb is not None and free_mb < limits.min_free_disk_mb:
                return "disk", f"killed: {free_mb:.0f} MB left on the disk holding {path}", 0
        if os.fstat(self.log_fd).st_size > limits.max_log_mb * MB + SLACK:
            self.dropped = drop_middle(self.log_fd, int(limits.max_log_mb * MB), self.dropped)
        self._progress()
        return None

    def _record(self) -> None:
        try:
            write_record(self.record_path, self.popen.pid, self.group.tree.stats)
        except OSError:
            pass  # the job may have removed the directory; recovery then has less to go on

    def _progress(self) -> None:
        progress = self.follower.poll()
        if progress and progress != self.last_progress:
            self.last_progress = progress
            if self.on_progress:
                self.on_progress(progress)

    def kill(self, reason: str, note: str, grace: float) -> None:
        self.kill_reason = reason
        self.notes.append(note)
        if not _kill_job(self.group, self.popen, grace):
            self.notes.append("the job's first process would not die (stuck in the kernel?)")
        self.ended = time.monotonic()

    def result(self, applied: confine.Applied, cgroup_note: str, reaper: bool) -> RunResult:
        if self.kill_reason is None:
            verdict = self.group.memory_verdict(self.limits.max_rss_mb)  # an OOM kill since
            if verdict:
                self.kill_reason = "rss"
                self.notes.append(verdict)
        leftovers = len(self.group.kill(grace=0)) + self.group.left_in_namespace()
        if leftovers:
            self.notes.append(f"killed {leftovers} process(es) the job left behind")
        if not reaper:
            self.notes.append(
                "ar could not become the reaper of orphans: a daemonised grandchild may survive"
            )
        self._progress()
        exit_code = self.popen.returncode
        reason = self.kill_reason or _exit_reason(exit_code)
        if reason == "signal":
            self.notes.append(_signal_note(-exit_code))
        if os.fstat(self.log_fd).st_size >= int(self.limits.max_file_mb * MB):
            cap = self.limits.max_file_mb
            self.notes.append(
                f"the log reached the file-size cap of {cap:g} MB: later output was lost"
            )
        cap = int(self.limits.max_log_mb * MB)
        self.dropped = keep_head_and_tail(self.log_fd, cap, self.dropped)
        restored = restore_name(self.log_fd, self.log_path)
        if restored:
            self.notes.append(restored)
        append_lines(self.log_fd, [f"[sandbox] {note}" for note in self.notes])
        gpu = self.gpu.stop()
        return RunResult(
            exit_code=exit_code, reason=reason, wall_seconds=round(self.ended - self.started, 3),
            peak_rss_mb=round(self.group.peak_memory / MB, 1), peak_vram_mb=gpu.peak_vram_mb,
            gpu_util_percent=gpu.util_percent, gpu_max_temp_c=gpu.max_temp_c, gpu_note=gpu.note,
            network_isolated=applied.network_isolated, network_note=applied.network_note,
            log_tail=read_tail(self.log_fd), note="; ".join(self.notes),
            peak_processes=self.peak_processes, log_dropped_mb=round(self.dropped / MB, 1),
            last_progress=self.last_progress, isolation=applied.level,
            isolation_note="; ".join(filter(None, [applied.note, cgroup_note])),
            cpu_share=self.share.share(), cpu_seconds=self.share.job_seconds(),
        )  # fmt: skip

    def close(self) -> None:
        self.gpu.stop()
        self.record_path.unlink(missing_ok=True)
        if self.exit_poller:
            os.close(self.exit_poller[0])


def _signal_note(signum: int) -> str:
    name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
    hint = " (the kernel's OOM killer sends SIGKILL)" if signum == signal.SIGKILL else ""
    return f"the job died from {name}{hint}"


def _exit_reason(exit_code: int | None) -> str:
    if exit_code == 0:
        return "ok"
    if exit_code is None or exit_code > 0:
        return "crash"
    return "signal"
