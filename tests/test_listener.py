"""Listeners no idle or slow client can exhaust: the metrics/health endpoint, real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tokend import listener
from tokend.metrics import Metrics, MetricsServer


def _probe() -> tuple[bool, dict[str, Any]]:
    return True, {}


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    s = MetricsServer(Metrics(), ("127.0.0.1", 0), healthy=_probe, ready=_probe).start()
    yield s
    s.stop()


def connect(server: MetricsServer, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        sock = socket.create_connection(server.address, timeout=5)
        out.append(sock)
    return out


def scrape(server: MetricsServer, path: str = "/metrics", timeout: float = 2.0) -> float:
    """One real request; how long it took (it must answer within ``timeout``)."""
    host, port = server.address
    session = requests.Session()
    session.trust_env = False  # loopback, never a proxy
    t0 = time.monotonic()
    r = session.get(f"http://{host}:{port}{path}", timeout=timeout)
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    session.close()
    return took


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_fifty_idle_connections_hold_no_thread_and_a_scrape_still_answers(
        server: MetricsServer) -> None:
    scrape(server)  # the worker pool exists now
    threads = threading.active_count()
    idle = connect(server, 50)
    try:
        time.sleep(0.5)  # all accepted
        # before: one thread per idle connection, each waiting forever for a request line
        assert threading.active_count() <= threads + listener.WORKERS
        assert scrape(server) < 2.0
        assert scrape(server, "/healthz") < 2.0
    finally:
        for sock in idle:
            sock.close()


def test_more_idle_connections_than_the_bound_close_the_oldest(server: MetricsServer) -> None:
    idle = connect(server, listener.MAX_CONNECTIONS + 40)
    try:
        assert scrape(server) < 2.0
        assert closed_by_peer(idle[0], 2.0)  # the oldest made room
        assert not closed_by_peer(idle[-1], 0.2)  # the newest still waits for its request
        assert server.server.open_connections <= listener.MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()


def test_idle_and_stalled_connections_are_closed_after_their_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(listener, "REQUEST_TIMEOUT", 1.0)
    s = MetricsServer(Metrics(), ("127.0.0.1", 0), healthy=_probe, ready=_probe).start()
    try:
        idle = connect(s, 1)[0]
        # a request that starts and never ends holds a worker: one per worker and more
        stalled = connect(s, listener.WORKERS + 2)
        for sock in stalled:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        t0 = time.monotonic()
        assert scrape(s, timeout=5.0) < 5.0
        assert closed_by_peer(idle, 3.0)
        assert all(closed_by_peer(sock, 3.0) for sock in stalled)
        assert time.monotonic() - t0 < 5.0
        assert _wait_for(lambda: s.server.open_connections == 0, 3)
        for sock in [idle, *stalled]:
            sock.close()
    finally:
        s.stop()


def test_stop_ends_idle_and_stalled_connections_at_once(server: MetricsServer) -> None:
    idle = connect(server, 3)
    idle[0].sendall(b"GET /metr")
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 2.0
    assert all(closed_by_peer(sock, 2.0) for sock in idle)
    for sock in idle:
        sock.close()


def test_an_ipv6_address_is_served() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        s = MetricsServer(Metrics(), ("::1", 0), healthy=_probe, ready=_probe).start()
    except OSError as exc:  # ::1 not configured (a container without IPv6 loopback)
        pytest.skip(f"::1: {exc}")
    try:
        r = requests.get(f"http://[::1]:{s.address[1]}/healthz", timeout=5)
        assert r.status_code == 200
    finally:
        s.stop()


def test_a_port_in_use_is_an_os_error(server: MetricsServer) -> None:
    with pytest.raises(OSError):
        MetricsServer(Metrics(), server.address, healthy=_probe, ready=_probe)
