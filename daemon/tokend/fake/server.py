"""The fake's HTTP/1.1 server: keep-alive, connection tracking (so ``pause`` can cut them),
and the routing of requests to the provider's endpoints and its control API."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from tokend.fake.league import Response, json_response

if TYPE_CHECKING:
    from tokend.fake.provider import FakeJustimmo


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for hanging handlers
    allow_reuse_address = True  # resume() rebinds the port while old sockets are in TIME_WAIT
    request_queue_size = 128  # 16-50 clients connecting at once must not overflow the backlog

    def __init__(self, address: tuple[str, int], fake: FakeJustimmo) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.fake = fake
        self.wake = fake._wake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._cut = False
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            if not alive:
                self._conns.discard(conn)
            elif not self._cut:
                self._conns.add(conn)
                return
        if alive:  # accepted just before cut_connections(): a paused server serves nothing
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def cut_connections(self) -> None:
        with self._conns_lock:
            self._cut = True
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (and our own cut_connections) are normal here, not tracebacks.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "FakeJustimmo/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls
    timeout = 120  # idle keep-alive connections eventually free their thread

    @property
    def _srv(self) -> Server:
        return cast(Server, self.server)

    def setup(self) -> None:
        super().setup()
        self._srv.track(self.connection, True)
        self._srv.fake._connected()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._srv.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # benchmarks make thousands of requests; stderr is not the place for them

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        # Always drain the body, even for requests we refuse, or keep-alive framing breaks.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        fake = self._srv.fake
        if url.path.startswith("/_fake/"):
            try:
                payload = json.loads(body) if body else {}
            except ValueError:
                payload = None
            self._send(fake._control(self.command, url.path, payload))
            return
        # A provider's rate limit counts a request when it arrives, not after the time
        # it takes to answer: with varying latency, times taken after the sleep put
        # requests that arrived in different seconds into one.
        arrived = time.monotonic()
        fake._enter()
        try:
            if fake._latency > 0:
                time.sleep(fake._latency)
            self._provider(fake, url.path, url.query, body, arrived)
        finally:
            fake._leave()

    def _provider(self, fake: FakeJustimmo, path: str, query: str, body: bytes,
                  arrived: float) -> None:
        auth = self.headers.get("Authorization")
        if path == "/access_token":
            if self.command != "POST":
                self._send(
                    json_response(405, {"error": "method_not_allowed"}, (("Allow", "POST"),))
                )
                return
            form = first_values(body.decode("utf-8", "replace"))
            outcome = fake._token_request(form, auth, arrived=arrived)
            if outcome.hang > 0:
                self._srv.wake.wait(outcome.hang)
            if outcome.response is None:
                self._hang_up()
            else:
                self._send(outcome.response)
        elif path == "/authorize" and self.command == "GET":
            self._send(fake._authorize(first_values(query)))
        elif path == "/authorize" and self.command == "POST":
            form = first_values(body.decode("utf-8", "replace"))
            self._send(fake._authorize(form, submitted=True))
        elif path == "/oauth/user/current" and self.command == "GET":
            self._send(fake._user_current(auth))
        else:
            self._send(json_response(404, {"error": "not_found"}))

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, resp: Response) -> None:
        self.send_response(resp.status)
        for name, value in resp.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body:
            self.wfile.write(resp.body)



def first_values(encoded: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(encoded, keep_blank_values=True).items()}

