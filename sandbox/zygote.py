"""The warm runtime's server, and what a forked child does before it becomes a job.

    python -I -m sandbox.zygote --control FD --parent PID     (started by sandbox/warm.py)

The server is trusted and pristine: it imports numpy, torch, torch._dynamo and tiktoken
(what every training job and model worker imports, 2-5 s on two cores), freezes that
heap, checks that it is one thread (a fork copies other threads' locks as they are), and
then only ever forks. It never reads a request: for each spawn the runtime sends it the fixed
message SPWN and one descriptor, the child's end of a fresh socketpair; the server forks
an intermediate process, which forks the child and exits at once, so that the child is
re-parented to the runtime's process (a child subreaper while it runs a job: runner.py)
and that process waits for it exactly as for a Popen child. Only the child reads the
request (the launcher's command line, cwd, environment, and the descriptors to install at
their numbers), from its end of the socketpair, answers `PID n`, closes it and becomes
the launcher (limits.launch): control groups, limits, namespaces, the PID namespace's
init, no privileges, Landlock and seccomp; then, in the job's confined process, instead
of exec, it runs the Python command in place (sandbox/inprocess.py).

Nothing of one job reaches the next: each is a fork of the server, whose memory no job
writes (copy-on-write) and which holds nothing of any request; a child keeps only the
descriptors its request names; its environment is the request's; the server is in no
job's namespaces, holds no socket a job can name, and is not dumpable (no process of
its user may read or trace it).
"""

import argparse
import ctypes
import gc
import json
import os
import signal
import socket
import sys

from sandbox import inprocess

SPAWN, READY, GO = b"SPWN", b"REDY", b"GO"
MAX_REQUEST_BYTES = 1 << 20
MAX_FDS = 64
# What training jobs and model workers import. torch._dynamo too: torch.optim imports it
# on a job's first optimizer (measured: 2.4 s of every cold job's start on two cores).
PRELOAD = ("numpy", "torch", "torch._dynamo", "tiktoken")
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
EXIT_SETUP_FAILED = 125  # as limits.py: the job never started
REPARENT_WAIT_S = 2.0

_libc = ctypes.CDLL(None, use_errno=True)
_SANDBOX_DIR = os.path.dirname(os.path.abspath(__file__))
# sys.path of an isolated interpreter (the server and the scorer run with -I), taken before
# limits.py adds its own directory: the base every job's sys.path is built on.
BASE_PATH = tuple(path for path in sys.path if path != _SANDBOX_DIR)


def _launcher():
    """limits.py, imported as the launcher imports itself (its siblings top-level)."""
    if _SANDBOX_DIR not in sys.path:
        sys.path.append(_SANDBOX_DIR)
    import limits

    return limits


# ---------------------------------------------------------------------------
# A child, forked from a warm process: set up, then the launcher


def start_child(request: dict, fds: list[int], reply=None) -> None:
    """In a freshly forked child: install the descriptors, enter cwd and a new session,
    answer `reply(pid)`, then launch the job. Never returns; exit 125 when setup fails."""
    try:
        targets = [int(target) for target in request["fds"]]
        floor = max([*targets, 2]) + 1
        if reply is not None and reply.fileno() < floor:  # out of the targets' way
            reply = socket.socket(fileno=_dup_above(reply.detach(), floor, close=True))
        _install_fds(fds, targets, floor, [reply.fileno()] if reply is not None else [])
        os.chdir(request["cwd"])
        os.setsid()
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # as after exec: its own /proc stays its own
        options = _launcher().parse(list(request["launcher"]))
        env = {str(key): str(value) for key, value in request["env"].items()}
        if reply is not None:  # then wait for the runtime's go: one that gave up runs it cold
            reply.send(f"PID {os.getpid()}".encode())
            if reply.recv(len(GO)) != GO:
                os._exit(EXIT_SETUP_FAILED)
            reply.close()
    except Exception as exc:  # noqa: BLE001 (anything: the job must not start)
        _fail(f"the warm launcher failed: {type(exc).__name__}: {exc}", reply)
    try:
        _launcher().launch(options, lambda cmd: _become(cmd, env))
    except BaseException as exc:  # noqa: BLE001 (launch never returns; an escape must not either)
        _fail(f"the warm launcher failed: {type(exc).__name__}: {exc}", None)


