"""Do keeps hold up? The keep test against one run deciding, and disturbed runs set aside.

Phase "quiet": `ar iterate --n N --agent random` on the cpu profile under the default
sequential keep rule. Then every commit kept by it, and every commit that one run would
have kept (today's rule: the first run beats the best's mean by twice the baseline
repeats' std), and their parents, are run again `--reruns` times with fresh seeds,
outside the loop. A keep holds when the mean of its re-runs beats its parent's.
Cost: runs trained by the loop over the runs one-run would have needed (one per
experiment, one baseline).

Phase "busy": the same loop in a fresh workspace while a busy process competes for the
cores a third of the time (on for --busy-on seconds, off for twice that). Every run's
training window is matched against the busy intervals: no keep or discard may rest on a
run that overlapped them.

    python benchmarks/bench_keep.py [--budget 60] [--experiments 30] [--phase both]

Prints figures; asserts nothing. Long: about (budget + 15 s) x 4 x experiments.
"""

from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.doors import gitops  # noqa: E402
from autoresearch_cli.doors.ledger import Ledger  # noqa: E402

AR = str(Path(sys.executable).with_name("ar"))
JUDGED = ("experiment", "repair", "combination")
TRAINED = ("ok", "crash", "timeout", "oom", "disturbed")


def make_workspace(root: Path, budget: int, data_from: Path | None) -> Path:
    ws = root / "ws"
    subprocess.run([AR, "init", str(ws), "--profile", "cpu", "--tag", "bench", "--budget",
                    str(budget)], check=True, capture_output=True)
    if data_from is not None:
        shutil.copytree(data_from, ws / ".ar" / "data")
    else:
        subprocess.run([AR, "prepare"], cwd=ws, check=True, capture_output=True)
    return ws


