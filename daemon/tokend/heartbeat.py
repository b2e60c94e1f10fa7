"""Each replica's heartbeat row (table ``replicas``), read by ``tokend status``.

Written after every pass and when the process stops, so the database alone tells an
operator what every replica last did: no need to reach each host's metrics endpoint.
The last pass's report carries the capacity of the replica's last plan (the figures of
the gauges ``tokend_refresh_rate_needed`` / ``tokend_refresh_rate_limit``), so ``tokend
status`` can say it without planning a large table again.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from typing import Any

from . import __version__, logs, planner
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
        last: dict[str, Any] = (
            {"ok": result.ok, "claimed": result.claimed, "refreshed": result.refreshed,
             "failed": result.failed, "skipped": result.skipped,
             "failures": dict(result.failures), "duration_s": round(result.duration, 3)}
            if result is not None else {"ok": False, "error": (error or "failed")[:300]})
        if maintenance.capacity is not None and maintenance.planned_at is not None:
            last["capacity"] = capacity(maintenance.capacity, maintenance.planned_at)
        values["last_pass_at"] = last_pass_at
        values["last_pass"] = json.dumps(last)
    return values


def capacity(c: planner.Capacity, planned_at: datetime) -> dict[str, Any]:
    """A plan's figures as reported (read back by :func:`tokend.status.capacity`)."""
    return {"limit": c.limit, "needed": round(c.needed, 6),
            "margin_s": c.margin.total_seconds(), "aim_s": c.aim.total_seconds(),
            "floor_s": c.floor.total_seconds(), "grants": c.grants,
            "planned_at": planned_at.isoformat()}


def write(store: Store, values: dict[str, Any]) -> None:
    try:
        store.heartbeat(values)
    except StoreError as exc:  # the next pass writes it again
        log.warning("heartbeat_not_written", error=str(exc)[:300])
