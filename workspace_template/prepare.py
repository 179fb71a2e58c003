"""
Fixed runtime for train.py: profile constants, device, tokenizer, training batches and
saving the weights for the trusted evaluation. Never edited by agents.

The data comes from `ar prepare` (.ar/data); the evaluation code lives outside the
workspace, so nothing here can be changed to improve a score.

    from prepare import MAX_SEQ_LEN, TIME_BUDGET, DEVICE, SEED, Tokenizer, make_dataloader, save_for_eval
    clock = BudgetClock(warmup_steps=1)    # training seconds against TIME_BUDGET
"""

import json
import os
import pickle
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# Constants: the [profile] table of ar.toml, then the runner's environment
# ---------------------------------------------------------------------------

# Used only when there is no ar.toml next to this file (a bare copy of the template).
_FALLBACK_PROFILE = {"vocab_size": 1024, "max_seq_len": 256, "time_budget": 60, "eval_tokens": 32768, "device": "auto"}


def _read_profile():
    path = HERE / "ar.toml"
    if not path.exists():
        return dict(_FALLBACK_PROFILE)
    with open(path, "rb") as f:
        profile = tomllib.load(f).get("profile", {})
    return {**_FALLBACK_PROFILE, **profile}


def _resolve_device(requested):
    if requested not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    return requested


def _find_data_dir():
    if os.environ.get("AR_DATA_DIR"):
        return Path(os.environ["AR_DATA_DIR"])
    for parent in (HERE, *HERE.parents):
        if (parent / ".ar" / "data").is_dir():
            return parent / ".ar" / "data"
    return HERE / ".ar" / "data"


_PROFILE = _read_profile()
VOCAB_SIZE = int(_PROFILE["vocab_size"])  # tokenizer vocabulary, <|bos|> included
MAX_SEQ_LEN = int(_PROFILE["max_seq_len"])  # context length of training and evaluation
TIME_BUDGET = float(os.environ.get("AR_TIME_BUDGET") or _PROFILE["time_budget"])  # training seconds
# The run's seed, given by ar (every run of an experiment gets its own): seeds the weights
# and the order of the training data. ar owns it: proposals never change it.
SEED = int(os.environ.get("AR_SEED", "0"))
EVAL_TOKENS = int(_PROFILE["eval_tokens"])  # validation tokens the trusted evaluation scores
DEVICE = _resolve_device(os.environ.get("AR_DEVICE") or _PROFILE["device"])  # "cpu" or "cuda"
DATA_DIR = _find_data_dir()
OUTPUT_DIR = Path(os.environ.get("AR_OUTPUT_DIR") or HERE / ".ar" / "out")


# ---------------------------------------------------------------------------
# Precision: what this machine runs fastest
# ---------------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _precision(device):
    """(autocast dtype, Muon orthogonalisation dtype, why) for `device`.

    CUDA: bf16. CPU: what ar measured on this machine before the run (bf16 autocast is
    faster only where the CPU has bf16 instructions, and ~16x slower elsewhere), passed in
    AR_CPU_PRECISION / AR_MUON_PRECISION. Without them (a manual run) fp32, which is never
    the slow case.
    """
    if device == "cuda":
        return torch.bfloat16, torch.bfloat16, "CUDA"
    autocast = os.environ.get("AR_CPU_PRECISION", "")
    muon = os.environ.get("AR_MUON_PRECISION", "") or autocast
    if autocast in _DTYPES and muon in _DTYPES:
        return _DTYPES[autocast], _DTYPES[muon], os.environ.get("AR_CPU_PRECISION_REASON", "set by ar")
    return torch.float32, torch.float32, "AR_CPU_PRECISION unset: fp32, never the slow case on a CPU"


AUTOCAST_DTYPE, MUON_DTYPE, PRECISION_REASON = _precision(DEVICE)  # train.py's autocast and Muon dtypes


def _data_file(name):
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `ar prepare` first")
    return path


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

class Tokenizer:
    """The workspace's BPE tokenizer (a tiktoken Encoding with one special token, <|bos|>)."""

    BOS = "<|bos|>"

    def __init__(self, enc):
        self.enc = enc
        self.bos_id = enc.encode_single_token(self.BOS)
        self.vocab_size = enc.n_vocab

    @classmethod
    def from_directory(cls, data_dir=None):
        path = Path(data_dir) / "tokenizer.pkl" if data_dir else _data_file("tokenizer.pkl")
        with open(path, "rb") as f:
            tokenizer = cls(pickle.load(f))
        if tokenizer.vocab_size != VOCAB_SIZE:
            raise ValueError(f"{path} has {tokenizer.vocab_size} tokens but the profile's vocab_size is "
                             f"{VOCAB_SIZE}: run `ar prepare` again")
        return tokenizer

    def encode(self, text, prepend_bos=False):
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def decode(self, ids):
        return self.enc.decode(list(ids))


# ---------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------

def _document_starts(tokens, bos_id, chunk=1 << 24):
    """Offsets of every <|bos|> in the token file, read in chunks to bound memory."""
    starts = [np.flatnonzero(tokens[i:i + chunk] == bos_id) + i for i in range(0, len(tokens), chunk)]
    return np.concatenate(starts).astype(np.int64)


