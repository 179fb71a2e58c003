"""The trusted scorer: bits per byte of saved weights, computed by code train.py cannot reach.

Run as its own process from the installed package, never from the worktree:

    python -I -m sandbox.evaluate --code-dir WORKTREE --weights-dir OUT --data-dir DATA \\
        --eval-tokens N --seq-len T [--device cpu|cuda] [--batch-size B] --out eval.json

This process never imports train.py or anything from the run's directory. It reads the
val and holdout splits and starts two confined model workers (sandbox/modelworker.py,
sandbox/worker.py) that import train.py, load the weights and fill the logits for the
input rows they are given: through shared memory this process allocates on CPU; on CUDA
through a device buffer the worker exports and this process opens (sandbox/cudaipc.py),
so logits never leave the GPU. Each batch's logits are copied once out of that buffer,
which the worker can still write, and only the copy is read. The workers never see a
target or a split file; the cross-entropy is computed here.

Probes cannot be told apart from scoring. The rows are shuffled with a secret seed and
split between the two workers, which share no state (separate processes, confined, no
common writable place). Hidden among the scoring batches are twins of some rows, sent to
the *other* worker: exact copies (a row must get the same logits among other rows and in
another process: no row mixing, no state, no nondeterminism) and look-ahead twins whose
tokens after a random cut come from elsewhere in the split (logits before the cut must
not move). A twin is a real row of natural text in a full batch like any other; a model
that cheats on any row it scores risks being compared with its twin. eval.json is
always written; an invalid result carries a reason, never a score.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sandbox import protocol
from sandbox.errors import InvalidModel
from sandbox.files import write_json_atomic
from sandbox.modelworker import WORKERS, Worker

# ---------------------------------------------------------------------------
SPLITS = ("val", "holdout")
# How far logits may move where the model must not look, relative to max(1, largest |logit|).
# Twins run in full batches of the same shape, so an honest model answers them identically
# up to the rounding of its kernels: fp32 on CPU exactly, bf16 autocast on CUDA nearly.
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}
CPU_TOKENS_PER_BATCH = 16384  # throughput on two cores grows up to about here (measured)
CUDA_LOGITS_PER_BATCH = 1 << 28  # 1 GiB of fp32 logits per batch on CUDA
AHEAD_SHARE = 0.05  # share of each split's rows that get a look-ahead twin
COPY_SHARE = 0.03  # share that get an exact-copy twin
MIN_TWINS = 4  # per kind and split, however small the split
READY_TIMEOUT_S = 300.0  # importing torch and train.py, building the model, loading weights
REASON_CHARS = protocol.MAX_TEXT
# torch is imported by import_torch(), on CPU only once the workers are starting: their
# imports of torch and train.py then overlap with the scorer's own.
torch: Any = None
F: Any = None


def import_torch() -> None:
    global torch, F
    if torch is None:
        import torch as _torch
        import torch.nn.functional as _functional

        torch, F = _torch, _functional


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


def rows(tokens: np.ndarray, eval_tokens: int, seq_len: int, vocab_size: int, name: str):
    """Inputs and targets [rows, seq_len] from the first tokens of a split.

    Row r reads tokens[r*T : r*T+T] and is scored on tokens[r*T+1 : r*T+T+1]; only whole
    rows count, so at most min(eval_tokens, len(tokens) - 1) targets are scored.
    """
    n_rows = min(eval_tokens, len(tokens) - 1) // seq_len
    if n_rows < 1:
        raise InvalidModel(f"the {name} split holds {len(tokens)} tokens, fewer than one row")
    used = torch.from_numpy(np.array(tokens[: n_rows * seq_len + 1], dtype=np.int64))
    if int(used.max()) >= vocab_size:
        raise InvalidModel(f"the {name} split holds token ids >= vocab_size {vocab_size}")
    return used[:-1].view(n_rows, seq_len), used[1:].view(n_rows, seq_len)


# ---------------------------------------------------------------------------
# The plan: which row goes to which worker, in which batch, with which twins


@dataclass
class Job:
    """One row of one batch: a scored row, a twin of a scored row, or a filler."""

    kind: str  # "score" | "copy" | "ahead" | "fill"
    split: str
    row: int
    tokens: torch.Tensor  # [T] what the worker is given
    cut: int = 0  # ahead twins: positions >= cut hold other text; < cut are compared


@dataclass
class Plan:
    batches: list[tuple[int, list[Job]]]  # (worker, jobs) in the order they run
    twins: list[Job] = field(default_factory=list)


def make_plan(split_rows: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int,
              rng: np.random.Generator) -> Plan:  # fmt: skip
    """Every row scored once, by one of the workers (half each, chosen at random); twins of
    some rows on the other worker; each worker's rows shuffled and cut into batches of one
    size, at most `batch_size`, as even as can be (the last one padded with filler rows)."""
    per_worker: list[list[Job]] = [[] for _ in range(WORKERS)]
    twins: list[Job] = []
    for split, (inputs, _) in split_rows.items():
        n, seq_len = inputs.shape
        owner = rng.permutation(n) % WORKERS
        for row in range(n):
            per_worker[owner[row]].append(Job("score", split, row, inputs[row]))
        for kind, share in (("copy", COPY_SHARE), ("ahead", AHEAD_SHARE)):
            count = min(n, max(MIN_TWINS, math.ceil(share * n)))
            for row in rng.choice(n, count, replace=False):
                twin = _twin(kind, split, int(row), inputs, rng)
                if twin is None:
                    continue
                per_worker[1 - owner[row]].append(twin)
                twins.append(twin)
    batches = []
    all_rows = [job for jobs in per_worker for job in jobs if job.kind == "score"]
    longest = max(len(jobs) for jobs in per_worker)
    batch_size = math.ceil(longest / math.ceil(longest / batch_size))  # one shape, little padding
    for worker, jobs in enumerate(per_worker):
        order = rng.permutation(len(jobs))
        jobs = [jobs[i] for i in order]
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            while len(batch) < batch_size and len(batch) < len(all_rows):
                filler = all_rows[int(rng.integers(0, len(all_rows)))]
                batch.append(Job("fill", filler.split, filler.row, filler.tokens))
            batches.append((worker, batch))
    order = rng.permutation(len(batches))
    return Plan([batches[i] for i in order], twins)


def _twin(kind: str, split: str, row: int, inputs: torch.Tensor,
          rng: np.random.Generator) -> Job | None:  # fmt: skip
    tokens = inputs[row]
    if kind == "copy":
        return Job("copy", split, row, tokens.clone())
    n, seq_len = inputs.shape
    if seq_len < 2:
        return None
    cut = int(rng.integers(max(1, seq_len // 4), max(2, 3 * seq_len // 4) + 1))
    cut = min(cut, seq_len - 1)
    for _ in range(8):  # real text from another place of the split, differing after the cut
        donor = inputs[int(rng.integers(0, n))]
        twin = tokens.clone()
        twin[cut:] = donor[cut:]
        if not torch.equal(twin, tokens):
            return Job("ahead", split, row, twin, cut=cut)
    twin = tokens.clone()
    twin[cut:] = (twin[cut:] + 1) % int(inputs.max() + 1)
    return Job("ahead", split, row, twin, cut=cut)


# ---------------------------------------------------------------------------
# Scoring


def token_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats [B, T] from float32 logits [B, T, V]."""
    targets = targets.to(logits.device)
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    if not bool(torch.isfinite(nats).all()):
        raise InvalidModel("the model returned NaN or Inf logits (the loss is not finite)")
    return nats.view(targets.shape)


