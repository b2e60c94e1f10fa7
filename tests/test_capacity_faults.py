"""Three tokend processes on PostgreSQL share ONE rate limit (issue 13): the provider
never sees more than ``provider.rate_limit`` requests in any 1-second window."""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import faultlib as fl
from conftest import reset_pg
from test_faults import World

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

RATE = 5
GRANTS = 60


def most_in_any_second(times: list[float]) -> int:
    """The most request starts inside any half-open 1-second window."""
    times = sorted(times)
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        most = max(most, i - j + 1)
    return most


def test_most_in_any_second() -> None:
    assert most_in_any_second([0.0, 0.5, 0.99, 1.0, 1.2]) == 4
    assert most_in_any_second([0.0, 0.21, 0.42, 0.63, 0.84, 1.05]) == 5
    assert most_in_any_second([]) == 0


@pytest.fixture
def pg(pg_url: str) -> Iterator[str]:
    reset_pg(pg_url)
    yield pg_url
    reset_pg(pg_url)


def test_three_replicas_never_exceed_the_shared_rate_limit(tmp_path: Path, pg: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a fake that keeps the moment of every request
    monkeypatch.setattr(fl, "FakeProcess", functools.partial(fl.FakeProcess,
                                                             request_times=10_000))
    world = World(tmp_path, pg, interval="1s")
    try:
        text = world.config_path.read_text().replace("rate_limit = 0", f"rate_limit = {RATE}")
        world.config_path.write_text(text)
        world.seed(GRANTS)  # all due now, 1 h left on each token
        world.fake.reset_stats()
        daemons = [world.daemon("run", name=f"replica{i}") for i in range(3)]
        started = time.monotonic()
        # stopped halfway, while workers of all three wait for their slots
        world.wait_for_requests(GRANTS // 2, 60, daemons[0])
        elapsed = time.monotonic() - started
        for d in daemons:  # a stop must not release the workers waiting for slots at once
            d.signal(signal.SIGTERM)
        for d in daemons:
            assert d.wait(30) is not None
        times = world.fake.stats(times=True)["request_times"]
        assert len(times) >= GRANTS // 2
        most = most_in_any_second(times)
        assert most <= RATE, f"{most} requests in one second (limit {RATE})"
        # and the three together still use the budget (not one third each)
        assert GRANTS // 2 / elapsed > 0.5 * RATE, f"{GRANTS // 2} in {elapsed:.1f}s"
    finally:
        world.close()
