"""A confined model worker as the trusted scorer sees it: its buffers, pipes and process.

The worker itself (sandbox/worker.py) imports train.py and runs the model; this side
starts it confined, hands it input rows through shared memory it allocated, and takes
back the logits: on CPU from a shared-memory buffer it allocated, on CUDA from a device
buffer the worker exported (sandbox/cudaipc.py). Either buffer stays writable by the
worker, so collect() copies each batch out once, into memory of its own, as soon as the
worker says DONE: whatever the worker writes afterwards changes nothing.

torch is imported inside the methods that need it: the scorer starts its workers before
it imports torch, so that their imports overlap with its own.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sandbox import confine, cudaipc, protocol, warm
from sandbox.errors import InvalidModel
from sandbox.probes import WORKERS

# The scorer's variables a worker inherits; HOME and TMPDIR are its own private tmp.
WORKER_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
              "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
              "OPENBLAS_NUM_THREADS", "AR_CPU_PRECISION", "ATEN_CPU_CAPABILITY",
              "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # fmt: skip


def _shared_buffer(size: int, name: str) -> tuple[int, mmap.mmap]:
    """A memfd and this process's mapping of it. The worker maps the memfd itself (handed
    by pass_fds only); the mapping here is never inherited: a worker forked from this
    process later (sandbox/warm.py) would otherwise hold its sibling's inputs and logits."""
    fd = os.memfd_create(name, 0)  # not inheritable
    os.ftruncate(fd, size)
    buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    buffer.madvise(mmap.MADV_DONTFORK)
    return fd, buffer


