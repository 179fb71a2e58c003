"""The job's view of the file system, in a mount namespace of its own (Linux).

Part of the launcher (limits.py): standard library only, run before the job execs.

- A fresh /proc for the job's PID namespace, mounted hidepid=ptraceable: it lists only
  the processes of the job's own namespace, and of those only the ones it may ptrace
  (Landlock denies ptrace outside the job's domain), so neither the host's processes nor
  a sibling's (another model worker sharing the namespace) have an entry it can read.
- On the GPU path, where the seccomp filter must let CUDA open unix sockets, every place
  a unix socket of the host can live is replaced by an empty directory: each top-level
  directory but the system trees (SYSTEM_TREES: programs, libraries, /etc, /sys, /proc)
  gets an empty tmpfs over it, and only the paths the job may use are bound back into
  it (its code, data, output, the Python environment, the device files, the NVIDIA
  persistence daemon's socket). The user's D-Bus, docker.sock, an X server or a model
  server's socket then have no path the job can name; abstract sockets are the network
  namespace's own.

Mounts made here are private to the job's namespace and the job holds no capability to
undo them (lsm.drop_privileges); in a nested user namespace they are locked.
"""

import ctypes
import os
import stat

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
EINVAL = 22
SYSTEM_TREES = frozenset(("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "sys",
                          "proc"))  # fmt: skip
# Where the NVIDIA driver talks to its persistence daemon; the only host socket a CUDA job
# may reach (present only where the daemon runs).
NVIDIA_SOCKETS = ("/run/nvidia-persistenced/socket", "/var/run/nvidia-persistenced/socket")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:  # fmt: skip
    encoded = [None if value is None else value.encode() for value in (source, target, fstype)]
    if _libc.mount(*encoded, flags, None if data is None else data.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype or 'bind'} on {target}: {os.strerror(errno)}")


def make_private() -> None:
    """Nothing mounted from here on reaches the host's namespace, nor the other way."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def mount_proc() -> None:
    """A /proc of this PID namespace, hiding what this process may not ptrace."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        _mount("proc", "/proc", "proc", flags, "hidepid=ptraceable")
    except OSError as exc:
        if exc.errno != EINVAL:
            raise
        _mount("proc", "/proc", "proc", flags)  # before Linux 5.8: the namespace alone


def hide_host_sockets(exposed: list[str]) -> None:
    """Empty every top-level directory but SYSTEM_TREES, then bind `exposed` back.

    Call after mount_proc (the bind sources are named through /proc/self/fd) and before
    the Landlock rules are made (they must see the bound paths).
    """
    exposed = [path for path in (*exposed, *NVIDIA_SOCKETS) if os.path.exists(path)]
    # Both the path as named and where its symlinks lead: the job may use either.
    keep = _outermost({os.path.abspath(path) for path in exposed}
                      | {os.path.realpath(path) for path in exposed})  # fmt: skip
    if "/" in keep:
        return
    cwd = os.getcwd()
    handles = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in keep if _hidden(path)}
    try:
        null = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
        for entry in os.scandir("/"):
            target = f"/{entry.name}"
            if entry.name in SYSTEM_TREES or target in keep or entry.is_symlink():
                continue
            if entry.is_dir():
                _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
            elif stat.S_ISSOCK(entry.stat().st_mode):
                _mount(f"/proc/self/fd/{null}", target, None, MS_BIND)  # a socket at the top
        os.close(null)
        for path, handle in handles.items():
            _bind_back(handle, path)
    finally:
        for handle in handles.values():
            os.close(handle)
    try:
        os.chdir(cwd)  # the old working directory is a way into the hidden tree
    except FileNotFoundError:
        raise OSError(f"the working directory {cwd} is not a path the job may use") from None


def _hidden(path: str) -> bool:
    top = path.strip("/").split("/", 1)[0]
    return top not in SYSTEM_TREES and not os.path.islink(f"/{top}")


def _outermost(paths) -> list[str]:
    """The paths that are not beneath another one (binding those covers the rest)."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == parent or path.startswith(parent.rstrip("/") + "/") for parent in kept):
            kept.append(path)
    return kept


def _bind_back(handle: int, path: str) -> None:
    """Make `path` in the empty tree and bind the original (held open as `handle`) on it."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.isdir(f"/proc/self/fd/{handle}"):
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif not os.path.lexists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
