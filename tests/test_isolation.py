"""The kernel's groupings of a job against real, hostile processes: one property per test.

A job must not see processes outside its run (PID namespace, hidepid /proc), must die
whole however it forks (PID namespace teardown, cgroup.kill), must be charged for the
memory it holds however it holds it (memory cgroup), must not shed its own CPU time
through short-lived children (cgroup cpu, init's reaping), and on the GPU path must reach
no unix socket of the host (its mount namespace). Through `ar iterate`: test_hostile_llm.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from sandbox import cgroup, confine
from sandbox.confine import Confinement
from sandbox.runner import Limits, job_env, run

# Every job here starts from the warm runtime (conftest.py), as ar's own do.
pytestmark = pytest.mark.usefixtures("warm_runtime")

SUPPORT = confine.support()
needs_pidns = pytest.mark.skipif(not SUPPORT.pid_namespace, reason=SUPPORT.note)
needs_landlock = pytest.mark.skipif(not SUPPORT.confines_files, reason=SUPPORT.files_note)
needs_memory_cgroup = pytest.mark.skipif(cgroup.support().memory is None,
                                         reason=cgroup.support().note)  # fmt: skip
MB = 2**20


@pytest.fixture
def dirs(tmp_path):
    paths = {name: tmp_path / name for name in ("code", "out", "tmp")}
    for path in paths.values():
        path.mkdir()
    return paths


def confined(dirs, code: str, *, gpu: bool = False, write=(), limits=None, **kwargs):
    """Run `code` confined (a PID namespace of its own where the kernel gives one)."""
    confinement = Confinement(read=(str(dirs["code"]),),
                              write=tuple(map(str, (dirs["out"], dirs["tmp"], *write))), gpu=gpu)  # fmt: skip
    return run([sys.executable, "-c", textwrap.dedent(code)], dirs["code"],
               job_env({"TMPDIR": str(dirs["tmp"]), "HOME": str(dirs["tmp"])}),
               limits or Limits(wall_seconds=60), dirs["out"] / f"job-{uuid.uuid4().hex}.log",
               confinement=confinement, **kwargs)  # fmt: skip


def alive_with(token: str) -> list[int]:
    """Host processes whose command line holds `token` (not zombies)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and token in cmdline:
            found.append(process.pid)
    return found


# --- item 2: processes outside the run are invisible --------------------------------------

SCAN = """
    import os, subprocess, sys, time
    def command_lines():
        lines = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    lines[int(name)] = open(f"/proc/{name}/cmdline", "rb").read()
                except OSError:
                    pass
        return lines
"""


@needs_pidns
def test_a_job_cannot_see_or_read_a_process_outside(dirs):
    secret = f"neighbour-secret-{uuid.uuid4().hex}"
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret])
    try:
        code = SCAN + f"""
    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "own-marker"])
    time.sleep(0.3)
    everything = b" ".join(command_lines().values())
    print("own child visible:", b"own-marker" in everything)
    print("neighbour seen:", {secret[::-1]!r}[::-1].encode() in everything)  # not in its argv
    try:
        open("/proc/{neighbour.pid}/cmdline", "rb").read()
        print("neighbour read by pid")
    except OSError as exc:
        print("by pid:", type(exc).__name__)
    own.kill()
"""
        result = confined(dirs, code)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert result.reason == "ok", result.log_tail
    assert "own child visible: True" in result.log_tail  # the scan itself works
    assert "neighbour seen: False" in result.log_tail
    assert "neighbour read by pid" not in result.log_tail
    assert "pidns" in result.isolation


PUBLISH_AND_LISTEN = SCAN + """
    mine, theirs = sys.argv[1], sys.argv[2][::-1]  # reversed: its own argv must not hold it
    # publish through a child's command line, then look for the other side's for a while
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", mine])
    started, heard, saw_mine = time.time(), False, False
    while time.time() - started < 4 and not heard:
        lines = b" ".join(command_lines().values())
        saw_mine = saw_mine or mine.encode() in lines
        heard = theirs.encode() in lines
        time.sleep(0.05)
    print("window", started, time.time(), "saw mine", saw_mine, "heard", heard, flush=True)
    child.kill()
"""

RUN_ONE = """
import json, sys
from pathlib import Path
from sandbox.confine import Confinement
from sandbox.runner import Limits, job_env, run
code, work, mine, theirs = sys.argv[1:5]
work = Path(work)
result = run([sys.executable, "-c", code, mine, theirs], work, job_env({}), Limits(wall_seconds=60),
             work / "job.log", confinement=Confinement(read=(str(work),), write=(str(work),)))
print(json.dumps({"reason": result.reason, "tail": result.log_tail}))
"""


