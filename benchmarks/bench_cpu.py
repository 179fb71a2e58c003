"""CPU settings of the training job: precision and threads, in one run on this machine.

1. Precision: the cpu template's tokens/s in bf16 autocast and in fp32, natively and on an
   emulated CPU without bf16 instructions (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2),
   and what plan_cpu() chooses in each case (measured afresh, in a temporary cache).
2. Contention: tokens/s quiet and with one busy competitor at equal priority, for the
   default OpenMP wait policy, PASSIVE, one thread, and what plan_cpu() chose.

Targets: plan_cpu picks the faster precision in both cases; with one busy competitor,
plan_cpu's settings keep at least 45% of the quiet tokens/s.

    python benchmarks/bench_cpu.py [SECONDS]     # seconds per run, default 10
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch_cli.doors import workspace  # noqa: E402
from autoresearch_cli.doors.data import prepare_data  # noqa: E402
from sandbox.cpu import plan_cpu  # noqa: E402

NO_BF16 = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}  # a CPU without AVX-512 (so no bf16)
SKIP_STEPS = 3  # first steps allocate and warm kernels up
TARGET_BUSY_SHARE = 0.45
ROUNDS = 2  # repeats of each contention figure: other work on a shared machine adds noise
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def train_tokens_per_s(ws: Path, seconds: float, env: dict[str, str]) -> tuple[float, int]:
    """(median tokens/s of the steps after warm-up, steps) of ws/train.py run for `seconds`."""
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and not k.startswith("AR_")}
    run_env = {
        **base,
        "AR_DATA_DIR": str(ws / ".ar" / "data"),
        "AR_OUTPUT_DIR": str(ws / ".ar" / "out"),
        "AR_TIME_BUDGET": str(seconds),
        "AR_DEVICE": "cpu",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "train.py"],
        cwd=ws,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed: {done.stderr.strip()[-500:]}")
    rates = [int(r.replace(",", "")) for r in re.findall(r"tok/sec: ([\d,]+)", done.stdout)]
    return (statistics.median(rates[SKIP_STEPS:]) if len(rates) > SKIP_STEPS else 0.0), len(rates)


def precision_env(precision: str) -> dict[str, str]:
    return {"AR_CPU_PRECISION": precision, "AR_MUON_PRECISION": precision}


def precision_table(ws: Path, seconds: float) -> None:
    print(f"best of {ROUNDS} rounds, default threads and wait policy")
    print(f"{'CPU':28s} {'bf16 tok/s':>11s} {'fp32 tok/s':>11s} {'bf16/fp32':>9s}  plan_cpu chose")
    for name, isa in (("native", {}), ("emulated no-bf16 (AVX2)", NO_BF16)):
        saved = {k: os.environ.get(k) for k in isa}
        os.environ.update(isa)  # plan_cpu's measurement subprocess inherits them
        try:
            with tempfile.TemporaryDirectory() as cache:
                plan = plan_cpu("cpu", cache_dir=Path(cache))
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        rates: dict[str, list[float]] = {"bf16": [], "fp32": []}
        for _ in range(ROUNDS):
            for precision in rates:
                rates[precision].append(
                    train_tokens_per_s(ws, seconds, {**isa, **precision_env(precision)})[0]
                )
        bf16, fp32 = max(rates["bf16"]), max(rates["fp32"])
        chosen_fast = (plan.precision == "bf16") == (bf16 > fp32)
        print(
            f"{name:28s} {bf16:11,.0f} {fp32:11,.0f} {bf16 / max(fp32, 1):9.2f}  {plan.precision} "
            f"({'the faster' if chosen_fast else 'NOT the faster'}): {plan.reason.split(';')[0]}"
        )
        print(f"{'':28s} rounds: bf16 {_spread(rates['bf16'])}, fp32 {_spread(rates['fp32'])}")


def contention_table(ws: Path, seconds: float, precision: str) -> None:
    cores = len(os.sched_getaffinity(0))
    settings = {
        "default policy": {"OMP_NUM_THREADS": str(cores)},
        "ACTIVE": {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "ACTIVE"},
        "PASSIVE": {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"},
        "one thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    }
    figures: dict[str, dict[str, list[float]]] = {
        name: {"quiet": [], "busy": []} for name in [*settings, "plan_cpu"]
    }
    chosen = {}
    for load in ("quiet", "busy"):
        competitor = None
        if load == "busy":  # one process that never sleeps, at our priority
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            plan = plan_cpu("cpu")
            chosen[load] = f"{plan.threads} threads, {plan.wait_policy}"
            # Interleaved, so a burst of outside load hits every setting alike
            for _ in range(ROUNDS):
                for name, env in [*settings.items(), ("plan_cpu", plan.env)]:
                    rate, _ = train_tokens_per_s(ws, seconds, {**precision_env(precision), **env})
                    figures[name][load].append(rate)
        finally:
            if competitor:
                competitor.kill()
                competitor.wait()
    print(
        f"{cores} cores, {precision}; one busy competitor = a Python loop at equal priority; "
        f"best of {ROUNDS} rounds (all rounds in brackets)"
    )
    print(f"{'settings':16s} {'quiet tok/s':>24s} {'busy tok/s':>24s} {'busy/quiet':>10s}")
    for name, row in figures.items():
        quiet, busy = max(row["quiet"]), max(row["busy"])
        print(
            f"{name:16s} {quiet:7,.0f} {_spread(row['quiet']):>16s} {busy:7,.0f} {_spread(row['busy']):>16s} "
            f"{busy / max(quiet, 1):10.2f}"
        )
    print(f"plan_cpu chose: quiet {chosen['quiet']}; busy {chosen['busy']}")
    share = max(figures["plan_cpu"]["busy"]) / max(max(figures["plan_cpu"]["quiet"]), 1)
    print(
        f"plan_cpu busy vs quiet: {share:.2f} (target >= {TARGET_BUSY_SHARE}: "
        f"{'ok' if share >= TARGET_BUSY_SHARE else 'MISSED'})"
    )


def _spread(rates: list[float]) -> str:
    return "(" + ", ".join(f"{r / 1000:.1f}k" for r in rates) + ")"


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace.init(Path(tmp) / "ws", profile="cpu", tag="bench")
        prepare_data(ws.data_dir, source="stdlib", vocab_size=ws.settings().profile.vocab_size)
        print(
            f"cpu template, {seconds:g} s per run, median tokens/s after {SKIP_STEPS} warm-up steps\n"
        )
        precision_table(ws.root, seconds)
        print()
        contention_table(ws.root, seconds, plan_cpu("cpu", threads=1).precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
