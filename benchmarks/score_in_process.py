"""Scoring in one process that imports train.py (the evaluation before the split): the
reference benchmarks/bench_eval.py times the trusted scorer against.

    python benchmarks/score_in_process.py CODE OUT DATA EVAL_TOKENS SEQ_LEN DEVICE EXTRA_ROWS [ROWS]

Prints the val_bpb. EXTRA_ROWS more rows are forwarded unscored: the probes' share. ROWS:
rows per batch (default: the scorer's default for the device).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.evaluate import SPLITS, load_data, pick_batch_size, split_rows  # noqa: E402


def in_process(code_dir: Path, out_dir: Path, data_dir: Path, eval_tokens: int, seq_len: int,
               device: str, extra_rows: int = 0, batch_rows: int | None = None) -> tuple[float, float]:
    """(val_bpb, seconds): import train.py here, forward every row, cross-entropy here;
    `extra_rows` more rows of the val split forwarded too (the probes' share, unscored)."""
    started = time.monotonic()
    sys.path.insert(0, str(code_dir))
    spec = importlib.util.spec_from_file_location("bench_train", code_dir / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    model = train.build_model(json.loads((out_dir / "config.json").read_text()))
    model.load_state_dict(torch.load(out_dir / "model.pt", weights_only=True))
    model = model.to(device).eval()
    data = load_data(data_dir)
    batch = batch_rows or pick_batch_size(device, seq_len, data.vocab_size)
    autocast = (torch.autocast("cuda", torch.bfloat16) if device == "cuda"
                else contextlib.nullcontext())
    bpb = {}
    with torch.inference_mode():
        for name in SPLITS:
            windows = split_rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name).windows
            if name == "val" and extra_rows:  # the probes' rows: the same arithmetic, unscored
                for start in range(0, extra_rows, batch):
                    rows = torch.from_numpy(windows[np.arange(start, min(start + batch, extra_rows))
                                                    % len(windows), :-1].astype("int64"))
                    with autocast:
                        F.log_softmax(model(rows.to(device)).float(), -1)
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


if __name__ == "__main__":
    code, out, data, tokens, seq_len, device, extra = sys.argv[1:8]
    bpb, _ = in_process(Path(code), Path(out), Path(data), int(tokens), int(seq_len), device,
                        int(extra), int(sys.argv[8]) if len(sys.argv) > 8 else None)  # fmt: skip
    print(bpb)