def make_dataloader(tokenizer, batch_size, seq_len, device=DEVICE, seed=None):
    """
    Endless (inputs, targets, epoch) batches from train.bin; inputs and targets are int64
    [batch_size, seq_len] on `device`, targets the inputs shifted by one token.

    Every epoch shuffles the documents and packs them into one stream, each document
    followed by <|bos|>; the stream is cut into rows of seq_len tokens, visited in random
    order, and each row gets a leading <|bos|>. No token is cropped or padded away, every
    token is a target once per epoch, and long documents are seen whole, not only their
    first seq_len tokens. Only train.bin is ever read.
    """
    tokens = np.memmap(_data_file("train.bin"), dtype=np.uint16, mode="r")
    bos_id = tokenizer.bos_id
    if len(tokens) == 0 or tokens[0] != bos_id:
        raise ValueError(f"{DATA_DIR / 'train.bin'} does not start with <|bos|>: run `ar prepare` again")
    doc_starts = _document_starts(tokens, bos_id)
    # A document's unit in the stream is its tokens after <|bos|> plus one trailing <|bos|>,
    # so it has the same length as the document in the file.
    doc_lengths = np.diff(np.append(doc_starts, len(tokens)))
    rows_per_epoch = len(tokens) // seq_len
    if rows_per_epoch < batch_size:
        raise ValueError(f"train.bin has {len(tokens)} tokens, fewer than one batch of {batch_size} rows of {seq_len}")
    rng = np.random.default_rng(SEED if seed is None else seed)
    offsets = np.arange(seq_len, dtype=np.int64)
    pin = device == "cuda"
    epoch = 0
    while True:
        epoch += 1
        order = rng.permutation(len(doc_starts))
        starts, lengths = doc_starts[order], doc_lengths[order]
        unit_ends = np.cumsum(lengths)
        row_order = rng.permutation(rows_per_epoch)
        for first in range(0, rows_per_epoch - batch_size + 1, batch_size):
            rows = row_order[first:first + batch_size]
            position = rows[:, None] * seq_len + offsets  # positions in the shuffled stream
            unit = np.searchsorted(unit_ends, position, side="right")
            within = position - (unit_ends[unit] - lengths[unit])
            source = np.minimum(starts[unit] + 1 + within, len(tokens) - 1)
            body = np.where(within == lengths[unit] - 1, bos_id, tokens[source]).astype(np.int64)
            batch = np.empty((2, batch_size, seq_len), dtype=np.int64)  # inputs, targets
            batch[0, :, 0] = bos_id
            batch[0, :, 1:] = body[:, :-1]
            batch[1] = body
            batch = torch.from_numpy(batch)
            if pin:
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=pin)
            yield batch[0], batch[1], epoch


# ---------------------------------------------------------------------------
# The budget clock: only training is billed
# ---------------------------------------------------------------------------

def report_phase(name):
    """Tell ar the run enters phase `name` ("setup", "train", "save"), so that its own
    clock can say where the wall time went (start, compile and warm-up, train, save). Only
    a record: ar's hard kill, the budget plus the startup allowance, never moves."""
    fd = os.environ.get("AR_PHASE_FD", "")
    if fd.isdigit():
        try:
            os.write(int(fd), f"{name}\n".encode())
        except OSError:
            pass


class BudgetClock:
    """Training seconds, billed against TIME_BUDGET from the first step after the warm-up.

    Starting the interpreter, importing, building the model and the first `warmup_steps`
    steps (compilation, allocator and kernel warm-up) are not billed; ar is told when the
    first billed step begins. Time each step between start_step() and end_step(); the run
    has its budget when over() says so.
    """

    def __init__(self, warmup_steps):
        self.warmup_steps = warmup_steps
        self.seconds = 0.0  # billed training seconds so far
        self._t0 = None

    @property
    def progress(self):
        """Billed seconds as a share of the budget, at most 1: what the schedules follow."""
        return min(self.seconds / TIME_BUDGET, 1.0)

    @property
    def remaining(self):
        return max(0.0, TIME_BUDGET - self.seconds)

    def start_step(self, step):
        if step == self.warmup_steps:
            report_phase("train")
        self._t0 = time.time()

    def end_step(self, step):
        """The step's seconds (billed from step `warmup_steps` on)."""
        dt = time.time() - self._t0
        if step >= self.warmup_steps:
            self.seconds += dt
        return dt

    def over(self, steps_done):
        return steps_done > self.warmup_steps and self.seconds >= TIME_BUDGET


# ---------------------------------------------------------------------------
# Handing the model to the trusted evaluation
# ---------------------------------------------------------------------------

def _write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_for_eval(model, config):
    """Write OUTPUT_DIR/model.pt (state_dict, CPU float32) and OUTPUT_DIR/config.json."""
    report_phase("save")
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {
        name: (tensor.detach().to("cpu", torch.float32) if tensor.is_floating_point() else tensor.detach().cpu())
        for name, tensor in model.state_dict().items()
    }
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    _write_atomic(OUTPUT_DIR / "model.pt", lambda f: torch.save(state, f))
    _write_atomic(OUTPUT_DIR / "config.json", lambda f: f.write(text))
    return OUTPUT_DIR


report_phase("setup")  # the interpreter and imports are done: building the run comes next
