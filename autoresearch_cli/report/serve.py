"""`ar report --serve`: the report as a live page on 127.0.0.1, while `ar iterate` runs.

The page polls `/state.json` every POLL_MS; the answer holds the page's sections as HTML
fragments (report/page.py renders them, the same way as on the static page) and a version
that changes when the ledger or a running experiment's progress does. The server opens
the ledger read-only: it never takes a write lock, so it never blocks the loop, and it
rebuilds the report only when SQLite's data_version says another connection committed
(between two writes of the loop, polls cost one PRAGMA and a few small reads of the
running experiments' logs). Progress comes from those logs (train.log, written by the
job: read as untrusted bytes, bounded, never followed through a link or opened if not a
regular file, and only its step numbers are shown).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.doors.records import Run
from autoresearch_cli.doors.workspace import Workspace
from autoresearch_cli.errors import ArError
from autoresearch_cli.report import page
from autoresearch_cli.report.facts import Report, Running
from autoresearch_cli.report.write import read

POLL_MS = 1000  # how often the page asks for news
LOG_TAIL_BYTES = 8192  # of a running experiment's log, read to find its last step line
HOST = "127.0.0.1"

SCRIPT = """<script nonce="{nonce}">
(function () {{
  var version = document.body.dataset.version;
  function poll() {{
    fetch("state.json", {{cache: "no-store"}}).then(function (answer) {{
      return answer.ok ? answer.json() : null;
    }}).then(function (state) {{
      if (state && state.version !== version) {{
        version = state.version;
        Object.keys(state.sections).forEach(function (id) {{
          var element = document.getElementById(id);
          if (element) {{ element.innerHTML = state.sections[id]; }}
        }});
        document.body.dataset.version = version;
      }}
    }}).catch(function () {{ /* the server stopped: keep the last page */ }})
      .finally(function () {{ setTimeout(poll, {poll_ms}); }});
  }}
  setTimeout(poll, {poll_ms});
}})();
</script>"""


def log_progress(run_dir: Path) -> tuple[float | None, float | None]:
    """(percent, loss) from the last step line of a running job's log, or (None, None)."""
    from sandbox.progress import LINE_BREAK, parse_step

    try:
        fd = os.open(run_dir / "train.log", os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device: never wait on it
            return None, None
        data = os.pread(fd, LOG_TAIL_BYTES, max(0, info.st_size - LOG_TAIL_BYTES))
    except OSError:
        return None, None
    finally:
        os.close(fd)
    for line in reversed(LINE_BREAK.split(data)):
        found = parse_step(line)
        if found is not None:
            return found.percent, found.loss
    return None, None


class LivePage:
    """The live page's state, rebuilt when the ledger moves (thread-safe)."""

    def __init__(self, ws: Workspace, ledger: Ledger):
        self.ws, self.ledger = ws, ledger
        self.nonce = secrets.token_urlsafe(16)
        self._lock = threading.Lock()
        self._data_version: int | None = None
        self._report: Report | None = None
        self._fragments: dict[str, str] = {}

    def progress(self, run: Run | Running) -> tuple[float | None, float | None]:
        return log_progress(self.ws.runs_dir / str(run.id))

    def state(self) -> dict:
        """{"version": ..., "sections": {id: html}}: the whole page's news."""
        with self._lock:
            data_version = self.ledger.data_version()
            if self._report is None or data_version != self._data_version:
                self._report = read(self.ws, self.ledger, self.progress)
                self._data_version = data_version
                self._fragments = page.sections(self._report, live=True)
            else:  # nothing committed: only the running experiments' progress moves
                self._report.running = [_moved(run, self.progress(run)) for run in self._report.running]
                self._fragments["running"] = page.running_section(self._report)
            moving = ",".join(f"{run.id}:{run.percent}" for run in self._report.running)
            return {"version": f"{data_version}|{moving}", "sections": dict(self._fragments)}

    def html(self) -> str:
        state = self.state()  # builds the report
        with self._lock:
            assert self._report is not None
            script = SCRIPT.format(nonce=self.nonce, poll_ms=POLL_MS)
            policy = (f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                      f"connect-src 'self'; script-src 'nonce-{self.nonce}'")
            return page.page(self._report, live_script=script, policy=policy,
                             version=state["version"], fragments=state["sections"])


def _moved(run: Running, progress: tuple[float | None, float | None]) -> Running:
    percent, loss = progress
    return dataclasses.replace(run, percent=percent, loss=loss)


def handler_for(live: LivePage, port: Callable[[], int]) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to `live` (no global state)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            # a page on another site cannot reach this one through a renamed host
            allowed = {f"{HOST}:{port()}", f"localhost:{port()}"}
            if self.headers.get("Host") not in allowed:
                self._send(403, "text/plain", b"forbidden host")
            elif self.path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", live.html().encode())
            elif self.path.split("?", 1)[0] == "/state.json":
                self._send(200, "application/json", json.dumps(live.state()).encode())
            else:
                self._send(404, "text/plain", b"not found")

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            return None  # quiet: the terminal shows the URL, not every poll

    return Handler


def open_server(ws: Workspace, port: int = 0) -> tuple[ThreadingHTTPServer, LivePage, str]:
    """The live page's server on 127.0.0.1 (`port` 0: a free one), not yet serving; the
    caller runs `serve_forever` and closes `live.ledger` afterwards."""
    ledger = Ledger.for_workspace(ws.root, read_only=True)
    live = LivePage(ws, ledger)
    box: dict[str, int] = {}
    try:
        server = ThreadingHTTPServer((HOST, port), handler_for(live, lambda: box["port"]))
    except OSError as exc:
        ledger.close()
        raise ArError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True
    box["port"] = server.server_address[1]
    return server, live, f"http://{HOST}:{box['port']}/"
