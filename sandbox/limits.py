"""The launcher that runs inside the job's process: apply the limits, then become the job.

    python -I -S limits.py --fsize BYTES --nofile N [--namespaces user|user+net|net]
                           [--parent PID] -- CMD...
    python -I -S limits.py --probe user+net|net

It moves into fresh namespaces when asked (a user namespace; a network namespace with only
loopback up), sets the resource limits (largest file, open files, no core dumps), asks the
kernel to SIGKILL it if ar dies, and execs CMD.
Doing this in the child after fork, instead of in a preexec_fn, keeps ar's own process
free of fork-unsafe Python code. Standard library only and run with -S: it starts in a
few milliseconds and imports nothing of ar.
"""

import ctypes
import fcntl
import os
import resource
import signal
import socket
import struct
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sH22x"  # struct ifreq: interface name, then flags in a 24-byte union
EXIT_SETUP_FAILED = 125  # the launcher itself failed; the job never started
NAMESPACES = {"user": CLONE_NEWUSER, "user+net": CLONE_NEWUSER | CLONE_NEWNET, "net": CLONE_NEWNET}


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def enter_namespaces(mode: str) -> None:
    """Move into new namespaces: `user`, `user+net` or `net` (see NAMESPACES).

    The user namespace maps only our own uid and gid, and holds no capability over ar's:
    even a root job cannot raise its hard limits, read ar's memory or environment, or
    join the host's network namespace again. The network namespace has loopback only.
    """
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    flags = NAMESPACES[mode]
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare({mode}): {os.strerror(errno)}")
    if flags & CLONE_NEWUSER:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    if flags & CLONE_NEWNET:
        _loopback_up()


def _loopback_up() -> None:
    # Jobs may talk to themselves over 127.0.0.1; a fresh namespace starts with lo down.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        current = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0))
        flags = struct.unpack(IFREQ, current)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def set_limits(fsize: int, nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        nofile = min(nofile, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # ar died before the request took effect
        os._exit(EXIT_SETUP_FAILED)


def _parse(argv: list[str]) -> dict:
    options = {"fsize": None, "nofile": None, "namespaces": None, "parent": None, "probe": None}
    args = list(argv)
    while args and args[0] != "--":
        name = args.pop(0)
        key = name.removeprefix("--")
        if key not in options or not args:
            raise ValueError(f"bad launcher argument {name!r}")
        options[key] = args.pop(0)
    options["cmd"] = args[1:]
    return options


def main(argv: list[str]) -> None:
    try:
        options = _parse(argv)
        if options["probe"]:
            enter_namespaces(options["probe"])
            os._exit(0)
        if options["namespaces"]:
            enter_namespaces(options["namespaces"])
        set_limits(int(options["fsize"]), int(options["nofile"]))
        if options["parent"]:
            die_with_parent(int(options["parent"]))
        cmd = options["cmd"]
        if not cmd:
            raise ValueError("no command after --")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        sys.stderr.write(f"[sandbox] the launcher failed: {exc}\n")
        os._exit(EXIT_SETUP_FAILED)
    # Python ignores these two; ignored signals survive exec, so give the job the defaults.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        sys.stderr.write(f"[sandbox] cannot run {cmd[0]!r}: {exc.strerror}\n")
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


if __name__ == "__main__":
    main(sys.argv[1:])
