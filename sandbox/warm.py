"""The warm runtime: start a confined job without paying for the interpreter and torch.

    process = runtime().spawn(launcher, cwd, env, stdio=(0, log, log), pass_fds=())
    process = fork_launch(launcher, cwd, env, stdio, pass_fds)   # from a warm process itself
    process.poll(); process.wait(timeout); process.returncode    # as subprocess.Popen's

`launcher` is the cold path's command line (confine.launch_cmd: `python -I -S limits.py
OPTIONS -- CMD`), unchanged: the warm child applies exactly those options with the same
code (limits.launch), in the same order, and differs only at the very end, where the
cold path execs CMD and the warm child, for a Python command of this interpreter, runs it
in its own confined process (sandbox/inprocess.py). Everything up to then (control
groups, limits, namespaces, the PID namespace's init, no privileges, Landlock, seccomp)
happens before a byte of the candidate's code is read, as in the cold path.

Where the warm process comes from. A Runtime is one per slot (one per process that runs
jobs: a slot's worker process, a Ray node, a test): a server (sandbox/zygote.py) started
on first use with a clean environment, which imports torch once and forks each job. The
job is re-parented to this process, which must be a child subreaper (runner.py makes it
one while a job runs), so that it is this process's child and is waited for like a Popen
child. The trusted scorer, itself a warm job, forks its CPU model workers directly
(fork_launch), before it has read any evaluation data: their memory holds nothing the
scorer learns later.

When a job cannot start warm the caller runs it cold (runner.py), and says which ran.
Where: AR_SANDBOX_WARM=0; a command that is not this interpreter's; CUDA jobs unless
AR_SANDBOX_WARM=1 (forking before CUDA starts is sound, but not yet verified on a GPU:
docs/internals.md); a server that failed to start or died (its reason is the note).
A job whose environment changes how torch or OpenMP load (OMP_*, MKL_*, LD_*, CUDA_*, ...,
read once when the libraries load) gets a server started with that environment.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WARM_VARIABLE = "AR_SANDBOX_WARM"  # "0": always cold; "1": warm for CUDA jobs too; unset: CPU
SPAWN, READY, GO = b"SPWN", b"REDY", b"GO"
READY_TIMEOUT_S = 180.0  # the server's imports, on a busy machine
SPAWN_TIMEOUT_S = 10.0  # from the request to the child's `PID n`
REAP_WAIT_S = 2.0  # for a child that could not start to exit after saying so
PR_GET_CHILD_SUBREAPER = 37
# Read by the libraries when they load (once, in the server): a job whose value differs
# needs a server of its own. Everything else is the job's own, set when it starts.
BOOT_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "ONEDNN_", "DNNL_", "ATEN_",
                 "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "NVIDIA_", "LD_", "MALLOC_", "GLIBC_",
                 "PYTHON", "LANG", "LC_", "TRITON_")  # fmt: skip
NOT_BOOT = ("PYTHONPATH", "PYTHONUNBUFFERED", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")

_libc = ctypes.CDLL(None, use_errno=True)


class WarmUnavailable(Exception):
    """The job cannot start warm; the message says why (the caller runs it cold)."""


def wanted(gpu: bool) -> bool:
    """Whether AR_SANDBOX_WARM lets a job (on CUDA when `gpu`) start warm."""
    setting = os.environ.get(WARM_VARIABLE, "")
    if setting == "0" or not sys.platform.startswith("linux"):
        return False
    return setting == "1" or not gpu


def boot_env(env: dict[str, str]) -> dict[str, str]:
    """The part of a job's environment the libraries read when they load."""
    return {name: value for name, value in sorted(env.items())
            if name.startswith(BOOT_PREFIXES) and name not in NOT_BOOT}  # fmt: skip


