"""Rows per batch of the scorer's model workers on CPU, chosen by measurement.

A worker's forward pass is fastest when a batch's activations stay in the caches. On a
2-core AMD EPYC without AVX-512 (2026-12-04) the cpu profile's model ran 25k tokens/s on
one thread at 4 rows of 256 tokens and 17.6k at 64 rows (the old fixed 16,384 tokens),
and a whole scoring with its probes (814 rows) took 4.3-4.7 s of batches at 4 rows
against 6.3-6.7 s at 64, to the same val_bpb. Which size wins depends on the caches, so
it is measured where ar runs: once per machine, shape and worker threads, with a model
shaped like the cpu template (forward only, on the threads each worker gets), and cached
beside the precision measurement (sandbox/cpu.py). ar passes the result to the scorer
(`--batch-size`); the workers never see it, and every batch of a scoring has that one
shape. A failed measurement is not cached: the scorer then picks its default.

    python -m sandbox.evalbatch SEQ_LEN VOCAB   # print the choice here, measuring if needed

Importing this module does not import torch; only a measurement does, in a subprocess.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

from sandbox import cpu
from sandbox.files import write_json_atomic

CACHE_VERSION = 1  # bump when the measurement changes
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)  # batch sizes tried, in tokens (rows = tokens // T)
ROUNDS = 3  # interleaved rounds; the best of each size counts (load only slows a round down)
TOKENS_PER_TRY = 4096  # tokens forwarded per size and round
MARGIN = 1.03  # a larger batch within this of the fastest wins: fewer round trips per scoring
WIDTH, DEPTH, HEAD_DIM = 128, 2, 64  # the cpu template's model (autoresearch_cli/doors/template.py)


def worker_threads() -> int:
    """The threads each of the scorer's two workers gets on a quiet machine."""
    return max(1, cpu.available_cores() // 2)


def rows_per_batch(seq_len: int, vocab: int, cache_dir: Path | None = None) -> int | None:
    """The measured rows per batch for rows of `seq_len` tokens and `vocab` logits, from the
    cache or measured now (seconds, once); None when the measurement failed."""
    threads = worker_threads()
    key = {**cpu.cache_key(), "evalbatch": str(CACHE_VERSION), "seq_len": str(seq_len),
           "vocab": str(vocab), "threads": str(threads)}  # fmt: skip
    path = cpu.cache_path(cache_dir or cpu.default_cache_dir(), key, "eval-batch")
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") == key and int(entry["rows"]) >= 1:
            return int(entry["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        seconds = measure(seq_len, vocab, threads)
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
        return None
    rows = choose(seconds)
    entry = {"key": key, "rows": rows, "seconds_per_token": seconds,
             "date": datetime.date.today().isoformat()}  # fmt: skip
    try:
        write_json_atomic(path, entry, sort_keys=True)
    except OSError:
        pass  # not cached: measured again next time
    return rows


def choose(seconds_per_token: dict[str, float]) -> int:
    """The most rows whose time per token is within MARGIN of the fastest."""
    best = min(seconds_per_token.values())
    return max(int(rows) for rows, spt in seconds_per_token.items() if spt <= best * MARGIN)


def measure(seq_len: int, vocab: int, threads: int) -> dict[str, float]:
    """Seconds per token of each batch size ({rows: s}), in a fresh subprocess on `threads`."""
    return cpu.run_measurement(["sandbox.evalbatch", "--measure", str(seq_len), str(vocab)],
                               cpu.thread_env(threads, cpu.QUIET_WAIT_POLICY),
                               "batch measurement")  # fmt: skip


def _time_forward(seq_len: int, vocab: int) -> dict[str, float]:
    """Seconds per token of a forward pass shaped like the cpu template's (embedding,
    DEPTH blocks of causal attention and a relu^2 MLP, the head), per batch size."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    heads = WIDTH // HEAD_DIM
    emb, head = torch.randn(vocab, WIDTH), torch.randn(WIDTH, vocab) / WIDTH**0.5
    blocks = [[torch.randn(WIDTH, n) / WIDTH**0.5 for n in (3 * WIDTH, WIDTH, 4 * WIDTH)]
              + [torch.randn(4 * WIDTH, WIDTH) / (4 * WIDTH) ** 0.5] for _ in range(DEPTH)]  # fmt: skip

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(emb[tokens], (WIDTH,))
        rows = len(tokens)
        for qkv, out, up, down in blocks:
            q, k, v = (
                (F.rms_norm(x, (WIDTH,)) @ qkv).view(rows, seq_len, 3, heads, HEAD_DIM).unbind(2)
            )
            y = F.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
            )
            x = x + y.transpose(1, 2).reshape(rows, seq_len, WIDTH) @ out
            x = x + F.relu(F.rms_norm(x, (WIDTH,)) @ up).square() @ down
        logits = F.rms_norm(x, (WIDTH,)) @ head
        return 15 * torch.tanh(logits / 15)

    sizes = sorted({max(1, tokens // seq_len) for tokens in TOKENS})
    inputs = {rows: torch.randint(0, vocab, (rows, seq_len)) for rows in sizes}
    best = {rows: float("inf") for rows in sizes}
    with torch.inference_mode():
        for rows in sizes:  # warm-up: first calls allocate
            forward(inputs[rows])
        for _ in range(ROUNDS):
            for rows in sizes:
                calls = max(1, TOKENS_PER_TRY // (rows * seq_len))
                start = time.perf_counter()
                for _ in range(calls):
                    forward(inputs[rows])
                best[rows] = min(
                    best[rows], (time.perf_counter() - start) / (calls * rows * seq_len)
                )
    return {str(rows): seconds for rows, seconds in best.items()}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(_time_forward(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(rows_per_batch(int(sys.argv[1]), int(sys.argv[2])))