@dataclass
class Tally:
    nats: dict[str, float]
    target_bytes: dict[str, int]
    kept: dict[tuple[str, int], torch.Tensor]  # logits of rows that have twins
    twin_logits: list[tuple[Job, torch.Tensor]]


def run_plan(plan: Plan, workers: list[Worker], split_rows, token_bytes: torch.Tensor,
             deadline: float) -> Tally:  # fmt: skip
    """Both workers compute at once; the scorer scores one's batch while the other runs."""
    twinned = {(t.split, t.row) for t in plan.twins}
    tally = Tally({s: 0.0 for s in split_rows}, {s: 0 for s in split_rows}, {}, [])
    queues = [[jobs for w, jobs in plan.batches if w == index] for index in range(len(workers))]
    running: dict[int, list[Job]] = {}
    for index, queue in enumerate(queues):
        if queue:
            running[index] = queue.pop(0)
            workers[index].submit(torch.stack([job.tokens for job in running[index]]))
    while running:
        for index in list(running):
            jobs = running.pop(index)
            _tally_batch(tally, jobs, workers[index].collect(deadline), split_rows, token_bytes,
                         twinned)  # fmt: skip
            if queues[index]:
                running[index] = queues[index].pop(0)
                workers[index].submit(torch.stack([job.tokens for job in running[index]]))
    return tally