class Worker:
    """One confined model worker: its buffers, its control pipes, its process."""

    def __init__(self, index: int, code_dir: Path, weights_dir: Path, device: str, rows: int,
                 seq_len: int, vocab: int, log_dir: Path, confined: bool,
                 fork: bool = False):  # fmt: skip
        self.index, self.device = index, device
        self.shape = (rows, seq_len, vocab)
        self._count = 0
        self._fds: list[int] = []
        in_fd, self._inputs_map = _shared_buffer(rows * seq_len * 8, f"ar-inputs-{index}")
        self._fds.append(in_fd)
        args = ["--inputs-fd", str(in_fd)]
        if device != "cuda":  # on CUDA the worker allocates its logits buffer and exports it
            out_fd, self._logits_map = _shared_buffer(rows * seq_len * vocab * 4,
                                                      f"ar-logits-{index}")  # fmt: skip
            self._fds.append(out_fd)
            args += ["--logits-fd", str(out_fd)]
        to_worker_r, self._to_worker = os.pipe()
        self._from_worker, from_worker_w = os.pipe()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ar-worker-{index}-"))
        self.log_path = log_dir / f"worker-{index}.log"
        # -I ignores PYTHONPATH: the worker finds `sandbox` through a directory it may read
        # (an editable install's repository root is not readable under confinement)
        # os._exit: the scorer waits for the worker's exit, and an interpreter's teardown with
        # torch loaded takes a third of a second
        view = confine.import_dir(log_dir)
        start = (f"import os, sys; sys.path.insert(0, {str(view)!r}); from sandbox.worker import main; "
                 "code = main(); sys.stdout.flush(); sys.stderr.flush(); os._exit(code)")
        cmd = [
            sys.executable, "-I", "-c", start, "--code-dir", str(code_dir),
            "--weights-dir", str(weights_dir), "--device", device, "--rows", str(rows),
            "--seq-len", str(seq_len), "--vocab", str(vocab), "--ctl-in", str(to_worker_r),
            "--ctl-out", str(from_worker_w), *args,
        ]  # fmt: skip
        self.isolation, self.isolation_note = "none", "confinement was not asked for"
        if confined:
            cmd, self.isolation, self.isolation_note = _confined(
                cmd, (code_dir, weights_dir, view), self.tmp, device
            )
        pass_fds = (*self._fds, to_worker_r, from_worker_w)
        with open(self.log_path, "ab") as log:
            self.process = self._start(cmd, log.fileno(), pass_fds, fork and confined)
        os.close(to_worker_r)
        os.close(from_worker_w)

    def _start(self, cmd: list[str], log: int, pass_fds: tuple[int, ...], fork: bool):
        """The worker's process: a fork of this warm process (the launcher's options applied
        by the same code, before the candidate's code runs: sandbox/warm.py), or a new one."""
        if fork and self.device == "cpu":
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return warm.fork_launch(cmd, str(self.tmp), self._env(), (null, log, log), pass_fds)
            finally:
                os.close(null)
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=self._env(), cwd=self.tmp, pass_fds=pass_fds,
                                start_new_session=True)  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
        env.update(HOME=str(self.tmp), TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1")
        if self.device == "cpu":  # the workers compute at the same time: each gets its share
            threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
            share = str(max(1, threads // WORKERS))
            env.update(OMP_NUM_THREADS=share, MKL_NUM_THREADS=share)
        return env

    def wait_ready(self, deadline: float) -> int:
        """Wait until the worker has loaded the model; its parameter count, as it says."""
        import torch

        if self.device == "cuda":
            shared = self._receive((protocol.IPC_HANDLE, protocol.FAIL), deadline)
            try:
                self.logits = cudaipc.open_buffer(bytes.fromhex(shared.text), shared.value,
                                                  self.shape, torch)  # fmt: skip
            except (ValueError, cudaipc.CudaIpcError) as exc:
                raise InvalidModel(f"model worker {self.index} shared no usable buffer: {exc}") from None
        message = self._receive((protocol.READY, protocol.FAIL), deadline)
        self.inputs = torch.from_numpy(
            np.frombuffer(self._inputs_map, dtype=np.int64).reshape(self.shape[:2])
        )
        if self.device != "cuda":
            self.logits = torch.from_numpy(
                np.frombuffer(self._logits_map, dtype=np.float32).reshape(self.shape)
            )
        self._copy = torch.empty(self.shape, dtype=torch.float32, device=self.logits.device)
        return int(message.value)

    def submit(self, batch: Any) -> None:
        """Ask for the logits of input rows [B, T]; collect() waits for them."""
        self._count = len(batch)
        self.inputs[: self._count].copy_(batch)
        protocol.send(self._to_worker, protocol.FWD, self._count)

    def collect(self, deadline: float) -> Any:
        """The logits [B, T, V] of the last submit(), copied once out of the buffer the
        worker can write into this process's own memory: valid until the next collect()."""
        import torch

        message = self._receive((protocol.DONE, protocol.FAIL), deadline)
        if message.count != self._count:
            raise InvalidModel(f"model worker {self.index} broke the protocol")
        logits = self._copy[: self._count]
        logits.copy_(self.logits[: self._count])
        if self.device == "cuda":  # the copy is done before the worker may write again
            torch.cuda.current_stream().synchronize()
        return logits

    def _receive(self, allowed: tuple[bytes, ...], deadline: float) -> protocol.Message:
        try:
            message = protocol.receive(self._from_worker, allowed, deadline)
        except protocol.ProtocolError as exc:
            raise InvalidModel(self._died(str(exc))) from None
        if message.kind == protocol.FAIL:
            raise InvalidModel(message.text or "the model worker failed")
        return message

    def _died(self, what: str) -> str:
        code = self.process.poll()
        status = f"exited with code {code}" if code is not None else f"did not answer ({what})"
        tail = _log_tail(self.log_path)
        return f"the model worker {status}" + (f": {tail}" if tail else "")

    def say_bye(self) -> None:
        try:
            protocol.send(self._to_worker, protocol.BYE)
        except OSError:
            pass

    def close(self) -> None:
        """After say_bye(): wait for the worker to exit (kill it after 2 s), free the rest."""
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (*self._fds, self._to_worker, self._from_worker):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _confined(cmd: list[str], readable: tuple[Path, ...], tmp: Path,
              device: str) -> tuple[list[str], str, str]:  # fmt: skip
    """The worker's command inside the kernel's confinement: it reads its code, weights and
    the Python environment, writes only its private tmp, reaches no network."""
    confinement = confine.Confinement(
        read=tuple(map(str, readable)), write=(str(tmp),), gpu=device == "cuda"
    )
    # CUDA's IPC handles open only within one PID namespace: a CUDA worker shares the
    # scorer's, where the scorer's hidepid /proc and Landlock hide the workers from each other.
    applied = confine.plan(confinement, network=False, pid_namespace=device != "cuda")
    wrapped = confine.launch_cmd(
        applied, cmd, fsize_bytes=64 * 2**20, nofile=1024, parent_pid=os.getpid()
    )
    return wrapped, applied.level, applied.note


def _log_tail(path: Path, max_bytes: int = 4096) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            lines = handle.read().decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return protocol.clean_text(lines[-1].encode()) if lines else ""
