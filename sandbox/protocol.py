"""The control channel between the trusted scorer and a confined model worker.

Every message is a fixed 16-byte header, `<4s I Q>`: a 4-byte kind, a 32-bit count and a
64-bit value; a FAIL message is followed by `count` bytes of UTF-8 text. Nothing the
worker sends is unpickled or evaluated: the scorer reads exactly 16 bytes, checks the kind
against a short list, and reads at most MAX_TEXT bytes more. Anything else is a protocol
violation, which the scorer treats as an invalid model.

    scorer -> worker   FWD  rows  0        compute logits for the first `rows` input rows
                       BYE  0     0        exit
    worker -> scorer   IPCH n     offset   (CUDA) followed by n bytes: its logits buffer's IPC
                                           handle in hex; the scorer opens it (sandbox/cudaipc.py)
                       REDY 0     params   the model is loaded (params: its parameter count)
                       DONE rows  0        the logits of `rows` rows are in the buffer
                       FAIL n     0        followed by n bytes of text: why not
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass

HEADER = struct.Struct("<4sIQ")
FWD, BYE = b"FWD ", b"BYE "
READY, DONE, FAIL, IPC_HANDLE = b"REDY", b"DONE", b"FAIL", b"IPCH"
WITH_TEXT = (FAIL, IPC_HANDLE)  # followed by `count` bytes of text
MAX_TEXT = 600  # a reason goes to a terminal and an LLM: a paragraph at most


class ProtocolError(Exception):
    """The other side sent something outside the protocol, went silent, or went away."""


@dataclass(frozen=True)
class Message:
    kind: bytes
    count: int
    value: int
    text: str = ""


def encode(kind: bytes, count: int = 0, value: int = 0, text: str = "") -> bytes:
    data = text.encode("utf-8", errors="replace")[:MAX_TEXT]
    return HEADER.pack(kind, len(data) if kind in WITH_TEXT else count, value) + (
        data if kind in WITH_TEXT else b""
    )


def clean_text(raw: bytes) -> str:
    """Untrusted bytes as one printable line."""
    text = raw.decode("utf-8", errors="replace")
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()[:MAX_TEXT]


def send(fd: int, kind: bytes, count: int = 0, value: int = 0, text: str = "") -> None:
    data = encode(kind, count, value, text)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, needed = [], size
    while needed:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ProtocolError("no answer in time")
        chunk = os.read(fd, needed)
        if not chunk:
            raise ProtocolError("the channel closed")
        chunks.append(chunk)
        needed -= len(chunk)
    return b"".join(chunks)


def receive(fd: int, allowed: tuple[bytes, ...], deadline: float | None = None) -> Message:
    """One message whose kind is in `allowed`; ProtocolError for anything else."""
    kind, count, value = HEADER.unpack(_read_exactly(fd, HEADER.size, deadline))
    if kind not in allowed:
        raise ProtocolError(f"unexpected message kind {kind!r}")
    if kind in WITH_TEXT:
        if count > MAX_TEXT:
            raise ProtocolError(f"a failure text of {count} bytes (at most {MAX_TEXT})")
        return Message(kind, count, value, clean_text(_read_exactly(fd, count, deadline)))
    return Message(kind, count, value)
