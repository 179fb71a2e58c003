"""Which offline agent finds real improvements: random against tpe, the same budget.

For each agent, a fresh workspace (the same profile, data and branch name, so the same
seeds) runs `ar iterate --n N --agent A --seed S` under the default keep rule. Then each
agent's best (the branch tip at the end) and the baseline are run again on `--reruns`
new seeds, outside the loop and its ledger, both on each seed: the real gain of each
best is the mean of its paired differences with the baseline, with a 95% interval.
Printed side by side with what the loop recorded, the keeps, the runs trained and the
repeats turned back before training. The target: tpe ahead of random by
more than the interval.

    python benchmarks/bench_agents.py [--profile cpu] [--experiments 30] [--reruns 3]
    make bench-agents BENCH_AGENTS_FLAGS="--profile micro --experiments 4 --reruns 2"

Long at the cpu profile's 60 s budget: about (budget + 20 s) x 3 runs per experiment
(the keep test's confirmations and partners), per agent, then (agents + 1) x reruns runs.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.doors import gitops  # noqa: E402
from autoresearch_cli.doors.ledger import Ledger  # noqa: E402
from autoresearch_cli.doors.workspace import Workspace  # noqa: E402
from autoresearch_cli.research.evidence import Evidence, t_quantile  # noqa: E402

AR = str(Path(sys.executable).with_name("ar"))
TRAINED = ("ok", "crash", "timeout", "oom", "disturbed")
RERUN_SEED0 = 900_000  # far from the seeds ar gives (research/seeds.py): new to every commit
TURNED_BACK = "turned back before training"


@dataclass
class Searched:
    agent: str
    ws: Path
    wall_s: float
    baseline_sha: str
    best_sha: str
    keeps: int
    trained: int
    turned_back: int
    recorded: str  # the loop's own baseline -> best gain, as `ar log` gives it


def make_workspace(root: Path, profile: str, budget: int | None, data: Path | None) -> Path:
    ws = root / "ws"
    command = [AR, "init", str(ws), "--profile", profile, "--tag", "bench"]
    if budget:
        command += ["--budget", str(budget)]
    subprocess.run(command, check=True, capture_output=True)
    if data is not None:
        shutil.copytree(data, ws / ".ar" / "data")
    else:
        subprocess.run([AR, "prepare"], cwd=ws, check=True, capture_output=True)
    return ws


def search(agent: str, root: Path, args, data: Path | None) -> Searched:
    ws = make_workspace(root, args.profile, args.budget, data)
    began = time.monotonic()
    with open(root / "iterate.log", "w") as log:
        subprocess.run([AR, "iterate", "--n", str(args.experiments), "--agent", agent,
                        "--seed", str(args.seed)], cwd=ws, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    wall = time.monotonic() - began
    with Ledger.for_workspace(ws, read_only=True) as ledger:
        evidence = Evidence.load(ledger)
    runs = evidence.runs
    gain = evidence.gain()
    return Searched(
        agent, ws, wall, evidence.baseline_sha or "", evidence.best_sha or "",
        keeps=sum(1 for run in runs if evidence.is_keep(run)),
        trained=sum(1 for run in runs if run.status in TRAINED),
        turned_back=sum(1 for run in runs if (run.reason or "").startswith(TURNED_BACK)),
        recorded=gain.describe() if gain is not None else "-")


def run_on_seed(ws: Path, sha: str, seed: int, runs_dir: Path) -> float | None:
    """One run of commit `sha` on `seed`, outside the loop and the ledger: its val_bpb."""
    from autoresearch_cli.research.session import experiment_spec, session
    from sandbox.experiment import run_experiment

    tree = runs_dir / f"tree-{sha[:8]}-{seed}"
    gitops.worktree_add(ws, tree, sha)
    try:
        with session(Workspace(ws), "bench-agents") as current:
            spec = experiment_spec(current, runs_dir / f"{sha[:8]}-{seed}", tree, seed)
        result = run_experiment(spec)
        return result.val_bpb if result.status == "ok" else None
    finally:
        gitops.worktree_remove(ws, tree)


def paired_gain(baseline: dict[int, float | None], best: dict[int, float | None]) -> str:
    """The mean of baseline - best over the seeds both scored on, with its 95% interval."""
    diffs = [baseline[seed] - best[seed] for seed in best
             if best[seed] is not None and baseline.get(seed) is not None]
    if not diffs:
        return "no paired runs"
    mean = statistics.fmean(diffs)
    base_mean = statistics.fmean(v for v in baseline.values() if v is not None)
    if len(diffs) < 2:
        return f"{mean:+.4f} ({100 * mean / base_mean:+.2f}%, 1 pair: no interval)"
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.4f} ± {half:.4f} ({100 * mean / base_mean:+.2f}%, {len(diffs)} pairs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="cpu", help="cpu (the target), micro (a smoke run)")
    parser.add_argument("--budget", type=int, help="training seconds (default: the profile's)")
    parser.add_argument("--experiments", type=int, default=30)
    parser.add_argument("--reruns", type=int, default=3, help="new seeds for each best")
    parser.add_argument("--agents", default="random,tpe")
    parser.add_argument("--seed", type=int, default=1, help="the agents' --seed")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: temp)")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    agents = [name.strip() for name in args.agents.split(",") if name.strip()]
    load = os.getloadavg()[0]
    print(f"{args.profile} profile, budget {args.budget or 'default'}, {args.experiments} "
          f"experiments per agent ({', '.join(agents)}), seed {args.seed}, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load {load:.2f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="ar-bench-agents-") as tmp:
        root = args.workdir or Path(tmp)
        searched, data = [], None
        for agent in agents:
            done = search(agent, root / agent, args, data)
            data = data or done.ws / ".ar" / "data"
            searched.append(done)
            print(f"  {agent}: {args.experiments} experiments in {done.wall_s / 60:.1f} min, "
                  f"{done.trained} runs trained, {done.keeps} kept, {done.turned_back} repeats "
                  f"turned back; the loop's gain {done.recorded}", flush=True)
        seeds = [RERUN_SEED0 + index for index in range(args.reruns)]
        runs_dir = root / "reruns"
        first = searched[0]
        baseline = {seed: run_on_seed(first.ws, first.baseline_sha, seed, runs_dir) for seed in seeds}
        print(f"  baseline on {len(seeds)} new seeds: "
              f"{[round(v, 4) if v is not None else None for v in baseline.values()]}", flush=True)
        rows = []
        for done in searched:
            best = {seed: (baseline[seed] if done.best_sha == done.baseline_sha
                           else run_on_seed(done.ws, done.best_sha, seed, runs_dir))
                    for seed in seeds}
            rows.append((done.agent, done.keeps, done.recorded, paired_gain(baseline, best)))
    print(f"\n{'agent':8s} {'keeps':>5s}  {'gain recorded by the loop':40s}  "
          "gain of its best re-run on new seeds, paired with the baseline (95%)")
    for agent, keeps, recorded, real in rows:
        print(f"{agent:8s} {keeps:5d}  {recorded:40s}  {real}")
    print("target: tpe ahead of random by more than the interval")


if __name__ == "__main__":
    main()
