"""The budget bills only training: the phases a job reports are timed on ar's clock and
change nothing else (sandbox/phases.py), and the template's budget clock (prepare.py)
bills from the first step after its warm-up. One property per test."""

from __future__ import annotations

import importlib.util
import resource
import sys
import textwrap
import time

import pytest
from conftest import REPO_ROOT

from sandbox.phases import MAX_BYTES, durations
from sandbox.runner import Limits, job_env, run

pytestmark = pytest.mark.usefixtures("warm_runtime")


def phased_job(tmp_path, code: str, wall: float = 20):
    started = time.monotonic()
    result = run([sys.executable, "-c", textwrap.dedent(code)], tmp_path, job_env({}),
                 Limits(wall_seconds=wall), tmp_path / "job.log", phases=True)  # fmt: skip
    return result, time.monotonic() - started


def test_phases_are_timed_by_ar_once_each_in_order_whatever_the_job_writes(tmp_path):
    result, _ = phased_job(tmp_path, """
        import os, time
        fd = int(os.environ["AR_PHASE_FD"])
        os.write(fd, b"setup\\nbogus\\n")
        time.sleep(0.5)
        os.write(fd, b"train\\nsetup\\ntrain\\n\\x1b[2Jtrain\\n")
        time.sleep(0.5)
        os.write(fd, b"save\\n")
    """)
    seen = result.phases
    assert result.reason == "ok" and set(seen) == {"setup", "train", "save"}
    assert 0.4 < seen["train"] - seen["setup"] < 1.5 and 0.4 < seen["save"] - seen["train"] < 1.5
    spans = durations(seen, result.wall_seconds)
    assert set(spans) == {"start", "warmup", "train", "save"}
    assert abs(sum(spans.values()) - result.wall_seconds) < 0.01


def test_claiming_to_compile_buys_no_time_past_the_hard_kill(tmp_path):
    result, seconds = phased_job(tmp_path, """
        import os, time
        os.write(int(os.environ["AR_PHASE_FD"]), b"setup\\n")
        time.sleep(60)   # "compiling", forever
    """, wall=2)
    assert result.reason == "timeout" and seconds < 6
    assert list(result.phases) == ["setup"]
    assert durations(result.phases, result.wall_seconds)["warmup"] >= 1.5


def test_a_job_flooding_its_phase_pipe_costs_ar_nothing(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF)
    result, _ = phased_job(tmp_path, """
        import os, time
        fd, stop = int(os.environ["AR_PHASE_FD"]), time.time() + 2
        while time.time() < stop:
            try:
                os.write(fd, b"train\\n" * 100)
            except OSError:
                break   # ar stopped listening: the pipe is full or closed
    """)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.reason == "ok" and list(result.phases) == ["train"]
    assert cpu < 0.6, f"ar spent {cpu:.2f} s of CPU reading {MAX_BYTES} bytes at most"


def test_a_phase_never_reported_is_part_of_the_one_before():
    assert durations({}, 10.0) == {"start": 10.0}
    assert durations({"train": 2.0}, 10.0) == {"start": 2.0, "train": 8.0}
    assert durations({"setup": 1.0, "save": 9.0}, 10.0) == {"start": 1.0, "warmup": 8.0, "save": 1.0}


def test_the_templates_clock_bills_from_the_first_step_after_its_warm_up(monkeypatch):
    monkeypatch.setenv("AR_TIME_BUDGET", "1")
    monkeypatch.delenv("AR_PHASE_FD", raising=False)
    spec = importlib.util.spec_from_file_location("template_prepare",
                                                  REPO_ROOT / "workspace_template" / "prepare.py")  # fmt: skip
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    clock, now = prepare.BudgetClock(warmup_steps=2), [100.0]
    monkeypatch.setattr(prepare.time, "time", lambda: now[0])
    step = 0
    while not clock.over(step):
        clock.start_step(step)
        now[0] += 0.3 if step >= 2 else 5.0  # two slow warm-up steps: not billed
        clock.end_step(step)
        step += 1
    assert step == 6 and clock.seconds == pytest.approx(1.2) and clock.progress == 1.0
