"""The gpu profile on the GPU at hand, through `ar` itself: one table of the figures that
matter (`make bench-gpu`), so whoever has a GPU re-measures in one call.

    python benchmarks/bench_gpu.py --workspace DIR [--source SPEC] [--budget S]
        [--iterate N] [--variants PATTERNS] [--variant-budget S]

--variants runs train.py directly (no ar, unconfined) once per WINDOW_PATTERN given
(e.g. "SSSL,L") for --variant-budget seconds and prints steady tokens/s and MFU: the
quick way to compare attention paths. Without --workspace a temporary one is used.
MFU is against 989.5 TFLOP/s (H100 bf16 dense), as the original reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step (\d+) .*?dt: (\d+)ms \| tok/sec: ([\d,]+) \| mfu: ([\d.]+)%")


def ar(*args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "autoresearch_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def summary(log: str, key: str) -> float | None:
    match = re.search(rf"^{key}:\s+([0-9.]+)", log, re.MULTILINE)
    return float(match.group(1)) if match else None


def steady(log: str) -> tuple[float | None, float | None]:
    """Median tokens/s and MFU over the logged steps after the first 20 (compile, warm-up)."""
    steps = [(int(m[1]), int(m[3].replace(",", "")), float(m[4])) for m in STEP.finditer(log)]
    later = [s for s in steps if s[0] >= 20] or steps
    if not later:
        return None, None
    tok = sorted(s[1] for s in later)[len(later) // 2]
    mfu = sorted(s[2] for s in later)[len(later) // 2]
    return tok, mfu


def row(name: str, result: dict, run_dir: Path, budget: float) -> dict:
    log = (run_dir / "train.log").read_text(errors="replace").replace("\r", "\n")
    tok, mfu = steady(log)
    total_s, training_s = summary(log, "total_seconds"), summary(log, "training_seconds")
    return {
        "run": name, "status": result.get("status"), "val_bpb": result.get("val_bpb"),
        "steps": result.get("num_steps"), "tokens_M": result.get("total_tokens_M"),
        "tok_per_s": tok, "mfu_steady": mfu, "mfu_run": result.get("mfu_percent"),
        "peak_vram_gb": (result.get("peak_vram_mb") or 0) / 1024,
        "startup_compile_s": (total_s - training_s) if total_s and training_s else None,
        "train_wall_s": result.get("training_seconds"), "eval_s": result.get("eval_seconds"),
        "total_wall_s": result.get("total_seconds"), "budget_s": budget,
        "gpu_util": result.get("gpu_util_percent"), "isolation": result.get("isolation"),
        "worker_isolation": result.get("worker_isolation"), "reason": result.get("reason"),
    }


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(f"{'run':10s} {'status':7s} {'val_bpb':>8s} {'steps':>6s} {'tok/s':>10s} {'MFU%':>6s} "
          f"{'VRAM GB':>8s} {'start+compile':>13s} {'eval s':>7s} {'wall/budget':>12s} "
          f"{'GPU util':>8s} isolation")
    for r in rows:
        wall = f"{fmt(r['total_wall_s'], '.0f')}/{r['budget_s']:.0f}"
        print(f"{r['run']:10s} {r['status'] or '-':7s} {fmt(r['val_bpb'], '8.4f')} "
              f"{fmt(r['steps'], '6.0f')} {fmt(r['tok_per_s'], '10,.0f')} {fmt(r['mfu_steady'], '6.1f')} "
              f"{fmt(r['peak_vram_gb'], '8.1f')} {fmt(r['startup_compile_s'], '13.1f')} "
              f"{fmt(r['eval_s'], '7.1f')} {wall:>12s} {fmt(r['gpu_util'], '8.0f')} "
              f"{r['isolation']} / {r['worker_isolation']}")
        if r["reason"]:
            print(f"  {r['run']}: {r['reason']}")


FLEX_IMPORT = """import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_block_masks = {}


def window_block_mask(seq_len, window, device):
    \"\"\"flex_attention's block mask of a causal sliding window (built once per shape).\"\"\"
    key = (seq_len, window, str(device))
    if key not in _block_masks:
        def causal_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        _block_masks[key] = create_block_mask(causal_window, None, None, seq_len, seq_len, device=device)
    return _block_masks[key]
