"""The cpu profile end to end: the template's train.py against a plain GPT of the same
size (AdamW, nothing else), both trained for the profile's budget on the stdlib corpus and
scored by the same trusted evaluation, in one run.

Each runs in the precision ar's CPU plan chose for this machine (the fastest it runs), as
printed. `--no-bf16` emulates a CPU without bf16 instructions (oneDNN and ATen restricted to
AVX2), the machine the tokens/s target is set for.

Targets: wall time of one run (startup, training, save, evaluation) <= budget + 15 s; the
template's tokens/s >= 0.7x the plain GPT's (and >= 12,000 on a 2-core CPU without native
bf16); the template's val_bpb <= 0.75x the plain GPT's.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch_cli.doors import workspace  # noqa: E402
from autoresearch_cli.doors.config import load_raw  # noqa: E402
from autoresearch_cli.doors.data import prepare_data  # noqa: E402
from sandbox.experiment import run_experiment  # noqa: E402


def _summary_value(log: str, key: str) -> float | None:
    match = re.search(rf"^{key}:\s+([0-9.]+)", log, re.MULTILINE)
    return float(match.group(1)) if match else None


def _spec(code_dir: Path, run_dir: Path, config: dict, data_dir: Path):
    from sandbox.spec import ExperimentSpec  # the newer API only

    profile = config["profile"]
    return ExperimentSpec(
        code_dir=str(code_dir), run_dir=str(run_dir), data_dir=str(data_dir),
        time_budget=float(profile["time_budget"]), startup_allowance=float(profile["startup_allowance"]),
        eval_tokens=int(profile["eval_tokens"]), seq_len=int(profile["max_seq_len"]),
        eval_timeout=float(profile["eval_timeout"]), device=profile.get("device", "auto"),
    )


def _run(name: str, code_dir: Path, run_dir: Path, config: dict, data_dir: Path) -> dict:
    if "spec" in inspect.signature(run_experiment).parameters:
        result = run_experiment(_spec(code_dir, run_dir, config, data_dir)).as_dict()
    else:  # the older signature
        result = run_experiment(code_dir, run_dir, config, data_dir)
    log = (run_dir / "train.log").read_text(errors="replace")
    tokens_m = _summary_value(log, "total_tokens_M")
    train_s = _summary_value(log, "training_seconds")
    precision = re.search(r"^Precision: autocast torch\.(\w+)", log, re.MULTILINE)
    result["name"] = name
    result["precision"] = {"bfloat16": "bf16", "float32": "fp32"}.get(precision.group(1), "?") if precision else "?"
    result["tokens_per_s"] = tokens_m * 1e6 / train_s if tokens_m and train_s else None
    return result


NO_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # as bench_cpu.py
TARGET_TOKENS_RATIO = 0.7  # template tokens/s over the plain GPT's
TARGET_BPB_RATIO = 0.75  # template val_bpb over the plain GPT's


def main() -> int:
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    if "--no-bf16" in sys.argv[1:]:
        os.environ.update(NO_BF16)  # the CPU plan measures under it and passes it on to the job
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace.init(Path(tmp) / "ws", profile="cpu", tag="bench")
        config = load_raw(ws.config_path)
        profile = config["profile"]
        prepare_data(ws.data_dir, source="stdlib", vocab_size=profile["vocab_size"])
        plain_dir = Path(tmp) / "plain"
        shutil.copytree(ws.root, plain_dir, ignore=shutil.ignore_patterns(".git", ".ar"))
        shutil.copyfile(ROOT / "benchmarks" / "plain_gpt.py", plain_dir / "train.py")
        results = [
            _run("template", ws.root, Path(tmp) / "runs" / "template", config, ws.data_dir),
            _run("plain GPT + AdamW", plain_dir, Path(tmp) / "runs" / "plain", config, ws.data_dir),
        ]
    budget = profile["time_budget"]
    print(f"cpu profile: budget {budget} s, vocab {profile['vocab_size']}, context "
          f"{profile['max_seq_len']}, eval {profile['eval_tokens']:,} tokens, {os.cpu_count()} cores")
    print(f"{'train.py':20s} {'status':7s} {'prec':5s} {'val_bpb':>9s} {'holdout':>9s} {'tok/s':>9s} "
          f"{'steps':>6s} {'params M':>9s} {'train s':>8s} {'wall s':>7s}")
    for r in results:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        print(f"{r['name']:20s} {r['status']:7s} {r['precision']:5s} {fmt(r['val_bpb'], '9.4f')} {fmt(r['holdout_bpb'], '9.4f')} "
              f"{fmt(r['tokens_per_s'], '9,.0f')} {fmt(r['num_steps'], '6.0f')} {fmt(r['num_params_M'], '9.2f')} "
              f"{fmt(r['training_seconds'], '8.1f')} {fmt(r['total_seconds'], '7.1f')}")
        if r["status"] != "ok":
            print(f"  {r['name']}: {r['reason']}")
    template, plain = results
    wall_ok = template["total_seconds"] <= budget + 15
    print(f"template wall {template['total_seconds']:.1f} s vs target <= {budget + 15} s: "
          f"{'ok' if wall_ok else 'OVER TARGET'}")
    if template["tokens_per_s"] and plain["tokens_per_s"]:
        ratio = template["tokens_per_s"] / plain["tokens_per_s"]
        print(f"template vs plain GPT tokens/s: ratio {ratio:.2f} (target >= {TARGET_TOKENS_RATIO}: "
              f"{'ok' if ratio >= TARGET_TOKENS_RATIO else 'MISSED'})")
    if template["val_bpb"] is not None and plain["val_bpb"] is not None:
        ratio = template["val_bpb"] / plain["val_bpb"]
        print(f"template vs plain GPT val_bpb: {template['val_bpb']:.4f} vs {plain['val_bpb']:.4f}, ratio "
              f"{ratio:.3f} (target <= {TARGET_BPB_RATIO}: {'ok' if ratio <= TARGET_BPB_RATIO else 'MISSED'})")
    for r in results:
        if r.get("cpu"):
            print(f"{r['name']}: cpu plan {r['cpu']['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
