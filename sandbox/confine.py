"""What an untrusted job may touch, and the launcher options that hold it to that.

    confinement = Confinement(read=(str(code_dir), str(train_bin)), write=(str(out_dir), str(tmp)))
    result = run(cmd, cwd=code_dir, env=env, limits=limits, log_path=log, confinement=confinement)
    result.isolation   # "landlock-v7+userns+netns+pidns+cgroup-v1", or "userns+netns" / "none"

The kernel does the confining, in the job's own process just before it execs (limits.py):
Landlock lets the job read only its own files, the Python environment and the system's
libraries, write only its `write` directories, and neither connect over TCP, nor signal,
trace or read the /proc files of processes outside (ptrace scoping); the user and network
namespaces (netns.py) take the network away, loopback included. ar computes the readable
set, never the job. Landlock binds root as well (it is not DAC), needs no privilege or
binary and costs milliseconds. A small seccomp filter adds what Landlock (ABI <= 7) lacks:
no unix sockets (a model server's or docker's, reached by path), no io_uring. The job holds
no capability, even as root in its user namespace (lsm.drop_privileges).

Each job also gets a PID namespace of its own with its own /proc (nsinit.py, mounts.py):
it cannot see, name or signal any process outside its run, nor read their command lines,
and killing it is the kernel's teardown of the namespace. A CUDA model worker is the one
exception: the driver's IPC handles (cudaipc.py) open only within one PID namespace, so
it shares the scorer's (itself private to one evaluation), where a /proc mounted
hidepid=ptraceable and Landlock's ptrace scoping hide the two workers from each other and
the scorer from both. On the GPU path the seccomp filter lets CUDA open unix sockets; the
job's mount namespace then hides every socket of the host instead (mounts.py).

Where the kernel has no Landlock, the job still runs, unconfined, and `level` says so: the
caller decides whether that is acceptable. AR_SANDBOX_LANDLOCK=0 turns Landlock off, and
AR_SANDBOX_PIDNS=0 the PID and mount namespaces (tests, or a driver that fails under them).
"""

from __future__ import annotations

import functools
import glob
import os
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from sandbox import cgroup, netns
from sandbox.errors import SandboxConfigError
from sandbox.warm import WARM_VARIABLE

DISABLE_VARIABLE = "AR_SANDBOX_LANDLOCK"  # "0": never use Landlock
PIDNS_VARIABLE = "AR_SANDBOX_PIDNS"  # "0": no PID or mount namespace
PROBE_TIMEOUT_SECONDS = 10
SANDBOX_PACKAGE = Path(__file__).resolve().parent
# System files a Python/torch/numpy job reads (measured with strace on import torch, a
# matmul and a numpy memmap); /proc is whole because /proc/self of a child is a new path,
# and Landlock's ptrace scoping keeps the private files of other processes closed.
SYSTEM_READ = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
    "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd", "/etc/group",
    "/etc/nsswitch.conf", "/etc/hosts", "/etc/alternatives", "/proc", "/sys/devices/system/cpu",
    "/sys/devices/system/node", "/sys/fs/cgroup",
)  # fmt: skip
SYSTEM_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# The NVIDIA driver: its device files, sysfs (PCI topology, NUMA) and library directories.
GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri")
GPU_READ = ("/sys", "/usr/local/nvidia", "/usr/local/cuda", "/opt/nvidia", "/etc/nvidia")
# CUDA names its threads (/proc/self/task/TID/comm) and fails to start when it cannot.
# Resolved by the launcher: the job's own process only, not its children.
GPU_WRITE = ("/proc/self/task",)


@dataclass(frozen=True)
class Confinement:
    read: tuple[str, ...] = ()  # extra readable files or directories (code, data files, weights)
    write: tuple[str, ...] = ()  # writable directories (its output dir, its private tmp)
    gpu: bool = False  # also the NVIDIA device files, the driver's libraries, unix sockets