class WarmProcess:
    """A child started warm: the launcher's process, this process's child, as Popen has it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode  # reaped elsewhere: not ours to report
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            _wait_exit(self.pid, 0.05 if left is None else min(0.05, left))
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)  # not reaped yet: the pid is still this child's

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _wait_exit(pid: int, seconds: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        time.sleep(seconds)
        return
    try:
        select.select([fd], [], [], seconds)
    finally:
        os.close(fd)


class Runtime:
    """One warm server for this process. Started in the background on first use, and again
    when a job's boot environment differs from the one it was started with; a job that
    comes while it is starting runs cold (a cold start costs what waiting would)."""

    def __init__(self) -> None:
        self._server: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._boot: dict[str, str] | None = None
        self._home: str | None = None
        self._ready = False
        self._lock = threading.Lock()
        self.note = ""  # why the server is not there, when it is not

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (it outlives every job: it is not one)."""
        return self._server.pid if self._alive() else None

    def spawn(self, launcher: list[str], cwd: str, env: dict[str, str],
              stdio: tuple[int, int, int], pass_fds: tuple[int, ...] = ()) -> WarmProcess:  # fmt: skip
        """Start `launcher` warm; WarmUnavailable when it cannot be (the caller runs it cold)."""
        if not _is_subreaper():
            raise WarmUnavailable("this process is not a child subreaper")
        with self._lock:
            control = self._serving(boot_env(env))
            request = {"launcher": _launcher_args(launcher), "cwd": str(cwd), "env": env,
                       "fds": [0, 1, 2, *pass_fds], "parent": os.getpid()}  # fmt: skip
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with ours:
                try:
                    socket.send_fds(ours, [json.dumps(request).encode()], [*stdio, *pass_fds])
                    socket.send_fds(control, [SPAWN], [theirs.fileno()])
                except OSError as exc:
                    self._stop(f"the warm server is gone ({exc})")
                    raise WarmUnavailable(self.note) from None
                finally:
                    theirs.close()
                try:
                    pid = _read_pid(ours)
                    try:  # the child starts only now: had this given up, it would not start at all
                        ours.send(GO)
                    except OSError as exc:
                        raise WarmUnavailable(f"the warm child is gone ({exc})") from None
                    return WarmProcess(pid)
                except WarmUnavailable as exc:
                    if not self._alive():  # it died: the next job starts a new one
                        self._stop(str(exc))
                    raise

    def prestart(self, env: dict[str, str]) -> None:
        """Start the server for jobs with `env` now, unless it runs already."""
        with self._lock:
            boot = boot_env(env)
            if not self._alive() or boot != self._boot:
                self._stop("")
                self._start(boot)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait for the server (started again if it died); whether it serves now."""
        with self._lock:
            if self._boot is not None and not self._alive():
                boot = self._boot
                self._stop("")
                self._start(boot)
            if self._control is not None and not self._ready:
                self._check_ready(timeout)
            return self._ready

    def _alive(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def _serving(self, boot: dict[str, str]) -> socket.socket:
        """The control socket of a ready server for `boot`, or WarmUnavailable (and a start)."""
        if not self._alive() or boot != self._boot:
            self._stop("")
            self._start(boot)
        self._check_ready(0)
        if not self._ready:
            raise WarmUnavailable(self.note or "the warm server is still starting")
        return self._control

    def _start(self, boot: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._home = tempfile.mkdtemp(prefix="ar-warm-")
        # numpy's OpenBLAS would start its threads at import: the server stays one thread,
        # so that nothing another thread holds is copied locked into a fork (a job's numpy
        # BLAS then runs on one thread; torch's own threads are the job's, inprocess.py).
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": self._home,
               "TMPDIR": self._home, "OPENBLAS_NUM_THREADS": "1", **boot}  # fmt: skip
        try:
            # Its own process group (no terminal's Ctrl-C), but ar's session: a job's tree
            # never takes it for one of the job's orphans (proctree.py).
            self._server = subprocess.Popen(
                [sys.executable, "-I", "-m", "sandbox.zygote", "--control", str(theirs.fileno()),
                 "--parent", str(os.getpid())], env=env, cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=[theirs.fileno()],
                process_group=0,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            self.note = f"the warm server could not start: {exc}"
            return
        finally:
            theirs.close()
        self._control, self._boot, self._ready, self.note = ours, boot, False, ""

    def _check_ready(self, timeout: float) -> None:
        if self._ready or self._control is None or not _readable(self._control, timeout):
            return
        try:
            answer = self._control.recv(16)
        except OSError:
            answer = b""
        if answer == READY:
            self._ready = True
            self._server.stderr.close()
            return
        why = self._server.stderr.read(2000).decode(errors="replace").strip().splitlines()
        self._stop(f"the warm server did not start: {why[-1] if why else 'no answer'}")

    def _stop(self, note: str) -> None:
        self.note = note
        if self._control is not None:
            self._control.close()  # the server exits when its control socket closes
        if self._server is not None:
            try:
                self._server.wait(2)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            if self._server.stderr and not self._server.stderr.closed:
                self._server.stderr.close()
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
        self._server = self._control = self._home = None  # _boot stays: wait_ready restarts it
        self._ready = False

    def close(self) -> None:
        with self._lock:
            self._stop("")
            self._boot = None


def _is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    return _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and bool(flag.value)


def _launcher_args(launcher: list[str]) -> list[str]:
    """The options after limits.py in a launcher command line (confine.launch_cmd)."""
    for index, word in enumerate(launcher):
        if word.endswith("limits.py"):
            return launcher[index + 1 :]
    raise WarmUnavailable("not a launcher command line")


def _readable(sock: socket.socket, seconds: float) -> bool:
    return bool(select.select([sock], [], [], seconds)[0])


def _read_pid(channel: socket.socket) -> int:
    try:
        if not _readable(channel, SPAWN_TIMEOUT_S):
            raise WarmUnavailable("the warm server did not answer")
        answer = channel.recv(4096).decode(errors="replace")
    except OSError as exc:
        raise WarmUnavailable(f"the warm server is gone ({exc})") from None
    word, _, rest = answer.partition(" ")
    if word == "PID" and rest.isdigit():
        return int(rest)
    if word == "FAIL":
        pid, _, why = rest.partition(" ")
        if pid.isdigit():
            _reap(int(pid))
        raise WarmUnavailable(why)
    raise WarmUnavailable("the warm server broke the protocol")


def _reap(pid: int, seconds: float = REAP_WAIT_S) -> None:
    """Wait for a child that could not start: it exits as it answers, handed to this
    process (a subreaper), and would stay a zombie of this long-lived process."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass  # not handed over yet, or not ours
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)


