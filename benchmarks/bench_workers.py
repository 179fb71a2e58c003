"""Several experiments at once (`ar iterate --workers N`): what the scheduler costs, and
what a second worker buys.

1. Scheduler overhead per experiment, 4 workers, instant jobs (a train.py that exits at
   once, each in its own worker process): the time the one scheduling process spends on
   its own work (proposal, worktree, commit, ledger, decision, export) rather than
   waiting for its workers, per experiment. Target <= 0.3 s.
2. A simulated 16-slot run: the backend's jobs take the budget (sleep) and run nothing;
   experiments finished per budget period. Target >= 0.9 x 16.
3. (`--micro`, slow) 2 workers x 1 thread against 1 worker x 1 thread on the micro
   profile: experiments per hour. Target >= 1.7x. Needs two idle cores.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.agents.random_agent import RandomAgent  # noqa: E402
from autoresearch_cli.backends.base import Ended, Slot, SlotPool  # noqa: E402
from autoresearch_cli.backends.local import LocalWorkers  # noqa: E402
from autoresearch_cli.doors import gitops, workspace  # noqa: E402
from autoresearch_cli.doors.config import with_keep  # noqa: E402
from autoresearch_cli.doors.data import MANIFEST_FORMAT  # noqa: E402
from autoresearch_cli.research import session as runs  # noqa: E402
from autoresearch_cli.research.scheduler import Scheduler  # noqa: E402
from benchmarks.bench_loop import INSTANT_TRAIN_PY  # noqa: E402


class TimedWorkers(LocalWorkers):
    """The real backend, timing how long the scheduler waits for it."""

    waited = 0.0

    def wait(self, timeout):
        start = time.perf_counter()
        try:
            return super().wait(timeout)
        finally:
            self.waited += time.perf_counter() - start


class SleepingWorkers(SlotPool):
    """A backend whose jobs take `budget` seconds and run nothing (a simulated cluster)."""

    def __init__(self, slots, budget):
        super().__init__(slots)
        self.budget = budget
        self.running: dict[int, tuple[Slot, float]] = {}
        self.waited = 0.0

    def _slot_of(self, running):
        return running[0]

    def start(self, exp_id, slot, spec):
        self.running[exp_id] = (slot, time.monotonic() + self.budget)

    def wait(self, timeout):
        start = time.perf_counter()
        exp_id, (slot, ends_at) = min(self.running.items(), key=lambda item: item[1][1])
        time.sleep(max(0.0, min(timeout, ends_at - time.monotonic())))
        self.waited += time.perf_counter() - start
        if time.monotonic() < ends_at:
            return []
        del self.running[exp_id]
        return [Ended(exp_id, slot, {"status": "ok", "val_bpb": 5.0 + exp_id * 1e-6})]

    def stop_all(self):
        stopped = list(self.running)
        self.running.clear()
        return stopped


def _workspace(tmp: str, train_py: str | None, data_from: Path | None = None):
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    ws = workspace.init(Path(tmp) / "ws", profile="micro", tag="bench")
    if train_py is not None:
        (ws.root / "train.py").write_text(train_py)
        gitops.commit_all(ws.root, "instant train.py")
    if data_from is not None:
        shutil.copytree(data_from, ws.data_dir)
    else:
        ws.data_dir.mkdir(parents=True)
        (ws.data_dir / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT}))  # no data: the job reads none
    return ws


def _with_baseline(current, slot_class: str, val_bpb: float = 5.0) -> None:
    """A baseline row of the tip measured on `slot_class`, so no run measures it first; one
    run decides (what the keep test costs is bench_keep.py's figure, not the scheduler's)."""
    current.settings = with_keep(current.settings, rule="one-run")
    tip = current.ws.tip()
    exp_id = current.ledger.start_experiment("baseline", tip, "baseline", None, status="running")
    current.ledger.finish(exp_id, "ok", {"val_bpb": val_bpb, "status": "ok"}, sha=tip,
                          slot_class=slot_class)


def scheduler_overhead(experiments: int = 40, workers: int = 4) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    slots = [Slot(index, "cpu", cpus=(cpus[index % len(cpus)],)) for index in range(workers)]
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(tmp, INSTANT_TRAIN_PY)
        with runs.session(ws, "bench") as current:
            _with_baseline(current, slots[0].slot_class)
            pool = TimedWorkers(slots)
            start = time.perf_counter()
            Scheduler(current, pool, RandomAgent(seed=0), "random", experiments).run()
            total = time.perf_counter() - start
    own = (total - pool.waited) / experiments
    verdict = "ok" if own <= 0.3 else "OVER TARGET"
    print(f"{workers} workers, {experiments} instant jobs: {total:.1f} s in all, "
          f"{experiments / total:.2f} experiments/s")
    print(f"scheduler overhead: {own:.3f} s per experiment (target <= 0.3 s) {verdict}")


def simulated_cluster(slots_n: int = 16, budget: float = 10.0, periods: int = 3) -> None:
    experiments = slots_n * periods
    slots = [Slot(index, "cuda", gpu=str(index), slot_class="cuda:simulated")
             for index in range(slots_n)]
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(tmp, INSTANT_TRAIN_PY)
        with runs.session(ws, "bench") as current:
            _with_baseline(current, "cuda:simulated")
            pool = SleepingWorkers(slots, budget)
            start = time.perf_counter()
            Scheduler(current, pool, RandomAgent(seed=0), "random", experiments).run()
            total = time.perf_counter() - start
    per_period = experiments / (total / budget)
    verdict = "ok" if per_period >= 0.9 * slots_n else "UNDER TARGET"
    print(f"simulated {slots_n} slots, jobs of {budget:g} s: {experiments} experiments in "
          f"{total:.1f} s = {per_period:.1f} per budget period (target >= {0.9 * slots_n:.1f}) "
          f"{verdict}")


def micro_speedup(experiments: int = 6) -> None:
    """2 workers x 1 thread against 1 worker x 1 thread, real micro trainings."""
    from autoresearch_cli.doors.data import prepare_data

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("micro speedup: needs two cores; skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for package in ("json", "email", "http", "logging", "urllib", "xml/dom"):  # as the tests
            for source in sorted((stdlib / package).glob("*.py")):
                target = corpus / package.replace("/", "_") / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        prepare_data(data, source=f"files:{corpus}/**/*.py", vocab_size=512)
        rates = {}
        for label, slots in (("1 worker x 1 thread", [Slot(0, "cpu", cpus=(cpus[0],))]),
                             ("2 workers x 1 thread", [Slot(0, "cpu", cpus=(cpus[0],)),
                                                      Slot(1, "cpu", cpus=(cpus[1],))])):
            run_tmp = Path(tmp) / label.replace(" ", "_")
            run_tmp.mkdir()
            ws = _workspace(str(run_tmp), None, data_from=data)
            with runs.session(ws, "bench") as current:
                _with_baseline(current, "cpu:1")  # what the baseline scores is not compared
                start = time.perf_counter()
                Scheduler(current, LocalWorkers(slots), RandomAgent(seed=1), "random",
                          experiments).run()
                total = time.perf_counter() - start
                ran = [run for run in current.ledger.runs()[1:] if run.total_seconds]
            rates[label] = len(ran) / total * 3600
            mean = statistics.fmean(run.total_seconds for run in ran)
            steps = statistics.fmean(run.num_steps or 0 for run in ran)
            print(f"{label}: {len(ran)} micro runs ({experiments} proposed, the rest "
                  f"combinations) in {total:.1f} s = {rates[label]:.0f} runs/hour; a run takes "
                  f"{mean:.1f} s in the sandbox, {steps:.0f} training steps")
        speedup = rates["2 workers x 1 thread"] / rates["1 worker x 1 thread"]
        print(f"speedup {speedup:.2f}x (target >= 1.7x) {'ok' if speedup >= 1.7 else 'UNDER TARGET'}")


def main() -> None:
    scheduler_overhead()
    simulated_cluster()
    if "--micro" in sys.argv:
        micro_speedup()


if __name__ == "__main__":
    main()
