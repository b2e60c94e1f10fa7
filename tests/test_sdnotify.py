"""sd_notify against real AF_UNIX datagram sockets, the way systemd listens."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# isort: split
# (tokend counts as first- or third-party depending on ruff's `src`; either way this sorts)
from tokend.sdnotify import SystemdNotifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    # Short path: AF_UNIX paths are limited to ~108 bytes and pytest tmp dirs are long.
    path = tmp_path / "n.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp path too long for an AF_UNIX socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"tokend-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert recv(sock) == "READY=1"
    assert n.status("3 grants due")
    assert recv(sock) == "STATUS=3 grants due"
    assert n.watchdog()
    assert recv(sock) == "WATCHDOG=1"
    assert n.stopping()
    assert recv(sock) == "STOPPING=1"


def test_messages_reach_an_abstract_socket(
    abstract_listener: tuple[socket.socket, str],
) -> None:
    sock, name = abstract_listener
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": name})
    assert n.ready()
    assert recv(sock) == "READY=1"


def test_status_cannot_inject_other_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert n.status("provider said:\nREADY=1\r\nWATCHDOG=trigger")
    msg = recv(sock)
    assert "\n" not in msg
    assert msg.startswith("STATUS=provider said:")


def test_noop_without_notify_socket() -> None:
    n = SystemdNotifier.from_env({"WATCHDOG_USEC": "60000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.notify("READY=1") is False


def test_from_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SystemdNotifier.from_env().enabled


@pytest.mark.parametrize(
    "address",
    [
        "/nonexistent-dir-for-tokend/notify.sock",  # missing socket
        "@tokend-nobody-listens-" + uuid.uuid4().hex,  # abstract, unbound
        "/" + "x" * 200,  # longer than sun_path
    ],
)
def test_broken_socket_returns_false_without_raising(address: str) -> None:
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False


def test_socket_that_is_not_a_socket_returns_false(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": str(regular)}).ready() is False


def test_unknown_address_scheme_is_treated_as_absent() -> None:
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    assert n.watchdog_interval == 30.0


def test_watchdog_pid_of_this_process_enables_watchdog(
    listener: tuple[socket.socket, str],
) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_env(env).watchdog_interval == 1.0


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"},  # meant for another process
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not-a-pid"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "sixty"},
        {},
    ],
)
def test_no_watchdog(listener: tuple[socket.socket, str], extra: dict[str, str]) -> None:
    _, path = listener
    if extra.get("WATCHDOG_PID") == "1" and os.getpid() == 1:
        pytest.skip("test process is PID 1")
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, **extra})
    assert n.enabled
    assert n.watchdog_interval is None
