"""The kernel's rules for what a job may do: Landlock, a seccomp filter, no privileges.

Part of the launcher (limits.py): standard library only, imported by it as a top-level
module, run in the job's own process just before it execs.

Landlock (Linux >= 5.13, unprivileged, binds root too): the job may then read and execute
only beneath the --read paths, write only beneath the --write paths, use only the --device
files (read, write, ioctl); `offline` also forbids TCP bind and connect (ABI >= 4); from ABI
6 it cannot signal or reach the abstract sockets of processes outside, and at every ABI it
cannot ptrace them or read their /proc files (environ, mem, cwd, and with the launcher's
hidepid=ptraceable /proc, not even their entries). A seccomp filter then takes away unix
sockets and io_uring (see forbid_unix_sockets). A path that does not exist is skipped: that
only takes access away. ctypes, not the `landlock` package: that binding covers files only
(no TCP rules, no scoping) and is a development release.

drop_privileges() leaves the job no capability, even as root in its user namespace: it
cannot unmount the /proc or the empty directories the launcher mounted over the host's
(nor, as root, map root into a user namespace of its own: Linux >= 5.12 asks CAP_SETFCAP).
"""

import ctypes
import os

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all arches
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
EPERM = 1
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

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _prctl(*args: int) -> int:
    padded = (*args, *[0] * (5 - len(args)))
    return _libc.prctl(*(ctypes.c_ulong(arg) for arg in padded))


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct landlock_path_beneath_attr is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
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

    allow_unix keeps socket(AF_UNIX): CUDA fails to start without it (measured, H100). The
    launcher then hides every unix socket of the host from the job's view (mounts.py).
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
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"seccomp filter: {os.strerror(errno)}")
    return True


def drop_privileges() -> None:
    """No capability survives the exec, and no setuid binary can give one back.

    Root in the job's user namespace would otherwise keep every capability there, enough
    to unmount the launcher's /proc and see the host's processes again.
    """
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    with open("/proc/sys/kernel/cap_last_cap", "rb") as handle:
        last = int(handle.read())
    for cap in range(last + 1):
        if _prctl(PR_CAPBSET_DROP, cap) != 0:
            if ctypes.get_errno() == EPERM:
                break  # no CAP_SETPCAP: an unprivileged process, nothing to drop
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


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
        if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        _syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    forbid_unix_sockets(allow_unix=unix == "allow")
    return abi
