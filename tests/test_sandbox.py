"""The sandbox runner against real, misbehaving subprocesses: one adversarial property per test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from sandbox import gpu, netns, warm
from sandbox.proctree import kill_recorded
from sandbox.progress import Progress, parse_step
from sandbox.runner import Limits, job_env, run

# Every job here starts from the warm runtime (conftest.py), as ar's own do.
pytestmark = pytest.mark.usefixtures("warm_runtime")

MB = 2**20


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def run_job(tmp_path: Path, code: str, **limits) -> tuple:
    limits.setdefault("wall_seconds", 20)
    started = time.monotonic()
    result = run(python(code), tmp_path, job_env({}), Limits(**limits), tmp_path / "job.log")
    return result, time.monotonic() - started


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)]


def read_pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()]


def test_instant_job_returns_ok_with_its_output(tmp_path):
    result, seconds = run_job(tmp_path, "for i in range(80): print('line', i)")
    assert (result.reason, result.exit_code) == ("ok", 0)
    assert result.log_tail.splitlines()[-1] == "line 79"
    assert len(result.log_tail.splitlines()) == 50
    assert seconds < 2


def test_crash_is_reported_with_its_traceback(tmp_path):
    result, _ = run_job(
        tmp_path, "import sys\nprint('hello')\nraise RuntimeError('boom at step 3')"
    )
    assert (result.reason, result.exit_code) == ("crash", 1)
    assert "Traceback" in result.log_tail
    assert "RuntimeError: boom at step 3" in result.log_tail


def test_death_by_a_signal_is_told_apart_from_a_crash(tmp_path):
    result, _ = run_job(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert (result.reason, result.exit_code) == ("signal", -11)
    assert "SIGSEGV" in result.note and "SIGSEGV" in result.log_tail


def test_hang_that_ignores_sigterm_is_killed_at_the_wall_limit(tmp_path):
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    """
    result, seconds = run_job(tmp_path, code, wall_seconds=1)
    assert result.reason == "timeout"
    assert seconds < 1 + 5
    assert "wall-clock limit" in result.log_tail


def test_grandchild_that_calls_setsid_dies_with_the_job(tmp_path):
    code = f"""
        import os, signal, time
        if os.fork() == 0:
            if os.fork() == 0:
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                open({str(tmp_path / "pids")!r}, "a").write(f"{{os.getppid()}} {{os.getpid()}}\\n")
                time.sleep(600)
            time.sleep(0.3)
            os._exit(0)  # the grandchild is orphaned: the kernel hands it to the reaper
        time.sleep(600)
    """
    result, seconds = run_job(tmp_path, code, wall_seconds=1.5)
    assert result.reason == "timeout" and seconds < 1.5 + 5
    assert_gone(read_pids(tmp_path / "pids"))


