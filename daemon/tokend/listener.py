"""An HTTP listener no idle or slow client can exhaust (``/metrics``, ``tokend authorize``).

``http.server`` gives each connection a thread (or, single-threaded, the only one) that
waits for the request line without a time limit: idle connections (a browser's
pre-connect, a port scanner, a stuck scraper) each held a thread forever, or blocked
``tokend authorize`` entirely. Here a connection that has sent nothing costs a socket
in one selector, not a thread; it is handed to a small pool of workers only once its
request has begun to arrive. Every connection has a deadline (to start its request,
and to be answered), the number of open connections is bounded (the oldest idle one
makes room for a new one), and one request is served per connection.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

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
                 request_timeout: float | None = None) -> None:
        super().__init__(address, handler)
        self.name = name
        self.workers = workers or WORKERS
        self.max_connections = max_connections or MAX_CONNECTIONS
        self.idle_timeout = idle_timeout or IDLE_TIMEOUT
        self.request_timeout = request_timeout or REQUEST_TIMEOUT
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        # socket -> deadline; dicts keep insertion order, so the first is the oldest
        self._idle: dict[socket.socket, float] = {}
        self._busy: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._wake_r, self._wake_w = socket.socketpair()

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
            if len(self._idle) + len(self._busy) >= self.max_connections:
                if not self._idle:  # every slot is a request being answered
                    _close(conn)
                    return
                oldest = next(iter(self._idle))
                del self._idle[oldest]
                sel.unregister(oldest)
                _close(oldest)
            self._idle[conn] = time.monotonic() + self.idle_timeout
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, "conn")

    def _dispatch(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        sel.unregister(conn)
        with self._lock:
            self._idle.pop(conn, None)
            self._busy[conn] = time.monotonic() + self.request_timeout
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
            self.shutdown_request(conn)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [c for c, deadline in self._idle.items() if deadline <= now]
            for conn in idle:
                del self._idle[conn]
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