@needs_pidns
def test_two_jobs_at_once_cannot_talk_through_command_lines(tmp_path):
    """Two ar processes, one job each (as `ar iterate --workers 2` runs them)."""
    markers = [f"ar-talk-{side}-{uuid.uuid4().hex}" for side in "ab"]
    ars = []
    for side, (mine, theirs) in zip("ab", (markers, markers[::-1]), strict=True):
        work = tmp_path / side
        work.mkdir()
        ars.append(subprocess.Popen(
            [sys.executable, "-c", RUN_ONE, textwrap.dedent(PUBLISH_AND_LISTEN), str(work), mine,
             theirs[::-1]], stdout=subprocess.PIPE, text=True))  # fmt: skip
    tails = [process.communicate(timeout=90)[0] for process in ars]
    windows = []
    for tail in tails:
        assert '"reason": "ok"' in tail, tail
        assert "saw mine True" in tail  # each side sees its own publication
        assert "heard True" not in tail
        words = tail.split("window ")[1].split()
        windows.append((float(words[0]), float(words[1])))
    assert max(start for start, _ in windows) < min(end for _, end in windows)  # at once


# Like the scorer: in a PID namespace of its own, it starts two model workers the way it
# does on CUDA (sharing its namespace: CUDA's IPC handles need that), here on the CPU.
SHARING_SCORER = """
import os, subprocess, sys
from sandbox import confine
code, work, first, second = sys.argv[1:5]
workers = []
for mine, theirs in ((first, second), (second, first)):
    box = confine.Confinement(read=(work,), write=(work,), gpu=True)
    applied = confine.plan(box, pid_namespace=False)
    cmd = confine.launch_cmd(applied, [sys.executable, "-c", code, mine, theirs[::-1]],
                             fsize_bytes=1 << 30, nofile=256, parent_pid=os.getpid())
    workers.append(subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, text=True))
print("worker isolation", applied.level)
for worker in workers:
    print(worker.communicate(timeout=60)[0])
"""


@needs_landlock
@needs_pidns
def test_two_workers_sharing_the_scorers_pid_namespace_cannot_talk(tmp_path):
    first, second = (f"ar-talk-{side}-{uuid.uuid4().hex}" for side in "ab")
    code = textwrap.dedent(PUBLISH_AND_LISTEN)
    result = run([sys.executable, "-c", SHARING_SCORER, code, str(tmp_path), first, second],
                 tmp_path, job_env({}), Limits(wall_seconds=60), tmp_path / "scorer.log",
                 pid_namespace=True)  # fmt: skip
    assert result.reason == "ok", result.log_tail
    assert result.log_tail.count("saw mine True") == 2  # each sees its own publication
    assert "heard True" not in result.log_tail
    assert "+mntns+hidepid" in result.log_tail


# --- item 3: the kill is unescapable ------------------------------------------------------

HOPPERS = 8
SELF_DESTRUCT_S = 20  # a hopper the kill missed stops by itself later: the machine is shared
HOP = """
    import os, time
    beat = os.open({beats!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    stop_at = time.time() + {self_destruct}
    for _ in range({hoppers}):
        if os.fork() == 0:
            while time.time() < stop_at:
                if os.fork():
                    os._exit(0)  # the parent exits at once; the child carries on, reparented
                os.setsid()  # and out of the job's session
                os.write(beat, b".")  # alive: a /proc listing rarely catches it by its pid
            os._exit(0)
    time.sleep(600)
"""


@pytest.mark.parametrize("grouping", ["pid namespace", "control group"])
def test_processes_that_fork_and_exit_faster_than_a_listing_die_with_the_job(dirs, grouping,
                                                                          monkeypatch):  # fmt: skip
    if grouping == "pid namespace":
        if not SUPPORT.pid_namespace:
            pytest.skip(SUPPORT.note)
        monkeypatch.setenv(cgroup.DISABLE_VARIABLE, "0")
    else:
        if cgroup.support().kill is None and cgroup.support().memory is None:
            pytest.skip(cgroup.support().note)
        monkeypatch.setenv(confine.PIDNS_VARIABLE, "0")
    beats = dirs["out"] / "beats"
    code = HOP.format(beats=str(beats), self_destruct=SELF_DESTRUCT_S, hoppers=HOPPERS)
    started = time.monotonic()
    result = confined(dirs, code, limits=Limits(wall_seconds=1.5))
    assert result.reason == "timeout" and time.monotonic() - started < 15
    # they were hopping (a warm job is a fork of a process with torch loaded: each of its
    # forks copies more page tables than a bare interpreter's, so fewer hops fit in 1.5 s)
    assert beats.stat().st_size > 20
    size = beats.stat().st_size
    time.sleep(0.5)
    assert beats.stat().st_size == size, "a hopper outlived the kill"


