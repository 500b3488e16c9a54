"""A small HTTP reverse proxy in front of a test registry that injects faults on request.

Faults match on method and a path regex and fire ``times`` times:
  status         answer ``status`` (with ``headers``, e.g. Retry-After, and the standard error JSON)
  drop_request   read half of the request body, then close the connection without answering
  drop_response  forward, then send the headers and only half of the body before closing
  respond        answer a fixed ``status``/``headers``/``body`` (to imitate other registries)
The Host header is forwarded unchanged, so the registry's Location URLs point back at the proxy.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from tests.harness.httpserver import QuietHandler, serve_in_background, stop_server

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


@dataclass
class Fault:
    action: str
    method: str | None = None
    path: str = ".*"
    times: int = 1
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.fired < self.times
            and (self.method is None or self.method == method)
            and re.search(self.path, path) is not None
        )


@dataclass
class FaultProxy:
    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, int | str]] = field(default_factory=list)  # (method, path, status or fault)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, action: str, **options) -> Fault:
        fault = Fault(action, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.fired += 1
                    return fault
        return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                # SO_LINGER 0: close with RST so the client sees a broken connection at once.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _answer(self, status: int, headers: dict[str, str], body: bytes, head: bool = False) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                self.close_connection = True

            def _handle(self) -> None:
                method, path = self.command, self.path
                fault = proxy._take(method, path)
                if fault and fault.action == "drop_request":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
                    proxy.log.append((method, path, "drop_request"))
                    self._reset()
                    return
                body = self._body()
                if fault and fault.action in ("status", "respond"):
                    payload = (
                        fault.body
                        if fault.body is not None
                        else json.dumps(
                            {"errors": [{"code": "INJECTED", "message": f"injected {fault.status}"}]}
                        ).encode()
                    )
                    proxy.log.append((method, path, fault.status))
                    headers = {"Content-Type": "application/json", **fault.headers}
                    self._answer(fault.status, headers, payload, head=method == "HEAD")
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                    for key, value in self.headers.items():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            upstream.putheader(key, value)
                    if body or method in ("PUT", "POST", "PATCH"):
                        upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body or None)
                    response = upstream.getresponse()
                    data = response.read()
                    proxy.log.append((method, path, response.status if not fault else "drop_response"))
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if method == "HEAD":
                        return
                    if fault and fault.action == "drop_response":
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self._reset()
                        return
                    self.wfile.write(data)
                finally:
                    upstream.close()
                    self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._httpd = serve_in_background(self.port, Handler)
        self.port = self._httpd.server_address[1]
        return self

    def stop(self) -> None:
        stop_server(self._httpd)