def fork_launch(launcher: list[str], cwd: str, env: dict[str, str], stdio: tuple[int, int, int],
                pass_fds: tuple[int, ...] = ()) -> WarmProcess:  # fmt: skip
    """Start `launcher` in a fork of this process (a warm one: the scorer). Only call it
    before this process holds anything a job must not see: the child has its memory."""
    from sandbox import zygote

    request = {"launcher": _launcher_args(launcher), "cwd": str(cwd), "env": env,
               "fds": [0, 1, 2, *pass_fds]}  # fmt: skip
    fds = [*stdio, *pass_fds]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            zygote.start_child(request, fds)
        finally:
            os._exit(zygote.EXIT_SETUP_FAILED)  # never back into the caller's code
    return WarmProcess(pid)


@dataclass(frozen=True)
class Start:
    """How to start one job (runner.py): the launcher's command line, and the runtime where
    it may start warm (None: cold)."""

    launcher: list[str]
    cwd: Path
    env: dict[str, str]
    pass_fds: tuple[int, ...]
    runtime: Runtime | None

    def launch(self, log_fd: int) -> tuple[subprocess.Popen | WarmProcess, str]:
        """The job's first process, and "warm", "cold" or "cold: why not warm"."""
        launch = "cold"
        if self.runtime is not None:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                process = self.runtime.spawn(self.launcher, str(self.cwd), self.env,
                                             (null, log_fd, log_fd), self.pass_fds)  # fmt: skip
                return process, "warm"
            except WarmUnavailable as exc:
                launch = f"cold: {exc}"
            finally:
                os.close(null)
        process = subprocess.Popen(
            self.launcher, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log_fd,
            stderr=log_fd, start_new_session=True, pass_fds=self.pass_fds,
        )  # fmt: skip
        return process, launch


_shared: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime (one per slot), made on first call, closed when the process
    exits. Its server starts when asked (prestart) or when a job first needs it."""
    global _shared
    if _shared is None:
        _shared = Runtime()
        atexit.register(_shared.close)
    return _shared


def current() -> Runtime | None:
    """This process's runtime if something made one: runner.run uses it for its jobs."""
    return _shared
