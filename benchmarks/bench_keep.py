"""Keeps you can trust: the paired keep test, simulated and on real runs.

    python benchmarks/bench_keep.py --phase sim            # seconds
    python benchmarks/bench_keep.py --phase pairs          # 2 x K real runs
    python benchmarks/bench_keep.py --phase power          # a planted improvement, real
    python benchmarks/bench_keep.py --phase chain          # N random experiments + re-runs
    python benchmarks/bench_keep.py --phase busy           # the disturbed-run rule
    python benchmarks/bench_keep.py --phase all

sim: research/keeprule.judge itself on simulated paired differences: the rate at which a
change that does nothing is kept, across correlations 0 to 0.99 with the best and normal,
heavy-tailed and skewed luck (target <= 5%); the power and the runs it costs for
improvements measured in paired spreads (and, with --spread, in val_bpb: 0.5% of it).

pairs: the template and a one-constant change run on the same K seeds (the workspace's
seeds 0..K-1, as ar gives them): each side's spread between seeds, the spread of their
paired differences against two independent runs' (target <= 0.25x), and how much of the
paired spread follows the machine (steps, tokens/s, CPU share) rather than the seed.

power: a planted improvement, for real: the tip holds a worsened constant, a candidate
restores it; `ar iterate` judges it with the default rule. Kept? After how many runs?

chain: `ar iterate --n N --agent random` at the profile's budget; then the baseline and
the best are run again on three new seeds, paired: how much of the recorded gain holds
(target >= 90%).

busy: the same loop while a busy process competes for the cores a third of the time: no
keep or discard may rest on a run that overlapped it.

Prints figures; asserts nothing. The real phases are long: (budget + ~15 s) per run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.doors import gitops  # noqa: E402
from autoresearch_cli.doors.ledger import Ledger  # noqa: E402
from autoresearch_cli.doors.template import set_constants  # noqa: E402
from autoresearch_cli.research.evidence import Evidence  # noqa: E402
from autoresearch_cli.research.keeprule import CONFIRM, KEEP, Rule, judge  # noqa: E402
from autoresearch_cli.research.seeds import run_seed  # noqa: E402

AR = str(Path(sys.executable).with_name("ar"))
TRAINED = ("ok", "crash", "timeout", "oom", "disturbed")


# --- sim ---------------------------------------------------------------------------------


def _luck(rng, kind: str, size: int) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(size)
    if kind == "t3":
        return rng.standard_t(3, size) / np.sqrt(3)
    skewed = rng.lognormal(0, 0.8, size)  # rare large unlucky runs (right tail)
    return (skewed - np.exp(0.32)) / np.sqrt((np.exp(0.64) - 1) * np.exp(0.64))


def simulate(gain: float, correlation: float, tails: str, rule: Rule, trials: int,
             rng) -> tuple[float, float]:
    """(keep rate, mean runs) of a candidate `gain` (in units of one run's spread) better
    than the best, correlated `correlation` with it on a seed."""
    kept, runs = 0, 0
    for _ in range(trials):
        shared = _luck(rng, tails, rule.max_runs)
        best = np.sqrt(correlation) * shared + np.sqrt(1 - correlation) * _luck(rng, tails, rule.max_runs)
        mine = -gain + np.sqrt(correlation) * shared + np.sqrt(1 - correlation) * _luck(rng, tails, rule.max_runs)
        n = 1
        while (verdict := judge([(i, mine[i], best[i]) for i in range(n)], rule).verdict) == CONFIRM:
            n += 1
        kept += verdict == KEEP
        runs += n
    return kept / trials, runs / trials


def sim(args) -> None:
    rng, rule = np.random.default_rng(0), Rule()
    print(f"sim: the keep test (level {rule.level}, {rule.min_runs}..{rule.max_runs} pairs), "
          f"{args.trials} trials per cell")
    print("  a change that does nothing, kept (target <= 5%):")
    print("    correlation    " + "  ".join(f"{c:>6.2f}" for c in args.correlations))
    for tails in ("normal", "t3", "skewed"):
        rates = [simulate(0.0, c, tails, rule, args.trials, rng)[0] for c in args.correlations]
        print(f"    {tails:8s} luck  " + "  ".join(f"{100 * r:5.1f}%" for r in rates))
    print("  an improvement of g paired spreads (normal luck): kept / runs per candidate")
    for gain in (0.5, 1.0, 1.7, 2.7, 4.0):
        # paired spread = sqrt(2 (1 - c)) in units of one run's spread: pick c for it
        correlation = 0.9
        unit = np.sqrt(2 * (1 - correlation))
        rate, runs = simulate(gain * unit, correlation, "normal", rule, args.trials, rng)
        print(f"    {gain:3.1f} paired spreads: kept {100 * rate:5.1f}%, {runs:.2f} runs")
    rate, runs = simulate(0.0, 0.9, "normal", rule, args.trials, rng)
    print(f"  a null change costs {runs:.2f} runs on average (one run deciding: 1)")
    if args.spread:
        bpb_gain = 0.005 * args.bpb
        correlation = 1 - (args.spread / args.run_spread) ** 2 / 2
        rate, runs = simulate(bpb_gain / args.run_spread, max(0.0, correlation), "normal", rule,
                              args.trials, rng)
        print(f"  measured here: paired spread {args.spread:.4f}, run spread {args.run_spread:.4f}"
              f" -> a 0.5% gain ({bpb_gain:.4f}) kept {100 * rate:.1f}% with {runs:.2f} runs "
              f"(target >= 80% with <= 3)")


# --- real runs ------------------------------------------------------------------------------


def make_workspace(root: Path, budget: int, data_from: Path | None, tag: str = "bench") -> Path:
    ws = root / "ws"
    subprocess.run([AR, "init", str(ws), "--profile", "cpu", "--tag", tag, "--budget",
                    str(budget)], check=True, capture_output=True)
    if data_from is not None:
        shutil.copytree(data_from, ws / ".ar" / "data")
    else:
        subprocess.run([AR, "prepare"], cwd=ws, check=True, capture_output=True)
    return ws


def run_commit(ws: Path, sha: str, seed_indices: list[int], branch: str) -> list[dict]:
    """Runs of commit `sha` on the workspace's seeds, outside the loop and the ledger."""
    from autoresearch_cli.doors import config
    from sandbox.experiment import run_experiment
    from sandbox.spec import ExperimentSpec

    profile = config.load(ws / "ar.toml").profile
    results = []
    for index in seed_indices:
        tree = ws.parent / f"run-{sha[:8]}-{index}"
        gitops.worktree_add(ws, tree, sha)
        try:
            spec = ExperimentSpec(
                code_dir=str(tree), run_dir=str(ws.parent / "runs" / f"{sha[:8]}-{index}"),
                data_dir=str(ws / ".ar" / "data"), time_budget=float(profile.time_budget),
                startup_allowance=float(profile.startup_allowance),
                eval_tokens=int(profile.eval_tokens), seq_len=int(profile.max_seq_len),
                eval_timeout=float(profile.eval_timeout), device="cpu",
                seed=run_seed(branch, index))
            result = run_experiment(spec)
            results.append({"index": index, "val_bpb": result.val_bpb, "status": result.status,
                            "steps": result.num_steps, "tokens_per_s": result.tokens_per_s,
                            "share": result.cpu_share})
            print(f"    {sha[:7]} seed {index}: {result.status} {result.val_bpb} "
                  f"({result.num_steps} steps, share {result.cpu_share})", flush=True)
        finally:
            gitops.worktree_remove(ws, tree)
    return results


def commit_change(ws: Path, values: dict[str, str], message: str) -> str:
    train = ws / "train.py"
    train.write_text(set_constants(train.read_text(), values))
    return gitops.commit_all(ws, message)


def pairs(args, root: Path, data: Path | None) -> Path:
    ws = make_workspace(root, args.budget, data)
    base = gitops.rev_parse(ws, "HEAD")
    changed = commit_change(ws, {"ADAM_BETAS": "(0.8, 0.93)"}, "ADAM_BETAS (0.8, 0.95) -> (0.8, 0.93)")
    gitops.git(ws, "reset", "--hard", "-q", base)
    print(f"pairs: the template and ADAM_BETAS (0.8, 0.93), each on seeds 0..{args.seeds - 1}",
          flush=True)
    seeds = list(range(args.seeds))
    a = run_commit(ws, base, seeds, "autoresearch/bench")
    b = run_commit(ws, changed, seeds, "autoresearch/bench")
    ok = [(x, y) for x, y in zip(a, b, strict=True) if x["status"] == y["status"] == "ok"]
    xs, ys = [x["val_bpb"] for x, _ in ok], [y["val_bpb"] for _, y in ok]
    diffs = [y - x for x, y in zip(xs, ys, strict=True)]
    spread_a, spread_b, spread_d = statistics.stdev(xs), statistics.stdev(ys), statistics.stdev(diffs)
    independent = float(np.sqrt(spread_a ** 2 + spread_b ** 2))
    print(f"  spread between seeds: template {spread_a:.4f}, changed {spread_b:.4f}; "
          f"correlation {np.corrcoef(xs, ys)[0, 1]:.3f}")
    print(f"  paired differences: mean {statistics.fmean(diffs):+.4f}, spread {spread_d:.4f} vs "
          f"two independent runs {independent:.4f}: {spread_d / independent:.2f}x (target <= 0.25x)")
    steps = [y["steps"] - x["steps"] for x, y in ok if x["steps"] and y["steps"]]
    if len(steps) == len(diffs) and len(set(steps)) > 1:
        slope, _ = np.polyfit(steps, diffs, 1)
        residual = statistics.stdev(d - slope * s for d, s in zip(diffs, steps, strict=True))
        print(f"  the machine's part: step counts differ by {min(steps)}..{max(steps)} in a pair; "
              f"corr(diff, step gap) {np.corrcoef(steps, diffs)[0, 1]:+.2f}; the spread left "
              f"once the step gap is accounted for: {residual:.4f}")
    shares = [r["share"] for r in a + b if r["share"] is not None]
    if shares:
        print(f"  CPU share of the runs: {min(shares):.3f}..{max(shares):.3f}")
    print(f"  -> for `--phase sim --spread {spread_d:.4f} --run-spread "
          f"{(spread_a + spread_b) / 2:.4f} --bpb {statistics.fmean(xs):.3f}`")
    return ws


class Restorer:
    """An agent that proposes one change: the planted constant, restored."""

    model_backed = False

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def propose(self, train_py, program_md, history, failure=None, record_call=None):
        from autoresearch_cli.agents.base import Proposal

        return Proposal(f"restore {self.name}", set_constants(train_py, {self.name: self.value}),
                        "mutation")


def power(args, root: Path, data: Path | None) -> None:
    from autoresearch_cli.doors.workspace import Workspace
    from autoresearch_cli.research.loop import iterate
    from autoresearch_cli.research.session import session

    print(f"power: {args.planted_trials} planted improvement(s): the tip runs MATRIX_LR x 0.6, "
          "a candidate restores it", flush=True)
    for trial in range(args.planted_trials):
        ws = make_workspace(root / f"power-{trial}", args.budget, data, tag=f"power{trial}")
        line = next(ln for ln in (ws / "train.py").read_text().splitlines() if ln.startswith("MATRIX_LR = "))
        value = line.split("=", 1)[1].split("#")[0].strip()
        commit_change(ws, {"MATRIX_LR": repr(round(float(value) * 0.6, 6))}, "plant: MATRIX_LR x 0.6")
        with session(Workspace(ws), "bench") as current:
            started = time.monotonic()
            iterate(current, Restorer("MATRIX_LR", value), "restore", 1)
            evidence = Evidence.load(current.ledger)
        made = [run for run in evidence.runs if run.kind == "experiment"][0]
        judged = made.judgement or {}
        print(f"  trial {trial}: {evidence.word(made)} after {len(judged.get('runs', []))} pairs, "
              f"gain {judged.get('gain', 0):+.4f} ({100 * (judged.get('gain') or 0) / (judged.get('best_mean') or 1):.2f}%), "
              f"p={judged.get('p')}; {(time.monotonic() - started) / 60:.1f} min", flush=True)


def chain(args, root: Path, data: Path | None) -> Path:
    ws = make_workspace(root, args.budget, data)
    started = time.monotonic()
    with open(ws.parent / "iterate.log", "w") as log:
        subprocess.run([AR, "iterate", "--n", str(args.experiments), "--agent", "random",
                        "--seed", str(args.seed)], cwd=ws, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    with Ledger.for_workspace(ws, read_only=True) as ledger:
        evidence = Evidence.load(ledger)
    runs = [run for run in evidence.runs if run.status in TRAINED]
    kept = [run for run in evidence.runs if evidence.is_keep(run)]
    gain = evidence.gain()
    print(f"chain: {args.experiments} random experiments in {(time.monotonic() - started) / 60:.1f} "
          f"min, {len(runs)} runs trained ({len(runs) / args.experiments:.2f} per experiment), "
          f"{len(kept)} kept, {evidence.counts().get('rejudged', 0)} re-judged")
    for line in subprocess.run([AR, "log"], cwd=ws, capture_output=True, text=True).stdout.splitlines():
        if line.startswith(("noise", "best", "baseline")) or "runs:" in line:
            print(f"  {line}")
    if gain is None or evidence.best_sha == evidence.baseline_sha:
        print("  nothing kept: no gain to re-run")
        return ws
    print(f"  recorded gain: {gain.describe()}; re-running baseline and best on 3 new seeds",
          flush=True)
    fresh = [100, 101, 102]
    start = run_commit(ws, evidence.baseline_sha, fresh, "autoresearch/bench")
    best = run_commit(ws, evidence.best_sha, fresh, "autoresearch/bench")
    diffs = [a["val_bpb"] - b["val_bpb"] for a, b in zip(start, best, strict=True)
             if a["status"] == b["status"] == "ok"]
    if diffs:
        held = statistics.fmean(diffs)
        print(f"  on new seeds, paired: gain {held:+.4f} (spread {statistics.stdev(diffs) if len(diffs) > 1 else 0:.4f}) "
              f"= {100 * held / gain.value:.0f}% of the recorded gain (target >= 90%)")
    return ws


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def busy(args, root: Path, data: Path | None) -> None:
    ws = make_workspace(root, args.budget, data)
    intervals: list[tuple[float, float]] = []
    stop = threading.Event()

    def compete() -> None:
        stop.wait(args.busy_on)  # the baseline's runs start quiet
        while not stop.is_set():
            process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            began = time.time()
            stop.wait(args.busy_on)
            process.send_signal(signal.SIGKILL)
            process.wait()
            intervals.append((began, time.time()))
            stop.wait(2 * args.busy_on)

    thread = threading.Thread(target=compete, daemon=True)
    thread.start()
    try:
        subprocess.run([AR, "iterate", "--n", str(args.busy_experiments), "--agent", "random",
                        "--seed", str(args.seed)], cwd=ws, capture_output=True, check=True)
    finally:
        stop.set()
        thread.join()
    with Ledger.for_workspace(ws, read_only=True) as ledger:
        runs = ledger.runs()
    judged_on_busy, set_aside, hits = [], 0, 0
    for run in runs:
        if run.status not in TRAINED or not run.finished_at or not run.total_seconds:
            continue
        end = _stamp(run.finished_at) - (run.total_seconds - (run.training_seconds or 0))
        start = end - (run.training_seconds or 0)
        overlap = sum(max(0.0, min(end, e) - max(start, b)) for b, e in intervals)
        hit = overlap > 0.1 * max(end - start, 1.0)
        hits += hit
        set_aside += run.status == "disturbed"
        if hit and run.status == "ok":
            judged_on_busy.append(run.id)
    print(f"busy: {args.busy_experiments} experiments; runs that overlapped the busy process: "
          f"{hits}; set aside as disturbed: {set_aside}; ok runs that overlapped it: "
          f"{len(judged_on_busy)} {judged_on_busy} (target 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=("sim", "pairs", "power", "chain", "busy", "all"),
                        default="sim")
    parser.add_argument("--budget", type=int, default=60, help="training seconds (cpu profile: 60)")
    parser.add_argument("--trials", type=int, default=2000, help="simulated candidates per cell")
    parser.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.97, 0.99])
    parser.add_argument("--spread", type=float, help="measured paired spread (val_bpb)")
    parser.add_argument("--run-spread", type=float, default=0.02, help="measured spread between runs")
    parser.add_argument("--bpb", type=float, default=1.65, help="the baseline's val_bpb")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per side in the pairs phase")
    parser.add_argument("--planted-trials", type=int, default=1)
    parser.add_argument("--experiments", type=int, default=30)
    parser.add_argument("--busy-experiments", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--busy-on", type=float, default=90.0, help="seconds the competitor runs")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}, budget {args.budget} s", flush=True)
    phases = ("sim", "pairs", "power", "chain", "busy") if args.phase == "all" else (args.phase,)
    with tempfile.TemporaryDirectory(prefix="ar-bench-keep-") as tmp:
        root = Path(args.workdir or tmp)
        data = None
        for phase in phases:
            if phase == "sim":
                sim(args)
                continue
            ws = {"pairs": pairs, "power": power, "chain": chain, "busy": busy}[phase](
                args, root / phase, data)
            if data is None and isinstance(ws, Path):
                data = ws / ".ar" / "data"
            print(f"  (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
