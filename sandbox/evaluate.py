"""The trusted scorer: bits per byte of saved weights, computed by code train.py cannot reach.

Run as its own process from the installed package, never from the worktree:

    python -I -m sandbox.evaluate --code-dir WORKTREE --weights-dir OUT --data-dir DATA \\
        --eval-tokens N --seq-len T [--device cpu|cuda] [--batch-size B] --out eval.json

This process never imports train.py or anything from the run's directory, and runs with an
environment of its own (sandbox/experiment.py: a fresh private HOME and TMPDIR, nothing the
training job set or wrote). It reads the val and holdout splits and starts two confined
model workers (sandbox/modelworker.py, sandbox/worker.py) that import train.py, load the
weights and fill the logits for the input rows they are given: through shared memory this
process allocates on CPU; on CUDA through a device buffer the worker exports and this
process opens (sandbox/cudaipc.py), so logits never leave the GPU. Each batch's logits are
copied once out of that buffer, and only the copy is read. The workers never see a target
or a split file; the cross-entropy is computed here (sandbox/scoring.py).

Probes cannot be told apart from scoring (sandbox/probes.py). The rows are shuffled with a
secret seed and split between the two workers, which share no state. Hidden among the
scoring batches are twins of rows, each sent to the *other* worker: the same row with its
tokens from a cut on replaced by other real text (the scores before the cut must not
move) or, at a few, an exact copy (no row mixing, no state, no nondeterminism). Cuts fall
uniformly on every position of a row, and there are enough probes that a model which
looks ahead at 3 of the T positions of each row is caught with at least 99% (where the
splits hold the text for them; eval.json's probe_power says what was achieved, for 1, 3
and 10 positions). eval.json is always written; an invalid result carries a reason, never
a score.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sandbox import probes, protocol
from sandbox.errors import InvalidModel
from sandbox.files import write_json_atomic
from sandbox.modelworker import Worker

# ---------------------------------------------------------------------------
SPLITS = ("val", "holdout")
DEVICES = ("cpu", "cuda")
CPU_TOKENS_PER_BATCH = 16384  # throughput on two cores grows up to about here (measured)
CUDA_LOGITS_PER_BATCH = 1 << 28  # 1 GiB of fp32 logits per batch on CUDA
SPARE_ROWS_PER_PROBE = 2  # spare rows read past the scored ones: a decoy and a donor per probe
READY_TIMEOUT_S = 300.0  # importing torch and train.py, building the model, loading weights
REASON_CHARS = protocol.MAX_TEXT


# ---------------------------------------------------------------------------
# Data


@dataclass
class Data:
    vocab_size: int
    token_bytes: np.ndarray  # int64 [vocab_size], 0 for special tokens
    splits: dict[str, np.ndarray]  # uint16 token ids per split


def load_data(data_dir: Path) -> Data:
    needed = ["manifest.json", "token_bytes.npy"] + [f"{name}.bin" for name in SPLITS]
    missing = [name for name in needed if not (data_dir / name).is_file()]
    if missing:
        raise InvalidModel(f"data directory {data_dir} lacks {', '.join(missing)} (run ar prepare)")
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
        vocab_size = int(manifest["vocab_size"])
        token_bytes = np.load(data_dir / "token_bytes.npy", allow_pickle=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidModel(f"data directory {data_dir} is unreadable: {exc}") from None
    if manifest.get("dtype", "uint16") != "uint16" or token_bytes.shape != (vocab_size,):
        raise InvalidModel(
            f"data directory {data_dir} does not match its manifest: dtype "
            f"{manifest.get('dtype')!r}, token_bytes {token_bytes.shape}, vocab_size {vocab_size}"
        )
    splits = {}
    for name in SPLITS:
        path = data_dir / f"{name}.bin"
        size = path.stat().st_size
        tokens = np.memmap(path, dtype="<u2", mode="r") if size else np.zeros(0, dtype="<u2")
        expected = manifest.get("splits", {}).get(name, {}).get("tokens")
        if size % 2 or (expected is not None and int(expected) != len(tokens)):
            raise InvalidModel(
                f"{path} holds {size} bytes but manifest.json says {expected} tokens"
            )
        splits[name] = tokens
    return Data(vocab_size, token_bytes.astype(np.int64), splits)


def data_shape(data_dir: Path) -> tuple[int, dict[str, int]]:
    """The vocabulary size and each split's token count, from the manifest and the files'
    sizes alone: what the workers' buffers need, known before a byte of a split is read."""
    missing = [name for name in ("manifest.json", *(f"{s}.bin" for s in SPLITS))
               if not (data_dir / name).is_file()]  # fmt: skip
    if missing:
        raise InvalidModel(f"data directory {data_dir} lacks {', '.join(missing)} (run ar prepare)")
    try:
        vocab_size = int(json.loads((data_dir / "manifest.json").read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidModel(f"data directory {data_dir} is unreadable: {exc}") from None
    return vocab_size, {name: (data_dir / f"{name}.bin").stat().st_size // 2 for name in SPLITS}


def scored_rows(split_tokens: int, eval_tokens: int, seq_len: int) -> int:
    """Whole rows of at most eval_tokens targets: row r reads tokens[r*T : r*T+T] and is
    scored on tokens[r*T+1 : r*T+T+1]."""
    return max(0, min(eval_tokens, split_tokens - 1) // seq_len)


def split_rows(tokens: np.ndarray, eval_tokens: int, seq_len: int, vocab_size: int, name: str,
               spare: int = 0) -> probes.SplitRows:  # fmt: skip
    """The split as rows: the scored ones (scored_rows), then up to `spare` whole rows of
    the text after the last scored target, for the probes."""
    scored = scored_rows(len(tokens), eval_tokens, seq_len)
    if scored < 1:
        raise InvalidModel(f"the {name} split holds {len(tokens)} tokens, fewer than one row")
    start = scored * seq_len + 1
    spare = max(0, min(spare, (len(tokens) - start - 1) // seq_len))
    regions = [np.asarray(tokens[: start]), np.asarray(tokens[start : start + spare * seq_len + 1])]
    windows = np.concatenate([
        np.lib.stride_tricks.sliding_window_view(region, seq_len + 1)[::seq_len]
        for region in regions if len(region) > seq_len
    ])  # fmt: skip
    if int(windows.max()) >= vocab_size:
        raise InvalidModel(f"the {name} split holds token ids >= vocab_size {vocab_size}")
    return probes.SplitRows(windows, scored)


def pick_batch_size(device: str, seq_len: int, vocab_size: int) -> int:
    if device == "cuda":
        return max(1, CUDA_LOGITS_PER_BATCH // (seq_len * vocab_size))
    return max(1, CPU_TOKENS_PER_BATCH // seq_len)


# ---------------------------------------------------------------------------
# The evaluation


def evaluate(
    code_dir: str | Path,
    weights_dir: str | Path,
    data_dir: str | Path,
    eval_tokens: int,
    seq_len: int,
    device: str = "cpu",
    batch_size: int | None = None,
    log_dir: str | Path | None = None,
    confine: bool = True,
    timeout: float = 3600.0,
    probe_target: float = probes.TARGET_POWER,
    fork_workers: bool = False,
) -> dict[str, Any]:
    """Score the model in weights_dir on the val and holdout splits: the eval.json dict.

    `probe_target`: the chance of catching a model that looks ahead at probes.TARGET_K
    positions of each row that the probes are sized for (0: the copies alone).
    `fork_workers`: start the confined model workers as forks of this process (a warm one,
    with torch loaded: sandbox/warm.py), before it reads any evaluation data; only for a
    process that is the scorer and nothing else (`python -m sandbox.evaluate`).
    Never raises for a bad model, bad weights or bad data: status "invalid" with a reason.
    """
    started = time.monotonic()
    result: dict[str, Any] = {
        "status": "invalid", "reason": None, "val_bpb": None, "holdout_bpb": None,
        "val_tokens": 0, "holdout_tokens": 0, "eval_tokens_requested": int(eval_tokens),
        "num_params_M": None, "causality_max_diff": None, "seconds": 0.0, "note": "",
        "twin_rows": 0, "probes": 0, "probe_power": None, "worker_isolation": None,
        "worker_isolation_note": None, "batch_rows": None, "timing": {},
    }  # fmt: skip
    own_log_dir = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="ar-eval-")) if own_log_dir else Path(log_dir)
    try:
        paths = Path(code_dir).resolve(), Path(weights_dir).resolve(), Path(data_dir)
        _evaluate(*paths, int(eval_tokens), int(seq_len), device, batch_size, logs, confine,
                  started + timeout, float(probe_target), result, fork_workers)  # fmt: skip
        result["status"] = "ok"
    except InvalidModel as exc:
        result["reason"] = _clip(str(exc))
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            result["reason"] = "the evaluation ran out of GPU memory"
        else:
            result["reason"] = _clip(f"the evaluation failed: {type(exc).__name__}: {exc}")
    finally:
        if own_log_dir:
            shutil.rmtree(logs, ignore_errors=True)
    if result["status"] != "ok":
        result["val_bpb"] = result["holdout_bpb"] = None
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _evaluate(code_dir, weights_dir, data_dir, eval_tokens, seq_len, device, batch_size, logs,
              confine, deadline, probe_target, result, fork_workers):  # fmt: skip
    if (eval_tokens < 1 or seq_len < 2 or (batch_size or 1) < 1 or device not in DEVICES
            or not 0 <= probe_target < 1):  # fmt: skip
        raise InvalidModel(
            f"bad arguments: eval_tokens {eval_tokens}, seq_len {seq_len}, batch_size "
            f"{batch_size}, device {device!r}, probe_target {probe_target}"
        )
    started = time.monotonic()
    vocab_size, split_tokens = data_shape(data_dir)
    total_rows = sum(scored_rows(tokens, eval_tokens, seq_len) for tokens in split_tokens.values())
    batch_size = max(1, min(batch_size or pick_batch_size(device, seq_len, vocab_size),
                            total_rows))  # fmt: skip
    result["batch_rows"] = batch_size
    if device == "cuda":  # the shared device buffers need CUDA before the workers start
        import torch

        if not torch.cuda.is_available():
            raise InvalidModel("device cuda was asked for but CUDA is not available")
    workers: list[Worker] = []
    try:
        # Before a byte of the splits is read: a worker forked from here has this memory.
        for index in range(probes.WORKERS):  # both start at once: their imports overlap
            workers.append(Worker(index, code_dir, weights_dir, device, batch_size, seq_len,
                                  vocab_size, logs, confine, fork_workers))  # fmt: skip
        data = load_data(data_dir)
        if data.vocab_size != vocab_size:
            raise InvalidModel(f"data directory {data_dir} changed during the evaluation")
        plan, splits = _plan(data, eval_tokens, seq_len, batch_size, probe_target, result)
        import torch  # while the workers import theirs

        from sandbox import scoring

        if device == "cpu":  # the workers have the cores; this process only scores between batches
            torch.set_num_threads(1)

        ready_by = min(deadline, time.monotonic() + READY_TIMEOUT_S)
        params = [worker.wait_ready(ready_by) for worker in workers]
        ready = time.monotonic()
        result["num_params_M"] = round(params[0] / 1e6, 6)  # as a worker reports it
        result["worker_isolation"] = workers[0].isolation
        result["worker_isolation_note"] = workers[0].isolation_note
        with torch.inference_mode():
            token_bytes = torch.from_numpy(data.token_bytes).to(workers[0].logits.device)
            tally = scoring.run_plan(plan, workers, splits, token_bytes, deadline)
            compared = scoring.compare_twins(tally, device)
        # fixed: start the workers (import, build, load) and plan; arithmetic: the batches
        result["timing"] = {"ready": round(ready - started, 3),
                            "scoring": round(time.monotonic() - ready, 3)}  # fmt: skip
        result["causality_max_diff"] = compared.max_move
        if compared.reason:
            raise InvalidModel(compared.reason)
    finally:
        for worker in workers:
            worker.say_bye()
        for worker in workers:
            worker.close()
    for name in SPLITS:
        if tally.target_bytes[name] == 0:
            raise InvalidModel(f"the scored {name} tokens hold no bytes (only special tokens)")
        result[f"{name}_bpb"] = tally.nats[name] / math.log(2) / tally.target_bytes[name]
        result[f"{name}_tokens"] = splits[name].scored * seq_len


def _plan(data: Data, eval_tokens: int, seq_len: int, batch_size: int, probe_target: float,
          result: dict[str, Any]) -> tuple[probes.Plan, dict[str, probes.SplitRows]]:  # fmt: skip
    """The secret plan of rows and probes, and what it achieves, in `result`."""
    wanted = probes.probes_needed(probes.TARGET_K, probe_target, seq_len)
    splits = {
        name: split_rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name,
                         spare=SPARE_ROWS_PER_PROBE * wanted)
        for name in SPLITS
    }  # fmt: skip
    plan = probes.make_plan(splits, batch_size, np.random.default_rng(secrets.randbits(64)), wanted)
    notes = [_shortfall(name, eval_tokens, len(data.splits[name]), rows.scored * seq_len)
             for name, rows in splits.items()]  # fmt: skip
    if plan.probes < wanted:
        notes.append(
            f"probes: {plan.probes} of the {wanted} wanted (the splits hold too little text): "
            f"a look-ahead at {probes.TARGET_K} positions of each row is caught with "
            f"{plan.power(probes.TARGET_K):.1%}, not {probe_target:.0%}"
        )
    result["note"] = "; ".join(filter(None, notes))
    result["probes"], result["twin_rows"] = plan.probes, plan.extra_rows
    result["probe_power"] = {str(k): plan.power(k) for k in probes.REPORTED_K}
    return plan, splits


def _shortfall(name: str, requested: int, split_tokens: int, scored: int) -> str | None:
    if scored >= requested:
        return None
    why = f"the split holds only {split_tokens}" if split_tokens <= requested else "whole rows only"
    return f"{name}: scored {scored} of {requested} requested tokens ({why})"


def _clip(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


# ---------------------------------------------------------------------------
# Command line


def summary(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"eval invalid: {result['reason']}"
    return (
        f"eval ok: val_bpb {result['val_bpb']:.6f}, holdout_bpb {result['holdout_bpb']:.6f} "
        f"({result['val_tokens']} + {result['holdout_tokens']} tokens, {result['seconds']:.1f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.evaluate", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--code-dir", required=True, type=Path, help="directory holding train.py and prepare.py")
    add(
        "--weights-dir", required=True, type=Path, help="directory holding model.pt and config.json"
    )
    add("--data-dir", required=True, type=Path, help="the data directory written by ar prepare")
    add("--eval-tokens", required=True, type=int, help="tokens to score in each split")
    add("--seq-len", required=True, type=int, help="tokens per row")
    add("--device", default="cpu", choices=DEVICES)
    add("--batch-size", type=int, default=None, help="rows per forward (default: picked)")
    add("--log-dir", type=Path, default=None, help="where the workers' logs go")
    add("--no-confine", action="store_true", help="run the model workers unconfined")
    add("--timeout", type=float, default=3600.0, help="seconds for the whole evaluation")
    add("--probe-target", type=float, default=probes.TARGET_POWER,
        help=f"chance of catching a look-ahead at {probes.TARGET_K} positions per row the "
             "probes are sized for (0: exact copies only)")  # fmt: skip
    add("--out", required=True, type=Path, help="where to write eval.json")
    add("--fork-workers", action="store_true",
        help="fork the model workers from this process (the warm runtime: sandbox/warm.py)")
    args = parser.parse_args(argv)
    result = evaluate(
        args.code_dir, args.weights_dir, args.data_dir, args.eval_tokens, args.seq_len,
        args.device, args.batch_size, args.log_dir, not args.no_confine, args.timeout,
        args.probe_target, args.fork_workers,
    )  # fmt: skip
    try:
        write_json_atomic(args.out, result)
    except OSError as exc:
        print(f"eval: could not write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