def _become(cmd: list[str], env: dict[str, str]) -> None:
    """The job's process, confined: run a Python command here, exec anything else."""
    program = inprocess.parse(cmd)
    if program is None:
        os.environ.clear()
        os.environ.update(env)
        _launcher().exec_cmd(cmd)
    inprocess.become(program, env, list(BASE_PATH))


def _install_fds(fds: list[int], targets: list[int], floor: int, keep: list[int]) -> None:
    """Put fds[i] at number targets[i] (all below `floor`); close every other descriptor
    but `keep` (at or above `floor`)."""
    if len(fds) != len(targets) or len(set(targets)) != len(targets) or min(targets, default=0) < 0:
        raise ValueError("the request's descriptors do not match their numbers")
    moved = [_dup_above(fd, floor) for fd in fds]  # no dup2 below can land on a source
    for source, target in zip(moved, targets, strict=True):
        os.dup2(source, target)
    low = 0
    for fd in sorted({*targets, *keep}):
        if low < fd:  # closerange(n, n) would close every descriptor (CPython 3.11)
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _dup_above(fd: int, floor: int, close: bool = False) -> int:
    import fcntl

    duplicate = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    if close:
        os.close(fd)
    return duplicate


def _fail(why: str, reply) -> None:
    try:
        if reply is not None:  # with its pid: the runtime's process reaps it (warm._read_pid)
            reply.send(f"FAIL {os.getpid()} {why}".encode()[:4096])
        else:
            os.write(2, f"[sandbox] {why}\n".encode())
    except OSError:
        pass
    os._exit(EXIT_SETUP_FAILED)


# ---------------------------------------------------------------------------
# The server


def serve(control: socket.socket) -> None:
    """Fork a child for each SPWN until the runtime closes its end."""
    control.send(READY)
    while True:
        message, fds, _flags, _address = socket.recv_fds(control, 16, 1)
        if not message:
            return
        if message != SPAWN or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        _fork_child(control, fds[0])


def _fork_child(control: socket.socket, channel: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                _child(control, channel)
        finally:
            os._exit(0)  # the child is now the runtime's (its parent is a subreaper)
    os.close(channel)
    os.waitpid(middle, 0)


def _child(control: socket.socket, channel_fd: int) -> None:
    """The forked child: read the request, wait to be the runtime's, start. Never returns."""
    reply = None
    try:
        control.close()
        reply = socket.socket(fileno=channel_fd)
        raw, fds, _flags, _address = socket.recv_fds(reply, MAX_REQUEST_BYTES, MAX_FDS)
        request = json.loads(raw)
        _wait_for_parent(int(request["parent"]))
    except Exception as exc:  # noqa: BLE001 (anything: the job must not start)
        _fail(f"the warm launcher failed: {type(exc).__name__}: {exc}", reply)
    start_child(request, fds, reply)


def _wait_for_parent(parent: int) -> None:
    """Until the intermediate's exit hands this process to the runtime's process."""
    import time

    deadline = time.monotonic() + REPARENT_WAIT_S
    while os.getppid() != parent:
        if time.monotonic() > deadline:
            raise OSError(f"not re-parented to {parent} (is it a child subreaper?)")
        time.sleep(0.0002)


def _preload() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            continue
    gc.collect()
    gc.freeze()  # children's collections then never touch (and copy) the server's pages
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork copies another thread's locks as they are: refuse to serve
        raise SystemExit(f"the warm server has {threads} threads after its imports, not one")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.zygote")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != args.parent:
        return 1  # the runtime died before the request took effect
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    control = socket.socket(fileno=args.control)
    _preload()
    _launcher()
    serve(control)
    return 0


if __name__ == "__main__":
    from sandbox.zygote import main as server_main  # one module object, not a __main__ copy

    sys.exit(server_main())
