"""Each replica's heartbeat row (table ``replicas``), read by ``tokend status``.

Written after every pass and when the process stops, so the database alone tells an
operator what every replica last did: no need to reach each host's metrics endpoint.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from typing import Any

from . import __version__, logs
from .errors import StoreError
from .maintenance import Maintenance, PassResult
from .store import Store

log = logs.get("tokend.heartbeat")


def row(maintenance: Maintenance, started_at: datetime, last_pass_at: datetime | None,
        result: PassResult | None, *, error: str | None = None,
        stopped_at: datetime | None = None) -> dict[str, Any]:
    with maintenance._circuit_lock:
        blocked = sorted(n for n, c in maintenance.circuits.items() if c.blocked)
    values: dict[str, Any] = {
        "owner": maintenance.owner, "host": socket.gethostname()[:255], "pid": os.getpid(),
        "version": __version__, "started_at": started_at,
        "held_outcomes": maintenance.held.count(), "open_circuits": json.dumps(blocked),
        "stopped_at": stopped_at,
    }
    if last_pass_at is not None:
        values["last_pass_at"] = last_pass_at
        values["last_pass"] = json.dumps(
            {"ok": result.ok, "claimed": result.claimed, "refreshed": result.refreshed,
             "failed": result.failed, "skipped": result.skipped,
             "failures": dict(result.failures), "duration_s": round(result.duration, 3)}
            if result is not None else {"ok": False, "error": (error or "failed")[:300]})
    return values


def write(store: Store, values: dict[str, Any]) -> None:
    try:
        store.heartbeat(values)
    except StoreError as exc:  # the next pass writes it again
        log.warning("heartbeat_not_written", error=str(exc)[:300])