def iterate(ws: Path, experiments: int, seed: int) -> float:
    started = time.monotonic()
    with open(ws.parent / "iterate.log", "w") as log:
        subprocess.run([AR, "iterate", "--n", str(experiments), "--agent", "random", "--seed",
                        str(seed)], cwd=ws, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - started


def rows_of(ws: Path) -> list[dict]:
    with Ledger.for_workspace(ws) as ledger:
        return [vars(run) for run in ledger.runs()]


def cost(rows: list[dict]) -> tuple[int, int]:
    """(runs the loop trained, runs one run deciding would have trained)."""
    trained = sum(1 for row in rows if row["status"] in TRAINED)
    first_runs = sum(1 for row in rows if row["kind"] in JUDGED and row["status"] in TRAINED
                     and row["again_of"] is None)
    return trained, first_runs + 1


def one_run_keeps(rows: list[dict]) -> list[dict]:
    """The experiments today's rule would have kept: first run < best's mean - 2 std."""
    baseline = [row["val_bpb"] for row in rows if row["kind"] in ("baseline", "remeasure")
                and row["status"] == "ok" and row["sha"] == rows[0]["sha"]]
    threshold = 2 * statistics.stdev(baseline) if len(baseline) >= 2 else 0.0
    keeps = []
    for row in rows:
        if row["kind"] in JUDGED and row["evidence"]:
            evidence = json.loads(row["evidence"])
            if evidence["runs"] and evidence["best_runs"] and (
                    evidence["runs"][0] < statistics.fmean(evidence["best_runs"]) - threshold):
                keeps.append(row)
    return keeps


def rerun(ws: Path, sha: str, times: int, seed0: int) -> list[float]:
    """`times` fresh runs of commit `sha`, outside the loop and the ledger."""
    from autoresearch_cli.doors import config
    from sandbox.experiment import run_experiment
    from sandbox.spec import ExperimentSpec

    profile = config.load_raw(ws / "ar.toml")["profile"]
    values = []
    for index in range(times):
        tree = ws.parent / f"rerun-{sha[:8]}-{index}"
        gitops.worktree_add(ws, tree, sha)
        try:
            spec = ExperimentSpec(
                code_dir=str(tree), run_dir=str(ws.parent / "reruns" / f"{sha[:8]}-{index}"),
                data_dir=str(ws / ".ar" / "data"), time_budget=float(profile["time_budget"]),
                startup_allowance=float(profile["startup_allowance"]),
                eval_tokens=int(profile["eval_tokens"]), seq_len=int(profile["max_seq_len"]),
                eval_timeout=float(profile["eval_timeout"]), device="cpu", seed=seed0 + index)
            result = run_experiment(spec)
            if result.status == "ok":
                values.append(result.val_bpb)
        finally:
            gitops.worktree_remove(ws, tree)
    return values


def holding(keeps: list[dict], means: dict[str, float]) -> tuple[int, int]:
    held = sum(1 for row in keeps if row["sha"] in means and row["parent_sha"] in means
               and means[row["sha"]] < means[row["parent_sha"]])
    return held, len(keeps)


def quiet(args, root: Path, data: Path | None) -> Path:
    ws = make_workspace(root, args.budget, data)
    wall = iterate(ws, args.experiments, args.seed)
    rows = rows_of(ws)
    trained, one_run = cost(rows)
    sequential = [row for row in rows if row["kind"] in JUDGED and row["decision"] == "keep"]
    single = one_run_keeps(rows)
    commits = {row["sha"] for row in sequential + single} | {
        row["parent_sha"] for row in sequential + single}
    print(f"quiet: {args.experiments} experiments in {wall / 60:.1f} min; {trained} runs trained "
          f"(one run deciding: {one_run}); re-running {len(commits)} commits x {args.reruns}",
          flush=True)
    means = {}
    for index, sha in enumerate(sorted(commits)):
        values = rerun(ws, sha, args.reruns, 10_000 + 100 * index)
        if values:
            means[sha] = statistics.fmean(values)
    seq_held, seq_n = holding(sequential, means)
    one_held, one_n = holding(single, means)
    noise = [line for line in subprocess.run([AR, "log"], cwd=ws, capture_output=True,
                                             text=True).stdout.splitlines() if "noise" in line]
    print(f"  keeps that still beat their parent's mean over {args.reruns} fresh runs:")
    print(f"    keep test (sequential):  {seq_held}/{seq_n}"
          f" = {100 * seq_held / max(seq_n, 1):.0f}% (target >= 90%)")
    print(f"    one run decides (today): {one_held}/{one_n} = {100 * one_held / max(one_n, 1):.0f}%")
    print(f"  cost: {trained} runs vs {one_run} with one run deciding: "
          f"+{100 * (trained / one_run - 1):.0f}% (target <= 40%)")
    kinds = {kind: sum(1 for row in rows if row["kind"] == kind and row["status"] in TRAINED)
             for kind in ("baseline", "remeasure", "confirmation")}
    print(f"  extra runs: {kinds}; disturbed {sum(row['status'] == 'disturbed' for row in rows)}")
    for line in noise:
        print(f"  {line}")
    return ws


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def busy(args, root: Path, data: Path | None) -> None:
    ws = make_workspace(root, args.budget, data)
    intervals: list[tuple[float, float]] = []
    stop = threading.Event()

    def compete() -> None:
        off = 2 * args.busy_on
        stop.wait(args.busy_on)  # the baseline's runs start quiet
        while not stop.is_set():
            process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            began = time.time()
            stop.wait(args.busy_on)
            process.send_signal(signal.SIGKILL)
            process.wait()
            intervals.append((began, time.time()))
            stop.wait(off)

    thread = threading.Thread(target=compete, daemon=True)
    thread.start()
    try:
        wall = iterate(ws, args.busy_experiments or args.experiments, args.seed)
    finally:
        stop.set()
        thread.join()
    rows = rows_of(ws)
    busy_s = sum(end - began for began, end in intervals)
    judged_on_busy, set_aside, false_alarms, trained_busy = [], 0, [], 0
    quiet_shares = []
    for row in rows:
        if row["status"] not in TRAINED or not row["finished_at"] or not row["total_seconds"]:
            continue
        end = _stamp(row["finished_at"]) - (row["total_seconds"] - (row["training_seconds"] or 0))
        start = end - (row["training_seconds"] or 0)
        overlap = sum(max(0.0, min(end, e) - max(start, b)) for b, e in intervals)
        hit = overlap > 0.1 * max(end - start, 1.0)
        trained_busy += hit
        if row["status"] == "disturbed":
            set_aside += 1
            if not hit:
                false_alarms.append(row["cpu_share"])
        elif hit and row["status"] == "ok":
            judged_on_busy.append(row["id"])
        elif not hit and row["cpu_share"] is not None:
            quiet_shares.append(row["cpu_share"])
    trained, one_run = cost(rows)
    print(f"busy: {args.busy_experiments or args.experiments} experiments in {wall / 60:.1f} min, a busy process on for "
          f"{busy_s / max(wall, 1):.0%} of the time; {trained} runs trained (one run deciding: {one_run})")
    print(f"  runs that overlapped the busy process: {trained_busy}; set aside as disturbed: "
          f"{set_aside} ({len(false_alarms)} without overlap, their shares {false_alarms})")
    if quiet_shares:
        print(f"  share of runs without overlap: median {statistics.median(quiet_shares):.3f}, "
              f"min {min(quiet_shares):.3f}")
    print(f"  ok runs used for a keep or discard that overlapped it: {len(judged_on_busy)} "
          f"{judged_on_busy} (target 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=60, help="training seconds (cpu profile: 60)")
    parser.add_argument("--experiments", type=int, default=30)
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--busy-experiments", type=int, help="experiments of the busy phase "
                        "(default: --experiments)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--busy-on", type=float, default=90.0, help="seconds the competitor runs")
    parser.add_argument("--phase", choices=("quiet", "busy", "both"), default="both")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    print(f"cpu profile, budget {args.budget} s, {args.experiments} random-agent experiments, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="ar-bench-keep-") as tmp:
        tmp = args.workdir or tmp
        data = None
        if args.phase in ("quiet", "both"):
            ws = quiet(args, Path(tmp) / "quiet", None)
            data = ws / ".ar" / "data"
        if args.phase in ("busy", "both"):
            busy(args, Path(tmp) / "busy", data)


if __name__ == "__main__":
    main()
