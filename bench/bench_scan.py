"""Scan scaling: finding the due grants must not get slower as the table grows.

Two tables side by side on each backend: 10,000 grants and 1,000,000 grants (``--quick``:
100,000), 1,000 of them due in each, spread through the table. Rows are bulk-loaded with
SQL through tokend's own schema; tokens are realistic-size encrypted dummies.

Measured alternately on the two tables, many rounds, medians:

* ``select``: the store's real claim query (``Store.claim_query``: same columns,
  ``ORDER BY next_attempt_at LIMIT``, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) fetching
  all 1,000 due grants, inside an open transaction.
* ``claim``: what a pass does: ``Store.claim_due`` in batches of 8 (the default
  concurrency) until the 1,000 due grants are leased, each batch its own transaction.
  (The leases are reset between rounds.)

Target: time on the big table / time on the small one <= 1.5. The query plans are printed.
``Store.stats()`` (the gauges, once per pass) is timed for information.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from common import (
    backends,
    banner,
    bulk_fill,
    count_rows,
    database,
    load,
    median,
    open_bench_store,
    parse_args,
    ratio_line,
    utcnow,
    workdir,
    write_config,
)
from sqlalchemy import text

from tokend.store import Store

DUE = 1000
SMALL = 10_000


def time_select(store: Store) -> float:
    with store.tx() as conn:
        t0 = time.perf_counter()
        rows = conn.execute(store.claim_query(utcnow(), DUE)).all()
        elapsed = time.perf_counter() - t0
    assert len(rows) == DUE, len(rows)
    return elapsed


def time_claim(store: Store) -> float:
    t0 = time.perf_counter()
    claimed = 0
    while batch := store.claim_due("bench-scan", 8, timedelta(minutes=2)):
        claimed += len(batch)
    elapsed = time.perf_counter() - t0
    assert claimed == DUE, claimed
    with store.engine.begin() as conn:  # make them due again
        conn.execute(text(
            "UPDATE grants SET next_attempt_at = :t, lease_owner = NULL, "
            "lease_expires_at = NULL WHERE lease_owner = 'bench-scan'"),
            {"t": _db_time(store, utcnow() - timedelta(seconds=5))})
    return elapsed


def time_stats(store: Store) -> float:
    t0 = time.perf_counter()
    store.stats(["main"])
    return time.perf_counter() - t0


def _db_time(store: Store, t: Any) -> Any:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if store.dialect == "sqlite" else t


def plans(store: Store) -> str:
    out = [store.due_query_plan(utcnow(), limit=DUE)]
    if store.dialect == "postgresql":
        compiled = store.claim_query(utcnow(), DUE).compile(
            dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
        with store.tx() as conn:
            rows = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + str(compiled)).all()
        out.append("-- EXPLAIN ANALYZE:\n" + "\n".join(r[0] for r in rows))
    return "\n".join(out)


def main() -> None:
    args = parse_args(__doc__)
    big_n = 100_000 if args.quick else 1_000_000
    rounds = 7 if args.quick else 15
    ratios: dict[str, dict[str, float]] = {}
    with workdir("scan") as wd:
        for backend in backends(args):
            banner(f"{backend}: {SMALL:,} vs {big_n:,} grants, {DUE:,} due in each")
            with database(backend, "scan_small", wd) as small_url, \
                    database(backend, "scan_big", wd) as big_url:
                stores: dict[str, Store] = {}
                for label, url, n in (("small", small_url, SMALL), ("big", big_url, big_n)):
                    config = load(write_config(wd, url, token_url="http://127.0.0.1:9/t",
                                               name=f"{label}.toml"))
                    stores[label] = store = open_bench_store(config)
                    secs = bulk_fill(store, n, user_id_start=1, due=DUE)
                    print(f"loaded {count_rows(store):,} rows in {secs:.1f} s", flush=True)
                try:
                    for label, store in stores.items():
                        print(f"-- plan, {label} table:\n{plans(store)}")
                    samples: dict[str, dict[str, list[float]]] = {
                        m: {"small": [], "big": []} for m in ("select", "claim", "stats")}
                    for store in stores.values():  # warm caches once
                        time_select(store)
                        time_claim(store)
                    for _ in range(rounds):
                        for label, store in stores.items():
                            samples["select"][label].append(time_select(store))
                            samples["claim"][label].append(time_claim(store))
                            samples["stats"][label].append(time_stats(store))
                    ratios[backend] = {}
                    for m, by in samples.items():
                        s, b = median(by["small"]), median(by["big"])
                        print(f"{m:6s}: small {s * 1000:8.2f} ms, big {b * 1000:8.2f} ms, "
                              f"ratio {b / s:.2f}")
                        ratios[backend][m] = b / s
                finally:
                    for store in stores.values():
                        store.close()
    banner("ratios")
    for backend, r in ratios.items():
        print(f"info: {backend} stats() big/small = {r['stats']:.2f} (gauges: grows with the "
              "table, not a target)")
    for backend, r in ratios.items():
        print(ratio_line(f"{backend} select_due big/small", r["select"], "<=", 1.5))
        print(ratio_line(f"{backend} claim_due big/small", r["claim"], "<=", 1.5))


if __name__ == "__main__":
    main()
