"""The workspace template: rendering per profile, the model contract, the data loader,
and real (tiny) training runs of train.py as a subprocess."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from autoresearch_cli.doors import config
from autoresearch_cli.doors.resources import template_dir
from autoresearch_cli.doors.template import TRAIN_OVERRIDES, render_train_py, set_constants

SUMMARY_KEYS = ("training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")


def _module_constants(source: str) -> dict[str, str]:
    """NAME -> normalised source of its value, for every module-level NAME = value."""
    constants = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            constants[node.targets[0].id] = ast.unparse(node.value)
    return constants


def _workspace(root: Path, profile: str = "micro", train_source: str | None = None) -> Path:
    """A bare workspace: train.py for the profile, prepare.py and ar.toml; no git."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(train_source or render_train_py(profile))
    shutil.copyfile(template_dir() / "prepare.py", root / "prepare.py")
    config.write(root / "ar.toml", config.default_config(profile, "test"))
    return root


def _run_train(ws: Path, data_dir: Path, out_dir: Path, budget: str = "3",
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AR_DATA_DIR": str(data_dir), "AR_OUTPUT_DIR": str(out_dir),
           "AR_TIME_BUDGET": budget, "AR_DEVICE": "cpu", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, "train.py"], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def micro_train(tmp_path, micro_data, monkeypatch):
    """The micro train.py (and its prepare.py) imported in-process from a bare workspace."""
    ws = _workspace(tmp_path / "ws")
    monkeypatch.setenv("AR_DATA_DIR", str(micro_data))
    monkeypatch.setenv("AR_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("AR_DEVICE", "cpu")
    monkeypatch.syspath_prepend(str(ws))
    monkeypatch.delitem(sys.modules, "prepare", raising=False)
    spec = importlib.util.spec_from_file_location(f"train_{uuid.uuid4().hex}", ws / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("prepare", None)


# ---------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("profile", sorted(TRAIN_OVERRIDES))
def test_render_sets_the_profile_constants_and_keeps_comments(profile):
    source = render_train_py(profile)
    constants = _module_constants(source)
    for name, literal in TRAIN_OVERRIDES[profile].items():
        assert constants[name] == ast.unparse(ast.parse(literal, mode="eval").body)
        line = next(line for line in source.splitlines() if line.startswith(f"{name} = "))
        assert "  # " in line
    template = (template_dir() / "train.py").read_text()
    assert len(source.splitlines()) == len(template.splitlines())
    if not TRAIN_OVERRIDES[profile]:
        assert source == template


def test_every_public_profile_has_overrides():
    assert set(config.PROFILES) <= set(TRAIN_OVERRIDES)


def test_set_constants_rejects_unknown_names_and_bad_values():
    template = (template_dir() / "train.py").read_text()
    with pytest.raises(ValueError, match="NO_SUCH_CONSTANT"):
        set_constants(template, {"NO_SUCH_CONSTANT": "1"})
    with pytest.raises(ValueError, match="DEPTH"):
        set_constants(template, {"DEPTH": "4 +"})
    with pytest.raises(ValueError, match="nope"):
        render_train_py("nope")


# ---------------------------------------------------------------------------
# The model contract


def test_import_does_not_train(micro_train, tmp_path):
    assert callable(micro_train.build_model) and callable(micro_train.main)
    assert not (tmp_path / "out").exists()


def test_build_model_returns_logits(micro_train, micro_data):
    profile = config.PROFILES["micro"]
    model_config = micro_train.model_config(profile["vocab_size"], profile["max_seq_len"])
    assert json.loads(json.dumps(model_config)) == model_config
    model = micro_train.build_model(model_config).eval()
    idx = torch.randint(0, profile["vocab_size"], (3, profile["max_seq_len"]))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (3, profile["max_seq_len"], profile["vocab_size"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with torch.no_grad():
        short = model(idx[:, :10])
    assert short.shape == (3, 10, profile["vocab_size"])


def test_model_is_causal(micro_train):
    profile = config.PROFILES["micro"]
    model = micro_train.build_model(micro_train.model_config(profile["vocab_size"], profile["max_seq_len"]))
    with torch.no_grad():  # zero-initialised projections would hide any leak
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    idx = torch.randint(0, profile["vocab_size"], (2, profile["max_seq_len"]))
    changed = idx.clone()
    cut = profile["max_seq_len"] // 3
    changed[:, cut:] = (changed[:, cut:] + 1) % profile["vocab_size"]
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.allclose(before[:, :cut], after[:, :cut], atol=1e-5)
    assert not torch.allclose(before[:, cut:], after[:, cut:], atol=1e-3)


def test_sliding_window_mask(micro_train):
    mask = micro_train.sliding_window_mask(6, 2)
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(mask, (j <= i) & (i - j < 2))


# ---------------------------------------------------------------------------
# The data loader


def test_dataloader_rows_are_bos_aligned_slices_of_train(micro_train, micro_data):
    prepare = sys.modules["prepare"]
    tokenizer = prepare.Tokenizer.from_directory()
    bos = tokenizer.bos_id
    train_bytes = np.fromfile(micro_data / "train.bin", dtype="<u2").tobytes()
    loader = prepare.make_dataloader(tokenizer, 4, 32)
    for _ in range(3):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
        assert epoch == 1
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in y.numpy():
            # Between markers a row is a run of one document, so it appears verbatim in train.bin.
            for piece in np.split(row, np.flatnonzero(row == bos)):
                piece = piece[piece != bos].astype("<u2")
                assert piece.tobytes() in train_bytes


def test_dataloader_reads_only_train_and_counts_epochs(micro_train, micro_data, tmp_path):
    prepare = sys.modules["prepare"]
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for name in ("tokenizer.pkl", "train.bin"):
        shutil.copyfile(micro_data / name, train_only / name)
    tokenizer = prepare.Tokenizer.from_directory(train_only)
    prepare.DATA_DIR = train_only  # the module reads its files through DATA_DIR
    n_tokens = len(np.fromfile(train_only / "train.bin", dtype="<u2"))
    batch_size, seq_len = 64, 64
    loader = prepare.make_dataloader(tokenizer, batch_size, seq_len)
    seen = 0
    while next(loader)[2] == 1:
        seen += batch_size * seq_len
    assert n_tokens - 2 * batch_size * seq_len < seen <= n_tokens


def test_missing_data_says_run_ar_prepare(micro_train, tmp_path):
    prepare = sys.modules["prepare"]
    prepare.DATA_DIR = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match="ar prepare"):
        prepare.Tokenizer.from_directory()


# ---------------------------------------------------------------------------
# Real training runs


def test_micro_training_run_saves_a_model_that_rebuilds(tmp_path, micro_data, monkeypatch):
    ws = _workspace(tmp_path / "ws")
    out = tmp_path / "out"
    result = _run_train(ws, micro_data, out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"step 00001 \([0-9.]+%\) \| loss: [0-9.]+ \|.*\| remaining: \d+s", result.stdout)
    summary = result.stdout.rpartition("\n---\n")[2]
    figures = dict(line.split(":", 1) for line in summary.strip().splitlines())
    assert set(SUMMARY_KEYS) <= set(figures) and "val_bpb" not in result.stdout
    assert float(figures["num_steps"]) > 1 and 2.5 < float(figures["training_seconds"]) < 10
    # Without ar's CPU plan (a manual run) the header says fp32, the precision that is never slow
    assert "Precision: autocast torch.float32 | Muon orthogonalisation torch.float32" in result.stdout

    saved_config = json.loads((out / "config.json").read_text())
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    monkeypatch.syspath_prepend(str(ws))
    monkeypatch.delitem(sys.modules, "prepare", raising=False)
    spec = importlib.util.spec_from_file_location(f"train_{uuid.uuid4().hex}", ws / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    model = train.build_model(saved_config)
    model.load_state_dict(state, strict=True)
    idx = torch.from_numpy(np.fromfile(micro_data / "val.bin", dtype="<u2")[:64].astype(np.int64))[None]
    with torch.no_grad():
        logits = model.eval()(idx)
    assert logits.shape == (1, 64, saved_config["vocab_size"]) and torch.isfinite(logits).all()
    sys.modules.pop("prepare", None)


def test_training_runs_in_the_precision_the_cpu_plan_chose(tmp_path, micro_data):
    ws = _workspace(tmp_path / "ws")
    result = _run_train(ws, micro_data, tmp_path / "out", budget="1",
                        extra_env={"AR_CPU_PRECISION": "bf16", "AR_MUON_PRECISION": "fp32",
                                   "AR_CPU_PRECISION_REASON": "measured faster"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert ("Precision: autocast torch.bfloat16 | Muon orthogonalisation torch.float32 | threads 1 "
            "(measured faster)") in result.stdout


def test_exploding_training_fails_fast_with_a_clear_message(tmp_path, micro_data):
    source = set_constants(render_train_py("micro"), {"EMBEDDING_LR": "float('nan')"})
    ws = _workspace(tmp_path / "ws", train_source=source)
    result = _run_train(ws, micro_data, tmp_path / "out", budget="30")
    assert result.returncode != 0
    assert "FAIL: training loss is nan" in result.stderr
    assert not (tmp_path / "out" / "model.pt").exists()
