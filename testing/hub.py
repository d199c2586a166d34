"""A Hugging Face hub on loopback for tests: it answers the probe at once and says of every repo
file what the real hub says of a repo that does not exist (or is gated), after ``delay_s``."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeHub:
    """``FakeHub(error="RepoNotFound", delay_s=0)``: the hub's answer for repo files."""

    def __init__(self, *, error: str = "RepoNotFound", status: int = 401,
                 delay_s: float = 0.0) -> None:
        self.error, self.status, self.delay_s = error, status, delay_s
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                if self.path.startswith("/api/models?"):  # the probe
                    self._send(200, b"[]")
                    return
                time.sleep(hub.delay_s)
                self._send(hub.status, b'{"error": "Repository Not Found"}',
                           {"X-Error-Code": hub.error, "X-Error-Message": "Repository Not Found"})

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      ) -> None:
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_port_url() -> str:
    """An http:// address on loopback where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
