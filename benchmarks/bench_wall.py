"""Every second on training: the cpu profile through `ar iterate`, back to back on one slot,
and where each experiment's wall time went.

    python benchmarks/bench_wall.py [--budgets 60,20] [--runs 4] [--cold]

For each budget: a fresh workspace (the stdlib data, prepared once), the random agent,
one run deciding each keep, `--runs` experiments after the baseline on one slot. The
wall time of an experiment is from the end of the one before to its own end (proposal,
commit, the sandbox, the decision); the first experiment after the baseline is left out
of the medians. Printed: budget / wall and billed training / wall per experiment, and the
median of each phase (`ar log --timing`). `--cold` runs the same with AR_SANDBOX_WARM=0
for comparison, in the same process run.

Targets: budget / wall >= 0.95 at 60 s and >= 0.85 at 20 s (0.84 and 0.62 with cold starts, 2026-12-03).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.agents.random_agent import RandomAgent  # noqa: E402
from autoresearch_cli.doors import workspace  # noqa: E402
from autoresearch_cli.doors.config import with_keep  # noqa: E402
from autoresearch_cli.doors.data import prepare_data  # noqa: E402
from autoresearch_cli.report import walltime  # noqa: E402
from autoresearch_cli.research import loop  # noqa: E402
from autoresearch_cli.research import session as runs  # noqa: E402

TARGETS = {60: 0.95, 20: 0.85}


def one_budget(tmp: Path, data: Path, budget: int, count: int) -> dict:
    """Run `count` experiments after the baseline at `budget`; the figures."""
    ws = workspace.init(tmp / f"ws-{budget}-{time.monotonic_ns()}", profile="cpu", tag="bench",
                        budget=budget)  # fmt: skip
    shutil.copytree(data, ws.data_dir)
    ended: list[float] = []
    with runs.session(ws, "bench") as current:
        current.settings = with_keep(current.settings, rule="one-run")
        loop.iterate(current, RandomAgent(seed=0), "random", count,
                     on_event=lambda kind, **_: kind == "done" and ended.append(time.monotonic()))
        done = current.ledger.runs()
    experiments = done[-count:]
    cycles = [end - begin for begin, end in zip(ended[-count - 1:-1], ended[-count:], strict=True)]
    rows = walltime.timing_rows(experiments)
    steady = list(zip(cycles, rows, strict=True))[1:] or list(zip(cycles, rows, strict=True))
    return {
        "budget_share": statistics.median(budget / cycle for cycle, _ in steady),
        "train_share": statistics.median((row["train"] or 0.0) / cycle for cycle, row in steady),
        "wall": statistics.median(cycle for cycle, _ in steady),
        "rows": [row for _, row in steady],
        "launch": sorted({row["launch"] for _, row in steady}),
    }


def report(budget: int, label: str, figures: dict) -> None:
    target = TARGETS.get(budget)
    verdict = "" if target is None else (
        f" (target >= {target}: {'ok' if figures['budget_share'] >= target else 'MISSED'})")
    print(f"{label} budget {budget} s: wall {figures['wall']:.1f} s per experiment; budget / wall "
          f"{figures['budget_share']:.3f}{verdict}; billed training / wall "
          f"{figures['train_share']:.3f}; started {', '.join(figures['launch'])}")
    print(f"    {walltime.timing_summary(figures['rows'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="60,20")
    parser.add_argument("--runs", type=int, default=4, help="experiments per budget")
    parser.add_argument("--cold", action="store_true", help="also with AR_SANDBOX_WARM=0")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{os.getloadavg()[0]:.2f} before")
    with tempfile.TemporaryDirectory(prefix="ar-bench-wall-") as tmp:
        data = Path(tmp) / "data"
        prepare_data(data, source="stdlib", vocab_size=1024)
        modes = [("warm", None)] + ([("cold", "0")] if args.cold else [])
        for budget in budgets:
            for label, setting in modes:
                if setting is None:
                    os.environ.pop("AR_SANDBOX_WARM", None)
                else:
                    os.environ["AR_SANDBOX_WARM"] = setting
                report(budget, label, one_budget(Path(tmp), data, budget, args.runs))
                print(f"    load average {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
