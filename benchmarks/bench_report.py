"""`ar report` and its live page: what they cost.

1. `ar report` on a ledger of 1,000 experiments (a baseline, 25 kept steps with real
   commits, confirmations and re-measures, discards, crashes and invalid proposals, a
   model call of 8,000 prompt tokens per proposal): the whole command, start-up included.
   Target < 2 s.
2. The live page beside the loop: the scheduler's overhead per experiment (4 workers,
   instant jobs, as bench_workers.py) with no page open, then with `ar report --serve`
   running and a client polling /state.json every second as the page does. Target: no
   measurable difference (within the run-to-run spread of the figure without a page).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.agents.random_agent import RandomAgent  # noqa: E402
from autoresearch_cli.backends.base import Slot  # noqa: E402
from autoresearch_cli.doors import gitops, workspace  # noqa: E402
from autoresearch_cli.doors.ledger import Ledger  # noqa: E402
from autoresearch_cli.doors.template import set_constants  # noqa: E402
from autoresearch_cli.research import session as runs  # noqa: E402
from autoresearch_cli.research.scheduler import Scheduler  # noqa: E402
from benchmarks.bench_loop import INSTANT_TRAIN_PY  # noqa: E402
from benchmarks.bench_workers import TimedWorkers, _with_baseline, _workspace  # noqa: E402

REPORT_TARGET_S = 2.0
EXPERIMENTS = 1000
KEPT = 25
PROMPT = "x" * 32_000  # about 8,000 tokens of prompt text per call
POLLER = """
import sys, time, urllib.request
url = sys.argv[1]
while True:
    try:
        urllib.request.urlopen(url + "state.json", timeout=10).read()
    except OSError:
        pass
    time.sleep(1.0)
