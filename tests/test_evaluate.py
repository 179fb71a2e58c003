"""The trusted evaluation: exact scores for honest models, a clear reason for every cheat or fault."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sandbox.evaluate import evaluate, main

VOCAB = 64
BOS = VOCAB - 1
SEQ_LEN = 16
SPLIT_TOKENS = 1000

# A model that returns table[token]: a bigram table, honest and causal. Variants below
# replace LOGITS, the expression that turns idx into logits.
TRAIN_PY = """
import torch
import prepare

class Bigram(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, idx):
        table = self.table
        return {logits}

def build_model(config):
    assert prepare.MARKER == "beside train.py"
    return Bigram(config["vocab_size"])
"""
HONEST = "table[idx]"


def write_split(path: Path, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, BOS, SPLIT_TOKENS).astype("<u2")
    tokens[rng.random(SPLIT_TOKENS) < 0.05] = BOS
    tokens[0] = BOS
    tokens.tofile(path)
    return tokens


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    token_bytes = np.random.default_rng(0).integers(1, 5, VOCAB).astype(np.int32)
    token_bytes[BOS] = 0
    np.save(data / "token_bytes.npy", token_bytes)
    splits = {}
    for seed, name in enumerate(("train", "val", "holdout")):
        write_split(data / f"{name}.bin", seed)
        splits[name] = {"file": f"{name}.bin", "tokens": SPLIT_TOKENS}
    manifest = {
        "format": 1,
        "vocab_size": VOCAB,
        "bos_id": BOS,
        "dtype": "uint16",
        "splits": splits,
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def make_run(tmp_path: Path, logits: str = HONEST, table: torch.Tensor | None = None,
             source: str | None = None) -> tuple[Path, Path]:  # fmt: skip
    """A code dir (train.py + prepare.py) and a weights dir (model.pt + config.json)."""
    code, weights = tmp_path / "code", tmp_path / "out"
    code.mkdir(parents=True)
    weights.mkdir()
    (code / "train.py").write_text(source if source is not None else TRAIN_PY.format(logits=logits))
    (code / "prepare.py").write_text('MARKER = "beside train.py"\n')
    if table is None:
        table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
    torch.save({"table": table}, weights / "model.pt")
    (weights / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return code, weights


def expected_bpb(
    tokens: np.ndarray, table: np.ndarray, token_bytes: np.ndarray, n_targets: int
) -> float:
    """Bits per byte of a bigram table over the first n_targets targets, by hand."""
    inputs, targets = (
        tokens[:n_targets].astype(np.int64),
        tokens[1 : n_targets + 1].astype(np.int64),
    )
    logits = table[inputs].astype(np.float64)
    log_norm = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    nats = log_norm - logits[np.arange(n_targets), targets]
    scored = token_bytes[targets] > 0
    return nats[scored].sum() / math.log(2) / token_bytes[targets].sum()


def run_eval(code: Path, weights: Path, data: Path, eval_tokens: int = 512, **kwargs) -> dict:
    return evaluate(code, weights, data, eval_tokens, SEQ_LEN, **kwargs)


def test_uniform_model_in_a_real_subprocess_scores_log2_vocab_per_byte(tmp_path, data_dir):
    code, weights = make_run(
        tmp_path, logits="torch.zeros_like(table[idx])", table=torch.zeros(VOCAB, VOCAB)
    )
    out = tmp_path / "run" / "eval.json"
    completed = subprocess.run(
        [sys.executable, "-I", "-m", "sandbox.evaluate", "--code-dir", str(code), "--weights-dir", str(weights),
         "--data-dir", str(data_dir), "--eval-tokens", "512", "--seq-len", str(SEQ_LEN), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "ok", result["reason"]
    targets = np.fromfile(data_dir / "val.bin", dtype="<u2")[1:513]
    token_bytes = np.load(data_dir / "token_bytes.npy")
    n_scored = int((token_bytes[targets] > 0).sum())
    assert result["val_bpb"] == pytest.approx(
        math.log2(VOCAB) * n_scored / token_bytes[targets].sum(), abs=1e-6
    )
    assert (
        result["val_tokens"] == result["holdout_tokens"] == result["eval_tokens_requested"] == 512
    )
    assert result["causality_max_diff"] == 0.0
    assert result["num_params_M"] == pytest.approx(VOCAB * VOCAB / 1e6)
    assert result["note"] == ""
    assert completed.stdout.count("\n") == 1 and "val_bpb" in completed.stdout
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind


def test_invalid_result_is_written_with_exit_code_zero(tmp_path, data_dir):
    code, weights = make_run(tmp_path)
    (weights / "model.pt").unlink()
    out = tmp_path / "eval.json"
    completed = subprocess.run(
        [sys.executable, "-I", "-m", "sandbox.evaluate", "--code-dir", str(code), "--weights-dir", str(weights),
         "--data-dir", str(data_dir), "--eval-tokens", "512", "--seq-len", str(SEQ_LEN), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "invalid" and "model.pt" in result["reason"]
    assert result["val_bpb"] is None and result["holdout_bpb"] is None


def test_unwritable_output_exits_non_zero(tmp_path, data_dir, capsys):
    code, weights = make_run(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["--code-dir", str(code), "--weights-dir", str(weights), "--data-dir", str(data_dir),
            "--eval-tokens", "64", "--seq-len", str(SEQ_LEN), "--out", str(blocker / "eval.json")]  # fmt: skip
    assert main(argv) != 0
    assert "could not write" in capsys.readouterr().err


def test_bigram_model_matches_a_by_hand_score_and_holdout_differs(tmp_path, data_dir):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
    code, weights = make_run(tmp_path, table=table)
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "ok", result["reason"]
    token_bytes = np.load(data_dir / "token_bytes.npy")
    for name in ("val", "holdout"):
        tokens = np.fromfile(data_dir / f"{name}.bin", dtype="<u2")
        assert result[f"{name}_bpb"] == pytest.approx(
            expected_bpb(tokens, table.numpy(), token_bytes, 512), abs=1e-6
        )
    assert abs(result["val_bpb"] - result["holdout_bpb"]) > 1e-3


def test_batch_size_does_not_change_the_score(tmp_path, data_dir):
    code, weights = make_run(tmp_path)
    scores = {run_eval(code, weights, data_dir, batch_size=size)["val_bpb"] for size in (1, 3, 32)}
    assert max(scores) - min(scores) < 1e-9


def test_eval_tokens_beyond_the_split_scores_what_is_there(tmp_path, data_dir):
    code, weights = make_run(tmp_path)
    result = run_eval(code, weights, data_dir, eval_tokens=10**6)
    assert result["status"] == "ok", result["reason"]
    whole_rows = (SPLIT_TOKENS - 1) // SEQ_LEN * SEQ_LEN
    assert result["val_tokens"] == result["holdout_tokens"] == whole_rows
    assert result["eval_tokens_requested"] == 10**6
    assert f"holds only {SPLIT_TOKENS}" in result["note"]
    assert f"val: scored {whole_rows} of {10**6}" in result["note"]


@pytest.mark.parametrize(
    ("logits", "reason"),
    [
        ("table[torch.roll(idx, -1, dims=1)]", "looks ahead"),
        ("table[idx] + 0.01 * table[idx[:, -1:]]", "looks ahead"),
        ("table[idx] + table[idx].mean(0, keepdim=True)", "mixes batch rows"),
        ("table[torch.roll(idx, 1, dims=0)]", "mixes batch rows"),
    ],
    ids=["next-token", "last-token", "batch-mean", "batch-roll"],
)
def test_a_model_that_sees_what_it_must_not_is_invalid(tmp_path, data_dir, logits, reason):
    code, weights = make_run(tmp_path, logits=logits)
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid"
    assert reason in result["reason"]
    assert result["val_bpb"] is None and result["holdout_bpb"] is None
    assert result["causality_max_diff"] > 0


def test_a_model_that_refills_one_output_buffer_cannot_hide_a_look_ahead(tmp_path, data_dir):
    refill = "        self.out = getattr(self, 'out', None)\n" + (
        "        if self.out is None or self.out.shape != logits.shape: self.out = logits.clone()\n"
        "        return self.out.copy_(logits)\n"
    )
    source = TRAIN_PY.format(logits="table[torch.roll(idx, -1, dims=1)]").replace(
        "        return table[torch.roll(idx, -1, dims=1)]\n",
        "        logits = table[torch.roll(idx, -1, dims=1)]\n" + refill,
    )
    code, weights = make_run(tmp_path, source=source)
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "looks ahead" in result["reason"]


def test_a_model_that_keeps_state_between_calls_is_invalid(tmp_path, data_dir):
    # Honest for its first calls, then different: what a model that counts calls to guess
    # where probes are could do. Twins of its rows sit at random places in both workers.
    counting = "        self.calls = getattr(self, 'calls', 0) + 1\n"
    source = TRAIN_PY.format(logits="table[idx] * (2.0 if self.calls > 3 else 1.0)").replace(
        "        table = self.table\n", "        table = self.table\n" + counting
    )
    code, weights = make_run(tmp_path, source=source)
    result = run_eval(code, weights, data_dir, batch_size=4)
    assert result["status"] == "invalid"
    assert "stateful" in result["reason"] or "nondeterministic" in result["reason"]


@pytest.mark.parametrize(
    ("logits", "reason"),
    [
        ("table[idx][:, :, :-1]", "shape"),
        ("table[idx].unsqueeze(0)", "shape"),
        ("(table[idx], None)", "tuple"),
        ("table[idx] * float('nan')", "NaN"),
        ("table[idx] + float('inf')", "Inf"),
        ("table[idx] + 1 / 0", "ZeroDivisionError"),
    ],
    ids=["vocab", "rank", "tuple", "nan", "inf", "raises"],
)
def test_bad_logits_are_invalid(tmp_path, data_dir, logits, reason):
    code, weights = make_run(tmp_path, logits=logits)
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid"
    assert reason in result["reason"]
    assert result["val_bpb"] is None


def test_train_py_that_raises_at_import_is_invalid_with_the_error(tmp_path, data_dir):
    code, weights = make_run(
        tmp_path, source="import torch\n\nX = 1\nraise RuntimeError('no GPU today')\n"
    )
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid"
    assert (
        "RuntimeError: no GPU today" in result["reason"] and "train.py line 4" in result["reason"]
    )


def test_train_py_that_exits_at_import_is_invalid(tmp_path, data_dir):
    code, weights = make_run(tmp_path, source="import sys\nsys.exit(3)\n")
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "SystemExit" in result["reason"]


def test_train_py_without_build_model_is_invalid(tmp_path, data_dir):
    code, weights = make_run(tmp_path, source="import torch\n")
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "build_model" in result["reason"]


@pytest.mark.parametrize("missing", ["model.pt", "config.json"])
def test_missing_weights_are_invalid(tmp_path, data_dir, missing):
    code, weights = make_run(tmp_path)
    (weights / missing).unlink()
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid"
    assert missing in result["reason"] and "save_for_eval" in result["reason"]


@pytest.mark.parametrize(
    "state",
    [
        {"table": torch.zeros(VOCAB, VOCAB), "extra": torch.zeros(1)},
        {"table": torch.zeros(VOCAB, 3)},
        {},
    ],
    ids=["unexpected-key", "wrong-shape", "missing-key"],
)
def test_weights_that_do_not_match_the_model_are_invalid(tmp_path, data_dir, state):
    code, weights = make_run(tmp_path)
    torch.save(state, weights / "model.pt")
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "does not match build_model" in result["reason"]


def test_pickled_weights_are_refused(tmp_path, data_dir):
    code, weights = make_run(tmp_path)
    torch.save({"table": torch.zeros(VOCAB, VOCAB), "note": object()}, weights / "model.pt")
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "model.pt could not be loaded" in result["reason"]


@pytest.mark.parametrize("missing", ["val.bin", "holdout.bin", "token_bytes.npy", "manifest.json"])
def test_data_dir_missing_a_file_is_invalid(tmp_path, data_dir, missing):
    code, weights = make_run(tmp_path)
    (data_dir / missing).unlink()
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and missing in result["reason"]


def test_truncated_split_is_invalid(tmp_path, data_dir):
    code, weights = make_run(tmp_path)
    tokens = np.fromfile(data_dir / "val.bin", dtype="<u2")
    tokens[:-10].tofile(data_dir / "val.bin")
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "manifest.json says" in result["reason"]


def test_evaluations_of_different_code_dirs_do_not_share_modules(tmp_path, data_dir):
    prepare_before = sys.modules.get("prepare")
    first, weights = make_run(tmp_path / "a")
    second, _ = make_run(tmp_path / "b", logits="torch.zeros_like(table[idx])")
    (second / "prepare.py").write_text('MARKER = "beside train.py"\nVOCAB_OFFSET = 0\n')
    scores = [run_eval(code, weights, data_dir)["val_bpb"] for code in (first, second, first)]
    assert scores[0] == scores[2] != scores[1]
    assert sys.modules.get("prepare") is prepare_before


def test_a_model_with_random_logits_is_invalid(tmp_path, data_dir):
    code, weights = make_run(tmp_path, logits="table[idx] + torch.randn_like(table[idx])")
    result = run_eval(code, weights, data_dir)
    assert result["status"] == "invalid" and "nondeterministic" in result["reason"]


def test_a_model_that_cheats_only_on_rows_it_has_not_seen_is_invalid(tmp_path, data_dir):
    # Remembers every row it answered and repeats itself, so a probe that shows it the same
    # row twice agrees; on new rows it reads the next token. Its twins live in the other
    # worker, which has not seen them: the look-ahead shows.
    memo = (
        "        self.seen = getattr(self, 'seen', {})\n"
        "        out = table[torch.roll(idx, -1, dims=1)].clone()\n"
        "        for i, row in enumerate(idx):\n"
        "            key = tuple(row.tolist())\n"
        "            out[i] = self.seen.setdefault(key, out[i])\n"
        "        return out\n"
    )
    source = TRAIN_PY.format(logits="None").replace("        return None\n", memo)
    code, weights = make_run(tmp_path, source=source)
    result = run_eval(code, weights, data_dir, batch_size=8)
    assert result["status"] == "invalid" and "looks ahead" in result["reason"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_on_cuda_an_honest_model_scores_as_on_cpu(tmp_path, data_dir):
    # the workers export their logits buffers through CUDA IPC; the scorer reads them in place
    code, weights = make_run(tmp_path)
    on_cpu = run_eval(code, weights, data_dir)
    on_cuda = run_eval(code, weights, data_dir, device="cuda")
    assert on_cuda["status"] == "ok", on_cuda["reason"]
    # as confined (Landlock, user and network namespaces); a CUDA worker shares the scorer's
    # PID namespace (CUDA's IPC needs it) in a mount namespace of its own
    cuda_layers, cpu_layers = (set(r["worker_isolation"].split("+")) for r in (on_cuda, on_cpu))
    assert cpu_layers - cuda_layers == {"pidns"} and "mntns" in cuda_layers
    assert on_cuda["val_bpb"] == pytest.approx(on_cpu["val_bpb"], rel=1e-3)


@cuda
def test_on_cuda_a_look_ahead_is_invalid(tmp_path, data_dir):
    code, weights = make_run(tmp_path, logits="table[torch.roll(idx, -1, dims=1)]")
    result = run_eval(code, weights, data_dir, device="cuda")
    assert result["status"] == "invalid" and "looks ahead" in result["reason"]
