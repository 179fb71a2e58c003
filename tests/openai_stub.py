"""A small OpenAI-compatible chat server on 127.0.0.1 for tests.

Each request to POST /v1/chat/completions (or /chat/completions, or Anthropic's
/v1/messages) takes the next scripted response from a queue and is recorded in
`requests`. A scripted chat.completion body is sent as server-sent events when the
request asks for a stream, as llama.cpp, vLLM and Ollama do; a `Streamed` script sends
its events with a delay between them and then ends, stalls or drops the connection, and
the server notes when it sees the client hang up (`disconnects`).
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/messages")
DONE = "data: [DONE]\n\n"


class Headers(dict):
    """Request headers by name, case-insensitively, as HTTP defines them: clients differ
    in the case they send (`Authorization` or `authorization`)."""

    def __init__(self, items=()) -> None:
        super().__init__((str(name).lower(), value) for name, value in items)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:
        return super().get(name.lower(), default)


def chat_body(content: str, *, model: str = "stub-model", prompt_tokens: int = 100,
              completion_tokens: int = 20, finish_reason: str = "stop") -> dict[str, Any]:
    """A chat.completion response body holding one assistant message."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, kind: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


# --- streams ---------------------------------------------------------------------------------


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event carrying `payload` as JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


def chunk_event(content: str | None = None, finish_reason: str | None = None,
                usage: dict[str, Any] | None = None, model: str = "stub-model") -> str:
    """One chat.completion.chunk event: a piece of content, a finish reason, or usage."""
    choices = [] if usage is not None else [{
        "index": 0, "delta": {"content": content} if content is not None else {},
        "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": "chatcmpl-stub", "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return sse(body)


def usage_of(prompt_tokens: int, completion_tokens: int,
             cached_tokens: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def chunk_events(pieces: Iterable[str], finish_reason: str | None = "stop",
                 usage: dict[str, Any] | None = None, model: str = "stub-model",
                 done: bool = True) -> Iterator[str]:
    """A whole OpenAI stream: one event per piece, the finish reason, usage, [DONE]."""
    for piece in pieces:
        yield chunk_event(piece, model=model)
    if finish_reason is not None:
        yield chunk_event(finish_reason=finish_reason, model=model)
    if usage is not None:
        yield chunk_event(usage=usage, model=model)
    if done:
        yield DONE


def endless_tokens() -> Iterator[str]:
    """A model that never stops writing."""
    for number in itertools.count():
        yield chunk_event(f" word{number}")


def anthropic_events(pieces: Iterable[str], stop_reason: str = "end_turn",
                     input_tokens: int = 100, output_tokens: int = 20,
                     cache_read_tokens: int = 0, cache_write_tokens: int = 0) -> Iterator[str]:
    """A Messages API stream as Anthropic sends it."""
    usage = {"input_tokens": input_tokens, "output_tokens": 1,
             "cache_read_input_tokens": cache_read_tokens,
             "cache_creation_input_tokens": cache_write_tokens}
    yield sse({"type": "message_start", "message": {
        "id": "msg_stub", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
        "usage": usage}}, "message_start")
    yield sse({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}, "content_block_start")
    for piece in pieces:
        yield sse({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                   "stop_sequence": None},
               "usage": {"output_tokens": output_tokens}}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


@dataclass
class Streamed:
    """A scripted streaming reply: `events` sent `delay_s` apart, then `then`:
    "end" (a complete response), "stall" (send nothing more until the client hangs up) or
    "close" (drop the connection without ending the response)."""

    events: Iterable[str] | Callable[[], Iterable[str]]
    delay_s: float = 0.0
    then: str = "end"
    first_delay_s: float = 0.0  # before the response headers: the prompt being read
    sent: list[str] = field(default_factory=list)  # what went out, filled in by the server
    sent_at: list[float] = field(default_factory=list)  # time.monotonic() of each


class StubServer:
    """Use as a context manager; `url` is the api_base to hand to litellm."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnects: list[float] = []  # time.monotonic() when a client hung up mid-stream
        self._responses: list[tuple[int, Any, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Script the next response: a dict body is sent as JSON, a str as it is."""
        with self._lock:
            self._responses.append((status, body, headers or {}))

    def reply(self, content: str, **usage: Any) -> None:
        """Script a successful chat completion carrying `content`."""
        self.queue(200, chat_body(content, **usage))

    def stream(self, script: Streamed) -> Streamed:
        """Script a streaming reply."""
        self.queue(200, script)
        return script

    def _next(self, request: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append(request)
            if self._responses:
                return self._responses.pop(0)
        return 500, error_body("the stub has no scripted response left"), {}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path not in CHAT_PATHS:
                    self._send(404, error_body(f"no route {self.path}", "not_found"), {})
                    return
                try:
                    payload = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    payload = None
                request = {"path": self.path, "headers": Headers(self.headers.items()),
                           "json": payload, "at": time.monotonic()}
                status, body, headers = stub._next(request)
                if isinstance(body, Streamed):
                    self._stream(body)
                elif status == 200 and isinstance(body, dict) and (payload or {}).get("stream"):
                    self._stream(Streamed(as_events(body, payload)))
                else:
                    self._send(status, body, headers)

            def _stream(self, script: Streamed) -> None:
                if script.first_delay_s and self._hung_up(script.first_delay_s):
                    stub.disconnects.append(time.monotonic())
                    return
                self.protocol_version = "HTTP/1.1"  # chunked, so a dropped stream is visible
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                events = script.events() if callable(script.events) else script.events
                try:
                    for number, event in enumerate(events):
                        if number and script.delay_s and self._hung_up(script.delay_s):
                            raise ConnectionResetError
                        data = event.encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                        script.sent.append(event)
                        script.sent_at.append(time.monotonic())
                    if script.then == "stall":
                        while not self._hung_up(0.05):
                            pass
                        raise ConnectionResetError
                    if script.then == "end":
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    stub.disconnects.append(time.monotonic())

            def _hung_up(self, wait_s: float) -> bool:
                """Whether the client closed its end, waiting up to `wait_s` to see."""
                readable, _, _ = select.select([self.connection], [], [], wait_s)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def as_events(body: dict[str, Any], request: dict[str, Any]) -> list[str]:
    """A chat.completion body as the stream a server sends for it; usage only when the
    request asked for it, as OpenAI does."""
    choice = body["choices"][0]
    wants_usage = (request.get("stream_options") or {}).get("include_usage")
    content = choice["message"]["content"] or ""
    pieces = [content[start:start + 16] for start in range(0, len(content), 16)]
    return list(chunk_events(pieces, choice["finish_reason"],
                             body.get("usage") if wants_usage else None, body["model"]))
