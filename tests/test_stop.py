"""One stop event and one clock, made by run_daemon/run_once and shared by every part."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from conftest import CLIENT_ID
from tokend.config import Config
from tokend.daemon import Daemon
from tokend.fake import FakeJustimmo
from tokend.model import NewGrant
from tokend.policy import initial
from tokend.store import Store
from tokend.testing import quiet_logs

N = 12


def seed(store: Store, config: Config, fake: FakeJustimmo) -> list[int]:
    issued = fake.issue_many(CLIENT_ID, N, user_id_start=1)
    now = datetime.now(UTC)
    return store.insert_grants([NewGrant(
        client="main", grant_type="authorization_code", access_token=t.access_token,
        access_expires_at=now + timedelta(hours=1), obtained_at=now - timedelta(hours=4),
        refresh_token=t.refresh_token, refresh_expires_at=t.refresh_expires_at,
        user_id=str(t.user_id), tenant_id=str(t.tenant_id)) for t in issued],
        lambda g: initial(g, now, config.schedule))


def test_the_signal_event_stops_the_pass_the_notifier_and_the_scheduler(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    config = make_config(fake=fake, schedule_extra="concurrency = 1\nbatch_size = 1")
    store = store_for(config)
    seed(store, config, fake)
    fake.set_latency(0.3)
    stop = threading.Event()  # what run_daemon's signal handler sets
    daemon = Daemon(config, store, stop=stop)
    try:
        assert daemon.maintenance.stop_event is stop and daemon.notifier.stop is stop
        with quiet_logs():
            timer = threading.Timer(0.5, stop.set)  # the signal arrives during the pass
            timer.start()
            started = time.monotonic()
            result = daemon.maintenance.run_pass()
            timer.join()
        # Nothing but the event was touched: the pass stopped claiming by itself.
        assert result.stopped and 0 < result.claimed < N, result
        assert time.monotonic() - started < 10
        assert daemon.run_pass() is None  # the scheduler's next pass does not start
    finally:
        daemon.close()


def test_one_clock_for_the_daemon_the_pass_and_the_api(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    config = make_config(fake=fake)
    store = store_for(config)
    moment = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    daemon = Daemon(config, store, clock=lambda: moment)
    try:
        assert daemon.started_at == moment
        assert daemon.maintenance.clock() == moment
    finally:
        daemon.close()
