"""``tokend status``: one screen for the operator, read from the database alone.

:func:`summary` is a pure function of what the store returns and ``now``; :func:`render`
turns it into text. Replicas report through their heartbeat rows (:mod:`tokend.heartbeat`):
a replica that has not written one for three intervals (and a minute) is shown as silent,
and what it last reported (held outcomes, open circuits) no longer counts as current.

Capacity (issue 13) is the newest plan any listed replica reported (:mod:`tokend.planner`,
the same figures as its gauges), said in words by :func:`tokend.planner.describe`. It is
not planned here: planning reads every maintained grant (tens of seconds for a million
rows), and the daemon does it at each pass anyway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from . import planner
from .model import Grant, Stats

DEADLINES = 10
STOPPED_KEPT = timedelta(days=1)  # stopped replicas are listed this long after stopping


def replica_state(row: dict[str, Any], now: datetime, interval: timedelta) -> str:
    if row.get("stopped_at") is not None:
        return "stopped"
    if now - row["updated_at"] > interval * 3 + timedelta(minutes=1):
        return "silent"
    return "running"


def summary(stats: Stats, deadlines: Sequence[Grant], replicas: Sequence[dict[str, Any]],
            now: datetime, interval: timedelta) -> dict[str, Any]:
    grants: dict[str, dict[str, int]] = {}
    for (client, status), n in sorted(stats.counts.items()):
        grants.setdefault(client, {})[status] = n
    shown = []
    held = 0
    blocked: set[str] = set()
    for row in replicas:
        state = replica_state(row, now, interval)
        if state == "stopped" and now - row["stopped_at"] > STOPPED_KEPT:
            continue
        circuits = json.loads(row.get("open_circuits") or "[]")
        last = json.loads(row["last_pass"]) if row.get("last_pass") else None
        if state == "running":
            held += int(row.get("held_outcomes") or 0)
            blocked.update(circuits)
        shown.append({
            "owner": row["owner"], "host": row["host"], "pid": row["pid"],
            "version": row["version"], "state": state, "started_at": _iso(row["started_at"]),
            "last_pass_at": _iso(row.get("last_pass_at")), "last_pass": last,
            "held_outcomes": int(row.get("held_outcomes") or 0), "open_circuits": circuits,
            "updated_at": _iso(row["updated_at"]), "stopped_at": _iso(row.get("stopped_at")),
        })
    return {
        "now": _iso(now),
        "grants": grants,
        "backlog": {"due_now": sum(stats.due.values()), "by_client": dict(sorted(
            stats.due.items()))},
        "refresh_token_deadlines": [
            {"grant_id": g.id, "client": g.client, "user_id": g.user_id,
             "status": g.status.value, "refresh_expires_at": _iso(g.refresh_expires_at)}
            for g in deadlines],
        "capacity": capacity(shown),
        "held_outcomes": held,
        "blocked_clients": sorted(blocked),
        "replicas": shown,
    }


def capacity(replicas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The newest plan the listed replicas reported (all plan the same table against the
    same limit), with its words; every figure None when none has reported one."""
    newest: tuple[datetime, planner.Capacity, dict[str, Any]] | None = None
    for r in replicas:
        report: Any = (r.get("last_pass") or {}).get("capacity")
        if report is None:
            continue  # no plan yet, or a failed first pass
        try:
            at = datetime.fromisoformat(report["planned_at"])
            if at.tzinfo is None:
                raise ValueError("planned_at without a time zone")
            c = planner.Capacity(
                limit=float(report["limit"]), needed=float(report["needed"]),
                margin=timedelta(seconds=report["margin_s"]),
                aim=timedelta(seconds=report["aim_s"]),
                floor=timedelta(seconds=report["floor_s"]), grants=int(report["grants"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            continue  # written by another version: not a reason to fail status
        if newest is None or at > newest[0]:
            newest = (at, c, r)
    if newest is None:
        return {"limit": None, "needed": None, "ratio": None, "margin_s": None,
                "aim_s": None, "floor_s": None, "grants": None, "planned_at": None,
                "planned_by": None,
                "words": "capacity: not known: no replica has reported a plan yet "
                         "(`tokend run` plans at each pass)"}
    at, c, r = newest
    return {"limit": c.limit, "needed": round(c.needed, 3),
            "ratio": round(c.ratio, 3) if c.limit else None,
            "margin_s": c.margin.total_seconds(), "aim_s": c.aim.total_seconds(),
            "floor_s": c.floor.total_seconds(), "grants": c.grants, "planned_at": _iso(at),
            "planned_by": {"host": r["host"], "pid": r["pid"], "state": r["state"]},
            "words": planner.describe(c)}


def render(s: dict[str, Any]) -> str:
    lines = [f"tokend status at {s['now']}", "", "grants by client and status:"]
    if not s["grants"]:
        lines.append("  (none)")
    for client, counts in s["grants"].items():
        lines.append(f"  {client}: " + ", ".join(f"{st} {n}" for st, n in counts.items()))
    b = s["backlog"]
    lines += ["", f"backlog: {b['due_now']} grant(s) due now"
              + ("" if not b["by_client"] else " ("
                 + ", ".join(f"{c} {n}" for c, n in b["by_client"].items()) + ")")]
    c = s["capacity"]
    first, *more = c["words"].splitlines()
    lines += ["", first, *(f"  {line}" for line in more)]
    if c["planned_by"] is not None:
        by = c["planned_by"]
        lines.append(f"  (planned at {c['planned_at']} by {by['host']} pid {by['pid']}, "
                     f"{by['state']})")
    lines += ["", "next refresh-token deadlines:"]
    if not s["refresh_token_deadlines"]:
        lines.append("  (none)")
    for d in s["refresh_token_deadlines"]:
        who = f"user {d['user_id']}" if d["user_id"] else "client credentials"
        lines.append(f"  {d['refresh_expires_at']}  grant {d['grant_id']} ({d['client']}, "
                     f"{who}, {d['status']})")
    lines += ["", f"held tokens (rotated, not yet saved): {s['held_outcomes']}",
              "blocked clients: " + (", ".join(s["blocked_clients"]) or "none"),
              "", "replicas:"]
    if not s["replicas"]:
        lines.append("  (none has reported yet)")
    for r in s["replicas"]:
        last = r["last_pass"]
        if last is None:
            what = "no pass yet"
        elif "error" in last:
            what = f"failed: {last['error']}"
        else:
            what = (f"refreshed {last['refreshed']}, failed {last['failed']}, "
                    f"skipped {last['skipped']} in {last['duration_s']}s")
        lines.append(f"  {r['host']} pid {r['pid']} ({r['state']}, {r['version']}): last pass "
                     f"{r['last_pass_at'] or '-'}: {what}; held {r['held_outcomes']}; open "
                     f"circuits: {', '.join(r['open_circuits']) or 'none'}")
    return "\n".join(lines) + "\n"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value else None
