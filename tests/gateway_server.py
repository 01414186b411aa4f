"""A real HTTP server on 127.0.0.1 standing in for a third-party gateway (webhook receivers, SMS gateways): it
records every request (headers, body, the client's port, so a test can tell a reused connection from a new one)
and answers each one as the test scripted, in order, then 200 with a JSON id.

`stop()` closes the listening socket and the open connections, as a gateway that goes down does: the next
connection is refused."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple


class Answer(NamedTuple):
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before answering: past the client's timeout, a timeout
    hang_up: bool = False  # close the connection after answering without saying so (a stale keep-alive)
    drop: bool = False  # close the connection instead of answering (a gateway that crashed on the request)


class Request(NamedTuple):
    path: str
    headers: dict[str, str]
    body: bytes
    port: int  # the client's port: one a connection

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeouts) or a server stopped under a request: what the tests are about


class GatewayServer:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answers: deque[Answer] = deque()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/messages"

    def answer(self, *answers: Answer) -> None:
        """The answers to the next requests, in order (after them: 200 with {"id": "gw-N"})."""
        self.answers.extend(answers)

    def start(self) -> GatewayServer:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real gateways do
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms wait for the ACK between

            def setup(self) -> None:
                super().setup()
                with gateway._lock:
                    gateway._sockets.add(self.connection)

            def finish(self) -> None:
                with gateway._lock:
                    gateway._sockets.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with gateway._lock:
                    gateway.requests.append(Request(self.path, dict(self.headers), body, self.client_address[1]))
                    count = len(gateway.requests)
                    answer = gateway.answers.popleft() if gateway.answers else None
                if answer is None:
                    answer = Answer(
                        200, json.dumps({"id": f"gw-{count}"}).encode(), (("Content-Type", "application/json"),)
                    )
                time.sleep(answer.delay)
                if answer.drop:
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
                if answer.hang_up:
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: pytest shows what the test asserts

        server = _Server(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._sockets.clear()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None
