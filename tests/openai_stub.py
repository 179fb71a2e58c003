"""A small OpenAI-compatible chat server on 127.0.0.1 for tests.

Each request to POST /v1/chat/completions (or /chat/completions) takes the next scripted
(status, body, headers) response from a queue and is recorded in `requests`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")


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


class StubServer:
    """Use as a context manager; `url` is the api_base to hand to litellm."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._responses: list[tuple[int, Any, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def queue(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Script the next response: a dict body is sent as JSON, a str as it is."""
        with self._lock:
            self._responses.append((status, body, headers or {}))

    def reply(self, content: str, **usage: Any) -> None:
        """Script a successful chat completion carrying `content`."""
        self.queue(200, chat_body(content, **usage))

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
                request = {"path": self.path, "headers": dict(self.headers), "json": payload}
                self._send(*stub._next(request))

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