"""
FLEX_ATTEND = """            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)"""
FLEX_ATTEND_NEW = """            if torch.compiler.is_compiling() and q.is_cuda:  # the compiled flex kernel skips masked blocks
                y = flex_attention(q, k, v, block_mask=window_block_mask(q.size(2), self.window, q.device))
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)"""


def flex_source(source: str) -> str:
    """The template with its sliding-window layers on flex_attention when compiled on CUDA."""
    source = source.replace("import torch.nn.functional as F\n", FLEX_IMPORT, 1)
    source = source.replace(FLEX_ATTEND, FLEX_ATTEND_NEW, 1)
    source = source.replace("        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)\n",
                            "        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)\n"
                            "        self.window = config.sequence_len // 2\n", 1)
    return source


def variants(ws: Path, patterns: list[str], budget: float) -> None:
    """train.py directly, once per window pattern: steady tokens/s and MFU."""
    print(f"attention variants, {budget:g} s each (train.py directly, unconfined):")
    source = (ws / "train.py").read_text()
    for pattern in patterns:
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp)
            for name in ("prepare.py", "ar.toml"):
                (code / name).write_bytes((ws / name).read_bytes())
            window_pattern, _, how = pattern.partition(":")
            text = re.sub(r'^WINDOW_PATTERN = "[SL]+"', f'WINDOW_PATTERN = "{window_pattern}"',
                          source, flags=re.MULTILINE)  # fmt: skip
            if how == "flex":
                text = flex_source(text)
            (code / "train.py").write_text(text)
            env = {**os.environ, "AR_DATA_DIR": str(ws / ".ar" / "data"),
                   "AR_OUTPUT_DIR": str(code / "out"), "AR_TIME_BUDGET": str(budget)}
            started = time.monotonic()
            done = subprocess.run([sys.executable, "train.py"], cwd=code, env=env,
                                  capture_output=True, text=True, timeout=budget + 300)  # fmt: skip
            log = done.stdout.replace("\r", "\n") + done.stderr
            tok, mfu = steady(log)
            print(f"  WINDOW_PATTERN={pattern:6s} tok/s {tok or 0:>12,} MFU {mfu or 0:5.1f}% "
                  f"startup+compile {((summary(log, 'total_seconds') or 0) - (summary(log, 'training_seconds') or 0)):5.1f} s "
                  f"peak VRAM {(summary(log, 'peak_vram_mb') or 0) / 1024:5.1f} GB "
                  f"wall {time.monotonic() - started:5.1f} s exit {done.returncode}")
            if done.returncode:
                print("   ", "\n    ".join(log.strip().splitlines()[-5:]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--source", default=None, help="ar prepare --source (default: stdlib)")
    parser.add_argument("--budget", type=int, default=None, help="training seconds (default 300)")
    parser.add_argument("--iterate", type=int, default=0, help="random-agent experiments after the baseline")
    parser.add_argument("--variants", default="",
                        help="comma-separated WINDOW_PATTERNs to time; PATTERN:flex puts the "
                             "windowed layers on flex_attention")
    parser.add_argument("--variant-budget", type=float, default=30)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    ws = args.workspace or Path(tempfile.mkdtemp()) / "ws"
    if not (ws / "ar.toml").exists():
        init = ["init", str(ws), "--profile", "gpu", "--tag", "bench"]
        if args.budget:
            init += ["--budget", str(args.budget)]
        done = ar(*init, cwd=ws.parent if ws.parent.exists() else Path.cwd())
        print(done.stdout.strip() or done.stderr.strip())
    started = time.monotonic()
    done = ar("prepare", *(["--source", args.source] if args.source else []), cwd=ws)
    print(done.stdout.strip().splitlines()[:4] if done.returncode == 0 else done.stderr[-2000:])
    print(f"prepare: {time.monotonic() - started:.1f} s")
    if args.variants:
        variants(ws, args.variants.split(","), args.variant_budget)
    budget = float(json.loads(json.dumps(__import__("tomllib").loads((ws / "ar.toml").read_text())))["profile"]["time_budget"])
    rows = []
    if not args.no_baseline:
        done = ar("baseline", cwd=ws)
        print(done.stdout.strip()[-800:], done.stderr.strip()[-1500:])
    if args.iterate:
        done = ar("iterate", "--n", str(args.iterate), "--agent", "random", "--seed", "0", cwd=ws)
        print(done.stdout.strip()[-1500:], done.stderr.strip()[-1500:])
    for run_dir in sorted((ws / ".ar" / "runs").glob("*"), key=lambda p: int(p.name)):
        if (run_dir / "result.json").exists():
            result = json.loads((run_dir / "result.json").read_text())
            rows.append(row(f"#{run_dir.name}", result, run_dir, budget))
    if rows:
        print(f"gpu profile, budget {budget:g} s; MFU vs 989.5 TFLOP/s bf16 dense")
        print_table(rows)
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
