"""Prometheus metrics (names and labels fixed by docs/contract.md) and the HTTP endpoint.

All series a configured client can have exist from start-up with zero values, so an
alert never sees "absent" by accident. No label ever holds a user, tenant or grant id.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .listener import BoundedHTTPServer, Served
from .model import GrantType, Stats, Status

KINDS = ("transient", "permanent", "client")
EVENTS = ("reconsent_due", "reconsent_required", "reconsent_reminder", "recovered")
OUTCOMES = ("delivered", "failed")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_start_time_seconds lets TokendNoSuccessfulPass catch a first pass that hangs
        ProcessCollector(registry=r)
        self.attempts = Counter("tokend_refresh_attempts", "Refresh / acquire attempts.",
                                ["client", "grant_type"], registry=r)
        self.failures = Counter("tokend_refresh_failures", "Failed attempts by error kind.",
                                ["client", "grant_type", "kind", "error"], registry=r)
        self.duration = Histogram(
            "tokend_refresh_duration_seconds", "Duration of token endpoint calls.",
            ["client", "grant_type"], registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.grants = Gauge("tokend_grants", "Grants by status.", ["client", "status"], registry=r)
        self.access_earliest = Gauge(
            "tokend_access_token_expiry_earliest_timestamp_seconds",
            "Earliest access-token expiry among maintained grants (0: none).", ["client"],
            registry=r)
        self.refresh_earliest = Gauge(
            "tokend_refresh_token_expiry_earliest_timestamp_seconds",
            "Earliest refresh-token expiry among maintained grants (0: none).", ["client"],
            registry=r)
        self.due = Gauge("tokend_due_grants", "Grants whose next attempt is due now.", ["client"],
                         registry=r)
        self.unreadable = Gauge(
            "tokend_grants_unreadable",
            "Grant rows set aside because they cannot be decoded (log: grant_unreadable).",
            registry=r)
        self.pass_duration = Histogram(
            "tokend_pass_duration_seconds", "Duration of maintenance passes.", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.pass_last_success = Gauge("tokend_pass_last_success_timestamp_seconds",
                                       "End of the last successful pass (unix time).", registry=r)
        self.notifications = Counter("tokend_notifications", "Webhook deliveries.",
                                     ["event", "outcome"], registry=r)
        self.client_blocked_gauge = Gauge(
            "tokend_client_blocked",
            "1 while the provider refuses the client's credentials (its circuit is open).",
            ["client"], registry=r)
        self.build_info = Gauge("tokend_build_info", "tokend version.", ["version"], registry=r)
        self.interval = Gauge("tokend_schedule_interval_seconds",
                              "Configured interval between passes.", registry=r)
        self.held = Gauge(
            "tokend_held_outcomes", "Refreshes whose rotated refresh token the database has "
            "not taken yet (spooled to <state dir>/spool, saved as soon as it can be).",
            registry=r)
        # needed / limit is the table's use of the provider's rate limit (tokend.planner):
        # the TokendCapacity alert fires above 0.8.
        self.rate_needed = Gauge(
            "tokend_refresh_rate_needed",
            "Requests/s the grant table needs to keep every access token alive "
            "(refreshed at schedule.refresh_margin_min, including backlogs ahead).", registry=r)
        self.rate_limit = Gauge(
            "tokend_refresh_rate_limit",
            "provider.rate_limit in requests/s (all replicas together on PostgreSQL; "
            "0: unlimited).", registry=r)
        # A slot of the shared rate limit its request could not leave within the send
        # gate's tolerance (tokend.sendgate): unused, the request took a new one.
        self.slots_missed = Counter(
            "tokend_rate_slots_missed",
            "Slots of the shared rate limit left unused: the request would have left too "
            "late after its slot, or the database's round trip was too slow to place it.",
            registry=r)
        self.build_info.labels(__version__).set(1)
        self._known_clients: set[str] = set()
        self._lock = threading.Lock()

    def init_clients(self, clients: Iterable[tuple[str, bool]], interval: float) -> None:
        """Zero-valued series for every configured client (name, keeps client credentials)."""
        self.interval.set(interval)
        for event in EVENTS:
            for outcome in OUTCOMES:
                self.notifications.labels(event, outcome)
        for name, cc in clients:
            self._known_clients.add(name)
            types = [GrantType.AUTHORIZATION_CODE.value]
            if cc:
                types.append(GrantType.CLIENT_CREDENTIALS.value)
            for gt in types:
                self.attempts.labels(name, gt)
                self.duration.labels(name, gt)
                for kind in KINDS:
                    self.failures.labels(name, gt, kind, "none")
            for status in Status:
                self.grants.labels(name, status.value).set(0)
            self.access_earliest.labels(name).set(0)
            self.refresh_earliest.labels(name).set(0)
            self.due.labels(name).set(0)
            self.client_blocked_gauge.labels(name).set(0)

    def attempt(self, client: str, grant_type: str, seconds: float) -> None:
        self.attempts.labels(client, grant_type).inc()
        self.duration.labels(client, grant_type).observe(seconds)

    def client_blocked(self, client: str, blocked: bool) -> None:
        self.client_blocked_gauge.labels(client).set(1 if blocked else 0)

    def failure(self, client: str, grant_type: str, kind: str, error: str) -> None:
        self.failures.labels(client, grant_type, kind, error).inc()

    def pass_done(self, seconds: float, finished: datetime | None) -> None:
        self.pass_duration.observe(seconds)
        if finished is not None:
            self.pass_last_success.set(finished.timestamp())

    def capacity(self, needed: float, limit: float) -> None:
        self.rate_needed.set(needed)
        self.rate_limit.set(limit)

    def slot_missed(self) -> None:
        self.slots_missed.inc()

    def notified(self, event: str, outcome: str) -> None:
        self.notifications.labels(event, outcome).inc()

    def set_stats(self, stats: Stats) -> None:
        with self._lock:
            clients = self._known_clients | {c for c, _ in stats.counts} | set(stats.due)
            for client in clients:
                self._known_clients.add(client)
                for status in Status:
                    self.grants.labels(client, status.value).set(
                        stats.counts.get((client, status.value), 0))
                a = stats.access_earliest.get(client)
                r = stats.refresh_earliest.get(client)
                self.access_earliest.labels(client).set(a.timestamp() if a else 0)
                self.refresh_earliest.labels(client).set(r.timestamp() if r else 0)
                self.due.labels(client).set(stats.due.get(client, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


Probe = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer(Served):
    """``/metrics``, ``/healthz`` (process and scheduler alive), ``/readyz`` (can do work)."""

    def __init__(self, metrics: Metrics, address: tuple[str, int], *,
                 healthy: Probe, ready: Probe) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    probe = outer.healthy if path == "/healthz" else outer.ready
                    try:
                        ok, detail = probe()
                    except Exception as exc:  # a probe must answer, not crash the server
                        ok, detail = False, {"error": type(exc).__name__}
                    body = json.dumps({"ok": ok, **detail}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        super().__init__(BoundedHTTPServer(address, Handler, name="tokend-metrics-http"),
                         "tokend-metrics")
