"""Confinement against real, hostile jobs: one adversarial property per test.

A workspace-like tree in tmp: the job's code, output and tmp directories, and beside them
what it must not touch (the evaluation split, the ledger, a git repository, a home).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import uuid

import pytest

from sandbox import cgroup, confine, netns
from sandbox.confine import Confinement
from sandbox.errors import SandboxConfigError
from sandbox.runner import Limits, job_env, run

# Every job here starts from the warm runtime (conftest.py), as ar's own do.
pytestmark = pytest.mark.usefixtures("warm_runtime")

CONFINES = confine.support().confines_files
needs_landlock = pytest.mark.skipif(not CONFINES, reason=confine.support().note)
DENIED = "DENIED"


@pytest.fixture
def tree(tmp_path):
    dirs = {name: tmp_path / name for name in ("code", "out", "tmp", "home", "ws")}
    for path in dirs.values():
        path.mkdir()
    (dirs["ws"] / ".ar" / "data").mkdir(parents=True)
    (dirs["ws"] / ".ar" / "data" / "val.bin").write_bytes(b"the evaluation split")
    (dirs["code"] / "train.bin").write_bytes(b"the train split")
    return dirs


def job(tree, code: str, *, read=(), write=None, limits=None, **env):
    """Run `code` confined, cwd the code dir; its log tail."""
    write = (tree["out"], tree["tmp"]) if write is None else write
    confinement = Confinement(
        read=tuple(map(str, (tree["code"], *read))), write=tuple(map(str, write))
    )
    variables = {"TMPDIR": str(tree["tmp"]), "HOME": str(tree["home"]), **env}
    result = run(
        [sys.executable, "-c", textwrap.dedent(code)], tree["code"], job_env(variables),
        limits or Limits(wall_seconds=60), tree["out"].parent / f"job-{uuid.uuid4().hex}.log",
        confinement=confinement,
    )  # fmt: skip
    assert result.reason == "ok", result.log_tail
    return result


def attempt(action: str) -> str:
    """Job code: run `action`; print DENIED when the kernel refused it, else ALLOWED."""
    return textwrap.dedent(
        """
        import errno, sqlite3, sys
        try:
        {}
        except (PermissionError, sqlite3.OperationalError) as exc:
            print("DENIED", exc)
        except OSError as exc:
            print("DENIED" if exc.errno in (errno.EACCES, errno.EPERM) else "OTHER", exc)
        else:
            print("ALLOWED")
        """
    ).format(textwrap.indent(textwrap.dedent(action).strip(), "    "))


@needs_landlock
def test_cannot_read_the_evaluation_split(tree):
    val = tree["ws"] / ".ar" / "data" / "val.bin"
    result = job(tree, attempt(f"open({str(val)!r}, 'rb').read()"))
    assert DENIED in result.log_tail
    assert result.isolation.startswith("landlock-v")


@needs_landlock
@pytest.mark.parametrize("where", ["ws", "home", "package"])
def test_cannot_write_outside_its_write_set(tree, where):
    directory = confine.SANDBOX_PACKAGE if where == "package" else tree[where]
    target = directory / f"planted-{uuid.uuid4().hex}.py"
    try:
        result = job(tree, attempt(f"open({str(target)!r}, 'w').write('x = 1')"))
        assert DENIED in result.log_tail
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@needs_landlock
def test_cannot_open_the_ledger_for_writing(tree):
    ledger = tree["ws"] / ".ar" / "ledger.db"
    with sqlite3.connect(ledger) as db:
        db.execute("CREATE TABLE experiments (id INTEGER, val_bpb REAL)")
        db.execute("INSERT INTO experiments VALUES (1, 1.5)")
    db.close()
    forge = f"""
        db = sqlite3.connect({str(ledger)!r})
        db.execute("UPDATE experiments SET val_bpb = 0.01")
        db.commit()
    """
    result = job(tree, attempt(forge))
    assert DENIED in result.log_tail
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT val_bpb FROM experiments").fetchall() == [(1.5,)]
    db.close()


@needs_landlock
def test_cannot_move_a_git_ref(tree):
    repo = tree["ws"]
    git = [
        "git",
        "-C",
        str(repo),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    first = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "two"], check=True)
    tip = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    code = f"""
        import subprocess
        done = subprocess.run(["git", "-C", {str(repo)!r}, "update-ref", "refs/heads/main", {first!r}])
        print("git exit", done.returncode)
    """
    result = job(tree, code)
    assert "git exit 0" not in result.log_tail
    assert (
        subprocess.run([*git, "rev-parse", "main"], capture_output=True, text=True).stdout.strip()
        == tip
    )


@pytest.fixture
def host_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    yield server
    server.close()


def _nobody_connected(server) -> bool:
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@needs_landlock
def test_cannot_reach_a_port_on_the_hosts_loopback(tree, host_listener):
    port = host_listener.getsockname()[1]
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    result = job(tree, attempt(code))
    assert "ALLOWED" not in result.log_tail
    assert _nobody_connected(host_listener)
    assert result.network_isolated


@needs_landlock
def test_landlock_alone_refuses_tcp_without_a_network_namespace(tree, host_listener):
    """The second layer: no namespace at all (as where unshare is forbidden), Landlock only."""
    port = host_listener.getsockname()[1]
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    applied = confine.launcher_args(Confinement(write=(str(tree["out"]),)))
    cmd = netns.launcher_cmd("--fsize", str(2**30), "--nofile", "256", *applied, "--",
                             sys.executable, "-c", attempt(code))  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree["out"], timeout=60)
    assert DENIED in done.stdout, done.stdout + done.stderr
    assert _nobody_connected(host_listener)


@needs_landlock
def test_cannot_reach_a_unix_socket_on_the_host(tree):
    path = tree["home"] / "server.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        server.setblocking(False)
        code = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
        result = job(tree, attempt(code))
        assert DENIED in result.log_tail
        assert _nobody_connected(server)


@pytest.fixture
def neighbour():
    """Another process of the same user, with a secret in its environment."""
    secret = f"hunter-{uuid.uuid4().hex}"
    env = {"PATH": os.defpath, "AR_TEST_SECRET": secret}
    process = subprocess.Popen(["sleep", "60"], env=env)
    yield process, secret
    process.kill()
    process.wait()


@needs_landlock
@pytest.mark.parametrize(
    ("name", "user_namespace"),
    # Without the user namespace Landlock alone must refuse; as root it refuses mem and
    # cwd but lets environ through on this kernel (see confine.py), so environ is checked
    # only in the default configuration.
    [("environ", True), ("mem", True), ("cwd", True), ("mem", False), ("cwd", False)],
)
def test_cannot_read_another_processs_proc_files(tree, neighbour, name, user_namespace,
                                                 monkeypatch):  # fmt: skip
    # Landlock's layer alone: in a PID namespace the process has no entry at all
    # (test_pidns.py).
    monkeypatch.setenv(confine.PIDNS_VARIABLE, "0")
    process, secret = neighbour
    path = f"/proc/{process.pid}/{name}"
    action = (
        f"import os; os.listdir({path!r})"
        if name == "cwd"
        else f"print(open({path!r}, 'rb').read(64))"
    )
    limits = Limits(wall_seconds=60, user_namespace=user_namespace)
    result = job(tree, attempt(action), limits=limits)
    assert DENIED in result.log_tail
    assert secret not in result.log_tail


@needs_landlock
@pytest.mark.skipif(
    CONFINES and confine.support().landlock_abi < 6, reason="signal scoping needs ABI 6"
)
def test_cannot_signal_a_process_outside(tree, neighbour, monkeypatch):
    monkeypatch.setenv(confine.PIDNS_VARIABLE, "0")  # Landlock's scoping alone: see above
    process, _secret = neighbour
    result = job(tree, attempt(f"import os, signal; os.kill({process.pid}, signal.SIGKILL)"))
    assert DENIED in result.log_tail
    assert process.poll() is None


@needs_landlock
def test_can_import_torch_and_run_a_matmul(tree):
    result = job(
        tree, "import torch; print('matmul', (torch.ones(2, 2) @ torch.ones(2, 2)).sum().item())"
    )
    assert "matmul 8.0" in result.log_tail


@needs_landlock
def test_can_read_its_files_and_write_its_output_and_tmp(tree):
    data = tree["ws"] / "train.bin"
    data.write_bytes(bytes(range(16)))
    code = f"""
        import os, tempfile, numpy as np
        tokens = np.memmap({str(data)!r}, dtype=np.uint8, mode="r")
        print("tokens", int(tokens.sum()), open("train.bin", "rb").read())
        with tempfile.NamedTemporaryFile(dir=None) as scratch:
            scratch.write(b"scratch")
        import multiprocessing, socket
        ours, theirs = socket.socketpair()  # between its own processes: still allowed
        receiver, sender = multiprocessing.Pipe()
        with open(os.path.join({str(tree["out"])!r}, "model.pt"), "wb") as out:
            out.write(b"weights")
    """
    result = job(tree, code, read=(data,))
    assert "tokens 120 b'the train split'" in result.log_tail
    assert (tree["out"] / "model.pt").read_bytes() == b"weights"


@needs_landlock
def test_handed_descriptors_reach_the_job(tree):
    read_end, write_end = os.pipe()
    try:
        result = run(
            [sys.executable, "-c", f"import os; os.write({write_end}, b'through the pipe')"],
            tree["code"], job_env({}), Limits(wall_seconds=30), tree["out"] / "job.log",
            confinement=Confinement(read=(str(tree["code"]),)), pass_fds=(write_end,),
        )  # fmt: skip
        assert result.reason == "ok", result.log_tail
        assert os.read(read_end, 100) == b"through the pipe"
    finally:
        os.close(read_end)
        os.close(write_end)


@needs_landlock
def test_wrap_confines_a_command_started_by_the_caller(tree):
    val = tree["ws"] / ".ar" / "data" / "val.bin"
    cmd = confine.wrap(
        [sys.executable, "-c", attempt(f"open({str(val)!r}, 'rb').read()")],
        Confinement(read=(str(tree["code"]),)), fsize_bytes=2**30, nofile=256,
        parent_pid=os.getpid(),
    )  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tree["code"], env=job_env({}), timeout=60
    )
    assert DENIED in done.stdout, done.stdout + done.stderr
    machine = confine.support()
    assert confine.plan(Confinement(), cgroup=machine.cgroup).level == machine.level


@needs_landlock
def test_a_confined_job_can_import_the_sandbox_package(tree):
    view = confine.import_dir(tree["tmp"])
    code = "import sandbox.files, sandbox.confine; print('imported', sandbox.files.__name__)"
    result = job(tree, code, read=(view,), PYTHONPATH=str(view))
    assert "imported sandbox.files" in result.log_tail


def test_a_missing_path_is_refused_before_the_job_starts(tree):
    with pytest.raises(SandboxConfigError, match="does not exist"):
        confine.plan(Confinement(read=(str(tree["ws"] / "absent"),)))


def test_support_reports_a_level():
    support = confine.support()
    assert support.level and support.note
    assert support.confines_files == support.level.startswith("landlock-v")
    assert support.landlock_abi is None or support.landlock_abi >= 1


@pytest.fixture
def no_kernel_help(monkeypatch):
    """A kernel that offers neither Landlock nor namespaces nor control groups."""
    monkeypatch.setenv(confine.DISABLE_VARIABLE, "0")
    monkeypatch.setenv(cgroup.DISABLE_VARIABLE, "0")
    monkeypatch.setattr(
        netns, "probe", lambda: netns.NetworkIsolation(None, "no namespaces (test)")
    )
    confine._support.cache_clear()
    yield
    confine._support.cache_clear()


def test_without_kernel_help_the_job_runs_and_says_none(tree, no_kernel_help):
    val = tree["ws"] / ".ar" / "data" / "val.bin"
    result = job(tree, attempt(f"open({str(val)!r}, 'rb').read()"))
    assert result.isolation == "none"
    assert "unconfined" in result.isolation_note
    assert "ALLOWED" in result.log_tail  # "none" means none: the caller decides the policy


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@needs_landlock
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here")
def test_can_use_the_gpu_and_still_not_read_the_split(tree):
    val = tree["ws"] / ".ar" / "data" / "val.bin"
    code = "import torch\nx = torch.ones(256, 256, device='cuda')\nprint('cuda', (x @ x).sum().item())\n"
    code += attempt(f"open({str(val)!r}, 'rb').read()")
    confinement = Confinement(read=(str(tree["code"]),), write=(str(tree["out"]),), gpu=True)
    result = run(
        [sys.executable, "-c", code], tree["code"], job_env({}), Limits(wall_seconds=120),
        tree["out"] / "job.log", confinement=confinement,
    )  # fmt: skip
    assert result.reason == "ok", result.log_tail
    assert "cuda 16777216.0" in result.log_tail
    # Landlock refuses it, or (with a mount namespace) the GPU path has hidden the workspace
    hidden = "hidden" in result.isolation_note and "OTHER [Errno 2]" in result.log_tail
    assert DENIED in result.log_tail or hidden


def test_an_unconfined_job_says_so(tree):
    result = run(
        [sys.executable, "-c", "pass"], tree["code"], job_env({}), Limits(wall_seconds=30),
        tree["out"] / "job.log",
    )  # fmt: skip
    assert result.reason == "ok"
    assert not result.isolation.startswith("landlock")
    assert "unconfined" in result.isolation_note


def test_the_launcher_never_runs_a_job_it_could_not_confine(tree):
    cmd = netns.launcher_cmd("--fsize", str(2**30), "--nofile", "256", "--confine", "bogus",
                             "--", sys.executable, "-c", "print('RAN')")  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert "RAN" not in done.stdout
