"""The warm runtime (sandbox/warm.py, zygote.py, inprocess.py): jobs forked from a server
that has imported torch, one adversarial property per test. Nothing of one job reaches
the next, the server is out of every job's reach, and a warm job is the job a cold start
would have run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from sandbox import proctree, warm
from sandbox.confine import Confinement
from sandbox.runner import Limits, job_env, run

pytestmark = pytest.mark.usefixtures("warm_runtime")


def job(tmp_path: Path, code: str, name: str = "job", runtime="auto", **env) -> tuple:
    """Run `code` confined (it may write only tmp_path/out); the result and its log."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    result = run([sys.executable, "-c", textwrap.dedent(code)], tmp_path, job_env(env),
                 Limits(wall_seconds=30), log, confinement=Confinement(write=(str(out),)),
                 runtime=runtime)  # fmt: skip
    return result, log.read_text()


def test_a_warm_job_starts_fast_confined_and_with_torch_loaded(tmp_path):
    started = time.monotonic()
    result, log = job(tmp_path, """
        import os, sys
        print("torch" in sys.modules, open("/proc/self/status").read().count("NoNewPrivs:\\t1"))
        print(os.getpid(), len([p for p in os.listdir("/proc") if p.isdigit()]) < 5)
        try:
            open("/etc/shadow").read()
        except PermissionError:
            print("shadow denied")
    """)
    assert result.launch == "warm" and result.reason == "ok", log
    assert time.monotonic() - started < 5  # the cold path imports torch alone in 2-5 s here
    lines = log.splitlines()
    assert lines[0] == "True 1" and lines[1].endswith("True") and "shadow denied" in log


def test_what_a_job_changes_in_its_memory_never_reaches_the_next(tmp_path):
    first, log = job(tmp_path, """
        import sys, numpy, torch, torch.nn.functional as F
        F.cross_entropy = lambda *a, **k: torch.zeros(())   # a patched scoring function
        torch.left_behind = "planted"
        sys.modules["prepare"] = "planted"
        numpy.random.seed(7)
    """, name="first")
    assert first.launch == "warm" and first.reason == "ok", log
    second, log = job(tmp_path, """
        import sys, numpy, torch, torch.nn.functional as F
        print(F.cross_entropy.__module__, hasattr(torch, "left_behind"), "prepare" in sys.modules)
        print(numpy.random.get_state()[1][0] != numpy.random.RandomState(7).get_state()[1][0])
    """, name="second")
    assert second.launch == "warm", log
    assert log.splitlines() == ["torch.nn.functional False False", "True"]


def test_a_job_holds_only_the_descriptors_it_was_given(tmp_path):
    read_end, write_end = os.pipe()
    try:
        out = tmp_path / "out"
        out.mkdir()
        code = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
        result = run([sys.executable, "-c", code], tmp_path, job_env({}), Limits(wall_seconds=30),
                     tmp_path / "job.log", confinement=Confinement(write=(str(out),)),
                     pass_fds=(write_end,))  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.launch == "warm"
    fds = eval((tmp_path / "job.log").read_text().splitlines()[0])  # noqa: S307 (our own print)
    assert set(fds) == {0, 1, 2, write_end, 3}  # 3: the one listdir itself opened


def test_the_server_is_out_of_a_jobs_reach(tmp_path, warm_runtime):
    server = warm_runtime.pid
    result, log = job(tmp_path, f"""
        import os, signal, socket
        try:
            os.kill({server}, signal.SIGKILL)
            print("killed the server")
        except (ProcessLookupError, PermissionError) as exc:
            print("no server:", type(exc).__name__)
        print({server} in [int(p) for p in os.listdir("/proc") if p.isdigit()])
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            print("unix socket")
        except PermissionError:
            print("no unix socket")
    """)
    assert result.launch == "warm", log
    assert "killed the server" not in log and "False" in log and "no unix socket" in log
    assert warm_runtime.pid == server and psutil.Process(server).is_running()
    again, log = job(tmp_path, "print('still served')", name="again")
    assert again.launch == "warm" and "still served" in log


