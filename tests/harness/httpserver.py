"""A threaded HTTP server on 127.0.0.1, served from a daemon thread: the base of the test servers."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the test output clean (no access log on stderr)."""

    def log_message(self, *args) -> None:
        pass


def serve_in_background(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """Bind 127.0.0.1:`port` (0 = a free port) and serve from a daemon thread; read the port from
    `server_address`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd


def stop_server(httpd: ThreadingHTTPServer | None) -> None:
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()