def _tally_batch(tally: Tally, jobs: list[Job], logits: torch.Tensor, split_rows,
                 token_bytes: torch.Tensor, twinned: set) -> None:  # fmt: skip
    for split in split_rows:
        scored = [i for i, job in enumerate(jobs) if job.kind == "score" and job.split == split]
        if not scored:
            continue
        targets = split_rows[split][1][[jobs[i].row for i in scored]]
        target_bytes = token_bytes.to(logits.device)[targets.to(logits.device)]
        nats = token_nats(logits[scored], targets)
        tally.nats[split] += float((nats.double() * (target_bytes > 0)).sum())
        tally.target_bytes[split] += int(target_bytes.sum())
    for i, job in enumerate(jobs):
        if job.kind == "score" and (job.split, job.row) in twinned:
            tally.kept[(job.split, job.row)] = logits[i].clone()
        elif job.kind in ("copy", "ahead"):
            tally.twin_logits.append((job, logits[i].clone()))
    if not math.isfinite(sum(tally.nats.values())):
        raise InvalidModel("the model returned NaN or Inf logits")


def check_twins(tally: Tally, device: str) -> tuple[float, str | None]:
    """The largest move between a row and its twin where none is allowed, and why the
    model is invalid when that move is beyond rounding (None when it is not)."""
    worst = {"copy": 0.0, "ahead": 0.0}
    scale = 1.0
    for job, logits in tally.twin_logits:
        original = tally.kept[(job.split, job.row)]
        scale = max(scale, float(original.abs().max()))
        compared = slice(None) if job.kind == "copy" else slice(0, job.cut)
        moved = float((logits[compared] - original[compared]).abs().max())
        worst[job.kind] = max(worst[job.kind], moved if math.isfinite(moved) else math.inf)
    tolerance = TOLERANCE[device] * scale
    reason = None
    if worst["copy"] > tolerance:
        reason = (
            f"the model's logits for a row moved by {worst['copy']:.3g} (tolerance "
            f"{tolerance:.3g}) when the same row was scored again among other rows: it mixes "
            "batch rows, keeps state between calls (stateful), or is nondeterministic"
        )
    elif worst["ahead"] > tolerance:
        reason = (
            f"the model looks ahead: changing later tokens of a row moved the logits at "
            f"earlier positions by {worst['ahead']:.3g} (tolerance {tolerance:.3g})"
        )
    return max(worst.values()), reason


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
) -> dict[str, Any]:
    """Score the model in weights_dir on the val and holdout splits: the eval.json dict.

    Never raises for a bad model, bad weights or bad data: status "invalid" with a reason.
    """
    started = time.monotonic()
    result: dict[str, Any] = {
        "status": "invalid", "reason": None, "val_bpb": None, "holdout_bpb": None,
        "val_tokens": 0, "holdout_tokens": 0, "eval_tokens_requested": int(eval_tokens),
        "num_params_M": None, "causality_max_diff": None, "seconds": 0.0, "note": "",
        "twin_rows": 0, "worker_isolation": None, "worker_isolation_note": None,
    }  # fmt: skip
    own_log_dir = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="ar-eval-")) if own_log_dir else Path(log_dir)
    try:
        paths = Path(code_dir).resolve(), Path(weights_dir).resolve(), Path(data_dir)
        _evaluate(
            *paths,
            int(eval_tokens),
            int(seq_len),
            device,
            batch_size,
            logs,
            confine,
            started + timeout,
            result,
        )
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
              confine, deadline, result):  # fmt: skip
    if eval_tokens < 1 or seq_len < 2 or (batch_size or 1) < 1 or device not in TOLERANCE:
        raise InvalidModel(
            f"bad arguments: eval_tokens {eval_tokens}, seq_len {seq_len}, "
            f"batch_size {batch_size}, device {device!r}"
        )
    data = load_data(data_dir)
    total_rows = sum(max(0, min(eval_tokens, len(t) - 1) // seq_len) for t in data.splits.values())
    batch_size = max(1, min(batch_size or pick_batch_size(device, seq_len, data.vocab_size),
                            total_rows))  # fmt: skip
    if device == "cuda":  # the shared device buffers need CUDA before the workers start
        import_torch()
        if not torch.cuda.is_available():
            raise InvalidModel("device cuda was asked for but CUDA is not available")
    workers: list[Worker] = []
    try:
        for index in range(WORKERS):  # both start at once: their imports overlap
            workers.append(Worker(index, code_dir, weights_dir, device, batch_size, seq_len,
                                  data.vocab_size, logs, confine))  # fmt: skip
        import_torch()
        if device == "cpu":  # the workers have the cores; this process only scores between batches
            torch.set_num_threads(1)
        split_rows = {}
        for name in SPLITS:
            split_rows[name] = rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name)
            note = _shortfall(name, eval_tokens, len(data.splits[name]), split_rows[name][0].numel())
            result["note"] = "; ".join(filter(None, [result["note"], note]))
        plan = make_plan(split_rows, batch_size, np.random.default_rng(secrets.randbits(64)))
        ready_by = min(deadline, time.monotonic() + READY_TIMEOUT_S)
        params = [worker.wait_ready(ready_by) for worker in workers]
        result["num_params_M"] = round(params[0] / 1e6, 6)  # as a worker reports it
        result["worker_isolation"] = workers[0].isolation
        result["worker_isolation_note"] = workers[0].isolation_note
        with torch.inference_mode():
            token_bytes = torch.from_numpy(data.token_bytes)
            tally = run_plan(plan, workers, split_rows, token_bytes, deadline)
            result["causality_max_diff"], reason = check_twins(tally, device)
        if reason:
            raise InvalidModel(reason)
    finally:
        for worker in workers:
            worker.say_bye()
        for worker in workers:
            worker.close()
    result["twin_rows"] = len(plan.twins)
    for name in SPLITS:
        if tally.target_bytes[name] == 0:
            raise InvalidModel(f"the scored {name} tokens hold no bytes (only special tokens)")
        result[f"{name}_bpb"] = tally.nats[name] / math.log(2) / tally.target_bytes[name]
        result[f"{name}_tokens"] = split_rows[name][0].numel()


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
    add("--device", default="cpu", choices=sorted(TOLERANCE))
    add("--batch-size", type=int, default=None, help="rows per forward (default: picked)")
    add("--log-dir", type=Path, default=None, help="where the workers' logs go")
    add("--no-confine", action="store_true", help="run the model workers unconfined")
    add("--timeout", type=float, default=3600.0, help="seconds for the whole evaluation")
    add("--out", required=True, type=Path, help="where to write eval.json")
    args = parser.parse_args(argv)
    result = evaluate(
        args.code_dir, args.weights_dir, args.data_dir, args.eval_tokens, args.seq_len,
        args.device, args.batch_size, args.log_dir, not args.no_confine, args.timeout,
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