def test_a_process_left_behind_dies_with_its_job(tmp_path):
    beats = tmp_path / "out" / "beats"
    result, log = job(tmp_path, f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for _ in range(300):
                    with open({str(beats)!r}, "a") as handle:
                        handle.write(".")
                    time.sleep(0.05)
            os._exit(0)
        time.sleep(0.3)
    """)
    assert result.launch == "warm" and result.reason == "ok", log
    size = beats.stat().st_size
    time.sleep(0.5)
    assert beats.stat().st_size == size, "a daemon of the job outlived it"


def test_a_jobs_environment_is_its_own_and_the_next_never_sees_it(tmp_path):
    first, log = job(tmp_path, "import os; print(os.environ['AR_SECRET'])", AR_SECRET="s3cret")
    assert first.launch == "warm" and log.strip() == "s3cret"
    second, log = job(tmp_path, """
        import os
        print("AR_SECRET" in os.environ, b"s3cret" in open("/proc/self/environ", "rb").read())
    """, name="second")
    assert second.launch == "warm" and log.strip() == "False False"


def test_a_warm_job_is_the_program_a_cold_start_runs(tmp_path):
    (tmp_path / "prog.py").write_text(textwrap.dedent("""
        import os, signal, sys, tempfile, torch
        print(__name__, os.path.basename(__file__), sys.argv[1:], sys.path[0] == os.getcwd())
        print(torch.get_num_threads(), tempfile.gettempdir() == os.environ["TMPDIR"])
        print(signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN, torch.manual_seed(1).seed() > 0)
        sys.exit(3)
    """))
    out = tmp_path / "out"
    out.mkdir()
    logs = {}
    for runtime in ("auto", None):
        log = tmp_path / f"{runtime}.log"
        result = run([sys.executable, "prog.py", "a", "b"], tmp_path,
                     job_env({"TMPDIR": str(out)}), Limits(wall_seconds=60),
                     log, confinement=Confinement(read=(str(tmp_path),), write=(str(out),)),
                     runtime=runtime)  # fmt: skip
        assert result.exit_code == 3, log.read_text()
        logs[result.launch] = log.read_text()
    assert logs["warm"] == logs["cold"]
    assert logs["warm"].splitlines()[0] == "__main__ prog.py ['a', 'b'] True"


def test_each_warm_job_draws_its_own_random_state(tmp_path):
    """A new interpreter seeds torch's and numpy's generators afresh; so does a warm job,
    rather than repeat the server's."""
    code = "import numpy, torch; print(torch.initial_seed(), numpy.random.randint(2**31))"
    draws = [job(tmp_path, code, name=f"draw{index}")[1].strip() for index in range(2)]
    assert draws[0] != draws[1] and all(len(draw.split()) == 2 for draw in draws)


def test_an_uncaught_exception_and_a_signal_end_a_warm_job_as_they_end_a_cold_one(tmp_path):
    raised, log = job(tmp_path, "raise ValueError('boom')")
    assert (raised.launch, raised.exit_code) == ("warm", 1) and "ValueError: boom" in log
    killed, _ = job(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)", name="k")
    assert (killed.launch, killed.exit_code) == ("warm", -signal.SIGTERM)


def test_without_a_server_or_where_warm_is_off_the_job_runs_cold_and_says_why(tmp_path,
                                                                               monkeypatch):  # fmt: skip
    off, _ = job(tmp_path, "pass", runtime=None)
    assert off.launch == "cold"
    runtime = warm.Runtime()  # a second one, never started: it starts now, in the background
    try:
        starting, _ = job(tmp_path, "pass", name="starting", runtime=runtime)
        assert starting.launch == "cold: the warm server is still starting"
        assert runtime.wait_ready()
        os.kill(runtime.pid, signal.SIGKILL)  # a server that died: cold once, then a new one
        dead, _ = job(tmp_path, "pass", name="dead", runtime=runtime)
        assert dead.launch.startswith("cold") and dead.reason == "ok"
        assert runtime.wait_ready() and job(tmp_path, "pass", "new", runtime)[0].launch == "warm"
    finally:
        runtime.close()
    monkeypatch.setenv(warm.WARM_VARIABLE, "0")
    assert job(tmp_path, "pass", name="off")[0].launch == "cold"


def test_a_job_whose_libraries_load_differently_gets_its_own_server(tmp_path, warm_runtime):
    """OMP_* is read when torch loads: a job asking for other values must not get a fork of
    a server that read the old ones (it runs cold while the new server starts)."""
    before = warm_runtime.pid
    result, log = job(tmp_path, "import os; print(os.environ['OMP_WAIT_POLICY'])",
                      OMP_WAIT_POLICY="PASSIVE")  # fmt: skip
    assert result.launch.startswith("cold") and log.strip() == "PASSIVE"
    warm_runtime.prestart(job_env({}))  # back to the suite's environment for the next tests
    assert warm_runtime.wait_ready() and warm_runtime.pid != before


def test_the_server_exits_with_the_process_that_started_it(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from sandbox import runner, warm
        runtime = warm.runtime()
        runtime.prestart(runner.job_env({}))
        assert runtime.wait_ready()
        print(runtime.pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        server = int(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and psutil.pid_exists(server):
        time.sleep(0.05)
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie"


def test_a_runs_load_sample_waits_for_its_own_starting_server():
    """The server's imports keep a core busy for seconds: a load sample taken meanwhile
    planned the first run of every `ar` process for a half-taken machine (one thread, two
    thirds of the throughput). The run now waits for its own server before it samples."""
    code = textwrap.dedent("""
        from sandbox import experiment, warm
        experiment.prestart_warm("cpu")
        starting = not warm.runtime().wait_ready(0)
        experiment._own_server_settled()
        print(starting, warm.runtime().wait_ready(0), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]  # starting when asked, serving after


def test_a_child_that_cannot_start_says_why_and_leaves_no_zombie(tmp_path, warm_runtime):
    out, log = tmp_path / "out", tmp_path / "job.log"
    out.mkdir()
    proctree.set_subreaper(True)  # as runner.run is: the failed child is handed to this process
    try:
        with open(log, "wb") as sink, open(os.devnull, "rb") as null:
            with pytest.raises(warm.WarmUnavailable, match="FileNotFoundError"):  # no such cwd
                warm_runtime.spawn([sys.executable, "sandbox/limits.py", "--", sys.executable,
                                    "-c", "pass"], str(tmp_path / "gone"), job_env({}),
                                   (null.fileno(), sink.fileno(), sink.fileno()))  # fmt: skip
        time.sleep(0.2)  # a child left unreaped would be a zombie by now
        zombies = [child.pid for child in psutil.Process().children() if child.status() == "zombie"]
    finally:
        proctree.set_subreaper(False)
    assert not zombies