@dataclass(frozen=True)
class Support:
    landlock_abi: int | None  # None: no Landlock (old kernel, not Linux, forbidden, turned off)
    namespaces: str | None  # netns.probe(): "user+net", "net" or None
    level: str  # e.g. "landlock-v7+userns+netns+pidns+cgroup-v1", "userns+netns", "none"
    confines_files: bool
    note: str  # one line, in words
    pid_namespace: bool = False  # each job sees only its own processes
    cgroup: str | None = None  # cgroup.Support.level: where jobs' memory is charged
    files_note: str = ""  # the first part of `note`: what Landlock confines, or why nothing


@dataclass(frozen=True)
class Applied:
    """What one launch will get: the launcher's options and how to describe them."""

    options: tuple[str, ...]  # launcher options, before "--"
    namespaces: str | None  # the launcher's --namespaces, e.g. "user+net+pid"
    level: str
    note: str
    network_isolated: bool
    network_note: str


def support() -> Support:
    """What this kernel offers, probed once per process (and per AR_SANDBOX_* setting)."""
    return _support(os.environ.get(DISABLE_VARIABLE, "") == "0", not _pid_namespaces(),
                    cgroup.support().level)  # fmt: skip


def switches() -> dict[str, str]:
    """The AR_SANDBOX_* variables set in this process: a process that confines jobs of its
    own (the scorer) must follow the same choices."""
    names = (DISABLE_VARIABLE, PIDNS_VARIABLE, cgroup.DISABLE_VARIABLE, WARM_VARIABLE)
    return {name: os.environ[name] for name in names if name in os.environ}


def _pid_namespaces() -> bool:
    return os.environ.get(PIDNS_VARIABLE, "") != "0" and netns.probe().pid


@functools.cache
def _support(disabled: bool, no_pid: bool, cgroup_level: str | None) -> Support:
    probed = netns.probe()
    abi, why = (None, f"Landlock turned off by {DISABLE_VARIABLE}=0") if disabled else _probe()
    namespaces = "+".join(filter(None, [probed.mode, None if no_pid else "pid"])) or None
    level = _level(abi, namespaces, cgroup_level)
    if abi is None:
        files = f"files and processes unconfined: {why}"
    else:
        files = f"Landlock ABI {abi}: {', '.join(_confined(abi, network=False))} confined"
    note = files
    if no_pid:
        why_not = f"turned off by {PIDNS_VARIABLE}=0" if probed.pid else probed.pid_note
        note += f"; other processes' command lines visible ({why_not})"
    note += f"; {cgroup.support().note}"
    return Support(abi, probed.mode, level, abi is not None, note, not no_pid, cgroup_level,
                   files)  # fmt: skip


