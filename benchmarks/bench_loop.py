"""Orchestration overhead of `ar iterate`, and what 100 iterations leave behind.

The job is an instant train.py (it exits at once, saving nothing), the agent is the
random agent (no model latency), and one `ar iterate --n N` runs them back to back on one
slot, so what is timed is ar's own work per experiment: proposal, validation, worktree,
commit, handing the spec to the slot's process, ledger, decision, export: the wall time
from one experiment's end to the next one's, less the time the sandbox spent on it
(result.json's total_seconds, which holds the CPU plan's load sample: printed apart).
The first experiment also starts the slot's process and its warm server: printed apart.
Then benchmarks/bench_workers.py: the same with several workers at once.
Target: <= 0.15 s per experiment; ledger, git and disk stay bounded.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.agents.random_agent import RandomAgent  # noqa: E402
from autoresearch_cli.backends.base import machine_class  # noqa: E402
from autoresearch_cli.doors import gitops, workspace  # noqa: E402
from autoresearch_cli.doors.config import with_keep  # noqa: E402
from autoresearch_cli.doors.data import MANIFEST_FORMAT  # noqa: E402
from autoresearch_cli.research import loop  # noqa: E402
from autoresearch_cli.research import session as runs  # noqa: E402

INSTANT_TRAIN_PY = '''"""An instant train.py: it exits at once (benchmarks of ar's own overhead)."""
# ---
MATRIX_LR = 0.04  # learning rate
DEPTH = 4  # layers
TOTAL_BATCH_SIZE = 2**14  # tokens per step
DEVICE_BATCH_SIZE = 16  # rows per micro-step
WEIGHT_DECAY = 0.1  # decoupled decay


def build_model(config):
    raise NotImplementedError


if __name__ == "__main__":
    pass  # no prepare.save_for_eval: the run ends invalid without an evaluation
'''


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


TARGET_S = 0.15


def main(iterations: int = 100) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
        ws = workspace.init(Path(tmp) / "ws", profile="micro", tag="bench")
        (ws.root / "train.py").write_text(INSTANT_TRAIN_PY)
        gitops.commit_all(ws.root, "instant train.py")
        ws.data_dir.mkdir(parents=True)
        (ws.data_dir / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT}))  # no data: the job reads none
        agent = RandomAgent(seed=0)
        ended: list[float] = []
        load = os.getloadavg()[0]
        with runs.session(ws, "bench") as current:
            current.settings = with_keep(current.settings, rule="one-run")  # no noise runs
            tip = ws.tip()
            # a baseline row so the loop does not run one first
            exp_id = current.ledger.start_experiment("baseline", tip, "baseline", None, status="running")
            current.ledger.update(exp_id, sha=tip)
            current.ledger.finish(exp_id, "ok", {"val_bpb": 5.0, "status": "ok"}, sha=tip,
                                  slot_class=machine_class("cpu"))
            started = time.perf_counter()
            loop.iterate(current, agent, "random", iterations,
                         on_event=lambda kind, **_: kind == "done" and ended.append(time.perf_counter()))
            done = current.ledger.runs()[-iterations:]
        cycles = [end - begin for begin, end in zip([started, *ended[:-1]], ended, strict=True)]
        job_seconds = [run.total_seconds or 0.0 for run in done]
        plans = [((run.result or {}).get("timing") or {}).get("plan") or 0.0 for run in done]
        overhead = [cycle - job for cycle, job in zip(cycles, job_seconds, strict=True)]
        median = statistics.median(overhead[1:])
        verdict = "ok" if median <= TARGET_S else "OVER TARGET"
        print(f"{iterations} experiments back to back on one slot, load average {load:.2f} "
              f"before, {os.getloadavg()[0]:.2f} after, {time.strftime('%Y-%m-%d')}")
        print(f"per experiment: median {statistics.median(cycles[1:]):.3f} s in all, "
              f"{statistics.median(job_seconds[1:]):.3f} s in the sandbox, of which the CPU "
              f"plan's load sample {statistics.median(plans[1:]):.3f} s")
        print(f"orchestration overhead: median {median:.3f} s, p90 "
              f"{sorted(overhead[1:])[int(0.9 * len(overhead[1:]))]:.3f} s (target <= "
              f"{TARGET_S} s) {verdict}; the first experiment, which starts the slot's process "
              f"and its warm server: {overhead[0]:.3f} s")
        worktrees = list((ws.root / ".ar" / "worktrees").iterdir())
        runs_mb = _dir_mb(ws.root / ".ar" / "runs")
        weights = list((ws.root / ".ar" / "runs").rglob("model.pt"))
        objects = subprocess.run(["git", "count-objects", "-v"], cwd=ws.root, capture_output=True,
                                 text=True).stdout.replace("\n", ", ")
        print(f"after {iterations} iterations: {len(worktrees)} worktrees left, "
              f".ar/runs {runs_mb:.2f} MB ({len(weights)} weight files), "
              f"ledger {(ws.root / '.ar' / 'ledger.db').stat().st_size / 1e6:.2f} MB")
        print(f"git: {objects}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
    from benchmarks import bench_workers  # several experiments at once (make bench runs this file)

    print("--- several workers ---")
    bench_workers.main()
