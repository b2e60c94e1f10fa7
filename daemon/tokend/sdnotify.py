"""The systemd notification protocol (sd_notify), without libsystemd.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments sent to
the AF_UNIX socket named by ``$NOTIFY_SOCKET``. Doing it here keeps the daemon free
of a C dependency that only exists on systemd hosts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SystemdNotifier"]


def _socket_address(raw: str) -> str | bytes | None:
    """Turn the value of ``$NOTIFY_SOCKET`` into an address ``sendto`` accepts."""
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: systemd writes the leading NUL as '@' because an
        # environment variable cannot contain NUL.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # Other schemes (e.g. "vsock:" for VMs) are not used by a service unit on the
    # host; treating them as absent is safer than sending to a wrong path.
    return None


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    usec_raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(usec_raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_raw = env.get("WATCHDOG_PID")
    if pid_raw:
        # The variables are inherited by children; a child must not ping for the
        # service, or a hung main process would be kept alive by its helper.
        try:
            if int(pid_raw) != pid:
                return None
        except ValueError:
            return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends, so one late ping is
    # not fatal.
    return usec / 2_000_000


@dataclass(frozen=True)
class SystemdNotifier:
    """Sends state changes to the service manager; a no-op outside systemd."""

    address: str | bytes | None = None
    watchdog_interval: float | None = None
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SystemdNotifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        interval = _watchdog_interval(env, os.getpid()) if address is not None else None
        return cls(address=address, watchdog_interval=interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one raw notification; True if the datagram was handed to the socket.

        Never raises: the daemon's work must not depend on the service manager
        listening, and there is nowhere useful to report the failure to.
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8", "replace"), self.address)
        except (OSError, ValueError):
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        # A newline would start a new assignment, letting status text (which may
        # quote provider errors) inject e.g. "READY=1" or "WATCHDOG=trigger".
        line = " ".join(text.splitlines())
        return self.notify(f"STATUS={line}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current state's timeout (e.g.
        ``TimeoutStopSec=``) kills us; to be repeated before they run out."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")
