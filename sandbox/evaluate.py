"""The trusted evaluation: bits per byte of saved weights, computed by code train.py does not own.

Run as its own process from the installed package, never from the worktree:

    python -I -m sandbox.evaluate --code-dir WORKTREE --weights-dir OUT --data-dir DATA \\
        --eval-tokens N --seq-len T [--device cpu|cuda] [--batch-size B] --out eval.json

train.py is imported only for build_model(config); model.pt is loaded strictly. The model
gets input tokens and nothing else; the cross-entropy comes from its logits here. Probes
reject a model whose earlier logits move when later tokens change, whose rows move each
other, or whose answer to the same batch changes. eval.json is always written; an invalid
result carries a reason, never a score.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sandbox.files import write_json_atomic

# ---------------------------------------------------------------------------
SPLITS = ("val", "holdout")
# How far logits may move where the model must not look, relative to max(1, largest |logit|).
# fp32 on CPU is exact in practice; bf16 autocast on CUDA gets room for kernels that round
# differently. Twice the noise measured by running the same batch twice is added on top.
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}
NOISE_LIMIT = 20  # more run-to-run noise than this many tolerances is not rounding: invalid
CPU_TOKENS_PER_BATCH = 16384  # throughput on two cores grows up to about here (measured)
CUDA_LOGITS_PER_BATCH = 1 << 28  # first try on CUDA: 1 GiB of fp32 logits; halved on OOM
PROBE_ROWS = 4  # val rows the probes perturb; each probe costs one forward of these rows
REASON_CHARS = 600  # reasons go to an LLM and a terminal: a paragraph at most


class InvalidModel(Exception):
    """The code, weights or data cannot give a trustworthy score; the message says why."""


# ---------------------------------------------------------------------------
# Inputs: data, train.py, weights


@dataclass
class Data:
    vocab_size: int
    token_bytes: torch.Tensor  # int64 [vocab_size], 0 for special tokens
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
        raise InvalidModel(f"data directory {data_dir} is unreadable: {_describe(exc)}") from None
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
    return Data(vocab_size, torch.from_numpy(token_bytes.astype(np.int64)), splits)


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


@contextlib.contextmanager
def imported_train(code_dir: Path) -> Iterator[Any]:
    """train.py under a fresh module name, code_dir first on sys.path so that its
    `import prepare` finds the prepare.py beside it. Undone on exit."""
    path = code_dir / "train.py"
    if not path.is_file():
        raise InvalidModel(f"{path} does not exist")
    name = f"_ar_train_{uuid.uuid4().hex}"
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    # A same-named module imported earlier (from another code dir) must not answer for this one.
    shadowed = {
        stem: sys.modules.pop(stem)
        for stem in (p.stem for p in code_dir.glob("*.py"))
        if stem in sys.modules and stem not in sys.stdlib_module_names
    }
    sys.path.insert(0, str(code_dir))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            raise InvalidModel(f"train.py failed to import: {_describe(exc, code_dir)}") from None
        yield module
    finally:
        sys.path[:] = saved_path
        for added in set(sys.modules) - saved_modules:
            if added == name or _inside(
                getattr(sys.modules.get(added), "__file__", None), code_dir
            ):
                sys.modules.pop(added, None)
        sys.modules.update(shadowed)


def load_model(train: Any, weights_dir: Path, device: str, code_dir: Path) -> torch.nn.Module:
    weights_path, config_path = weights_dir / "model.pt", weights_dir / "config.json"
    missing = [p.name for p in (weights_path, config_path) if not p.is_file()]
    if missing:
        raise InvalidModel(
            f"{weights_dir} lacks {' and '.join(missing)}: train.py must end with "
            "prepare.save_for_eval(model, config)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, OSError) as exc:
        raise InvalidModel(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidModel("config.json must hold a JSON object")
    if not callable(getattr(train, "build_model", None)):
        raise InvalidModel("train.py defines no build_model(config) function")
    try:
        model = train.build_model(config)
    except Exception as exc:
        raise InvalidModel(f"build_model(config) raised {_describe(exc, code_dir)}") from None
    if not isinstance(model, torch.nn.Module):
        raise InvalidModel(f"build_model(config) returned {type(model).__name__}, not a Module")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise InvalidModel("build_model(config) returned a model with tensors on the meta device")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidModel(f"model.pt could not be loaded: {_describe(exc)}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InvalidModel("model.pt must hold a state_dict (names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise InvalidModel(
            f"model.pt does not match build_model(config): {_describe(exc)}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# Forward, probes, scoring


def make_forward(model: torch.nn.Module, device: str, vocab_size: int, code_dir: Path) -> Callable:
    """A function inputs [B, T] -> checked float32 logits [B, T, vocab_size]."""

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        # A copy with storage of its own: a view would let the model read the targets beside it.
        idx = inputs.to(device, copy=True)
        autocast = (
            torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
        )
        try:
            with autocast:
                logits = model(idx)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            raise InvalidModel(f"the model's forward raised {_describe(exc, code_dir)}") from None
        if not isinstance(logits, torch.Tensor):
            raise InvalidModel(f"the model returned a {type(logits).__name__}, not a logits tensor")
        expected = [*inputs.shape, vocab_size]
        if list(logits.shape) != expected or not logits.is_floating_point():
            raise InvalidModel(
                f"the model returned {logits.dtype} logits of shape {list(logits.shape)}; "
                f"expected float [B, T, vocab_size] = {expected}"
            )
        # A finite sum proves every logit finite, at a fraction of the cost of isfinite().
        total = logits.sum(dtype=torch.float32).item()
        if not math.isfinite(total) and not bool(torch.isfinite(logits).all()):
            raise InvalidModel("the model returned NaN or Inf logits")
        return logits.to(device=device, dtype=torch.float32)

    return forward


@dataclass
class Probe:
    base: torch.Tensor  # logits of the unchanged probe batch
    max_diff: float  # the largest logit move seen where none is allowed
    tolerance: float
    reason: str | None  # why the model is invalid, or None


def probe(forward: Callable, inputs: torch.Tensor, vocab_size: int, device: str) -> Probe:
    """Change later tokens, then other rows; earlier logits and the other rows must not move."""
    generator = torch.Generator().manual_seed(0)
    half = inputs.shape[1] // 2

    def changed(row_slice: slice, start: int) -> torch.Tensor:
        # Every replaced id differs from the original, so every probed position really changes.
        out = inputs.clone()
        region = out[row_slice, start:]
        shift = torch.randint(1, vocab_size, region.shape, generator=generator, device="cpu")
        out[row_slice, start:] = (region + shift) % vocab_size
        return out

    base = forward(inputs).clone()  # the model may hand back one buffer it refills every call
    floor = TOLERANCE[device] * max(1.0, base.abs().max().item())
    noise = _max_diff(forward(inputs), base)
    tolerance = floor + 2 * noise
    if noise > NOISE_LIMIT * floor:
        return Probe(base, noise, tolerance, f"the model is nondeterministic: the same batch twice "
                     f"gave logits {noise:.3g} apart")  # fmt: skip
    ahead = _max_diff(forward(changed(slice(None), half))[:, :half], base[:, :half])
    if ahead > tolerance:
        return Probe(base, ahead, tolerance, (
            f"the model looks ahead: changing the tokens at positions >= {half} moved the logits "
            f"at earlier positions by {ahead:.3g} (tolerance {tolerance:.3g})"
        ))  # fmt: skip
    across = max(
        _max_diff(forward(changed(slice(0, 1), 0))[1:], base[1:]),
        _max_diff(forward(changed(slice(1, None), 0))[:1], base[:1]),
    )
    if across > tolerance:
        return Probe(base, across, tolerance, (
            f"the model mixes batch rows: changing one row moved another row's logits by "
            f"{across:.3g} (tolerance {tolerance:.3g})"
        ))  # fmt: skip
    return Probe(base, max(ahead, across), tolerance, None)


def token_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats [B, T] from float32 logits [B, T, V]."""
    targets = targets.to(logits.device)
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    if not bool(torch.isfinite(nats).all()):
        raise InvalidModel("the loss is NaN or Inf")
    return nats.view(targets.shape)


