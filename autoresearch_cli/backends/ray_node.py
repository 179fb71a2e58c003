"""The node side of the Ray backend: trusted code that runs in a Ray worker process on
the node (backends/ray.py is the driver's side).

SlotActor writes the commit's files to a temp dir, finds this node's copy of the
data and checks it against the driver's hashes (a mismatch is an invalid run, never a
score), then runs `python -m autoresearch_cli.backends.worker_process` as LocalWorkers does: the
same confinement and trusted scorer. It answers with plain bytes and JSON (result.json,
the logs, an ok run's weights); nothing the candidate's code made is returned as an object.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autoresearch_cli.backends.local import last_line, read_result
from autoresearch_cli.errors import DataError

DATA_FILES = ("train.bin", "val.bin", "holdout.bin", "tokenizer.pkl", "token_bytes.npy")
MANIFEST_KEYS = ("dtype", "bos_id", "vocab_size", "splits", "tokenizer_sha256")
STOP_GRACE_S = 15.0  # as LocalWorkers: a worker process killing its job on SIGTERM
BEGIN_WAIT_S = 60.0  # a result asked for before the run was handed over waits this long
IDLE_EXIT_S = 120.0  # a slot actor that nobody touched this long, and runs nothing, exits
RESULT_KEEP_S = 3600.0  # an answer no driver collected is kept this long
IDLE_CHECK_S = 10.0
MAX_LOG_BYTES = 4 << 20  # the tail of a log sent back


def probe_node() -> dict[str, Any]:
    """This node's host name, the cores its processes may use and its GPU models."""
    from autoresearch_cli.backends.base import available_cpus

    names: list[str] = []
    try:
        from sandbox.gpu import nvml

        nv, _ = nvml()
        if nv is not None:
            for index in range(nv.nvmlDeviceGetCount()):
                name = nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(index))
                names.append(name.decode() if isinstance(name, bytes) else str(name))
    except Exception:  # noqa: BLE001 (no NVML, or its own error types)
        names = []
    return {"host": socket.gethostname(), "cores": available_cpus(), "gpu_names": names}


@dataclass
class Run:
    """One experiment of a slot actor."""

    exp_id: int
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] | None = None
    child: subprocess.Popen | None = None
    stopped: bool = False


class SlotActor:
    """One slot of one node (a GPU, or a share of its cores), held for ar: it runs the
    experiments it is handed one at a time and keeps each answer until the driver has
    written it (`release`), so that a restarted driver can still collect it. A live driver
    touches it every few seconds; when none has for IDLE_EXIT_S and it runs nothing, it
    exits and gives the slot back (after RESULT_KEEP_S when an answer is uncollected)."""

    def __init__(self) -> None:
        self._runs: dict[int, Run] = {}
        self._begun = threading.Condition()  # calls run in threads, in any order
        self._active = time.monotonic()
        threading.Thread(target=self._exit_when_idle, daemon=True).start()

    def info(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address()}

    def start(self, exp_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        self.stop()  # a run still going belongs to no driver (one reattaches before starting)
        with self._begun:
            self._runs[exp_id] = run = Run(exp_id)
            self._begun.notify_all()
        threading.Thread(target=self._run, args=(run, payload), daemon=True).start()
        return self.info()

    def touch(self) -> None:
        self._active = time.monotonic()

    def has(self, exp_id: int) -> bool:
        return exp_id in self._runs

    def poll(self, exp_id: int) -> dict[str, Any] | None:
        run = self._runs.get(exp_id)
        return run.progress if run else None

    def result(self, exp_id: int) -> dict[str, Any]:
        with self._begun:
            if not self._begun.wait_for(lambda: exp_id in self._runs, timeout=BEGIN_WAIT_S):
                return {"result": {"status": "interrupted", "val_bpb": None, "requeue": True,
                                   "reason": "the run never began on the cluster"}}
            run = self._runs[exp_id]
        run.done.wait()
        return run.reply

    def release(self, exp_id: int) -> None:
        self._runs.pop(exp_id, None)
        self._active = time.monotonic()

    def stop(self) -> None:
        """SIGTERM to every worker process (each kills its job), SIGKILL after the grace;
        returns once the runs have cleaned up."""
        runs = [run for run in list(self._runs.values()) if not run.done.is_set()]
        for run in runs:
            run.stopped = True
            if run.child is not None and run.child.poll() is None:
                run.child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for run in runs:
            if not run.done.wait(timeout=max(0.1, deadline - time.monotonic())):
                if run.child is not None:
                    run.child.kill()
                run.done.wait(timeout=5)

    def _exit_when_idle(self) -> None:
        while True:
            time.sleep(IDLE_CHECK_S)
            unreleased = any(run.done.is_set() for run in self._runs.values())
            running = any(not run.done.is_set() for run in self._runs.values())
            idle_for = time.monotonic() - self._active
            if not running and idle_for > (RESULT_KEEP_S if unreleased else IDLE_EXIT_S):
                os._exit(0)  # no driver came back for it: give the slot back

    def _run(self, run: Run, payload: dict[str, Any]) -> None:
        info = self.info()
        workdir = Path(tempfile.mkdtemp(prefix="ar-run-"))
        try:
            run.reply = self._experiment(run, payload, workdir, info)
        except Exception as exc:  # noqa: BLE001 (reported as the run's failure)
            run.reply = {"result": {"status": "crash", "val_bpb": None,
                                    "reason": f"ar failed on node {info['host']}: {exc}"}}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        run.reply["result"].update(node=info["host"], node_ip=info["ip"])
        self._active = time.monotonic()
        run.done.set()

    def _experiment(self, run: Run, payload: dict[str, Any], workdir: Path,
                    info: dict[str, Any]) -> dict[str, Any]:
        from autoresearch_cli.backends.worker_process import FAILED_EXIT
        from sandbox.spec import ExperimentSpec

        spec = ExperimentSpec.from_json(payload["spec"])
        try:
            data_dir = node_data_dir(Path(spec.data_dir), payload["manifest"], payload["prepare"])
            problem = verify_data(data_dir, payload["hashes"], payload["manifest"])
        except (DataError, OSError) as exc:
            data_dir, problem = None, f"no usable data: {exc}"
        if problem:
            return {"result": {"status": "invalid", "val_bpb": None, "reason":
                               f"data on node {info['host']} differs from the driver's: {problem}"}}
        code_dir, run_dir = workdir / "code", workdir / "run"
        write_files(code_dir, payload["code"])
        run_dir.mkdir()
        spec = replace(spec, code_dir=str(code_dir), run_dir=str(run_dir), data_dir=str(data_dir),
                       python=sys.executable)
        (run_dir / "spec.json").write_text(spec.to_json())
        cpus = payload["cpus"]
        env = dict(os.environ)
        if cpus:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        if run.stopped:
            return {"result": {"status": "interrupted", "val_bpb": None,
                               "reason": "stopped before it began"}}
        cmd = [sys.executable, *payload["command"], str(run_dir / "spec.json"), str(os.getpid()),
               ",".join(map(str, cpus))]
        with open(run_dir / "worker.log", "ab") as log:
            run.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=log, env=env, cwd=workdir)
        for line in run.child.stdout:
            try:
                run.progress = json.loads(line)
            except ValueError:
                continue
        code = run.child.wait()
        result = read_result(run_dir, code)
        result["slot_class"] = node_slot_class(spec.device, payload["slot_class"])
        reply = {"result": result, "files": run_files(run_dir, result.get("status") == "ok")}
        if code == FAILED_EXIT:
            reply["sandbox_failed"] = last_line(run_dir / "worker.log")
        return reply


