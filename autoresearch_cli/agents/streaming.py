"""One streamed model call through litellm, ended at its time limit or on Ctrl-C.

A watchdog thread ends the call at its deadline even when the server sends nothing: it
shuts the connection's socket down, which wakes the blocked read and tells the server that
the client is gone (llama.cpp, vLLM and Ollama stop generating on a closed connection).
Whatever arrived before the end is kept. While no token has come yet the watchdog reports
the wait, so a model reading a long prompt is not mistaken for a hung one.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from autoresearch_cli.agents.base import OnStream

PROGRESS_EVERY_S = 0.5  # between progress reports while tokens arrive
WAITING_EVERY_S = 5.0  # between reports while no token has arrived yet


@dataclass
class StreamedReply:
    """What one streamed call brought back, however it ended."""

    content: str
    ended_by: str  # one of agents.ENDED_BY
    seconds: float
    tokens: int = 0  # content chunks received: one token each from local servers
    usage: Any = None  # the server's usage report, when it sent one
    chunks: list[Any] = field(default_factory=list)
    error: BaseException | None = None  # the failure, when ended_by is "error"
    streamed: bool = False  # the response had begun: a failure now is a dropped stream


class Watchdog:
    """Ends a call at its deadline from its own thread; reports the wait for the first token."""

    def __init__(self, limit_s: float, limit_name: str, on_stream: OnStream | None) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + limit_s
        self.limit_name = limit_name
        self.on_stream = on_stream
        self.tokens = 0
        self.ended_by: str | None = None  # the limit, once the call was cut
        self._stream: Any = None
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ar-llm-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._finished.set()
        self._thread.join(timeout=1.0)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def attach(self, stream: Any) -> None:
        """The stream to hang up on; at once when the limit already passed."""
        with self._lock:
            self._stream = stream
            cut = self.ended_by is not None
        if cut:
            hang_up(stream)

    def cut(self) -> None:
        """End the call now: wake the reader and hang up on the server."""
        with self._lock:
            if self.ended_by is not None or self._finished.is_set():
                return
            self.ended_by = self.limit_name
            stream = self._stream
        if stream is not None:
            hang_up(stream)

    def finish(self) -> str | None:
        """The reader is done; the limit that cut the call, if one did."""
        with self._lock:
            self._finished.set()
            return self.ended_by

    def _watch(self) -> None:
        next_report = self.started + WAITING_EVERY_S
        while not self._finished.wait(max(0.0, min(self.deadline, next_report) - time.monotonic())):
            if time.monotonic() >= self.deadline:
                self.cut()
                return
            if self.tokens == 0 and self.on_stream is not None:
                self.on_stream(0, self.seconds())
            next_report += WAITING_EVERY_S


def stream_reply(litellm: Any, request: dict[str, Any], limit_s: float, limit_name: str,
                 on_stream: OnStream | None = None) -> StreamedReply:
    """Make one streamed call (`request` holds litellm.completion's arguments, stream=True
    and a timeout of `limit_s` among them) and read it to its end, its limit or Ctrl-C.

    Never raises for the call's own failures: they come back in `error`. A Ctrl-C comes
    back as ended_by "cancelled" with the stream closed; the caller records it and raises
    KeyboardInterrupt again.
    """
    parts: list[str] = []
    reply = StreamedReply("", "error", 0.0)
    finish_reason: str | None = None
    cancelled = False
    with Watchdog(limit_s, limit_name, on_stream) as watchdog:
        stream = None
        last_report = float("-inf")
        try:
            stream = litellm.completion(**request)
            watchdog.attach(stream)
            reply.streamed = True
            for chunk in stream:
                reply.chunks.append(chunk)
                reply.usage = getattr(chunk, "usage", None) or reply.usage
                for choice in getattr(chunk, "choices", None) or []:
                    text = getattr(choice.delta, "content", None)
                    if text:
                        parts.append(text)
                        watchdog.tokens += 1
                    finish_reason = choice.finish_reason or finish_reason
                now = time.monotonic()
                if watchdog.tokens and on_stream and now - last_report >= PROGRESS_EVERY_S:
                    on_stream(watchdog.tokens, watchdog.seconds())
                    last_report = now
                if now >= watchdog.deadline:
                    watchdog.cut()
                    break
        except KeyboardInterrupt:
            cancelled = True
        except Exception as exc:  # litellm maps every provider failure to its own types
            reply.error = exc
        finally:
            if stream is not None:
                close_quietly(stream)
        cut = watchdog.finish()
        reply.seconds = watchdog.seconds()
    reply.content = "".join(parts)
    reply.tokens = watchdog.tokens
    reply.ended_by = how_it_ended(litellm, reply, cancelled, cut, finish_reason, limit_name)
    if reply.ended_by not in ("error", "closed"):
        reply.error = None  # a failure of the read that our own hang-up caused
    return reply


def how_it_ended(litellm: Any, reply: StreamedReply, cancelled: bool, cut: str | None,
                 finish_reason: str | None, limit_name: str) -> str:
    """One of agents.ENDED_BY: "error" is a failure before the response began (an HTTP
    error status, a refused connection); "closed" a stream that broke off or ended without
    a finish reason."""
    if cancelled:
        return "cancelled"
    if cut:
        return cut
    if isinstance(reply.error, litellm.Timeout):  # the read timeout is the call's limit too
        return limit_name
    if reply.error is not None:
        return "closed" if reply.streamed else "error"
    if finish_reason is None:
        return "closed"
    return "length" if finish_reason == "length" else "stop"


def hang_up(stream: Any) -> None:
    """Close the connection under `stream` from any thread: shutting the socket down wakes
    a read blocked on it, which closing alone does not."""
    sock = socket_of(stream)
    if sock is None:
        close_quietly(stream)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def socket_of(stream: Any) -> socket.socket | None:
    """The socket under a litellm stream, or None where it cannot be found.

    httpx exposes it as its response's network_stream. litellm keeps that response as the
    OpenAI SDK stream's `response` (openai/), Anthropic's iterator's `_response`, the
    `http_response` of its own handler's iterators (hosted_vllm/), or else as the `self`
    of the `response.iter_lines()` generator an iterator reads from.
    """
    inner = getattr(stream, "completion_stream", None)
    for name in ("response", "_response", "http_response", "streaming_response"):
        candidate = getattr(inner, name, None)
        frame = getattr(candidate, "gi_frame", None)
        if frame is not None:
            candidate = frame.f_locals.get("self")
        extensions = getattr(candidate, "extensions", None)
        network_stream = extensions.get("network_stream") if isinstance(extensions, dict) else None
        try:
            sock = network_stream.get_extra_info("socket") if network_stream else None
        except Exception:  # a transport without sockets (a test double, HTTP/2)
            continue
        if isinstance(sock, socket.socket):
            return sock
    return None


def close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # closing a broken stream may fail again; it is closed either way
        pass


def cached_tokens(usage: Any) -> int | None:
    """Prompt tokens the provider read from its cache: OpenAI's prompt_tokens_details,
    or Anthropic's cache_read_input_tokens."""
    details = getattr(usage, "prompt_tokens_details", None)
    for value in (getattr(details, "cached_tokens", None),
                  getattr(usage, "cache_read_input_tokens", None)):
        if isinstance(value, int):
            return value
    return None
