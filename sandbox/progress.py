"""The job's log as ar sees it: live progress, a bounded size, the tail.

The job writes its log file directly (stdout and stderr point at it), so ar never holds
a pipe that an orphaned grandchild could keep open. Everything here works on the
descriptor ar opened before the job started, in bounded pieces: a job printing gigabytes
costs ar a fixed amount of memory, and a job that swaps the file's name for a FIFO or a
symlink cannot make ar block or read elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import SandboxError

# The progress line of train.py (docs/internals.md); lines may end in \r instead of \n.
STEP_LINE = re.compile(
    rb"step\s+(\d+)\s*\(\s*([0-9.]+)%\)\s*\|\s*loss:\s*([-+0-9.eEnaif]+)"
    rb".*?\|\s*remaining:\s*([0-9.]+)\s*s"
)
LINE_BREAK = re.compile(rb"[\r\n]")
FOLLOW_WINDOW = 64 * 1024  # bytes of new output looked at per poll; older ones are skipped
TAIL_BYTES = 64 * 1024  # bytes read from the end of the log for the tail
TAIL_LINES = 50
MAX_LINE_CHARS = 500  # a longer line in the tail is cut
COPY_CHUNK = 1024 * 1024
SLACK = 4096  # a log may exceed its cap by this much (the marker line) before it is cut


def create_log(path: Path) -> int:
    """A fresh regular file, whatever a previous job left at that name; read-write, append mode."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise SandboxError(f"cannot create the log {path}: {exc}") from exc


@dataclass(frozen=True)
class Progress:
    step: int
    percent: float
    loss: float
    seconds_left: float


def parse_step(line: bytes | str) -> Progress | None:
    """The progress in one log line, or None when it is not a step line."""
    if isinstance(line, str):
        line = line.encode("utf-8", errors="replace")
    match = STEP_LINE.search(line)
    if not match:
        return None
    try:
        return Progress(int(match[1]), float(match[2]), float(match[3]), float(match[4]))
    except ValueError:
        return None


class LogFollower:
    """Reads what the job appended since the last call and finds its latest step line."""

    def __init__(self, fd: int):
        self._fd = fd
        self._offset = 0
        self._partial = b""

    def poll(self) -> Progress | None:
        size = os.fstat(self._fd).st_size
        if size < self._offset:  # the log was trimmed under us
            self._offset, self._partial = size, b""
        if size - self._offset > FOLLOW_WINDOW:
            self._offset, self._partial = size - FOLLOW_WINDOW, b""
        if size == self._offset:
            return None
        chunk = os.pread(self._fd, size - self._offset, self._offset)
        self._offset += len(chunk)
        lines = LINE_BREAK.split(self._partial + chunk)
        self._partial = lines.pop()[-FOLLOW_WINDOW:]
        for line in reversed(lines):
            progress = parse_step(line)
            if progress:
                return progress
        return None


def read_tail(fd: int, max_lines: int = TAIL_LINES) -> str:
    """The last lines of the log as a terminal would show them: a \\r line keeps its last state."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES))
    lines = data.split(b"\n")
    if size > TAIL_BYTES and len(lines) > 1:
        lines = lines[1:]  # the first one is cut
    if lines and lines[-1] == b"":
        lines.pop()
    shown = []
    for raw in lines[-max_lines:]:
        text = raw.rstrip(b"\r").rsplit(b"\r", 1)[-1].decode("utf-8", errors="replace")
        shown.append(text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS] + " [...]")
    return "\n".join(shown)


def _marker(dropped: int, cap: int) -> bytes:
    return (
        f"\n[sandbox] the log is capped at {cap / 2**20:.0f} MB: "
        f"{dropped / 2**20:.1f} MB of output were dropped here\n"
    ).encode()


def drop_middle(fd: int, cap: int, dropped: int) -> int:
    """While the job runs: cut the log back to its first half-cap bytes and mark the cut.

    The job's descriptor is in append mode, so its next write lands after the marker.
    Returns the total number of bytes dropped so far.
    """
    size = os.fstat(fd).st_size
    head = cap // 2
    if size <= cap + SLACK:
        return dropped
    os.ftruncate(fd, head)
    dropped += size - head
    os.write(fd, _marker(dropped, cap))
    return dropped


def keep_head_and_tail(fd: int, cap: int, dropped: int) -> int:
    """Once the job is gone: keep the first and the last half-cap bytes, drop the middle.

    Returns the total number of bytes dropped.
    """
    size = os.fstat(fd).st_size
    half = cap // 2
    if size <= cap + SLACK:
        return dropped
    cut = size - half - half
    marker = _marker(dropped + cut, cap)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_APPEND)  # in append mode pwrite ignores offsets
    try:
        os.pwrite(fd, marker, half)
        write_at = half + len(marker)
        read_at = size - half  # ahead of write_at: the copy moves bytes towards the start
        while read_at < size:
            chunk = os.pread(fd, min(COPY_CHUNK, size - read_at), read_at)
            if not chunk:
                break
            os.pwrite(fd, chunk, write_at)
            read_at += len(chunk)
            write_at += len(chunk)
        os.ftruncate(fd, write_at)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return dropped + cut


def append_lines(fd: int, lines: list[str]) -> None:
    """Add lines at the end of the log, on a line of their own."""
    if not lines:
        return
    size = os.fstat(fd).st_size
    last = os.pread(fd, 1, size - 1) if size else b"\n"
    text = "".join(line + "\n" for line in lines).encode()
    try:
        os.write(fd, text if last == b"\n" else b"\n" + text)
    except OSError:  # a full disk: the caller still holds the lines
        pass


def restore_name(fd: int, path: Path) -> str | None:
    """Put the log back under its name if the job replaced it; a note when that was needed.

    Readers open the log by name afterwards, and a FIFO in its place would hang them.
    """
    ours = os.fstat(fd)
    try:
        there = os.stat(path, follow_symlinks=False)
        if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
            return None
    except FileNotFoundError:
        pass
    try:
        spare_fd, spare = tempfile.mkstemp(dir=path.parent, prefix=".log-")
        with open(spare_fd, "wb") as handle:
            offset = 0
            while chunk := os.pread(fd, COPY_CHUNK, offset):
                handle.write(chunk)
                offset += len(chunk)
        os.replace(spare, path)
    except OSError as exc:
        return f"the job replaced its log file and ar could not put it back: {exc}"
    return "the job replaced its log file; ar put the log back"
