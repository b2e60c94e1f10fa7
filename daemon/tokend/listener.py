"""An HTTP listener no idle or slow client can exhaust (``/metrics``, ``tokend authorize``).

``http.server`` gives each connection a thread (or, single-threaded, the only one) that
waits for the request line without a time limit: idle connections (a browser's
pre-connect, a port scanner, a stuck scraper) each held a thread forever, or blocked
``tokend authorize`` entirely. Here a connection that has sent nothing costs a socket
in one selector, not a thread; it is handed to a small pool of workers only once its
request has begun to arrive. Every connection has a deadline (to start its request,
and to be answered), the number of open connections is bounded (the oldest idle one
makes room for a new one, or the newcomer gets a given answer), a connection may be
given a maximum lifetime, and one request is served per connection. :class:`Served`
runs such a server on its own thread.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Self

from . import logs

log = logs.get("tokend.listener")
IDLE_TIMEOUT = 10.0  # to send the first bytes of a request
REQUEST_TIMEOUT = 10.0  # to send the whole request and read the answer
MAX_CONNECTIONS = 64
WORKERS = 4


class BoundedHTTPServer(HTTPServer):
    # socketserver's default backlog of 5 drops the SYN of a 7th client arriving at
    # once (retried only after a second); connections are accepted at once anyway.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int],
                 handler: type[BaseHTTPRequestHandler], *, name: str = "tokend-http",
                 workers: int | None = None, max_connections: int | None = None,
                 idle_timeout: float | None = None,
                 request_timeout: float | None = None, max_lifetime: float | None = None,
                 when_full: Callable[[socket.socket], None] | None = None) -> None:
        """``max_lifetime``: from accept to the end of the answer (default: no limit but
        the two deadlines). ``when_full``: answer a newcomer with it and close, instead of
        dropping the oldest idle connection."""
        if self.address_family == socket.AF_INET and ":" in str(address[0]):
            self.address_family = socket.AF_INET6
        self.name = name
        self.workers = workers or WORKERS
        self.max_connections = max_connections or MAX_CONNECTIONS
        self.idle_timeout = idle_timeout or IDLE_TIMEOUT
        self.request_timeout = request_timeout or REQUEST_TIMEOUT
        self.max_lifetime = max_lifetime or math.inf
        self.when_full = when_full
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        # socket -> deadline; dicts keep insertion order, so the first is the oldest
        self._idle: dict[socket.socket, float] = {}
        self._busy: dict[socket.socket, float] = {}
        self._born: dict[socket.socket, float] = {}  # socket -> end of its lifetime
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._wake_r, self._wake_w = socket.socketpair()
        # Last: a failed bind calls server_close, which needs all of the above.
        super().__init__(address, handler)

    def server_bind(self) -> None:  # HTTPServer's would look the host up (reverse DNS)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    # ------------------------------------------------------------------ the loop

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.socket, selectors.EVENT_READ, "listen")
                sel.register(self._wake_r, selectors.EVENT_READ, "wake")
                while not self._stop.is_set():
                    for key, _ in sel.select(self._next_timeout(poll_interval)):
                        if key.data == "listen":
                            self._accept(sel)
                        elif key.data == "wake":
                            self._wake_r.recv(4096)
                        else:
                            self._dispatch(sel, key.fileobj)  # type: ignore[arg-type]
                    self._expire(sel)
        finally:
            self._stopped.set()

    def _next_timeout(self, poll_interval: float) -> float:
        with self._lock:
            deadlines = [*self._idle.values(), *self._busy.values()]
        if not deadlines:
            return poll_interval
        return max(0.0, min(poll_interval, min(deadlines) - time.monotonic()))

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _addr = self.socket.accept()
        except OSError:
            return
        with self._lock:
            full = len(self._idle) + len(self._busy) >= self.max_connections
            if full and self.when_full is None:
                if not self._idle:  # every slot is a request being answered
                    _close(conn)
                    return
                oldest = next(iter(self._idle))
                del self._idle[oldest]
                self._born.pop(oldest, None)
                sel.unregister(oldest)
                _close(oldest)
            elif not full:
                now = time.monotonic()
                end = now + self.max_lifetime
                self._born[conn] = end
                self._idle[conn] = min(now + self.idle_timeout, end)
        if full and self.when_full is not None:
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)  # a small answer: the socket buffer takes it
                self.when_full(conn)
            self.shutdown_request(conn)
            return
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, "conn")

    def _dispatch(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        sel.unregister(conn)
        with self._lock:
            self._idle.pop(conn, None)
            end = self._born.get(conn, math.inf)
            self._busy[conn] = min(time.monotonic() + self.request_timeout, end)
        # Each read and write is bounded too; the deadline above bounds their sum.
        conn.settimeout(self.request_timeout)
        self._pool.submit(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            with contextlib.suppress(OSError):  # the client went away, or was too slow
                self.finish_request(conn, conn.getpeername())
        except Exception as exc:  # a bug in a handler: say so, serve the next one
            log.error("http_request_crashed", server=self.name, error=type(exc).__name__)
        finally:
            with self._lock:
                self._busy.pop(conn, None)
                self._born.pop(conn, None)
            self.shutdown_request(conn)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [c for c, deadline in self._idle.items() if deadline <= now]
            for conn in idle:
                del self._idle[conn]
                self._born.pop(conn, None)
            # A worker still reading or writing (or not yet started on it): end its
            # socket, its call then fails at once. Once is enough: no deadline left.
            late = [c for c, deadline in self._busy.items() if deadline <= now]
            for conn in late:
                self._busy[conn] = math.inf
        for conn in idle:
            sel.unregister(conn)
            _close(conn)
        for conn in late:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ stopping

    def shutdown(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            conns = [*self._idle, *self._busy]
            self._idle.clear()
            self._born.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=True)
        for conn in conns:
            _close(conn)
        self._wake_r.close()
        self._wake_w.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away is no event worth a traceback on stderr

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._idle) + len(self._busy)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.close()


class Served:
    """A server on a thread of its own: ``start``, ``stop`` (shut down, close, join)."""

    def __init__(self, server: BoundedHTTPServer, name: str, *,
                 poll_interval: float = 0.2) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": poll_interval}, name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
