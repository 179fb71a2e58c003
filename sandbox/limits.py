"""The launcher that runs inside the job's process: apply the limits, then become the job.

    python -I -S limits.py --fsize BYTES --nofile N [--namespaces user|user+net|net]
                           [--parent PID] [--confine offline|online [--read PATH]...
                           [--write PATH]... [--device PATH]... [--unix allow]] -- CMD...
    python -I -S limits.py --probe user+net|net|landlock

It moves into fresh namespaces when asked (a user namespace; a network namespace with only
loopback up), sets the resource limits (largest file, open files, no core dumps), asks the
kernel to SIGKILL it if ar dies, confines it with Landlock when asked, and execs CMD.

Landlock (Linux >= 5.13, unprivileged, binds root too): the job may then read and execute
only beneath the --read paths, write only beneath the --write paths, use only the --device
files (read, write, ioctl); `offline` also forbids TCP bind and connect (ABI >= 4); from ABI
6 it cannot signal or reach the abstract sockets of processes outside, and at every ABI it
cannot ptrace them or read their /proc files (environ, mem, cwd); a seccomp filter then
takes away unix sockets and io_uring (see forbid_unix_sockets). A path that does not exist
is skipped: that only takes access away. Any other failure stops the launch: never
unconfined by accident. ctypes, not the `landlock` package: that binding covers files only
(no TCP rules, no scoping) and is a development release.
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
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all arches
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
# seccomp: no socket(AF_UNIX) (Landlock cannot stop a connect to a unix socket by path
# before ABI 8: a model server's, docker's), no io_uring (it could open one anyway), no
# foreign-ABI syscalls (int 0x80, x32). socketpair() stays: it reaches no one.
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
AF_UNIX, EACCES = 1, 13
SYSCALL_ABI = {  # machine: (AUDIT_ARCH_*, socket, io_uring_setup)
    "x86_64": (0xC000003E, 41, 425),
    "aarch64": (0xC00000B7, 198, 425),
}
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


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct landlock_path_beneath_attr is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(number: int, *args) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"Landlock syscall {number}: {os.strerror(errno)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; OSError where there is none."""
    return _syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                    ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))  # fmt: skip


def _handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def _allow(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            rights &= FS_FILE_RIGHTS  # a file takes only file rights (EINVAL otherwise)
        rule = _PathBeneathAttr(rights, fd)
        _syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                 ctypes.byref(rule), ctypes.c_uint32(0))  # fmt: skip
    finally:
        os.close(fd)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]  # fmt: skip


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def forbid_unix_sockets(allow_unix: bool = False) -> bool:
    """Install the seccomp filter above; False on a machine whose syscall ABI is not known.

    allow_unix keeps socket(AF_UNIX): CUDA fails to start without it (measured, H100).
    """
    known = SYSCALL_ABI.get(os.uname().machine)
    if known is None:
        return False
    arch, socket_nr, io_uring_nr = known
    if allow_unix:
        socket_nr = 0xFFFFFFFF  # matches no syscall
    deny = SECCOMP_RET_ERRNO | EACCES
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),  # 0: seccomp_data.arch
        (BPF_JEQ_K, 0, 8, arch),  # 1: a foreign ABI -> 10
        (BPF_LD_W_ABS, 0, 0, 0),  # 2: seccomp_data.nr
        (BPF_JGE_K, 6, 0, 0x40000000),  # 3: x32 -> 10
        (BPF_JEQ_K, 5, 0, io_uring_nr),  # 4: -> 10
        (BPF_JEQ_K, 1, 0, socket_nr),  # 5: -> 7
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 6
        (BPF_LD_W_ABS, 0, 0, 16),  # 7: low half of args[0], the domain (little-endian)
        (BPF_JEQ_K, 1, 0, AF_UNIX),  # 8: -> 10
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 9
        (BPF_RET_K, 0, 0, deny),  # 10
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*line) for line in program])
    fprog = _SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"seccomp filter: {os.strerror(errno)}")
    return True


def confine(
    mode: str, read: list[str], write: list[str], devices: list[str], unix: str = "deny"
) -> int:
    """Restrict this process and what it execs with Landlock; returns the ABI used."""
    if mode not in ("offline", "online"):
        raise ValueError(f"bad --confine {mode!r}")
    abi = landlock_abi()
    handled = _handled_fs(abi)
    attr = _RulesetAttr(handled, 0, 0)
    if abi >= 4 and mode == "offline":
        attr.net = NET_BIND_TCP | NET_CONNECT_TCP  # handled and never allowed: no TCP at all
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    ruleset = _syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                       ctypes.c_uint32(0))  # fmt: skip
    try:
        readable = FS_READ_FILE | FS_READ_DIR | FS_EXECUTE
        for path in read:
            _allow(ruleset, path, readable & handled)
        for path in write:
            _allow(ruleset, path, handled)
        for path in devices:
            _allow(ruleset, path, (FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV) & handled)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        _syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    forbid_unix_sockets(allow_unix=unix == "allow")
    return abi


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
    options = {"fsize": None, "nofile": None, "namespaces": None, "parent": None, "probe": None,
               "confine": None, "read": [], "write": [], "device": [], "unix": "deny"}  # fmt: skip
    args = list(argv)
    while args and args[0] != "--":
        name = args.pop(0)
        key = name.removeprefix("--")
        if key not in options or not args:
            raise ValueError(f"bad launcher argument {name!r}")
        if isinstance(options[key], list):
            options[key].append(args.pop(0))
        else:
            options[key] = args.pop(0)
    options["cmd"] = args[1:]
    return options


def main(argv: list[str]) -> None:
    try:
        options = _parse(argv)
        if options["probe"] == "landlock":  # restrict this process for real, then tell the ABI
            sys.stdout.write(f"{confine('offline', ['/'], [], [])}\n")
            sys.stdout.flush()
            os._exit(0)
        if options["probe"]:
            enter_namespaces(options["probe"])
            os._exit(0)
        if options["namespaces"]:
            enter_namespaces(options["namespaces"])
        set_limits(int(options["fsize"]), int(options["nofile"]))
        if options["parent"]:
            die_with_parent(int(options["parent"]))
        if options["confine"]:
            confine(*(options[key] for key in ("confine", "read", "write", "device", "unix")))
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
