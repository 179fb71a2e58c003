"""What a repair is told about a failed run: only what ar extracted, never the raw log.

A crashed job's log is the job's own output: it may hold anything the job could read,
printed on purpose for the model server to receive. The repair prompt therefore carries
only:

- ar's own reason (its monitors: the hard time limit, the memory cap, an exit code);
- from the last Python traceback in the log: the frames that point into train.py, each
  as "train.py line N" followed by that line as it stands in the commit ar made (not as
  the log says), and the exception's type and message, cut to MESSAGE_CHARS.

Everything passes through doors/text.py first: no escape sequences, no control bytes.
"""

from __future__ import annotations

import re

from autoresearch_cli.doors.text import one_line

MESSAGE_CHARS = 300  # of the exception's message: enough to fix a bug, little to smuggle
MAX_FRAMES = 8
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')
_EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning)\w*)"
                        r"(?::\s?(?P<message>.*))?$")


def failure_report(reason: str | None, log_tail: str | None, train_py: str) -> str:
    """The failure as the repair prompt gives it (see the module's docstring)."""
    lines = [f"ar's reason: {one_line(_ar_reason(reason), MESSAGE_CHARS)}"]
    frames, exception = _last_traceback(log_tail or "")
    source = train_py.splitlines()
    for number in frames[-MAX_FRAMES:]:
        code = source[number - 1].strip() if 0 < number <= len(source) else ""
        lines.append(f"  train.py line {number}: {one_line(code, 160)}")
    if exception:
        lines.append(f"exception: {one_line(exception, MESSAGE_CHARS)}")
    return "\n".join(lines)


def _ar_reason(reason: str | None) -> str:
    """ar's words without the log line some reasons quote ("...: <last log line>")."""
    text = reason or "the run failed"
    for prefix in ("train.py exited with code", "train.py died from a signal"):
        if text.startswith(prefix):
            return text.split(":", 1)[0]
    return text


def _last_traceback(log: str) -> tuple[list[int], str | None]:
    """Line numbers of the train.py frames of the last traceback, and its exception line."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return [], None
    frames, exception = [], None
    for line in lines[starts[-1] + 1:]:
        frame = _FRAME.match(line)
        if frame:
            if frame.group("file").endswith("train.py"):
                frames.append(int(frame.group("line")))
            continue
        found = _EXCEPTION.match(line.strip())
        if found and not line.startswith(" "):
            exception = line.strip()
    return frames, exception
