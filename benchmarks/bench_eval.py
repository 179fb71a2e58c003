"""The trust boundary's cost and what its probes catch.

    python benchmarks/bench_eval.py [--profile cpu|gpu] [--source SPEC] [--repeat N] [--sim-runs N]

Scoring through the split (trusted scorer + two confined model workers) against scoring in
one process that imports train.py (what the evaluation did before the split), on the same
weights, in one run, interleaved: the scorer with exact copies only (the cost of the split
itself, as before the probes covered every position) and with its probes (now). Then the
probes' power: the chance of catching a model that looks ahead at k of the T positions of
each row, computed for both profiles and measured on the cpu profile by simulation; and
what confinement adds to a start.

Targets: the split with copies only at most 1.51x in-process on the cpu profile (its figure
before the probes), at most 15 s more on the gpu profile; the probes catch a look-ahead at
3 positions of each row with at least 99% on both profiles, for the cost of their extra
rows (printed); confinement adds at most 0.5 s to a job's start.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_power  # noqa: E402  (beside this file)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoresearch_cli.doors import workspace  # noqa: E402
from autoresearch_cli.doors.config import PROFILES, load_raw  # noqa: E402
from autoresearch_cli.doors.data import prepare_data  # noqa: E402
from sandbox import confine  # noqa: E402
from sandbox.evaluate import SPLITS, load_data, pick_batch_size, split_rows  # noqa: E402


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
            windows = split_rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name).windows
            inputs = torch.from_numpy(windows[:, :-1].astype("int64"))
            targets = torch.from_numpy(windows[:, 1:].astype("int64"))
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
    parser.add_argument("--sim-runs", type=int, default=200, help="plans simulated per k")
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse a prepared data dir")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_GLOBAL", os.devnull)
    device = "cuda" if args.profile == "gpu" else "cpu"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace.init(Path(tmp) / "ws", profile=args.profile, tag="bench")
        profile = load_raw(ws.config_path)["profile"]
        data_dir = args.data_dir or ws.data_dir
        if args.data_dir is None:
            prepare_data(data_dir, source=args.source, vocab_size=profile["vocab_size"])
        out = Path(tmp) / "out"
        out.mkdir()
        save_random_weights(ws.root, out, profile["vocab_size"], profile["max_seq_len"])
        timed = time_scoring(ws.root, out, data_dir, profile, device, Path(tmp), args.repeat)
        if timed is None:
            return 1
        simulated = None
        if args.profile == "cpu" and args.sim_runs > 0:
            splits = probe_power.real_splits(data_dir, profile["eval_tokens"], profile["max_seq_len"])
            simulated = probe_power.simulate(splits, args.sim_runs)
    print(f"{args.profile} profile on {device}: {profile['eval_tokens']:,} tokens per split, "
          f"seq {profile['max_seq_len']}, {os.cpu_count()} cores, median of {args.repeat}, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("\n".join(timing_lines(timed, device)))
    planned = [probe_power.plan_of(name, probe_power.nominal_splits(
                   PROFILES[name]["eval_tokens"], PROFILES[name]["max_seq_len"],
                   PROFILES[name]["vocab_size"]),
                   pick_batch_size("cuda" if name == "gpu" else "cpu", PROFILES[name]["max_seq_len"],
                                   PROFILES[name]["vocab_size"]))
               for name in ("cpu", "gpu")]  # fmt: skip
    print("\n".join(probe_power.report(planned, simulated, args.sim_runs)))
    plain, confined, level = confinement_start_cost(max(5, args.repeat))
    print(f"start of `python -c pass`: {plain:.3f} s plain, {confined:.3f} s confined ({level}); "
          f"+{confined - plain:.3f} s (target <= 0.5 s: {'ok' if confined - plain <= 0.5 else 'OVER'})")
    return 0


def time_scoring(code: Path, out: Path, data_dir: Path, profile: dict, device: str, tmp: Path,
                 repeat: int) -> dict | None:  # fmt: skip
    """Seconds of each way of scoring (fresh processes, interleaved: drift hits all alike),
    and the last eval.json of each scorer; None when one failed."""
    eval_tokens, seq_len = profile["eval_tokens"], profile["max_seq_len"]
    reference = [sys.executable, __file__, "--reference", str(code), str(out), str(data_dir),
                 str(eval_tokens), str(seq_len), device]  # fmt: skip
    scorer = [sys.executable, "-I", "-m", "sandbox.evaluate", "--code-dir", str(code),
              "--weights-dir", str(out), "--data-dir", str(data_dir), "--eval-tokens",
              str(eval_tokens), "--seq-len", str(seq_len), "--device", device,
              "--out", str(tmp / "eval.json")]  # fmt: skip
    ways = {"in-process": reference, "copies only": [*scorer, "--probe-target", "0"],
            "probes": scorer}  # fmt: skip
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    results: dict[str, dict] = {}
    for _ in range(repeat):
        for way, cmd in ways.items():
            started = time.monotonic()
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            seconds[way].append(time.monotonic() - started)
            if done.returncode:
                print(f"{way} evaluation failed: {done.stderr.strip()[-1500:]}")
                return None
            if way == "in-process":
                results[way] = {"val_bpb": float(done.stdout.split()[-1])}
                continue
            results[way] = json.loads((tmp / "eval.json").read_text())
            if results[way]["status"] != "ok":
                print(f"{way} evaluation failed: {results[way]['reason']}")
                return None
    return {way: (statistics.median(seconds[way]), results[way]) for way in ways}


def timing_lines(timed: dict, device: str) -> list[str]:
    inproc, reference = timed["in-process"]
    copies = timed["copies only"][0]
    lines = [f"  one process that imports train.py:               {inproc:7.2f} s  "
             f"val_bpb {reference['val_bpb']:.6f}"]  # fmt: skip
    for way, name in (("copies only", "exact copies only (before)"), ("probes", "probes (now)")):
        seconds, result = timed[way]
        lines.append(f"  scorer + 2 workers, {name + ':':<29}{seconds:7.2f} s  {seconds / inproc:.2f}x  "
                     f"val_bpb {result['val_bpb']:.6f}  {result['twin_rows']} extra rows, "
                     f"{result['probes']} probes: k=3 caught {result['probe_power']['3']:.1%}")
    ok = copies <= 1.51 * inproc if device == "cpu" else copies <= inproc + 15
    limit = "<= 1.51x" if device == "cpu" else "<= +15 s"
    probed = timed["probes"][0]
    lines.append(f"  the split alone: {copies / inproc:.2f}x in-process (target {limit}: "
                 f"{'ok' if ok else 'OVER TARGET'}); the probes: {probed / copies:.2f}x the split "
                 f"alone, +{probed - copies:.2f} s")
    return lines

if __name__ == "__main__":
    sys.exit(main())