def score(forward: Callable, inputs, targets, token_bytes, batch_size: int) -> tuple[float, int]:
    """Bits per byte over all rows, and the batch size that fit.

    Targets of zero bytes (special tokens) are left out. The batch size halves whenever a
    batch runs out of GPU memory.
    """
    total_nats = torch.zeros((), dtype=torch.float64)
    total_bytes = 0
    start = 0
    while start < len(inputs):
        try:
            logits = forward(inputs[start : start + batch_size])
            batch_targets = targets[start : start + batch_size].to(logits.device)
            target_bytes = token_bytes.to(logits.device)[batch_targets]
            nats = token_nats(logits, batch_targets)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            continue
        total_nats += (nats.double() * (target_bytes > 0)).sum().cpu()
        total_bytes += int(target_bytes.sum())
        start += batch_size
        del logits, nats  # before the next forward, not after it: one batch of logits at a time
    if total_bytes == 0:
        raise InvalidModel("the scored tokens hold no bytes (only special tokens)")
    return total_nats.item() / math.log(2) / total_bytes, batch_size


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
) -> dict[str, Any]:
    """Score the model in weights_dir on the val and holdout splits: the eval.json dict.

    Never raises for a bad model, bad weights or bad data: status "invalid" with a reason.
    """
    started = time.monotonic()
    result: dict[str, Any] = {
        "status": "invalid", "reason": None, "val_bpb": None, "holdout_bpb": None,
        "val_tokens": 0, "holdout_tokens": 0, "eval_tokens_requested": int(eval_tokens),
        "num_params_M": None, "causality_max_diff": None, "seconds": 0.0, "note": "",
    }  # fmt: skip
    try:
        paths = Path(code_dir).resolve(), Path(weights_dir), Path(data_dir)
        _evaluate(*paths, int(eval_tokens), int(seq_len), device, batch_size, result)
        result["status"] = "ok"
    except InvalidModel as exc:
        result["reason"] = _clip(str(exc))
    except torch.cuda.OutOfMemoryError:
        result["reason"] = "the evaluation ran out of GPU memory, even at batch size 1"
    except Exception as exc:
        result["reason"] = f"the evaluation failed: {_describe(exc)}"
    if result["status"] != "ok":
        result["val_bpb"] = result["holdout_bpb"] = None
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _evaluate(code_dir, weights_dir, data_dir, eval_tokens, seq_len, device, batch_size, result):
    if eval_tokens < 1 or seq_len < 2 or (batch_size or 1) < 1 or device not in TOLERANCE:
        raise InvalidModel(
            f"bad arguments: eval_tokens {eval_tokens}, seq_len {seq_len}, "
            f"batch_size {batch_size}, device {device!r}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidModel("device cuda was asked for but CUDA is not available")
    data = load_data(data_dir)
    split_rows = {}
    for name in SPLITS:
        split_rows[name] = rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name)
        note = _shortfall(name, eval_tokens, len(data.splits[name]), split_rows[name][0].numel())
        result["note"] = "; ".join(filter(None, [result["note"], note]))
    with imported_train(code_dir) as train:
        model = load_model(train, weights_dir, device, code_dir)
        result["num_params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 6)
        forward = make_forward(model, device, data.vocab_size, code_dir)
        with torch.inference_mode():
            bpb = _scores(forward, data, split_rows, device, batch_size, seq_len, result)
    result["val_bpb"], result["holdout_bpb"] = bpb["val"], bpb["holdout"]


def _scores(forward, data, split_rows, device, batch_size, seq_len, result) -> dict[str, float]:
    """Probe on the first val rows, score both splits, then check the probe rows again."""
    probe_inputs, probe_targets = (t[:PROBE_ROWS] for t in split_rows["val"])
    checked = probe(
        forward, _two_rows_at_least(probe_inputs, data.vocab_size), data.vocab_size, device
    )
    result["causality_max_diff"] = checked.max_diff
    if checked.reason:
        raise InvalidModel(checked.reason)
    probe_nats = token_nats(checked.base[: len(probe_inputs)], probe_targets)
    tolerance = checked.tolerance
    del checked
    bpb = {}
    batch_size = batch_size or pick_batch_size(device, seq_len, data.vocab_size)
    for name in SPLITS:
        inputs, targets = split_rows[name]
        bpb[name], batch_size = score(forward, inputs, targets, data.token_bytes, batch_size)
        result[f"{name}_tokens"] = inputs.numel()
    # A model that keeps state between calls answers the probe rows differently by now.
    again = _max_diff(token_nats(forward(probe_inputs), probe_targets), probe_nats)
    if again > 2 * tolerance:  # a logit move of d moves a token's loss by at most 2d
        raise InvalidModel(
            f"the model is stateful: the first val rows scored again after the rest moved their "
            f"per-token loss by {again:.3g} (tolerance {2 * tolerance:.3g})"
        )
    return bpb


def _two_rows_at_least(inputs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One row cannot show rows leaking into each other: the probe gets a random second one."""
    if len(inputs) > 1:
        return inputs
    extra = torch.randint(0, vocab_size, inputs.shape, generator=torch.Generator().manual_seed(1))
    return torch.cat([inputs, extra])


def _shortfall(name: str, requested: int, split_tokens: int, scored: int) -> str | None:
    if scored >= requested:
        return None
    why = f"the split holds only {split_tokens}" if split_tokens <= requested else "whole rows only"
    return f"{name}: scored {scored} of {requested} requested tokens ({why})"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _inside(filename: str | None, directory: Path) -> bool:
    return filename is not None and Path(filename).resolve().is_relative_to(directory)


def _describe(exc: BaseException, code_dir: Path | None = None) -> str:
    """`Type: message`, with the line in code_dir where it was raised, if it was."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if code_dir and _inside(f.filename, code_dir)
    ]
    if frames:
        text += f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})"
    return _clip(text)


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
    add("--out", required=True, type=Path, help="where to write eval.json")
    args = parser.parse_args(argv)
    result = evaluate(
        args.code_dir, args.weights_dir, args.data_dir, args.eval_tokens, args.seq_len,
        args.device, args.batch_size,
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