DAEMON = """
    import os, time
    beat = os.open({beats!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    if os.fork() == 0:
        os.setsid()  # a daemon of its own session, outside anything ar could list by session
        if os.fork() == 0:
            for _ in range(200):
                os.write(beat, b".")
                time.sleep(0.05)
        os._exit(0)
    time.sleep(600)
"""


@needs_pidns
def test_when_ar_is_killed_its_jobs_daemon_dies_at_once(dirs, tmp_path):
    """No next ar needed: the launcher dies with ar, init with the launcher, and the
    namespace with init."""
    beats = dirs["out"] / "beats"
    code = textwrap.dedent(DAEMON.format(beats=str(beats)))
    first_ar = subprocess.Popen([sys.executable, "-c", RUN_ONE, code, str(dirs["out"]), "-", "-"],
                                stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not beats.exists() or beats.stat().st_size < 5):
        time.sleep(0.05)
    assert beats.stat().st_size >= 5, "the daemon never started"
    first_ar.kill()
    first_ar.wait()
    time.sleep(0.3)
    size = beats.stat().st_size
    time.sleep(0.5)
    assert beats.stat().st_size == size, "the job's daemon outlived ar"


# --- item 4: memory as the kernel charges it ----------------------------------------------

MEMFD_HOG = """
    import os, time
    fd = os.memfd_create("hoard")  # never mapped: no process's RSS or PSS shows it
    chunk = b"x" * (16 << 20)
    for _ in range({chunks}):
        os.write(fd, chunk)
    print("held it all")
    time.sleep(30)
"""


@needs_memory_cgroup
def test_a_memfd_never_mapped_counts_and_past_the_cap_is_killed(dirs):
    result = confined(dirs, MEMFD_HOG.format(chunks=40), limits=Limits(wall_seconds=30, max_rss_mb=200))
    assert result.reason == "rss", result.log_tail
    assert "held it all" not in result.log_tail
    assert 190 <= result.peak_rss_mb <= 260  # the charge at the kill: the cap, not a poll's RSS
    assert "OOM" in result.note and result.isolation.endswith(cgroup.support().level)


@needs_memory_cgroup
def test_a_file_on_tmpfs_counts_and_past_the_cap_is_killed(dirs):
    shm = Path(f"/dev/shm/ar-test-{uuid.uuid4().hex}")
    shm.mkdir()
    try:
        code = f"""
            import time
            with open({str(shm / "hoard")!r}, "wb") as handle:
                for _ in range(40):
                    handle.write(b"x" * (16 << 20))
            print("held it all")
            time.sleep(30)
        """
        result = confined(dirs, code, write=(shm,), limits=Limits(wall_seconds=30, max_rss_mb=200))
    finally:
        for path in shm.iterdir():
            path.unlink()
        shm.rmdir()
    assert result.reason == "rss", result.log_tail
    assert "held it all" not in result.log_tail
    assert 190 <= result.peak_rss_mb <= 260


@needs_memory_cgroup
def test_an_honest_job_under_the_cap_is_charged_what_it_holds(dirs):
    code = "import time\nhoard = bytearray(120 << 20)\nhoard[::4096] = b'x' * len(hoard[::4096])\ntime.sleep(1)"
    result = confined(dirs, code, limits=Limits(wall_seconds=30, max_rss_mb=400))
    assert result.reason == "ok", result.log_tail
    assert 120 <= result.peak_rss_mb < 200


# --- item 5: the job's CPU time is its own, children that exited included -----------------

BURN = """
    import os, time
    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
    start_at, stop_at = {start_at}, {start_at} + 3
    while time.time() < start_at:  # the two jobs burn at the same time
        time.sleep(0.01)
    while time.time() < stop_at:
        if {children}:
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:  # orphaned at once: the job never waits for it
                    burn(0.04)
                os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.04)  # the orphan burns while the parent sleeps
        else:
            burn(0.04)
"""

SHARE_OF_ONE = """
import json, sys
from pathlib import Path
from sandbox.confine import Confinement
from sandbox.runner import Limits, job_env, run
code, work, pid_namespace = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "yes"
result = run([sys.executable, "-c", code], work, job_env({}), Limits(wall_seconds=60),
             work / "job.log", confinement=Confinement(read=(str(work),), write=(str(work),)),
             pid_namespace=pid_namespace)
print(json.dumps({"reason": result.reason, "cpu": result.cpu_seconds, "share": result.cpu_share}))
"""


