"""What the sandbox costs: latency of a job that exits at once, CPU of watching a running job,
and what each layer of confinement adds to the start of a process.

    python benchmarks/bench_sandbox.py [--seconds 8] [--starts 40]

Targets: an instant job completes through run() in <= 0.3 s; watching a job costs ar
<= 2% of one core (ar's own CPU time, all its threads, over a sleeping job); confinement
(launcher, namespaces, Landlock, its control group) adds < 0.1 s to the start of a process;
a confined Python job with torch loaded starts and ends in < 0.2 s from the warm runtime
(sandbox/warm.py), against a cold start that imports torch.
Start costs are medians of many starts taken in turns, so that a change in the machine's
load meanwhile falls on every layer alike; compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import cgroup, confine, netns, proctree, warm  # noqa: E402
from sandbox.runner import Limits, job_env, run  # noqa: E402

INSTANT_TARGET_SECONDS = 0.3
CPU_TARGET_PERCENT = 2.0
START_TARGET_SECONDS = 0.1
WARM_TARGET_SECONDS = 0.2
JOB = ["/bin/true"]


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


def _launch(options: list[str], confinement=None, hide: bool = False, group: bool = False):
    """A callable that starts JOB through the launcher with `options` (Landlock's for
    `confinement`; a control group made, joined and removed), waits and returns seconds."""

    def once() -> float:
        started = time.perf_counter()
        made = cgroup.JobCgroup.create(cgroup.support(), 1 << 30, 8192) if group else None
        joins = [word for path in made.join_dirs() for word in ("--cgroup", path)] if made else []
        rules = confine.launcher_args(confinement, hide_sockets=hide) if confinement else []
        cmd = netns.launcher_cmd("--fsize", str(2**30), "--nofile", "1024", *joins, *options,
                                 *rules, "--", *JOB)  # fmt: skip
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        if made:
            made.remove()
        return time.perf_counter() - started

    return once


def start_costs(workdir: Path, starts: int) -> dict[str, float]:
    """Median seconds to start and end JOB, per layer of confinement, taken in turns."""
    probed = netns.probe()
    box = confine.Confinement(read=(str(workdir),), write=(str(workdir),))
    gpu_box = confine.Confinement(read=(str(workdir),), write=(str(workdir),), gpu=True)
    network = ["--namespaces", probed.mode] if probed.mode else []
    layers = {
        "bare process": _timed_bare,
        "launcher": _launch([]),
        f"+ {probed.mode or 'no'} namespaces": _launch(network),
        "+ Landlock (the confinement before issue 21)": _launch(network, box),
    }
    if probed.pid:
        pid = ["--namespaces", f"{probed.mode}+pid", "--privileges", "drop"]
        layers["+ PID namespace, its own /proc"] = _launch(pid, box)
        grouped = bool(cgroup.support().memory or cgroup.support().kill)
        if grouped:
            layers["+ control group (made, joined, removed)"] = _launch(pid, box, group=True)
        layers["GPU path: + the host's sockets hidden"] = _launch(pid, gpu_box, True, grouped)
    samples: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(starts):
        for name, start in layers.items():
            samples[name].append(start())
    return {name: statistics.median(values) for name, values in samples.items()}


def warm_starts(workdir: Path, starts: int) -> dict[str, float]:
    """Median seconds to start a confined `python -c "import torch"` and see it end: cold
    (a new interpreter imports torch) and warm (a fork of the server, torch loaded), in turns."""
    runtime = warm.Runtime()
    runtime.prestart(job_env({}))
    runtime.wait_ready()
    proctree.set_subreaper(True)
    box = confine.Confinement(read=(str(workdir),), write=(str(workdir),))
    launcher = confine.launch_cmd(confine.plan(box), [sys.executable, "-c", "import torch"],
                                  fsize_bytes=2**30, nofile=1024, parent_pid=os.getpid())  # fmt: skip
    null = os.open(os.devnull, os.O_RDWR)
    samples: dict[str, list[float]] = {"cold": [], "warm": []}
    try:
        for _ in range(starts):
            started = time.perf_counter()
            subprocess.run(launcher, check=True, stdin=null, env=job_env({}), cwd=workdir)
            samples["cold"].append(time.perf_counter() - started)
            started = time.perf_counter()
            if runtime.spawn(launcher, str(workdir), job_env({}), (null, null, null)).wait() != 0:
                raise RuntimeError("the warm job failed")
            samples["warm"].append(time.perf_counter() - started)
    finally:
        os.close(null)
        runtime.close()
        proctree.set_subreaper(False)
    return {name: statistics.median(values) for name, values in samples.items()}


def _timed_bare() -> float:
    started = time.perf_counter()
    subprocess.run(JOB, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the sleeping job")
    parser.add_argument("--repeats", type=int, default=10, help="instant jobs to time")
    parser.add_argument("--starts", type=int, default=40, help="starts per confinement layer")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ar-bench-") as tmp:
        workdir = Path(tmp)
        starts = start_costs(workdir, args.starts)
        instant = instant_job(workdir, args.repeats)
        watch = watching_cost(workdir, args.seconds)
        warmed = warm_starts(workdir, max(5, args.starts // 4))
    polls = poll_cost()
    ok_instant = instant["median"] <= INSTANT_TARGET_SECONDS
    ok_cpu = watch["percent"] <= CPU_TARGET_PERCENT
    bare = starts.pop("bare process")
    added = max(starts.values()) - bare
    ok_start = added < START_TARGET_SECONDS
    print(f"isolation: {confine.support().level} ({os.cpu_count()} cores, load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after)")
    print(f"start of one process, median of {args.starts} ({bare * 1e3:.1f} ms bare):")
    for name, seconds in starts.items():
        print(f"  {name:<42} {seconds * 1e3:7.1f} ms  (+{(seconds - bare) * 1e3:.1f} ms, "
              f"{seconds / bare:.1f}x bare)")
    print(f"confinement adds at most {added * 1e3:.1f} ms to a start; target < "
          f"{START_TARGET_SECONDS * 1e3:.0f} ms: {'PASS' if ok_start else 'FAIL'}")
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
    ok_warm = warmed["warm"] < WARM_TARGET_SECONDS
    print(f"a confined job with torch loaded, started and ended: cold {warmed['cold']:.3f} s, "
          f"warm {warmed['warm']:.3f} s ({warmed['cold'] / warmed['warm']:.0f}x); target warm < "
          f"{WARM_TARGET_SECONDS} s: {'PASS' if ok_warm else 'FAIL'}")
    return 0 if ok_instant and ok_cpu and ok_start and ok_warm else 1


if __name__ == "__main__":
    sys.exit(main())
