"""Scale-out on PostgreSQL: three ``tokend run`` replicas against one.

3,000 due grants (``--quick``: 600), provider latency 200 ms, concurrency 4 per process,
no rate limit. First one ``tokend run`` process maintains them, then three processes
(fresh grants, same database, same fake provider) started together. Each run ends when
the fake has rotated every grant; the daemons are then stopped with SIGTERM (exit 0).

Throughput is taken from the fake's own request times (first token request to last
answer), and also from the wall clock (launch to last rotation, start-up included).
Every grant must be refreshed exactly once: rotations == grants, no refresh-token
reuse, and every row saved once (token_version == 1).

Target: throughput of three / of one >= 2.5.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from common import (
    Fake,
    banner,
    database,
    load,
    open_bench_store,
    parse_args,
    pg_available,
    ratio_line,
    seed_due,
    tokend_cmd,
    workdir,
    write_config,
)
from sqlalchemy import text

LATENCY = 0.2
CONCURRENCY = 4


def run(n_procs: int, path: Path, fake: Fake, n: int, wd: Path) -> dict[str, Any]:
    fake.reset_stats()
    logs = [open(wd / f"run{n_procs}-{i}.log", "wb") for i in range(n_procs)]  # noqa: SIM115
    t0 = time.monotonic()
    procs = [subprocess.Popen(tokend_cmd(path, "run"), stdout=log, stderr=subprocess.STDOUT)
             for log in logs]
    ideal = n / (n_procs * CONCURRENCY / LATENCY)
    deadline = t0 + ideal * 3 + 60
    try:
        while True:
            stats = fake.stats()
            if stats["rotations"] >= n and stats["in_flight"] == 0:
                wall = time.monotonic() - t0
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a tokend exited early, see {wd}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{n_procs} process(es): only {stats['rotations']} of {n} "
                                 "refreshed in time")
            time.sleep(0.1)
    finally:
        for p in procs:
            p.terminate()
        codes = [p.wait(60) for p in procs]
        for log in logs:
            log.close()
    time.sleep(0.5)
    stats = fake.stats()
    times = stats["request_times"]
    window = max(times) - min(times) + LATENCY
    return {"wall": wall, "window": window, "per_s": n / window, "wall_per_s": n / wall,
            "rotations": stats["rotations"], "reuse": stats["reuse_count"],
            "token_requests": stats["token_requests"], "exit_codes": codes}


def main() -> None:
    args = parse_args(__doc__)
    n = 600 if args.quick else 3000
    if not pg_available():
        raise SystemExit("PostgreSQL is needed for this benchmark")
    with workdir("scaleout") as wd, Fake(latency=LATENCY) as fake, \
            database("postgresql", "scaleout", wd) as url:
        path = write_config(wd, url, token_url=fake.token_url, concurrency=CONCURRENCY,
                            rate_limit=0, interval="60s")
        store = open_bench_store(load(path))
        results = {}
        try:
            for k in (1, 3):
                banner(f"{k} x tokend run, {n:,} due grants, latency {LATENCY * 1000:.0f} ms, "
                       f"concurrency {CONCURRENCY} each")
                with store.engine.begin() as conn:
                    conn.execute(text("DELETE FROM grants"))
                seed_due(store, fake, n, user_id_start=k * 1_000_000)
                r = run(k, path, fake, n, wd)
                with store.engine.connect() as conn:
                    versions = dict(conn.execute(text(
                        "SELECT token_version, count(*) FROM grants GROUP BY token_version"
                    )).all())
                r["saved_once"] = versions == {1: n}
                print(f"rotations {r['rotations']:,} of {n:,} (token requests "
                      f"{r['token_requests']:,}), reuse {r['reuse']}, rows by token_version "
                      f"{versions}, exit codes {r['exit_codes']}")
                print(f"throughput {r['per_s']:.1f}/s over the fake's {r['window']:.1f} s "
                      f"window (ideal {k * CONCURRENCY / LATENCY:.0f}/s); "
                      f"{r['wall_per_s']:.1f}/s by wall clock incl. start-up "
                      f"({r['wall']:.1f} s)", flush=True)
                results[k] = r
        finally:
            store.close()
    banner("ratios")
    one, three = results[1], results[3]
    for k, r in results.items():
        ok = r["rotations"] == n and r["reuse"] == 0 and r["saved_once"] \
            and r["exit_codes"] == [0] * k
        print(f"RATIO {k}proc each_grant_refreshed_once = {ok} (rotations {r['rotations']}, "
              f"reuse {r['reuse']}) {'PASS' if ok else 'MISS'}")
    print(f"info: by wall clock incl. start-up: {three['wall_per_s'] / one['wall_per_s']:.3f}")
    print(ratio_line("postgresql throughput 3proc/1proc", three["per_s"] / one["per_s"],
                     ">=", 2.5))


if __name__ == "__main__":
    main()
