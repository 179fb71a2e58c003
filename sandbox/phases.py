"""Where a job's wall time went, as ar's clock saw it: the phases a job reports.

A job may say which phase it enters by writing the phase's name and a newline to the
descriptor named by AR_PHASE_FD (the workspace's prepare.py does; sandbox/runner.py opens
the pipe when asked to):

    setup   the interpreter and imports are done (prepare.py was imported)
    train   the first training step billed to the budget begins (the warm-up is over)
    save    training ended: the weights are being saved

ar records the moment it *reads* each name, on its own clock, in seconds after it started
the job; from these come the run's phases (experiment.py): start (to setup), warm-up and
compile (to train), train (to save) and save (to the exit). What a job says is untrusted
and changes nothing but this record: only the names above count, each once and in this
order, at most MAX_BYTES are read, and the hard kill stays ar's own clock (budget plus the
startup allowance from the start), so that a job claiming to be "compiling" for longer buys
no time. A job that says nothing has one phase, from start to exit.
"""

from __future__ import annotations

import os
import time

PHASE_VARIABLE = "AR_PHASE_FD"
PHASES = ("setup", "train", "save")
MAX_BYTES = 256  # what ar reads from a job's phase pipe, at most; then it stops listening


class PhaseChannel:
    """The pipe a job reports its phases on, and when ar saw each."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.listening = True  # False once exhausted (MAX_BYTES, or every writer gone)
        self._started = time.monotonic()
        self._seen: dict[str, float] = {}
        self._partial = b""
        self._taken = 0

    def started(self, when: float) -> None:
        """The job holds the write end now (from `when` on, ar's clock)."""
        self._started = when
        os.close(self.write_fd)
        self.write_fd = -1

    def read(self) -> None:
        """Take what the job wrote since the last call, timestamped now."""
        if not self.listening:
            return
        try:
            chunk = os.read(self.read_fd, MAX_BYTES - self._taken)
        except BlockingIOError:
            return
        now = time.monotonic()
        self._taken += len(chunk)
        if not chunk or self._taken >= MAX_BYTES:
            self.listening = False  # the caller stops polling it, then calls stop()
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        self._partial = self._partial[-16:]
        for line in lines:
            self._note(line.strip().decode("ascii", errors="replace"), now)

    def _note(self, name: str, now: float) -> None:
        if name not in PHASES or name in self._seen:
            return
        latest = max((PHASES.index(seen) for seen in self._seen), default=-1)
        if PHASES.index(name) > latest:
            self._seen[name] = round(now - self._started, 3)

    def stop(self) -> None:
        """Stop listening: the job's next write fails at once instead of filling the pipe."""
        self.listening = False
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def seen(self) -> dict[str, float]:
        """Phase -> seconds after the start at which ar read it."""
        self.read()
        return dict(self._seen)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1
        self.listening = False


def durations(seen: dict[str, float], ended: float) -> dict[str, float]:
    """start, warmup, train, save in seconds from the marks ar saw and the job's end (all
    after the start); a phase the job never reported is part of the one before it."""
    marks = [("start", 0.0)] + [(name, seen[name]) for name in PHASES if name in seen]
    names = {"start": "start", "setup": "warmup", "train": "train", "save": "save"}
    spans = {}
    for (name, begin), (_, end) in zip(marks, [*marks[1:], ("end", ended)], strict=True):
        spans[names[name]] = round(max(0.0, end - begin), 3)
    return spans