"""


def _ar() -> list[str]:
    ar = Path(sys.executable).with_name("ar")
    return [str(ar)] if ar.exists() else [sys.executable, "-m", "autoresearch_cli"]


def _record(ledger: Ledger, kind: str, parent: str, sha: str | None, value: float | None,
            index: int, status: str = "ok", reason: str | None = None) -> int:
    exp_id = ledger.start_experiment(kind, parent, f"{kind} {index}", "llm", status="running")
    ledger.update(exp_id, sha=sha, slot_class="cpu:2", seed=index, seed_index=index)
    result = {"status": status, "val_bpb": value, "holdout_bpb": value and value + 0.01,
              "total_seconds": 80.0, "training_seconds": 60.0, "reason": reason}
    ledger.finish(exp_id, status, result)
    return exp_id


def night_of(ws, experiments: int = EXPERIMENTS, kept: int = KEPT) -> None:
    """A ledger of `experiments` rows with `kept` kept steps, each a real commit."""
    rng = random.Random(0)
    tip, value = ws.tip(), 2.0
    path = ws.worktrees_dir / "bench"
    ws.worktrees_dir.mkdir(parents=True, exist_ok=True)
    gitops.worktree_add(ws.root, path, tip)
    with Ledger.for_workspace(ws.root) as ledger:
        for index in range(5):
            _record(ledger, "baseline", tip, tip, value + rng.gauss(0, 0.01), index)
        keep_every = experiments // kept
        while len(ledger.runs()) < experiments:
            number = len(ledger.runs())
            if number % keep_every == 0:
                train_py = (path / "train.py").read_text()
                (path / "train.py").write_text(set_constants(train_py, {"MATRIX_LR": repr(0.04 + number / 1e5)}))
                sha = gitops.commit_file(path, "train.py", f"step {number}")
                value -= 0.003
                first = _record(ledger, "experiment", tip, sha, value + rng.gauss(0, 0.002), 0)
                for seed in (1, 2):
                    _record(ledger, "confirmation", tip, sha, value + rng.gauss(0, 0.002), seed)
                ledger.settle(first, "keep", json.dumps({"p": 0.001, "look_level": 0.01,
                                                         "runs": [value] * 3}), reason="kept")
                _record(ledger, "remeasure", sha, sha, value + rng.gauss(0, 0.002), 3)
                tip = sha
            elif number % 7 == 0:
                _record(ledger, "experiment", tip, f"{number:040x}", None, 0, "crash",
                        "train.py exited with code 1: boom")
            elif number % 11 == 0:
                exp_id = ledger.start_experiment("experiment", tip, "no edit", "llm")
                ledger.finish(exp_id, "invalid", None, reason="SEARCH block did not match")
            else:
                exp_id = _record(ledger, "experiment", tip, f"{number:040x}",
                                 value + abs(rng.gauss(0, 0.01)), 0)
                ledger.settle(exp_id, "discard", json.dumps({"p": 0.5}), reason="discarded")
            ledger.record_llm_call(len(ledger.runs()), {"model": "m", "prompt": PROMPT,
                                                        "reply": "y" * 2000, "cost_usd": 0.02,
                                                        "prompt_tokens": 8000,
                                                        "completion_tokens": 500})
    gitops.worktree_remove(ws.root, path)
    gitops.update_ref(ws.root, ws.branch_ref(), tip, None)


def report_time() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
        ws = workspace.init(Path(tmp) / "ws", profile="micro", tag="bench")
        night_of(ws)
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([*_ar(), "-C", str(ws.root), "report", "--out", f"{tmp}/r.html"],
                           check=True, capture_output=True)
            timings.append(time.perf_counter() - start)
        size = Path(f"{tmp}/r.html").stat().st_size / 1e6
    median = statistics.median(timings)
    verdict = "ok" if median < REPORT_TARGET_S else "OVER TARGET"
    print(f"ar report on {EXPERIMENTS} experiments ({KEPT} kept): median {median:.2f} s of "
          f"{len(timings)} (target < {REPORT_TARGET_S:.0f} s) {verdict}; page {size:.2f} MB")


def _overhead(ws_dir: str, experiments: int, serve: bool) -> float:
    """Scheduler overhead per experiment (s), with or without a live page polling."""
    cpus = sorted(os.sched_getaffinity(0))
    slots = [Slot(index, "cpu", cpus=(cpus[index % len(cpus)],)) for index in range(4)]
    ws = _workspace(ws_dir, INSTANT_TRAIN_PY)
    processes = []
    with runs.session(ws, "bench") as current:
        _with_baseline(current, slots[0].slot_class)
        if serve:
            server = subprocess.Popen([*_ar(), "-C", str(ws.root), "report", "--serve"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            url = server.stdout.readline().strip()  # type: ignore[union-attr]
            processes = [server, subprocess.Popen([sys.executable, "-c", POLLER, url])]
            time.sleep(1.5)  # the first page load
        try:
            pool = TimedWorkers(slots)
            start = time.perf_counter()
            Scheduler(current, pool, RandomAgent(seed=0), "random", experiments).run()
            total = time.perf_counter() - start
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    return (total - pool.waited) / experiments


def live_page_cost(experiments: int = 40, rounds: int = 2) -> None:
    without, with_page = [], []
    for _ in range(rounds):  # alternated, so a drift of the machine hits both
        for serve, into in ((False, without), (True, with_page)):
            with tempfile.TemporaryDirectory() as tmp:
                into.append(_overhead(tmp, experiments, serve))
    spread = max(without) - min(without)
    difference = statistics.median(with_page) - statistics.median(without)
    verdict = "ok" if difference <= max(spread, 0.01) else "MEASURABLE"
    print(f"scheduler overhead per experiment, 4 workers, instant jobs: no page "
          f"{', '.join(f'{s:.3f}' for s in without)} s; live page open "
          f"{', '.join(f'{s:.3f}' for s in with_page)} s; difference {difference:+.3f} s "
          f"(run-to-run spread without a page {spread:.3f} s) {verdict}")


if __name__ == "__main__":
    report_time()
    live_page_cost()