@pytest.mark.parametrize("grouping", ["control group", "pid namespace", "process tree"])
def test_cpu_burnt_in_short_lived_children_counts_as_the_jobs_own(tmp_path, grouping):
    """A job that burns a core in children that live 40 ms each, beside one that burns a
    core itself: both ar processes at once, so both see the same machine."""
    if grouping == "pid namespace" and not SUPPORT.pid_namespace:
        pytest.skip(SUPPORT.note)
    if grouping == "control group" and cgroup.support().cpu is None:
        pytest.skip(cgroup.support().note)
    env = {**os.environ, **({} if grouping == "control group" else {cgroup.DISABLE_VARIABLE: "0"})}
    start_at = time.time() + 1.5
    ars = {}
    for kind in ("quiet", "forking"):
        work = tmp_path / kind
        work.mkdir()
        code = textwrap.dedent(BURN.format(start_at=start_at, children=kind == "forking"))
        ars[kind] = subprocess.Popen(
            [sys.executable, "-c", SHARE_OF_ONE, code, str(work),
             "yes" if grouping == "pid namespace" else "no"], stdout=subprocess.PIPE, env=env)  # fmt: skip
    quiet, forking = (json.loads(ars[kind].communicate(timeout=90)[0]) for kind in ("quiet", "forking"))
    assert quiet["reason"] == forking["reason"] == "ok"
    # each burnt about a core for 3 s: the children's time counts as the job's own
    assert forking["cpu"] >= 0.7 * quiet["cpu"], (quiet, forking)
    assert forking["share"] >= quiet["share"] - 0.15, (quiet, forking)


# --- item 10: the GPU path opens unix sockets, but reaches none of the host's -------------


@needs_landlock
@needs_pidns
def test_on_the_gpu_path_a_unix_socket_outside_is_unreachable(dirs, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = elsewhere / "server.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        server.setblocking(False)
        code = f"""
            import os, socket
            own = os.path.join(os.environ["TMPDIR"], "own.sock")  # its own: allowed on this path
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(own)
            listener.listen(1)
            socket.socket(socket.AF_UNIX).connect(own)
            print("own socket works")
            try:
                socket.socket(socket.AF_UNIX).connect({str(path)!r})
                print("CONNECTED")
            except OSError as exc:
                print("refused:", exc)
        """
        result = confined(dirs, code, gpu=True)
        try:
            server.accept()[0].close()
            accepted = True
        except BlockingIOError:
            accepted = False
    assert result.reason == "ok", result.log_tail
    assert "own socket works" in result.log_tail
    assert "refused: [Errno 2]" in result.log_tail and "CONNECTED" not in result.log_tail
    assert not accepted
    assert "hidden" in result.isolation_note


# --- the launcher in a PID namespace ends as the job ended --------------------------------


@needs_pidns
@pytest.mark.parametrize(("code", "reason", "exit_code"), [
    ("import sys; sys.exit(3)", "crash", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "signal", -11),
])  # fmt: skip
def test_in_a_pid_namespace_the_job_ends_as_it_would_outside(dirs, code, reason, exit_code):
    result = confined(dirs, code)
    assert (result.reason, result.exit_code) == (reason, exit_code), result.log_tail


@needs_pidns
def test_in_a_pid_namespace_a_daemon_left_behind_is_killed_and_counted(dirs):
    token = f"daemon-{uuid.uuid4().hex}"
    code = f"""
        import os, time
        TOKEN = {token!r}
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        time.sleep(0.5)
    """
    result = confined(dirs, code)
    assert result.reason == "ok", result.log_tail
    assert "killed 1 process(es) the job left behind" in result.note
    assert alive_with(token) == []


def test_control_group_readings_on_cgroup_v2(tmp_path):
    """The v2 files, written and read as the kernel lays them out (this machine may have
    none to try for real)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("memory pids\n")
    v2 = cgroup.Hierarchy(2, parent, top=True)
    found = cgroup.Support(v2, v2, v2, v2, "test")
    group = cgroup.JobCgroup.create(found, memory_max=300 * MB, tasks_max=64)
    job = Path(group.join_dirs()[0])
    assert (job / "memory.max").read_text() == str(300 * MB)
    assert (job / "memory.oom.group").read_text() == "1"
    assert (job / "pids.max").read_text() == "64"
    (job / "memory.current").write_text(f"{250 * MB}\n")
    (job / "memory.stat").write_text(f"anon {200 * MB}\ninactive_file {50 * MB}\n")
    (job / "memory.peak").write_text(f"{300 * MB}\n")
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (job / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert group.memory_bytes() == 200 * MB and group.peak_bytes() == 300 * MB
    assert group.oom_kills() == 1 and group.cpu_seconds() == 2.5
    group.kill()
    assert (job / "cgroup.kill").read_text() == "1"
    assert group.level == "cgroup-v2"
