"""The Ray backend (`ar iterate --backend ray`): what running on a cluster costs.

1. Overhead per experiment through Ray against LocalWorkers, instant jobs (a train.py that
   exits at once; the real worker process, sandbox and data check run), one after the
   other on a one-node local Ray. Target <= 2 s over local.
2. A simulated 16-slot cluster: a local Ray with 16 "fake_gpu" resources; each slot a
   real Ray actor whose jobs sleep for the budget (`--budget S`, default 10). Experiments
   finished per budget period: the backend alone, under the real scheduler, and (for
   reference) that scheduler with a backend that only sleeps. Target >= 0.9 x 16.
3. (`--micro`, slow) real micro-profile trainings, 2 slots of one core: Ray against
   LocalWorkers, runs per hour.
Ray gets the machine's real CPU count and a small object store (200 MB).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def sleep_job(argv: list[str]) -> int:
    """The simulated cluster's job, in place of the worker process: BUDGET SPEC PID CPUS."""
    spec = json.loads(Path(argv[1]).read_text())
    time.sleep(float(argv[0]))
    result = {"status": "ok", "val_bpb": 5.0 + spec["seed"] * 1e-6, "seed": spec["seed"]}
    (Path(spec["run_dir"]) / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--sleep-job"]:
    sys.exit(sleep_job(sys.argv[2:]))  # on a node: nothing of ar imported

import secrets  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.agents.random_agent import RandomAgent  # noqa: E402
from autoresearch_cli.backends import ray as ray_backend  # noqa: E402
from autoresearch_cli.backends.base import Ended, Slot  # noqa: E402
from autoresearch_cli.backends.local import LocalWorkers  # noqa: E402
from autoresearch_cli.doors.config import with_keep  # noqa: E402
from autoresearch_cli.doors.data import prepare_data, read_manifest  # noqa: E402
from autoresearch_cli.research import session as runs  # noqa: E402
from autoresearch_cli.research.scheduler import Scheduler  # noqa: E402
from benchmarks.bench_loop import INSTANT_TRAIN_PY  # noqa: E402
from benchmarks.bench_workers import SleepingWorkers, _with_baseline, _workspace  # noqa: E402

OBJECT_STORE_BYTES = 200 * 1024 * 1024
# Ray's local clusters use token authentication: the token here, not in ~/.ray/auth_token
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def _micro_data(tmp: Path) -> Path:
    """Micro-profile data from a few hundred KB of the standard library (as the tests)."""
    corpus, data = tmp / "corpus", tmp / "data"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "http", "logging", "urllib", "xml/dom"):
        for source in sorted((stdlib / package).glob("*.py")):
            target = corpus / package.replace("/", "_") / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    prepare_data(data, source=f"files:{corpus}/**/*.py", vocab_size=512)
    return data


def _one_at_a_time(pool, slot: Slot, current, first_id: int, count: int) -> list[float]:
    """Seconds from start() to Ended for `count` runs, one after the other."""
    seconds = []
    for exp_id in range(first_id, first_id + count):
        run_dir = current.ws.runs_dir / str(exp_id)
        spec = runs.experiment_spec(current, run_dir, current.ws.root, seed=exp_id)
        started = time.perf_counter()
        pool.start(exp_id, slot, spec)
        while not any(isinstance(event, Ended) for event in pool.wait(0.5)):
            pass
        seconds.append(time.perf_counter() - started)
    return seconds


def overhead(runs_each: int = 8) -> None:
    import ray

    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="ar-bench-") as tmp:
        ws = _workspace(tmp, INSTANT_TRAIN_PY, data_from=_micro_data(Path(tmp)))
        with runs.session(ws, "bench") as current:
            local = _one_at_a_time(LocalWorkers([Slot(0, "cpu")]), Slot(0, "cpu"), current, 1,
                                   runs_each)
            started = time.perf_counter()
            ray.init(num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES,
                     include_dashboard=False, log_to_driver=False,
                     namespace=ray_backend.NAMESPACE, _temp_dir=f"{tmp}/ray")
            pool = ray_backend.connect(None, 1, "cpu", read_manifest(ws.data_dir), ws.data_dir)
            connect_s = time.perf_counter() - started
            first, *through_ray = _one_at_a_time(pool, pool.slots[0], current, 100, runs_each + 1)
            pool.close()
            ray.shutdown()
    local_s, ray_s = statistics.median(local), statistics.median(through_ray)
    extra = ray_s - local_s
    print(f"instant jobs, one at a time ({runs_each} each; medians): local {local_s:.2f} s, "
          f"Ray {ray_s:.2f} s (the first, which makes the slot's actor and hashes the data, {first:.2f} s); starting Ray and "
          f"planning its slots {connect_s:.1f} s once")
    print(f"Ray overhead: {extra:+.2f} s per experiment (target <= 2 s) "
          f"{'ok' if extra <= 2.0 else 'OVER TARGET'}")


