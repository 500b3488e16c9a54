"""An in-process HTTP listener that records registry notifications (or any POST)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from tests.harness.httpserver import QuietHandler, serve_in_background, stop_server


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers every POST with ``status`` (200) and keeps it; ``events`` flattens the envelopes."""

    status: int = 200
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    @property
    def events(self) -> list[dict]:
        with self._cond:
            return [event for r in self.requests for event in r.json().get("events", [])]

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float = 10.0) -> list[dict]:
        """Block until ``predicate(events)`` holds; fail with the events seen so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = [event for r in self.requests for event in r.json().get("events", [])]
                if predicate(events):
                    return events
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = [(e.get("action"), e["target"].get("mediaType"), e["target"].get("tag")) for e in events]
                    raise AssertionError(f"no matching notification within {timeout}s; got {summary}")
                self._cond.wait(remaining)

    def start(self) -> Receiver:
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._cond:
                    if receiver.status < 300:
                        receiver.requests.append(Request(self.path, dict(self.headers.items()), body))
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = serve_in_background(self.port, Handler)
        self.port = self._httpd.server_address[1]
        return self

    def stop(self) -> None:
        stop_server(self._httpd)
