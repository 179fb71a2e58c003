"""What the sandbox costs: latency of a job that exits at once, CPU of watching a running job.

    python benchmarks/bench_sandbox.py [--seconds 8]

Targets: an instant job completes through run() in <= 0.3 s; watching a job costs ar
<= 2% of one core (ar's own CPU time, all its threads, over a sleeping job).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import netns, proctree  # noqa: E402
from sandbox.runner import Limits, job_env, run  # noqa: E402

INSTANT_TARGET_SECONDS = 0.3
CPU_TARGET_PERCENT = 2.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def instant_job(workdir: Path, repeats: int) -> dict[str, float]:
    cmd = [sys.executable, "-S", "-c", "pass"]
    limits = Limits(wall_seconds=30)
    started = time.perf_counter()
    run(cmd, workdir, job_env({}), limits, workdir / "first.log")  # pays the network probe
    first = time.perf_counter() - started
    seconds = []
    for index in range(repeats):
        started = time.perf_counter()
        result = run(cmd, workdir, job_env({}), limits, workdir / f"instant{index}.log")
        seconds.append(time.perf_counter() - started)
        assert result.reason == "ok", result
    direct = []
    for _ in range(repeats):  # the same command without the sandbox, for comparison
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        direct.append(time.perf_counter() - started)
    return {"first": first, "median": statistics.median(seconds), "max": max(seconds),
            "bare": statistics.median(direct)}  # fmt: skip


def watching_cost(workdir: Path, seconds: float) -> dict[str, float]:
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    result = run(["sleep", str(seconds)], workdir, job_env({}), Limits(wall_seconds=seconds + 30),
                 workdir / "sleep.log")  # fmt: skip
    cpu, wall = _cpu_seconds() - cpu_before, time.perf_counter() - wall_before
    assert result.reason == "ok", result
    return {"cpu_seconds": cpu, "wall_seconds": wall, "percent": 100 * cpu / wall}


def poll_cost(repeats: int = 200) -> dict[str, float]:
    """CPU of one membership refresh plus the memory sum, the bulk of a poll."""
    tree = proctree.ProcTree()
    job = subprocess.Popen(["sleep", "30"], start_new_session=True)
    tree.attach(job.pid)
    try:
        started = time.process_time()
        for _ in range(repeats):
            tree.refresh()
            tree.rss_bytes()
        per_poll = (time.process_time() - started) / repeats
    finally:
        job.kill()
        job.wait()
    return {"processes": len(proctree._pids()), "ms": per_poll * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the sleeping job")
    parser.add_argument("--repeats", type=int, default=10, help="instant jobs to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ar-bench-") as tmp:
        workdir = Path(tmp)
        instant = instant_job(workdir, args.repeats)
        watch = watching_cost(workdir, args.seconds)
    polls = poll_cost()
    ok_instant = instant["median"] <= INSTANT_TARGET_SECONDS
    ok_cpu = watch["percent"] <= CPU_TARGET_PERCENT
    print(f"network: {netns.probe().note}")
    print(f"instant job through run(): median {instant['median']:.3f} s, max {instant['max']:.3f} s, "
          f"first call {instant['first']:.3f} s (bare subprocess {instant['bare']:.3f} s); "
          f"target <= {INSTANT_TARGET_SECONDS} s: {'PASS' if ok_instant else 'FAIL'}")  # fmt: skip
    print(f"watching a {args.seconds:g} s job: ar used {watch['cpu_seconds'] * 1e3:.0f} ms CPU "
          f"= {watch['percent']:.2f}% of one core; target <= {CPU_TARGET_PERCENT}%: "
          f"{'PASS' if ok_cpu else 'FAIL'}")  # fmt: skip
    print(
        f"one poll of the process tree with {polls['processes']} processes on the host: "
        f"{polls['ms']:.3f} ms CPU"
    )
    return 0 if ok_instant and ok_cpu else 1


if __name__ == "__main__":
    sys.exit(main())