def _keep_full(pool, current, experiments: int) -> None:
    """The backend alone: every free slot gets the next spec at once, until `experiments`."""
    started = ended = 0
    while ended < experiments:
        for slot in pool.free_slots()[:experiments - started]:
            started += 1
            run_dir = current.ws.runs_dir / str(1000 + started)
            pool.start(1000 + started, slot,
                       runs.experiment_spec(current, run_dir, current.ws.root, seed=started))
        ended += sum(isinstance(event, Ended) for event in pool.wait(0.5))


def simulated_cluster(slots_n: int = 16, budget: float = 10.0, periods: int = 2) -> None:
    """Ray with `slots_n` fake GPUs: the backend alone, then under the real scheduler, and
    the same scheduler with bench_workers' backend that only sleeps (no Ray) for reference."""
    import ray

    experiments = slots_n * periods
    rates = {}
    with tempfile.TemporaryDirectory(prefix="ar-bench-") as tmp:
        ws = _workspace(tmp, INSTANT_TRAIN_PY, data_from=_micro_data(Path(tmp)))
        ray.init(num_cpus=len(os.sched_getaffinity(0)), resources={"fake_gpu": slots_n},
                 object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=False, namespace=ray_backend.NAMESPACE, _temp_dir=f"{tmp}/ray")
        pool = ray_backend.connect(None, None, "cuda", read_manifest(ws.data_dir), ws.data_dir,
                                   gpu_resource="fake_gpu")
        pool.command = (str(Path(__file__).resolve()), "--sleep-job", str(budget))
        with runs.session(ws, "bench") as current:
            # one run decides: no noise measurements of the tip, which are runs, not experiments
            current.settings = with_keep(current.settings, rule="one-run", min_share=0.0,
                                         min_throughput=0.0)
            _with_baseline(current, pool.slots[0].slot_class)
            start = time.perf_counter()
            _keep_full(pool, current, slots_n)  # the first period makes the slot actors
            first = time.perf_counter() - start
            start = time.perf_counter()
            _keep_full(pool, current, experiments)
            rates["Ray backend alone"] = experiments / ((time.perf_counter() - start) / budget)
            for label, backend in (("Ray, with the scheduler", pool),
                                   ("no Ray (sleeping backend), with the scheduler",
                                    SleepingWorkers(pool.slots, budget))):
                before = len(current.ledger.runs())
                start = time.perf_counter()
                Scheduler(current, backend, RandomAgent(seed=0), "random", experiments).run()
                ran = len(current.ledger.runs()) - before  # combinations included
                rates[label] = ran / ((time.perf_counter() - start) / budget)
        pool.close()
        ray.shutdown()
    print(f"simulated {len(pool.slots)} slots on Ray (fake_gpu), jobs of {budget:g} s, "
          f"{experiments} experiments each; the first {slots_n} (making the slot actors) "
          f"took {first:.1f} s")
    for label, rate in rates.items():
        verdict = "ok" if rate >= 0.9 * slots_n else "UNDER TARGET"
        print(f"  {label}: {rate:.1f} runs per budget period "
              f"(target >= {0.9 * slots_n:.1f}) {verdict}")


def micro_runs(experiments: int = 6) -> None:
    """Real micro trainings, 2 slots of one core each: Ray against local."""
    import ray

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("micro: needs two cores; skipped")
        return
    rates = {}
    with tempfile.TemporaryDirectory(prefix="ar-bench-") as tmp:
        data = _micro_data(Path(tmp))
        for label in ("local", "ray"):
            (Path(tmp) / label).mkdir()
            ws = _workspace(str(Path(tmp) / label), None, data_from=data)
            if label == "ray":
                ray.init(num_cpus=len(cpus), object_store_memory=OBJECT_STORE_BYTES,
                         include_dashboard=False, log_to_driver=False,
                         namespace=ray_backend.NAMESPACE, _temp_dir=f"{tmp}/ray")
                pool = ray_backend.connect(None, 2, "cpu", read_manifest(ws.data_dir), ws.data_dir)
            else:
                pool = LocalWorkers([Slot(0, "cpu", cpus=(cpus[0],)), Slot(1, "cpu", cpus=(cpus[1],))])
            with runs.session(ws, "bench") as current:
                _with_baseline(current, "cpu:1")
                start = time.perf_counter()
                Scheduler(current, pool, RandomAgent(seed=1), "random", experiments).run()
                total = time.perf_counter() - start
                ran = [run for run in current.ledger.runs()[1:] if run.total_seconds]
            rates[label] = len(ran) / total * 3600
            if label == "ray":
                pool.close()
            print(f"micro, 2 slots x 1 core, {label}: {len(ran)} runs in {total:.1f} s = "
                  f"{rates[label]:.0f} runs/hour")
        ray.shutdown()
    print(f"Ray / local: {rates['ray'] / rates['local']:.2f}x")


def main() -> None:
    budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 10.0
    overhead()
    simulated_cluster(budget=budget)
    if "--micro" in sys.argv:
        micro_runs()


if __name__ == "__main__":
    main()
