"""The model worker: the only process of the evaluation that runs the candidate's code.

Started confined by the scorer (sandbox/evaluate.py), never by hand:

    python -I -m sandbox.worker --code-dir D --weights-dir W --device cpu|cuda --rows B
        --seq-len T --vocab V --ctl-in FD --ctl-out FD --inputs-fd FD [--logits-fd FD]

It imports train.py, rebuilds the model with build_model(config), loads model.pt, says
READY, then answers each FWD request: it reads the input rows from the buffer the scorer
allocated, runs the model and writes float32 logits into the logits buffer the scorer
allocated (shared memory on CPU; on CUDA a device buffer this worker allocates and exports
through CUDA IPC for the scorer to open, so the logits never leave the GPU). It never sees a target or a split file, and nothing it says
is trusted: the scorer computes every number itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import sys
import traceback
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sandbox import cudaipc, protocol

REASON_CHARS = protocol.MAX_TEXT


class WorkerError(Exception):
    """The code or weights cannot be evaluated; the message says why (sent as FAIL)."""


# ---------------------------------------------------------------------------
# Loading train.py and the weights


@contextlib.contextmanager
def imported_train(code_dir: Path) -> Iterator[Any]:
    """train.py under a fresh module name, code_dir first on sys.path so that its
    `import prepare` finds the prepare.py beside it."""
    path = code_dir / "train.py"
    if not path.is_file():
        raise WorkerError(f"{path} does not exist")
    name = f"_ar_train_{uuid.uuid4().hex}"
    sys.path.insert(0, str(code_dir))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise WorkerError(f"train.py failed to import: {describe(exc, code_dir)}") from None
    yield module


def load_model(train: Any, weights_dir: Path, device: str, code_dir: Path) -> torch.nn.Module:
    weights_path, config_path = weights_dir / "model.pt", weights_dir / "config.json"
    missing = [p.name for p in (weights_path, config_path) if not p.is_file()]
    if missing:
        raise WorkerError(
            f"{weights_dir} lacks {' and '.join(missing)}: train.py must end with "
            "prepare.save_for_eval(model, config)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, OSError) as exc:
        raise WorkerError(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise WorkerError("config.json must hold a JSON object")
    if not callable(getattr(train, "build_model", None)):
        raise WorkerError("train.py defines no build_model(config) function")
    try:
        model = train.build_model(config)
    except Exception as exc:
        raise WorkerError(f"build_model(config) raised {describe(exc, code_dir)}") from None
    if not isinstance(model, torch.nn.Module):
        raise WorkerError(f"build_model(config) returned {type(model).__name__}, not a Module")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise WorkerError("build_model(config) returned a model with tensors on the meta device")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WorkerError(f"model.pt could not be loaded: {describe(exc)}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WorkerError("model.pt must hold a state_dict (names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise WorkerError(f"model.pt does not match build_model(config): {describe(exc)}") from None
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# The buffers the scorer allocated


def map_cpu(fd: int, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    view = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.from_numpy(
        np.frombuffer(view, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    )


# ---------------------------------------------------------------------------
# Serving


def forward_into(model: torch.nn.Module, inputs: torch.Tensor, out: torch.Tensor,
                 device: str, vocab: int, code_dir: Path) -> None:  # fmt: skip
    idx = inputs.to(device, copy=True)  # storage of its own: the buffer stays the scorer's
    autocast = (
        torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), autocast:
            logits = model(idx)
    except Exception as exc:
        raise WorkerError(f"the model's forward raised {describe(exc, code_dir)}") from None
    if not isinstance(logits, torch.Tensor):
        raise WorkerError(f"the model returned a {type(logits).__name__}, not a logits tensor")
    expected = [*inputs.shape, vocab]
    if list(logits.shape) != expected or not logits.is_floating_point():
        raise WorkerError(
            f"the model returned {logits.dtype} logits of shape {list(logits.shape)}; "
            f"expected float [B, T, vocab_size] = {expected}"
        )
    out.copy_(logits.detach())
    if device == "cuda":
        torch.cuda.synchronize()  # the scorer reads the buffer as soon as it hears DONE


def serve(args: argparse.Namespace) -> None:
    code_dir, weights_dir = Path(args.code_dir).resolve(), Path(args.weights_dir)
    rows, seq_len, vocab = args.rows, args.seq_len, args.vocab
    inputs = map_cpu(args.inputs_fd, (rows, seq_len), np.int64)
    if args.device == "cuda":  # allocated here and exported: the scorer opens it
        logits = torch.empty((rows, seq_len, vocab), dtype=torch.float32, device="cuda")
        handle, offset = cudaipc.export(logits)
        protocol.send(args.ctl_out, protocol.IPC_HANDLE, 0, offset, handle.hex())
    else:
        logits = map_cpu(args.logits_fd, (rows, seq_len, vocab), np.float32)
    with imported_train(code_dir) as train:
        model = load_model(train, weights_dir, args.device, code_dir)
        params = sum(p.numel() for p in model.parameters())
        protocol.send(args.ctl_out, protocol.READY, 0, params)
        while True:
            request = protocol.receive(args.ctl_in, (protocol.FWD, protocol.BYE))
            if request.kind == protocol.BYE:
                return
            count = request.count
            if not 1 <= count <= rows:
                raise WorkerError(f"asked for {count} rows; the buffer holds {rows}")
            forward_into(model, inputs[:count], logits[:count], args.device, vocab, code_dir)
            protocol.send(args.ctl_out, protocol.DONE, count)


def describe(exc: BaseException, code_dir: Path | None = None) -> str:
    """`Type: message`, with the line in code_dir where it was raised, if it was."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if code_dir and f.filename and Path(f.filename).resolve().is_relative_to(code_dir)
    ]  # fmt: skip
    if frames:
        text += f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.worker")
    add = parser.add_argument
    add("--code-dir", required=True)
    add("--weights-dir", required=True)
    add("--device", default="cpu", choices=("cpu", "cuda"))
    add("--rows", required=True, type=int)
    add("--seq-len", required=True, type=int)
    add("--vocab", required=True, type=int)
    add("--ctl-in", required=True, type=int)
    add("--ctl-out", required=True, type=int)
    add("--inputs-fd", required=True, type=int)
    add("--logits-fd", type=int, default=-1)
    args = parser.parse_args(argv)
    try:
        serve(args)
    except WorkerError as exc:
        protocol.send(args.ctl_out, protocol.FAIL, text=str(exc))
        return 1
    except protocol.ProtocolError:
        return 1  # the scorer went away
    except torch.cuda.OutOfMemoryError:
        protocol.send(args.ctl_out, protocol.FAIL, text="the model ran out of GPU memory")
        return 1
    except Exception as exc:  # anything else: the model is at fault, say what happened
        protocol.send(args.ctl_out, protocol.FAIL, text=f"the model worker failed: {describe(exc)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
