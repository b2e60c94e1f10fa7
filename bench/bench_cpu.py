"""CPU cost per refresh: a tokend pass against a minimal hand-written loop.

tokend: one maintenance pass (tokend's real ``Maintenance``, store and provider client,
its JSON logs written to /dev/null) over N due grants, concurrency 8, no rate limit.
Minimal loop: for each grant one ``requests.Session().post`` to the token endpoint, the
JSON parsed, and one plain ``UPDATE grants SET access_token, refresh_token, ...`` with a
commit, straight through the DB-API driver (sqlite3 / psycopg) on one connection.

Both run in THIS process against the same fake provider (its own process, 50 ms
latency as in the other benchmarks) and the same database, alternately, nine rounds of
200 grants each (``--quick``: three of 100); the figure is process CPU
(``time.process_time()``: user + system of all threads of this process) per refresh,
and the result the median of the per-round ratios (CPU time on a shared VM varies by
+-20 % from one second to the next: many short alternating rounds, not a few long ones).
Target (issue 13): tokend / minimal <= 1.3 on each backend, with ``synchronous=FULL`` in
force: the minimal loop's SQLite connection runs FULL too (the same durability as
tokend's); on SQLite a second minimal loop with ``synchronous=NORMAL`` (no fsync per
commit) is measured in the same rounds and its ratio printed for reference.

``--latency 0.005`` shows the other extreme: the pass is then CPU-bound (eight threads
contending for the GIL) and pays for the contention, the sequential loop does not.
"""

from __future__ import annotations

import gc
import itertools
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from common import (
    CLIENT_ID,
    CLIENT_SECRET,
    Fake,
    backends,
    banner,
    database,
    load,
    median,
    open_bench_store,
    parse_args,
    ratio_line,
    seed_due,
    workdir,
    write_config,
)

from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.provider import ProviderClient
from tokend.store import Store
from tokend.testing import quiet_logs

_users = itertools.count()


def seed(store: Store, fake: Fake, n: int) -> list[tuple[int, str]]:
    """``n`` due grants; returns (id, refresh token in clear) of each."""
    ids = seed_due(store, fake, n, user_id_start=next(_users) * 100_000 + 1)
    out = []
    for gid in ids:
        _, refresh = store.tokens(store.get(gid, with_tokens=True))
        assert refresh is not None
        out.append((gid, refresh))
    return out


def tokend_pass(m: Maintenance, store: Store, fake: Fake, n: int) -> float:
    """One pass of ``m``: the passes of one Maintenance follow each other as in the
    daemon (its start-up probe and its first plan fall into the warm-up pass)."""
    seed(store, fake, n)
    fake.reset_stats()
    gc.collect()
    c0 = time.process_time()
    result = m.run_pass()
    cpu = time.process_time() - c0
    check(fake, n, result.refreshed)
    return cpu / n