def node_slot_class(device: str, planned: str) -> str:
    """The class of the GPU Ray gave this run (CUDA_VISIBLE_DEVICES); on CPU, the plan's."""
    from autoresearch_cli.backends.base import slot_class_of

    gpus = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            if gpu.strip()]
    return slot_class_of("cuda", gpu=gpus[0]) if device != "cpu" and gpus else planned


def run_files(run_dir: Path, with_weights: bool) -> dict[str, bytes]:
    """The run's logs and result.json (the tail of a long log), and out/* when asked."""
    files = {}
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and path.name not in ("job.pid", "spec.json"):
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - MAX_LOG_BYTES))
                files[path.name] = handle.read()
    if with_weights and (run_dir / "out").is_dir():
        for path in sorted((run_dir / "out").rglob("*")):
            if path.is_file() and not path.is_symlink():  # out/ is the job's: no links out
                files[str(path.relative_to(run_dir))] = path.read_bytes()
    return files


def node_data_dir(driver_path: Path, manifest: dict[str, Any], prepare: Any) -> Path:
    """Where this node's copy of the data is: AR_RAY_DATA_DIR, else the driver's path when
    the node sees it (shared storage), else a cache it prepares from the manifest with
    `prepare` (the data door's prepare_data, handed down by the driver)."""
    configured = os.environ.get("AR_RAY_DATA_DIR")
    if configured:
        data_dir = Path(configured)
    elif (driver_path / "manifest.json").is_file():
        return driver_path
    else:
        request = json.dumps({key: manifest.get(key) for key in
                              ("source", "vocab_size", "val_percent", "holdout_percent")},
                             sort_keys=True)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        data_dir = cache / "ar" / "data" / hashlib.sha256(request.encode()).hexdigest()[:16]
    if not (data_dir / "manifest.json").is_file():
        _prepare(data_dir, manifest, prepare)
    return data_dir


def _prepare(data_dir: Path, manifest: dict[str, Any], prepare_data: Any) -> None:
    """`ar prepare` on this node with the driver's parameters (one at a time per node)."""
    while True:
        try:
            prepare_data(data_dir, source=manifest["source"], vocab_size=manifest["vocab_size"],
                         val_percent=manifest["val_percent"],
                         holdout_percent=manifest["holdout_percent"])
            return
        except DataError as exc:
            if "another ar prepare" not in str(exc):
                raise
            time.sleep(2)  # another experiment on this node is preparing it


def verify_data(data_dir: Path, hashes: dict[str, str], manifest: dict[str, Any]) -> str | None:
    """What differs between this node's data and the driver's hashes; None when nothing."""
    try:
        local = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return f"{data_dir} has no readable manifest.json"
    for key in MANIFEST_KEYS:
        if local.get(key) != manifest.get(key):
            return f"manifest.json {key} differs ({data_dir})"
    for name in DATA_FILES:
        path = data_dir / name
        if not path.is_file():
            return f"{name} is missing from {data_dir}"
        got = cached_sha256(path)
        if got != hashes[name]:
            return f"{name} sha256 {got[:12]}… != the driver's {hashes[name][:12]}… ({data_dir})"
    return None


def cached_sha256(path: Path) -> str:
    """A file's sha256, remembered on this node by (path, inode, size, mtime)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ar" / "sha256"
    entry = cache / hashlib.sha256(key.encode()).hexdigest()
    try:
        return entry.read_text().strip()
    except OSError:
        digest = file_sha256(path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        temp = entry.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(digest)
        os.replace(temp, entry)
    except OSError:
        pass  # the next run hashes it again
    return digest


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """The node's run files into the driver's run dir; names that would leave it are skipped."""
    for name, data in files.items():
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not isinstance(data, bytes):
            continue
        target = run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
