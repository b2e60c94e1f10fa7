"""The daemon: an APScheduler 3.x interval job around the maintenance pass.

The main thread only waits on an event (and pings the systemd watchdog); the scheduler
thread runs passes (``max_instances=1``, coalesced, first one immediately). SIGTERM or
SIGINT stops claiming, lets in-flight refreshes finish and be saved, and exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from . import heartbeat, logs, state
from .api_server import ApiServer
from .config import Config
from .consent_server import ConsentServer
from .errors import SchemaError, StoreError, TokendError
from .maintenance import Maintenance, PassResult
from .metrics import Metrics, MetricsServer
from .notify import WebhookNotifier
from .provider import ProviderClient
from .sdnotify import SystemdNotifier
from .store import Clock, Store, open_store

log = logs.get("tokend.daemon")
STOP_TIMEOUT = 45.0  # below systemd's TimeoutStopSec=60
HELD_EXTEND = 60.0  # EXTEND_TIMEOUT_USEC is asked for at most this long after a stop begins


class Daemon:
    def __init__(self, config: Config, store: Store, *, metrics: Metrics | None = None,
                 provider: ProviderClient | None = None, stop: threading.Event | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.store = store
        # One stop event for every part (scheduler jobs, the pass, the notifier), made by
        # run_daemon/run_once whose signal handler sets it; and one clock.
        self.stop_event = stop if stop is not None else threading.Event()
        self.clock: Clock = clock or store.clock
        self.metrics = metrics or Metrics()
        self.metrics.init_clients(((c.name, c.client_credentials)
                                   for c in config.clients.values()),
                                  config.schedule.interval.total_seconds())
        self.provider = provider or ProviderClient(
            config.provider, pool_size=config.schedule.concurrency)
        self.maintenance = Maintenance(config, store, self.provider, metrics=self.metrics,
                                       stop=self.stop_event, clock=self.clock)
        # Code exchanges at the consent endpoint take slots of the same rate limit.
        self.provider.limiter = self.maintenance.limiter
        self.notifier = WebhookNotifier(config, store, self.metrics, self.stop_event)
        self.last_success: datetime | None = None
        self.last_result: PassResult | None = None
        self.consecutive_errors = 0
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.server: MetricsServer | None = None
        self.consent_server: ConsentServer | None = None
        self.api_server: ApiServer | None = None
        self.started_at = self.clock()

    # ------------------------------------------------------------------ passes

    def run_pass(self) -> PassResult | None:
        """One pass with its own error boundary: the database may be down; we go on."""
        if self.stop_event.is_set():
            return None
        started = self.clock()
        try:
            result = self.maintenance.run_pass()
        except TokendError as exc:
            self.consecutive_errors += 1
            self.metrics.pass_done((self.clock() - started).total_seconds(), None)
            log.error("pass_failed", error=str(exc), consecutive=self.consecutive_errors)
            heartbeat.write(self.store, heartbeat.row(
                self.maintenance, self.started_at, self.clock(), None, error=str(exc)))
            return None
        except Exception as exc:  # a bug must not end the daemon either
            self.consecutive_errors += 1
            log.exception("pass_crashed", error=type(exc).__name__)
            return None
        finished = self.clock()
        self.consecutive_errors = 0
        self.last_success = finished
        self.last_result = result
        self.metrics.pass_done(result.duration, finished)
        self.update_gauges()
        heartbeat.write(self.store, heartbeat.row(self.maintenance, self.started_at,
                                                  finished, result))
        log.info("pass_done", claimed=result.claimed, refreshed=result.refreshed,
                 failed=result.failed, skipped=result.skipped,
                 failures=dict(result.failures), duration_s=round(result.duration, 3),
                 stopped=result.stopped)
        return result

    def update_gauges(self) -> None:
        self.metrics.unreadable.set(len(self.store.unreadable))
        try:
            self.metrics.set_stats(self.store.stats(list(self.config.clients)))
        except StoreError as exc:
            log.warning("gauges_not_updated", error=str(exc))

    # ------------------------------------------------------------------ health

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        running = bool(self.scheduler.running)
        stuck = False
        started = self.maintenance.pass_started
        if self.maintenance.pass_running.is_set() and started is not None:
            limit = max(self.maintenance.lease.total_seconds() * 5, 600)
            stuck = time.monotonic() - started > limit
        # Held outcomes never keep a pass running (a failed commit hands them to the
        # background replay; a pass waits at most for one commit to fail): a database
        # that refuses saves is no reason to be killed.
        return running and not stuck, {"scheduler_running": running, "pass_stuck": stuck,
                                       "held_outcomes": self.maintenance.held.count()}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        window = self.config.schedule.interval * 3 + timedelta(seconds=30)
        recent = self.last_success is not None and \
            self.clock() - self.last_success < window
        try:
            self.store.revision()
            db = True
        except Exception:
            db = False
        return db and recent, {
            "database": db, "last_success": self.last_success.isoformat()
            if self.last_success else None,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        address = self.config.metrics.address
        if address is not None:
            try:
                self.server = MetricsServer(self.metrics, address, healthy=self.healthy,
                                            ready=self.ready).start()
            except OSError as exc:
                raise TokendError(f"metrics.listen: cannot listen on "
                                  f"{self.config.metrics.listen}: {exc.strerror}") from None
            log.info("metrics_listening", address=f"{self.server.address[0]}:"
                                                   f"{self.server.address[1]}")
        if self.config.consent.address is not None:
            try:
                self.consent_server = ConsentServer(self.config, self.store,
                                                    self.provider).start()
            except OSError as exc:
                raise TokendError(f"consent.listen: cannot listen on "
                                  f"{self.config.consent.listen}: {exc.strerror}") from None
            log.info("consent_listening", address=f"{self.consent_server.address[0]}:"
                                                   f"{self.consent_server.address[1]}",
                     public_url=self.config.consent.public_url)
        if self.config.api.enabled:
            self.api_server = self._start_api()
        interval = self.config.schedule.interval.total_seconds()
        self.scheduler.add_job(
            self.run_pass, "interval", seconds=interval, id="maintenance",
            max_instances=1, coalesce=True, misfire_grace_time=max(1, int(interval)),
            next_run_time=datetime.now(UTC))
        if self.config.notify.webhook_url:
            self.scheduler.add_job(
                self.notifier.deliver_due, "interval", seconds=min(interval, 10.0), id="notify",
                max_instances=1, coalesce=True, next_run_time=datetime.now(UTC))
        self.scheduler.start()

    def _start_api(self) -> ApiServer:
        from . import api_server
        from .api import TokenStore
        from .ondemand import OnDemand

        tokens = TokenStore(self.config, store=self.store)
        ondemand = OnDemand(self.maintenance, self.config.api.wait)
        try:
            server = api_server.start(self.config, tokens, ondemand)
        except OSError as exc:
            raise TokendError(f"api.listen: cannot listen on {self.config.api.listen}: "
                              f"{exc.strerror}") from None
        log.info("api_listening", address=server.address,
                 clients=list(self.config.api.clients) or "all")
        return server

    def stop(self) -> None:
        self.stop_event.set()
        self.maintenance.stop()
        if self.api_server is not None:  # on-demand callers get 503 at once now
            self.api_server.stop()
        # wait=True: the running pass finishes its in-flight refreshes and saves them.
        done = threading.Event()

        def shutdown() -> None:
            try:
                self.scheduler.shutdown(wait=True)
            finally:
                done.set()

        threading.Thread(target=shutdown, daemon=True).start()
        if not done.wait(STOP_TIMEOUT):
            log.error("stop_timeout", detail="in-flight work did not finish in time")
        self.close()
        self.update_gauges()
        heartbeat.write(self.store, heartbeat.row(
            self.maintenance, self.started_at, None, None, stopped_at=self.clock()))

    def close(self) -> None:
        """Release what this daemon holds (listeners, refresh workers, owner lock, HTTP
        pool); the end of both ``stop()`` and ``run --once``."""
        self.stop_event.set()
        if self.consent_server is not None:
            self.consent_server.stop()
        self.maintenance.close()
        self.provider.close()
        if self.server is not None:
            self.server.stop()


def run_daemon(config: Config) -> int:
    logs.configure(config.logging)
    state.prepare(config)
    sd = SystemdNotifier.from_env()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    store = _open_with_retry(config, stop, sd)
    if store is None:
        return 0
    daemon = Daemon(config, store, stop=stop, clock=store.clock)
    daemon.start()
    sd.ready()
    log.info("started", clients=sorted(config.clients), interval=str(config.schedule.interval),
             owner=daemon.maintenance.owner)
    ping = sd.watchdog_interval or 5.0
    while not stop.wait(min(ping, 5.0)):
        if daemon.healthy()[0]:
            sd.watchdog()
    sd.stopping()
    held = daemon.maintenance.held
    saver = daemon.maintenance.saver
    log.info("stopping", held_outcomes=held.count(), saving=saver.pending())
    # New tokens the saver has not written yet count as held: a commit stuck on a
    # vanished database may take up to 30 s to fail (and hand them to the spool).
    with _extend_stop_while_held(sd, lambda: held.count() + saver.pending()):
        daemon.stop()
        lost = held.settle(HELD_EXTEND - 5)
    store.close()
    return _stopped(held.count(), lost)


def _stopped(held: int, lost: int) -> int:
    if lost:
        log.critical("held_outcomes_lost", lost=lost,
                     detail="rotated refresh tokens neither saved nor spooled (the state "
                            "directory is not writable); their grants need re-consent")
        return 1
    if held:
        log.warning("held_outcomes_spooled", held_outcomes=held,
                    detail="saved by the next start, before it refreshes anything")
    log.info("stopped")
    return 0


@contextlib.contextmanager
def _extend_stop_while_held(sd: SystemdNotifier, held: Callable[[], int]) -> Iterator[None]:
    """While outcomes are held during the stop, ask systemd for more time, at most
    ``HELD_EXTEND`` seconds in all (then ``TimeoutStopSec`` applies as usual)."""
    done = threading.Event()
    started = time.monotonic()

    def extend() -> None:
        while (left := HELD_EXTEND - (time.monotonic() - started)) > 0:
            if held():
                sd.extend_timeout(min(15.0, left))
            if done.wait(5.0):
                return

    thread = threading.Thread(target=extend, name="tokend-stop-extend", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2)


def _open_with_retry(config: Config, stop: threading.Event,
                     sd: SystemdNotifier) -> Store | None:
    """A database that is down at start-up is waited for, not a reason to die."""
    delay = 1.0
    while True:
        try:
            return open_store(config, pool_size=config.schedule.concurrency + 2)
        except SchemaError:
            raise  # an operator must act; waiting does not help
        except StoreError as exc:
            log.error("database_unavailable", error=str(exc), retry_in=delay)
            sd.status(f"waiting for the database: {exc}")
            sd.watchdog()
        if stop.wait(delay):
            return None
        delay = min(delay * 2, 30.0)


def run_once(config: Config) -> int:
    """One pass. SIGTERM or SIGINT (a cron job's timeout, systemd stopping a oneshot
    unit, Ctrl-C) stops claiming as in ``run``: refreshes in flight finish and are
    saved, claimed grants not yet sent are given back, and the exit code is that of
    the pass so far. Dying at once would lose the rotated tokens in flight."""
    logs.configure(config.logging)
    state.prepare(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    store = open_store(config, pool_size=config.schedule.concurrency + 2)
    # A signal while opening the store has set ``stop`` already: nothing is claimed.
    daemon = Daemon(config, store, stop=stop, clock=store.clock)
    held = daemon.maintenance.held
    try:
        result = daemon.maintenance.run_pass()
        held.replay()  # one more try for what the workers handed over
        daemon.notifier.deliver_due()
    finally:
        daemon.close()
        lost = held.settle(HELD_EXTEND - 5)
        store.close()
    log.info("pass_done", claimed=result.claimed, refreshed=result.refreshed,
             failed=result.failed, skipped=result.skipped, failures=dict(result.failures),
             duration_s=round(result.duration, 3), stopped=result.stopped,
             held_outcomes=held.count())
    code = _stopped(held.count(), lost)
    if stop.is_set():
        log.info("stopped")
    return 0 if result.ok and not held.count() and not code else 1
