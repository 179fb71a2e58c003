"""The trust boundary's cost: scoring through the split (trusted scorer + two confined model
workers) against scoring in one process that imports train.py (what the evaluation did
before the split), on the same weights, in one run; and what confinement adds to a start.

    python benchmarks/bench_eval.py [--profile cpu|gpu] [--source SPEC] [--repeat N]

Targets: the split costs at most 20% more than in-process on the cpu profile, at most
15 s more on the gpu profile; confinement adds at most 0.5 s to a job's start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoresearch_cli.doors import workspace  # noqa: E402
from autoresearch_cli.doors.config import load_raw  # noqa: E402
from autoresearch_cli.doors.data import prepare_data  # noqa: E402
from sandbox import confine  # noqa: E402
from sandbox.evaluate import SPLITS, import_torch, load_data, pick_batch_size, rows  # noqa: E402


def save_random_weights(code_dir: Path, out_dir: Path, vocab: int, seq_len: int) -> None:
    """Weights of the template's model, freshly initialised: evaluation cost does not
    depend on training."""
    code = (f"import sys, json, torch; sys.path.insert(0, {str(code_dir)!r}); import train; "
            f"c = train.model_config({vocab}, {seq_len}); m = train.build_model(c); "
            f"torch.save(m.state_dict(), {str(out_dir / 'model.pt')!r}); "
            f"open({str(out_dir / 'config.json')!r}, 'w').write(json.dumps(c))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=code_dir,
                   env={**os.environ, "AR_OUTPUT_DIR": str(out_dir)})


def in_process(code_dir: Path, out_dir: Path, data_dir: Path, eval_tokens: int, seq_len: int,
               device: str) -> tuple[float, float]:
    """(val_bpb, seconds): import train.py here, forward every row, cross-entropy here."""
    started = time.monotonic()
    import_torch()
    sys.path.insert(0, str(code_dir))
    spec = importlib.util.spec_from_file_location("bench_train", code_dir / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    model = train.build_model(json.loads((out_dir / "config.json").read_text()))
    model.load_state_dict(torch.load(out_dir / "model.pt", weights_only=True))
    model = model.to(device).eval()
    data = load_data(data_dir)
    batch = pick_batch_size(device, seq_len, data.vocab_size)
    autocast = (torch.autocast("cuda", torch.bfloat16) if device == "cuda"
                else contextlib.nullcontext())
    bpb = {}
    with torch.inference_mode():
        for name in SPLITS:
            inputs, targets = rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name)
            nats, nbytes = 0.0, 0
            token_bytes = torch.from_numpy(data.token_bytes).to(device)
            for start in range(0, len(inputs), batch):
                with autocast:
                    logits = model(inputs[start:start + batch].to(device))
                t = targets[start:start + batch].to(device)
                ce = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="none")
                b = token_bytes[t.flatten()]
                nats += float((ce.double() * (b > 0)).sum())
                nbytes += int(b.sum())
            bpb[name] = nats / math.log(2) / nbytes
    if device == "cuda":
        torch.cuda.synchronize()
    sys.path.remove(str(code_dir))
    return bpb["val"], time.monotonic() - started


def confinement_start_cost(repeat: int) -> tuple[float, float, str]:
    """Median seconds to start and finish `python -c pass` plain and through the confining
    launcher, and the level applied."""
    cmd = [sys.executable, "-c", "pass"]
    applied = confine.plan(confine.Confinement(), network=False)
    wrapped = confine.launch_cmd(applied, cmd, fsize_bytes=2**30, nofile=1024)

    def timed(argv):
        samples = []
        for _ in range(repeat):
            started = time.monotonic()
            subprocess.run(argv, check=True)
            samples.append(time.monotonic() - started)
        return statistics.median(samples)

    return timed(cmd), timed(wrapped), applied.level


def main() -> int:
    if sys.argv[1:2] == ["--reference"]:  # one in-process evaluation, in a fresh process
        code, out, data, tokens, seq_len, device = sys.argv[2:8]
        bpb, _ = in_process(Path(code), Path(out), Path(data), int(tokens), int(seq_len), device)
        print(bpb)
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--source", default="stdlib")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse a prepared data dir")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    device = "cuda" if args.profile == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace.init(Path(tmp) / "ws", profile=args.profile, tag="bench")
        profile = load_raw(ws.config_path)["profile"]
        data_dir = args.data_dir or ws.data_dir
        if args.data_dir is None:
            prepare_data(data_dir, source=args.source, vocab_size=profile["vocab_size"])
        out = Path(tmp) / "out"
        out.mkdir()
        save_random_weights(ws.root, out, profile["vocab_size"], profile["max_seq_len"])
        eval_tokens, seq_len = profile["eval_tokens"], profile["max_seq_len"]
        inproc, split = [], []
        reference = [sys.executable, __file__, "--reference", str(ws.root), str(out), str(data_dir),
                     str(eval_tokens), str(seq_len), device]  # fmt: skip
        scorer = [sys.executable, "-I", "-m", "sandbox.evaluate", "--code-dir", str(ws.root),
                  "--weights-dir", str(out), "--data-dir", str(data_dir), "--eval-tokens",
                  str(eval_tokens), "--seq-len", str(seq_len), "--device", device,
                  "--out", str(Path(tmp) / "eval.json")]  # fmt: skip
        for _ in range(args.repeat):  # fresh processes, interleaved: drift hits both alike
            started = time.monotonic()
            done = subprocess.run(reference, capture_output=True, text=True)
            if done.returncode:
                print(f"in-process evaluation failed: {done.stderr.strip()[-1500:]}")
                return 1
            bpb_in = float(done.stdout.split()[-1])
            inproc.append(time.monotonic() - started)
            started = time.monotonic()
            subprocess.run(scorer, check=True, capture_output=True, cwd=tmp)
            split.append(time.monotonic() - started)
            result = json.loads((Path(tmp) / "eval.json").read_text())
            if result["status"] != "ok":
                print(f"split evaluation failed: {result['reason']}")
                return 1
    plain, confined, level = confinement_start_cost(max(5, args.repeat))
    a, b = statistics.median(inproc), statistics.median(split)
    print(f"{args.profile} profile on {device}: {eval_tokens:,} tokens per split, seq {seq_len}, "
          f"{os.cpu_count()} cores, median of {args.repeat}")
    print(f"  one process that imports train.py (before): {a:7.2f} s  val_bpb {bpb_in:.6f}")
    print(f"  trusted scorer + 2 confined workers (now):  {b:7.2f} s  val_bpb {result['val_bpb']:.6f}"
          f"  ({result['twin_rows']} twin rows, workers {result['worker_isolation']})")
    limit = "<= 1.20x" if device == "cpu" else "<= +15 s"
    ok = b <= 1.2 * a if device == "cpu" else b <= a + 15
    print(f"  split / in-process: {b / a:.2f}x, +{b - a:.2f} s (target {limit}: "
          f"{'ok' if ok else 'OVER TARGET'})")
    print(f"  start of `python -c pass`: {plain:.3f} s plain, {confined:.3f} s confined ({level}); "
          f"+{confined - plain:.3f} s (target <= 0.5 s: {'ok' if confined - plain <= 0.5 else 'OVER'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