def _probe() -> tuple[int | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"no Landlock on {sys.platform}"
    try:
        done = subprocess.run(
            netns.launcher_cmd("--probe", "landlock"), capture_output=True, text=True,
            timeout=PROBE_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"the Landlock probe failed: {exc}"
    if done.returncode != 0:
        failure = done.stderr.strip().removeprefix("[sandbox] the launcher failed: ")
        return None, f"the kernel refused Landlock ({failure or done.returncode})"
    return int(done.stdout.strip()), ""


def _confined(abi: int, network: bool) -> list[str]:
    tcp = ["TCP"] if abi >= 4 and not network else []
    return ["reads", "writes", *tcp, "unix sockets", "other processes"]


def _proc_hides_others() -> bool:
    """Whether this process's /proc lists only what it may ptrace (a launcher's hidepid
    /proc, as in the scorer's PID namespace): then a Landlock domain sees only itself."""
    try:
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split(" - ") for line in handle]
    except OSError:
        return False
    procs = [tail.split() for head, tail in mounts if head.split()[4] == "/proc"]
    options = procs[-1][2].split(",") if procs and procs[-1][0] == "proc" else []
    return "hidepid=ptraceable" in options or "hidepid=4" in options


def _level(abi: int | None, namespaces: str | None, cgroup_level: str | None) -> str:
    parts = [f"landlock-v{abi}"] if abi is not None else []
    names = namespaces.split("+") if namespaces else []
    parts += [f"{name}ns" for name in ("user", "net", "pid", "mnt") if name in names]
    parts += [cgroup_level] if cgroup_level else []
    return "+".join(parts) or "none"


def python_paths() -> tuple[str, ...]:
    """The trusted interpreter's environment, without an editable install's project root.

    sys.path entries outside the interpreter's prefixes (an editable install's repository,
    PYTHONPATH, the current directory) are left out; the sandbox package is added by name.
    """
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes |= {
        sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    prefixes |= set(site.getsitepackages())
    roots = [os.path.realpath(path) for path in prefixes if path]
    entries = [
        path for path in sys.path
        if path and (os.path.basename(path.rstrip("/")) in ("site-packages", "dist-packages")
                     or any(_beneath(os.path.realpath(path), root) for root in roots))
    ]  # fmt: skip
    return _unique([*roots, *entries, str(SANDBOX_PACKAGE)])


def default_read(gpu: bool = False) -> tuple[str, ...]:
    paths = [*python_paths(), *SYSTEM_READ]
    if gpu:
        paths += [*GPU_READ, *glob.glob("/usr/local/cuda*")]
        paths += [path for path in os.environ.get("LD_LIBRARY_PATH", "").split(":") if path]
    return _unique(path for path in paths if os.path.exists(path))


def default_devices(gpu: bool = False) -> tuple[str, ...]:
    paths = list(SYSTEM_DEVICES)
    if gpu:
        paths += [path for pattern in GPU_DEVICE_GLOBS for path in sorted(glob.glob(pattern))]
    return _unique(path for path in paths if os.path.exists(path))


def launcher_args(confinement: Confinement | None, *, network: bool = False,
                  hide_sockets: bool = False) -> list[str]:  # fmt: skip
    """The launcher options that apply `confinement` (none where there is nothing to apply).

    hide_sockets: the job will have a mount namespace in which the GPU path hides the host's
    unix sockets (its seccomp filter lets CUDA open them).
    """
    if confinement is None or not support().confines_files:
        return []
    options = ["--confine", "online" if network else "offline"]
    for path in (*default_read(confinement.gpu), *_checked(confinement.read, "read")):
        options += ["--read", path]
    for path in (*_checked(confinement.write, "write"), *(GPU_WRITE if confinement.gpu else ())):
        options += ["--write", path]
    for path in default_devices(confinement.gpu):
        options += ["--device", path]
    if confinement.gpu:  # CUDA does not start without unix sockets
        options += ["--unix", "hidden" if hide_sockets else "allow"]
    return options


def plan(
    confinement: Confinement | None, *, network: bool = False, user_namespace: bool = True,
    pid_namespace: bool = True, cgroup: str | None = None,
) -> Applied:  # fmt: skip
    """Namespaces and confinement for one job, from what the kernel offers and the caller asks.

    pid_namespace=False: the job shares its launcher's PID namespace (a CUDA model worker;
    see the module docstring). cgroup: the level of the job's control group (cgroup.py),
    made by the caller, or None.
    """
    pid = pid_namespace and _pid_namespaces()
    gpu = confinement is not None and confinement.gpu and support().confines_files
    namespaces = netns.plan(network, user_namespace, pid=pid, mount=gpu and _pid_namespaces())
    names = (namespaces.namespaces or "").split("+")
    hidden = gpu and ("pid" in names or "mnt" in names)
    options = launcher_args(confinement, network=network, hide_sockets=hidden)
    abi = support().landlock_abi if options else None
    shared_proc_hides = "mnt" in names and abi is not None and _proc_hides_others()
    level = _level(abi, namespaces.namespaces, cgroup) + ("+hidepid" if shared_proc_hides else "")
    note = _note(confinement, abi, network, names, hidden, shared_proc_hides)
    if confinement is not None:  # an untrusted job: no capability, even as root in its namespace
        options = ["--privileges", "drop", *options]
    if namespaces.namespaces:
        options = ["--namespaces", namespaces.namespaces, *options]
    return Applied(tuple(options), namespaces.namespaces, level, note,
                   namespaces.network_isolated, namespaces.note)  # fmt: skip


def _note(confinement: Confinement | None, abi: int | None, network: bool, names: list[str],
          hidden: bool, shared_proc_hides: bool) -> str:  # fmt: skip
    """One line: what is confined for this job, and what is not."""
    if confinement is None:
        parts = ["files and processes unconfined: no confinement was asked"]
    elif abi is None:
        parts = [support().files_note]
    else:
        parts = [f"Landlock ABI {abi}: {', '.join(_confined(abi, network))} confined"]
        if confinement.gpu and hidden:
            parts[0] = parts[0].replace("unix sockets, ", "")
            parts.append("unix sockets allowed for CUDA, the host's hidden from its mount namespace")
        elif confinement.gpu:
            parts[0] = parts[0].replace("unix sockets, ", "")
            parts.append("unix sockets open (CUDA needs them; no mount namespace to hide the host's)")
        if "user" not in names and "pid" not in names and os.geteuid() == 0:
            # Measured on Linux 6.18: Landlock alone lets a root job read another root
            # process's /proc/PID/environ and maps (mem, cwd and io stay closed).
            parts.append("without a user namespace a root job can read other processes' environ")
    if "pid" in names:
        parts.append("its own PID namespace")
    elif shared_proc_hides:
        parts.append("its launcher's PID namespace, other processes hidden (hidepid, Landlock)")
    else:
        parts.append("other processes' command lines visible (no PID namespace)")
    return "; ".join(parts)


def wrap(
    cmd: list[str],
    confinement: Confinement | None,
    *,
    fsize_bytes: int,
    nofile: int,
    network: bool = False,
    parent_pid: int | None = None,
    user_namespace: bool = True,
) -> list[str]:
    """A command line that runs `cmd` through the launcher, confined, for subprocess.Popen.

    plan() with the same arguments tells the level it gets. Start it with a clean env
    (runner.job_env) and stdin from /dev/null; parent_pid: SIGKILL the job when it dies.
    """
    return launch_cmd(plan(confinement, network=network, user_namespace=user_namespace), cmd,
                      fsize_bytes=fsize_bytes, nofile=nofile, parent_pid=parent_pid)  # fmt: skip


def launch_cmd(applied: Applied, cmd: list[str], *, fsize_bytes: int, nofile: int,
               parent_pid: int | None = None, cgroups: tuple[str, ...] = (),
               report_fd: int | None = None) -> list[str]:  # fmt: skip
    """The launcher's command line. cgroups: the job's control groups, joined first;
    report_fd: where the launcher says how many processes the job left behind (PID
    namespace only; pass it to Popen's pass_fds)."""
    if not cmd:
        raise SandboxConfigError("the sandbox needs a command to run")
    extra = [] if parent_pid is None else ["--parent", str(parent_pid)]
    extra += [word for directory in cgroups for word in ("--cgroup", directory)]
    extra += [] if report_fd is None else ["--report", str(report_fd)]
    return netns.launcher_cmd(
        "--fsize", str(int(fsize_bytes)), "--nofile", str(int(nofile)), *extra,
        *applied.options, "--", *cmd,
    )  # fmt: skip


def _checked(paths: tuple[str, ...], kind: str) -> list[str]:
    checked = []
    for path in paths:
        absolute = os.path.abspath(path)
        if not os.path.exists(absolute):
            raise SandboxConfigError(f"the confinement's {kind} path {absolute} does not exist")
        checked.append(absolute)
    return checked


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unique(paths) -> tuple[str, ...]:
    return tuple(dict.fromkeys(paths))


def import_dir(parent: Path) -> Path:
    """A directory from which a confined job can `import sandbox`: put it in Confinement.read
    and on the job's PYTHONPATH. Needed where ar is an editable install, whose sys.path
    entry is the repository root (never readable); elsewhere site-packages already has it.
    """
    view = Path(parent) / "ar-import"
    view.mkdir(parents=True, exist_ok=True)
    link = view / SANDBOX_PACKAGE.name
    if not link.is_symlink():
        link.symlink_to(SANDBOX_PACKAGE, target_is_directory=True)
    return view
