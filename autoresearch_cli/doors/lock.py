"""The experiment lock: one ar command at a time runs experiments in a workspace."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import Any

from autoresearch_cli.errors import BusyError, WorkspaceError


def lock_path(workspace: Path) -> Path:
    return Path(workspace) / ".ar" / "experiment.lock"


class ExperimentLock:
    """One ar command at a time runs experiments in a workspace.

    An flock on `.ar/experiment.lock`: the kernel drops it when the holder dies, so a
    killed ar never leaves a stale lock. The file names the holder for the error message.
    """

    def __init__(self, path: str | os.PathLike[str], command: str | None = None):
        self.path = Path(path)
        self.command = command or " ".join(["ar", *sys.argv[1:2]])
        self._handle: Any = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise WorkspaceError(f"cannot open the lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().split("\n", 1)
            handle.close()
            pid = holder[0].strip() or "unknown"
            command = holder[1].strip() if len(holder) > 1 and holder[1].strip() else "ar"
            raise BusyError(f"another ar command (pid {pid}: {command}) is running "
                            "experiments in this workspace") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n{self.command}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        self._handle.truncate(0)
        self._handle.flush()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> ExperimentLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
