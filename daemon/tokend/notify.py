"""Webhook notifications, delivered at least once from the durable ``events`` outbox.

A status change and its event are written in one transaction (``Store.save``), so a
crash can neither lose an event nor send one for a change that was not saved. Delivery
retries with backoff until the receiver answers 2xx; each event carries its id (also in
``X-Tokend-Event-Id``) so the receiver can drop duplicates.

Signature: ``X-Tokend-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` over the bytes
``<t>.<body>`` with ``notify.webhook_secret`` (see README for verification).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from datetime import timedelta

import requests

from . import __version__, logs
from .config import Config
from .errors import StoreError
from .metrics import Metrics
from .store import Store

log = logs.get("tokend.notify")
MAX_BACKOFF = timedelta(hours=1)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300,
           now: float | None = None) -> bool:
    """The receiver's check (also used by tests): signature valid and fresh."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def retry_delay(attempts: int) -> timedelta:
    delay: timedelta = timedelta(seconds=5) * (2 ** min(attempts, 20))
    return min(delay, MAX_BACKOFF)


class WebhookNotifier:
    def __init__(self, config: Config, store: Store, metrics: Metrics,
                 stop: threading.Event | None = None, *, timeout: float = 10.0) -> None:
        self.url = config.notify.webhook_url
        secret = config.notify.webhook_secret
        self.secret = secret.value if secret else None
        self.store = store
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"tokend/{__version__}"

    def deliver_due(self) -> int:
        """Deliver what is due; returns how many were delivered. Never raises."""
        if not self.url:
            return 0
        delivered = 0
        try:
            due = self.store.due_events()
        except StoreError as exc:
            log.warning("outbox_unavailable", error=str(exc))
            return 0
        for event_id, name, payload, attempts in due:
            if self.stop.is_set():
                break
            body = payload.encode()
            headers = {"Content-Type": "application/json", "X-Tokend-Event-Id": event_id,
                       "X-Tokend-Event": name}
            if self.secret:
                headers["X-Tokend-Signature"] = sign(self.secret, int(time.time()), body)
            error = None
            try:
                resp = self.session.post(self.url, data=body, headers=headers,
                                         timeout=self.timeout, allow_redirects=False)
                if not 200 <= resp.status_code < 300:
                    error = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                error = type(exc).__name__
            try:
                if error is None:
                    self.store.event_delivered(event_id)
                    delivered += 1
                    self.metrics.notified(name, "delivered")
                    log.info("notification_delivered", notification=name, event_id=event_id)
                else:
                    retry_at = self.store.clock() + retry_delay(attempts)
                    self.store.event_failed(event_id, error, retry_at)
                    self.metrics.notified(name, "failed")
                    log.warning("notification_failed", notification=name, event_id=event_id,
                                error=error, attempts=attempts + 1, retry_at=retry_at.isoformat())
            except StoreError as exc:
                # Delivered but not marked: it will be sent again (at least once).
                log.warning("outbox_update_failed", event_id=event_id, error=str(exc))
                break
        return delivered