def test_daemon_left_behind_by_a_finished_job_is_killed(tmp_path):
    code = f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                open({str(tmp_path / "pids")!r}, "w").write(str(os.getpid()))
                time.sleep(600)
            os._exit(0)
        time.sleep(0.5)
        print("done")
    """
    result, _ = run_job(tmp_path, code)
    assert (result.reason, result.exit_code) == ("ok", 0)
    assert "left behind" in result.note
    assert_gone(read_pids(tmp_path / "pids"))


def test_the_next_ar_kills_the_job_of_an_ar_that_was_killed(tmp_path):
    (tmp_path / "job.py").write_text(textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()  # out of the job's session, and soon an orphan
            if os.fork() == 0:
                open("grandchild", "w").write(str(os.getpid()))
                time.sleep(600)
            os._exit(0)
        time.sleep(600)
    """))  # fmt: skip
    (tmp_path / "ar.py").write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from sandbox.runner import Limits, job_env, run
        work = Path({str(tmp_path)!r})
        run([sys.executable, str(work / "job.py")], work, job_env({{}}), Limits(wall_seconds=60),
            work / "job.log")
    """))  # fmt: skip
    first_ar = subprocess.Popen([sys.executable, str(tmp_path / "ar.py")])
    record, grandchild = tmp_path / "job.pid", tmp_path / "grandchild"

    def recorded() -> list[int]:
        text = record.read_text() if record.exists() else ""
        return [int(line.split()[0]) for line in text.splitlines()]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
        grandchild.exists() and grandchild.read_text() and int(grandchild.read_text()) in recorded()
    ):
        time.sleep(0.05)
    pids = recorded()
    assert int(grandchild.read_text()) in pids
    first_ar.kill()
    first_ar.wait()
    assert kill_recorded(record) >= 1
    assert_gone(pids)


def test_a_reused_pid_in_a_stale_record_is_spared(tmp_path):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        (tmp_path / "job.pid").write_text(f"{bystander.pid} 12345 {boot}\n")  # another start time
        assert kill_recorded(tmp_path / "job.pid") == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_memory_hog_in_a_child_process_is_killed_for_rss(tmp_path):
    code = """
        import os, time
        if os.fork() == 0:
            hoard = []
            for _ in range(100):  # up to 2 GB, 20 MB at a time
                hoard.append(b"x" * (20 * 2**20))
                time.sleep(0.02)
            os._exit(0)
        os.wait()
    """
    result, seconds = run_job(tmp_path, code, max_rss_mb=300)
    assert result.reason == "rss"
    assert 300 <= result.peak_rss_mb < 1000
    assert seconds < 5


def test_output_flood_keeps_the_log_bounded_and_ar_small(tmp_path):
    code = """
        import os
        line = b"x" * 1023 + b"\\n"
        while True:
            os.write(1, line * 64)
    """
    before = psutil.Process().memory_info().rss
    result, seconds = run_job(tmp_path, code, wall_seconds=2, max_log_mb=1, max_file_mb=64)
    growth = psutil.Process().memory_info().rss - before
    assert seconds < 2 + 5
    log = (tmp_path / "job.log").read_bytes()
    assert len(log) <= 1 * MB + 4096 and log.startswith(b"xxxx")
    assert b"MB of output were dropped here" in log and result.log_dropped_mb > 0
    assert growth < 20 * MB
    assert len(result.log_tail) < 50 * 1024


def test_verbose_job_keeps_running_while_its_log_is_cut(tmp_path):
    code = """
        import sys, time
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            sys.stdout.write("chatter " * 1000 + "\\n")
        print("last words")
    """
    result, _ = run_job(tmp_path, code, max_log_mb=1, max_file_mb=1024)
    assert result.reason == "ok", result.log_tail
    assert result.log_tail.endswith("last words")
    assert (tmp_path / "job.log").stat().st_size <= 1 * MB + 4096
    assert result.log_dropped_mb > 1


def test_file_past_the_size_cap_fails(tmp_path):
    target = tmp_path / "big.bin"
    code = f"""
        with open({str(target)!r}, "wb") as handle:
            for _ in range(3):
                handle.write(b"x" * 2**20)
    """
    result, _ = run_job(tmp_path, code, max_file_mb=1)
    assert result.reason in ("crash", "signal") and result.exit_code != 0
    assert "File too large" in result.log_tail
    assert target.stat().st_size <= 1 * MB


def test_api_keys_do_not_reach_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-must-not-leak")
    env = job_env({"AR_TIME_BUDGET": "5"})
    code = """
        import os, sys
        leaked = [name for name, value in os.environ.items() if "must-not-leak" in value]
        print("leaked:", leaked, "budget:", os.environ.get("AR_TIME_BUDGET"))
        sys.exit(3 if leaked else 0)
    """
    result = run(python(code), tmp_path, env, Limits(wall_seconds=20), tmp_path / "job.log")
    assert result.reason == "ok", result.log_tail
    assert "leaked: [] budget: 5" in result.log_tail


@pytest.mark.parametrize("network", [False, True])
def test_job_cannot_read_the_environment_of_ar_through_proc(tmp_path, network):
    if os.geteuid() == 0 and netns.probe().mode != "user+net":
        pytest.skip("a root job outside a user namespace may read any process")
    code = f"""
        import sys
        try:
            open("/proc/{os.getpid()}/environ", "rb").read()
        except PermissionError:
            sys.exit(0)
        sys.exit(5)
    """
    result, _ = run_job(tmp_path, code, network=network)
    assert result.exit_code == 0, result.log_tail


def test_log_swapped_for_a_fifo_neither_hangs_ar_nor_loses_the_log(tmp_path):
    code = f"""
        import os
        print("before the swap", flush=True)
        os.unlink({str(tmp_path / "job.log")!r})
        os.mkfifo({str(tmp_path / "job.log")!r})
        print("after the swap", flush=True)
    """
    result, seconds = run_job(tmp_path, code)
    assert result.reason == "ok" and seconds < 5
    assert (tmp_path / "job.log").is_file()
    assert "after the swap" in (tmp_path / "job.log").read_text()
    assert "put the log back" in result.note


def test_network_isolation_blocks_an_outbound_connect(tmp_path):
    isolation = netns.probe()
    if isolation.mode is None:
        pytest.skip(isolation.note)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    code = f"""
        import socket, sys
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
        except OSError as exc:
            print("blocked:", exc)
            sys.exit(7)
        print("connected")
    """
    try:
        offline, _ = run_job(tmp_path, code, network=False)
        online, _ = run_job(tmp_path, code, network=True)  # the same job reaches it with network
    finally:
        server.close()
    assert offline.network_isolated and offline.exit_code == 7, offline.log_tail
    assert not online.network_isolated and online.exit_code == 0, online.log_tail


def test_without_namespaces_the_job_runs_online_and_the_result_says_so(tmp_path, monkeypatch):
    refused = netns.NetworkIsolation(None, "the job has the network: unshare: not permitted")
    monkeypatch.setattr(netns, "probe", lambda: refused)
    result, _ = run_job(tmp_path, "print('still runs')")
    assert result.reason == "ok" and result.log_tail == "still runs"
    assert not result.network_isolated and "not permitted" in result.network_note


def test_progress_lines_reach_the_callback(tmp_path):
    code = """
        import sys, time
        for step in range(1, 16):
            end = "\\r" if step % 2 else "\\n"
            sys.stdout.write(f"step {step:05d} ({step / 15 * 100:.1f}%) | loss: {5 - step / 10:.6f} "
                             f"| lrm: 1.00 | dt: 12ms | remaining: {15 - step}s{end}")
            sys.stdout.flush()
            time.sleep(0.05)
    """
    seen: list[Progress] = []
    result = run(python(code), tmp_path, job_env({}), Limits(wall_seconds=20),
                 tmp_path / "job.log", on_progress=seen.append)  # fmt: skip
    assert result.reason == "ok"
    assert seen and seen[-1] == Progress(step=15, percent=100.0, loss=3.5, seconds_left=0.0)
    assert [p.step for p in seen] == sorted({p.step for p in seen})
    assert result.last_progress == seen[-1]
    assert parse_step("step 00042 (12.3%) | loss: nan | remaining: 52s").step == 42
    assert parse_step("val_bpb: 0.9 | step 3") is None


def test_exception_in_the_caller_kills_the_job_and_propagates(tmp_path):
    code = f"""
        import os, time
        open({str(tmp_path / "pids")!r}, "w").write(str(os.getpid()))
        print("step 00001 (1.0%) | loss: 4.000000 | remaining: 60s", flush=True)
        time.sleep(600)
    """

    def interrupt(progress: Progress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(python(code), tmp_path, job_env({}), Limits(wall_seconds=30),
            tmp_path / "job.log", on_progress=interrupt)  # fmt: skip
    assert_gone(read_pids(tmp_path / "pids"))


def test_stop_event_ends_the_job_as_interrupted(tmp_path):
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    result = run(python("import time; time.sleep(600)"), tmp_path, job_env({}),
                 Limits(wall_seconds=30), tmp_path / "job.log", stop=stop)  # fmt: skip
    assert result.reason == "interrupted" and result.wall_seconds < 5


def test_too_many_processes_are_killed(tmp_path):
    code = """
        import os, time
        for _ in range(40):
            if os.fork() == 0:
                time.sleep(600)
                os._exit(0)
        time.sleep(600)
    """
    result, seconds = run_job(tmp_path, code, max_processes=10)
    assert result.reason == "procs" and seconds < 10
    left = [p for p in psutil.Process().children(recursive=True)
            if p.status() != "zombie" and p.pid != warm.runtime().pid]  # the server is no job's
    assert not left


def test_low_disk_space_stops_the_job(tmp_path):
    result, _ = run_job(tmp_path, "import time; time.sleep(600)", min_free_disk_mb=10**12)
    assert result.reason == "disk"


def test_gpu_watch_without_nvml_reports_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setattr(gpu, "_nvml_state", None)
    result, _ = run_job(tmp_path, "print('cpu only')")
    assert result.reason == "ok"
    assert result.gpu_note.startswith("no GPU")
    assert result.peak_vram_mb is None and result.gpu_util_percent is None


def fake_nvml(used_by: dict, device_used: list[int]) -> SimpleNamespace:
    """An NVML with one device; used_by maps a pid (or a callable giving pids) to bytes."""

    def processes(_handle):
        pids = used_by["pids"]()
        return [SimpleNamespace(pid=pid, usedGpuMemory=used_by["bytes"]) for pid in pids]

    return SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: "gpu0",
        nvmlDeviceGetMemoryInfo=lambda _h: SimpleNamespace(
            used=device_used.pop(0) if len(device_used) > 1 else device_used[0]
        ),
        nvmlDeviceGetComputeRunningProcesses=processes,
        nvmlDeviceGetUtilizationRates=lambda _h: SimpleNamespace(gpu=50),
        nvmlDeviceGetTemperature=lambda _h, _sensor: 61,
    )


def test_gpu_memory_of_the_job_above_the_cap_kills_it(tmp_path, monkeypatch):
    job_pids = lambda: [p.pid for p in psutil.Process().children(recursive=True)]  # noqa: E731
    fake = fake_nvml({"pids": job_pids, "bytes": 500 * MB}, [1000 * MB])
    monkeypatch.setattr(gpu, "_nvml_state", (fake, ""))
    result, seconds = run_job(tmp_path, "import time; time.sleep(600)", max_vram_mb=100)
    assert result.reason == "vram" and seconds < 8
    assert result.peak_vram_mb == 500 and result.gpu_max_temp_c == 61
    assert result.gpu_util_percent == 50


def test_gpu_watch_falls_back_to_device_memory_when_pids_are_foreign(monkeypatch):
    foreign = lambda: [4_194_000]  # noqa: E731 - a pid from another namespace
    fake = fake_nvml({"pids": foreign, "bytes": None}, [100 * MB, 700 * MB])
    monkeypatch.setattr(gpu, "_nvml_state", (fake, ""))
    watch = gpu.GpuWatch(None, interval=0.05)
    watch.start(lambda: frozenset({os.getpid()}))
    time.sleep(0.2)
    report = watch.stop()
    assert report.peak_vram_mb == 600
    assert "baseline" in report.note
