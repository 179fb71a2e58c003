"""The launcher's namespaces, and the first process of the job's PID namespace.

Part of the launcher (limits.py): standard library only.

enter() moves the launcher into new namespaces, named by `+`-joined tokens:
  user  a user namespace mapping only our own uid and gid: no capability over ar's
  net   a network namespace with only loopback, up
  pid   a PID namespace and a mount namespace with a /proc of its own (mounts.py)
  mnt   a mount namespace alone (a CUDA model worker: see confine.py)

A PID namespace takes effect for the next child, so the launcher forks (supervise()):
the child is the namespace's init (PID 1) and forks the job. Killing init kills every
process of the namespace at once (the kernel tears it down; nothing can fork out of it,
whatever it does with setsid or double forks), and the launcher's own death kills init
(PR_SET_PDEATHSIG), so SIGKILL to the launcher ends the whole job. Init reaps every
orphan, so the CPU time of children that lived between two polls stays in init's
cutime/cstime (share.py). When the job's first process exits, init kills what it left
behind, counts it, and hands the job's wait status to the launcher, which ends the same
way (same exit code, or the same signal).
"""

import ctypes
import fcntl
import os
import select
import signal
import socket
import struct
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
TOKENS = {"user": CLONE_NEWUSER, "net": CLONE_NEWNET, "pid": CLONE_NEWPID | CLONE_NEWNS,
          "mnt": CLONE_NEWNS}  # fmt: skip
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sH22x"  # struct ifreq: interface name, then flags in a 24-byte union
EXIT_SETUP_FAILED = 125  # the launcher itself failed; the job never started

_libc = ctypes.CDLL(None, use_errno=True)


def tokens(mode: str) -> list[str]:
    names = mode.split("+")
    if not names or any(name not in TOKENS for name in names):
        raise ValueError(f"bad --namespaces {mode!r}")
    return names


def enter(mode: str) -> None:
    """Move into new namespaces (see the module docstring).

    The user namespace maps only our own uid and gid, and holds no capability over ar's:
    even a root job cannot raise its hard limits, read ar's memory or environment, or
    join the host's network namespace again.
    """
    names = tokens(mode)
    uid, gid = os.getuid(), os.getgid()
    flags = 0
    for name in names:
        flags |= TOKENS[name]
    if _libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare({mode}): {os.strerror(errno)}")
    if "user" in names:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    if "net" in names:
        _loopback_up()


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _loopback_up() -> None:
    # Jobs may talk to themselves over 127.0.0.1; a fresh namespace starts with lo down.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        current = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0))
        flags = struct.unpack(IFREQ, current)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def die_with_parent(parent: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # ar died before the request took effect
        os._exit(EXIT_SETUP_FAILED)


def supervise(prepare, become_job, report_fd: int | None) -> None:
    """Fork the namespace's init, wait for it, then end as the job ended. Never returns.

    prepare(): run by init before the job exists (its mounts). become_job(): run in the
    job's process; execs. report_fd: where to write `left N` (processes init killed).
    """
    status_r, status_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(status_r)
        if report_fd is not None:
            os.close(report_fd)
        _init(status_w, prepare, become_job)
    os.close(status_w)
    # ar's SIGTERM is meant for the job (it gets it directly); this process ends with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _, init_status = os.waitpid(init, 0)
    job_status, left = _parse_report(_read_all(status_r))
    if report_fd is not None:
        os.write(report_fd, f"left {left}\n".encode())
        os.close(report_fd)
    _end_as(init_status if job_status is None else job_status)


def _parse_report(text: str) -> tuple[int | None, int]:
    """Init's `STATUS LEFT` line; (None, 0) when init died before writing it."""
    try:
        status, left = map(int, text.split())
    except ValueError:
        return None, 0
    return status, left


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    return b"".join(chunks).decode("ascii", errors="replace")


def _end_as(status: int) -> None:
    """Exit the way a process with this wait status ended."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # a signal whose default is not to end the process
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_SETUP_FAILED)


def _init(status_w: int, prepare, become_job) -> None:
    """PID 1 of the job's namespace: set up, fork the job, reap, report. Never returns."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Its fds (the status pipe) stay closed to the job even as root: no ptrace-level access.
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if _launcher_gone(status_w):  # the launcher died before PDEATHSIG took effect
        os._exit(EXIT_SETUP_FAILED)
    try:
        prepare()
        job = os.fork()
    except (OSError, ValueError, TypeError) as exc:
        sys.stderr.write(f"[sandbox] the launcher failed: {exc}\n")
        os._exit(EXIT_SETUP_FAILED)
    if job == 0:
        os.close(status_w)
        become_job()
    status = _reap_until(job)
    left = _end_the_rest()
    os.write(status_w, f"{status} {left}\n".encode())
    os._exit(0)


def _launcher_gone(status_w: int) -> bool:
    # The write end of a pipe reports POLLERR once its read end (the launcher's) is closed.
    poller = select.poll()
    poller.register(status_w, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _reap_until(job: int) -> int:
    """Reap every child and orphan until the job's first process exits; its wait status."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == job:
            return status


def _end_the_rest() -> int:
    """SIGKILL every other process of the namespace and reap it; how many there were."""
    while _reap_one(os.WNOHANG):  # those that already ended on their own
        pass
    try:
        os.kill(-1, signal.SIGKILL)  # from init: everyone in the namespace but init
    except ProcessLookupError:
        return 0
    left = 0
    while _reap_one(0):
        left += 1
    return left


def _reap_one(flags: int) -> bool:
    try:
        return os.waitpid(-1, flags)[0] > 0
    except ChildProcessError:
        return False
