"""The cpu profile end to end: the template's train.py against a plain GPT of the same
size (AdamW, nothing else), both trained for the profile's budget on the stdlib corpus and
scored by the same trusted evaluation, in one run.

Targets: wall time of one run (startup, training, save, evaluation) <= budget + 15 s, and
the template reaching a lower val_bpb than the plain GPT.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch_cli import workspace  # noqa: E402
from autoresearch_cli.data import prepare_data  # noqa: E402
from sandbox.experiment import run_experiment  # noqa: E402


def _summary_value(log: str, key: str) -> float | None:
    match = re.search(rf"^{key}:\s+([0-9.]+)", log, re.MULTILINE)
    return float(match.group(1)) if match else None


def _run(name: str, code_dir: Path, run_dir: Path, config: dict, data_dir: Path) -> dict:
    result = run_experiment(code_dir, run_dir, config, data_dir)
    log = (run_dir / "train.log").read_text(errors="replace")
    tokens_m = _summary_value(log, "total_tokens_M")
    train_s = _summary_value(log, "training_seconds")
    result["name"] = name
    result["tokens_per_s"] = tokens_m * 1e6 / train_s if tokens_m and train_s else None
    return result


def main() -> int:
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace.init(Path(tmp) / "ws", profile="cpu", tag="bench")
        config = ws.config()
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
    print(f"{'train.py':20s} {'status':7s} {'val_bpb':>9s} {'holdout':>9s} {'tok/s':>9s} "
          f"{'steps':>6s} {'params M':>9s} {'train s':>8s} {'wall s':>7s}")
    for r in results:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        print(f"{r['name']:20s} {r['status']:7s} {fmt(r['val_bpb'], '9.4f')} {fmt(r['holdout_bpb'], '9.4f')} "
              f"{fmt(r['tokens_per_s'], '9,.0f')} {fmt(r['num_steps'], '6.0f')} {fmt(r['num_params_M'], '9.2f')} "
              f"{fmt(r['training_seconds'], '8.1f')} {fmt(r['total_seconds'], '7.1f')}")
        if r["status"] != "ok":
            print(f"  {r['name']}: {r['reason']}")
    template, plain = results
    wall_ok = template["total_seconds"] <= budget + 15
    print(f"template wall {template['total_seconds']:.1f} s vs target <= {budget + 15} s: "
          f"{'ok' if wall_ok else 'OVER TARGET'}")
    if template["val_bpb"] is not None and plain["val_bpb"] is not None:
        better = template["val_bpb"] < plain["val_bpb"]
        print(f"template vs plain GPT: {template['val_bpb']:.4f} vs {plain['val_bpb']:.4f} "
              f"({'better' if better else 'NOT BETTER'}, ratio {template['val_bpb'] / plain['val_bpb']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