def minimal_loop(store: Store, url: str, fake: Fake, n: int, sync: str = "FULL") -> float:
    grants = seed(store, fake, n)
    fake.reset_stats()
    if url.startswith("sqlite"):
        conn: Any = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
        # FULL as tokend's connections (the same durability: a saved rotated token is on
        # disk when the commit returns); NORMAL is measured alongside for reference.
        conn.execute(f"PRAGMA synchronous={sync}")
        begin, mark = "BEGIN", "?"
    else:
        import psycopg

        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        begin, mark = "", "%s"
    # next_attempt_at too (as tokend's save): a row left due would be refreshed again by
    # the next tokend pass (policy.refresh_due: due for no other reason than its refresh)
    sql = (f"UPDATE grants SET access_token = {mark}, refresh_token = {mark}, "
           f"access_expires_at = {mark}, updated_at = {mark}, next_attempt_at = {mark} "
           f"WHERE id = {mark}")
    session = requests.Session()
    gc.collect()
    c0 = time.process_time()
    for gid, refresh in grants:
        r = session.post(fake.token_url, data={
            "grant_type": "refresh_token", "refresh_token": refresh,
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, timeout=10)
        r.raise_for_status()
        body = r.json()
        now = datetime.now(UTC)
        expires: Any = now + timedelta(seconds=body["expires_in"])
        following: Any = now + timedelta(hours=18)
        if begin:  # sqlite: tokend's text timestamps
            expires, now, following = (t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                                       for t in (expires, now, following))
            conn.execute(begin)
        conn.execute(sql, (body["access_token"], body["refresh_token"], expires, now,
                           following, gid))
        conn.commit()
    cpu = time.process_time() - c0
    session.close()
    conn.close()
    check(fake, n, n)
    return cpu / n


def check(fake: Fake, n: int, refreshed: int) -> None:
    stats = fake.stats()
    if refreshed != n or stats["rotations"] != n or stats["reuse_count"]:
        raise SystemExit(f"run went wrong: refreshed {refreshed}/{n}, rotations "
                         f"{stats['rotations']}, reuse {stats['reuse_count']}")


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument(
        "--latency", type=float, default=0.05, help="provider latency, seconds"))
    latency = args.latency
    n = 100 if args.quick else 200
    rounds = 3 if args.quick else 9
    ratios: dict[str, float] = {}
    with workdir("cpu") as wd, Fake(latency=latency) as fake:
        for backend in backends(args):
            banner(f"{backend}: CPU per refresh, {n} grants x {rounds} rounds, "
                   f"latency {latency * 1000:.0f} ms")
            with database(backend, "cpu", wd) as url:
                path = write_config(wd, url, token_url=fake.token_url, concurrency=8,
                                    rate_limit=0)
                config = load(path)
                with open(os.devnull, "w") as devnull, \
                        quiet_logs(config.logging.level, sink=devnull):
                    store = open_bench_store(config, pool_size=10)
                    provider = ProviderClient(config.provider,
                                              pool_size=config.schedule.concurrency)
                    m = Maintenance(config, store, provider, metrics=Metrics())
                    try:
                        tokend_pass(m, store, fake, 50)  # warm-up: imports, caches, plan
                        minimal_loop(store, url, fake, 50)
                        t_cpu, m_cpu, normal = [], [], []
                        for i in range(rounds):
                            t_cpu.append(tokend_pass(m, store, fake, n))
                            m_cpu.append(minimal_loop(store, url, fake, n))
                            line = (f"  round {i + 1}: tokend {t_cpu[-1] * 1000:.3f} ms/refresh, "
                                    f"minimal {m_cpu[-1] * 1000:.3f} ms/refresh, "
                                    f"ratio {t_cpu[-1] / m_cpu[-1]:.2f}")
                            if backend == "sqlite":
                                normal.append(minimal_loop(store, url, fake, n, sync="NORMAL"))
                                line += (f"; minimal NORMAL {normal[-1] * 1000:.3f} ms, ratio "
                                         f"{t_cpu[-1] / normal[-1]:.2f}")
                            print(line, flush=True)
                    finally:
                        m.close()
                        provider.close()
                        store.close()
            # each round's pair ran back to back: the median of the per-round ratios is
            # the figure least disturbed by the machine's neighbours
            ratios[backend] = median([t / m for t, m in zip(t_cpu, m_cpu, strict=True)])
            print(f"{backend}: median tokend {median(t_cpu) * 1000:.3f} ms, "
                  f"minimal {median(m_cpu) * 1000:.3f} ms CPU per refresh; median of the "
                  f"per-round ratios {ratios[backend]:.3f}")
            if normal:
                print(f"{backend}: minimal with synchronous=NORMAL {median(normal) * 1000:.3f} "
                      f"ms; median of tokend / it "
                      f"{median([t / m for t, m in zip(t_cpu, normal, strict=True)]):.3f} "
                      "(reference only: not the same durability)")
    banner("ratios")
    for backend, r in ratios.items():
        print(ratio_line(f"{backend} cpu_per_refresh tokend/minimal", r, "<=", 1.3))


if __name__ == "__main__":
    main()
