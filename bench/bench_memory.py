"""Peak memory of ``tokend run --once`` must not grow with the size of the grant table.

Two databases side by side on each backend: 10,000 grants, all due; and 1,000,000 grants
(``--quick``: 100,000) of which the same 10,000 (``--quick``: 2,000) are due, the rest
bulk-loaded with SQL and not due. Each is maintained by a real ``tokend run --once``
subprocess (fake provider in its own process, no latency, concurrency 16, no rate limit);
its peak RSS is ``ru_maxrss`` of exactly that child (``os.wait4``).

Target: peak RSS on the big table / on the small one <= 1.2.
"""

from __future__ import annotations

from common import (
    Fake,
    backends,
    banner,
    bulk_fill,
    count_rows,
    database,
    load,
    open_bench_store,
    parse_args,
    ratio_line,
    run_child,
    seed_due,
    tokend_cmd,
    workdir,
    write_config,
)


def main() -> None:
    args = parse_args(__doc__)
    due = 2_000 if args.quick else 10_000
    big_n = 100_000 if args.quick else 1_000_000
    ratios: dict[str, float] = {}
    with workdir("memory") as wd, Fake(latency=0.0) as fake:
        for backend in backends(args):
            banner(f"{backend}: {due:,} grants vs {big_n:,} grants, {due:,} due in each")
            with database(backend, "mem_small", wd) as small_url, \
                    database(backend, "mem_big", wd) as big_url:
                configs = {}
                users = 1
                for label, url, filler in (("small", small_url, 0),
                                           ("big", big_url, big_n - due)):
                    path = write_config(wd, url, token_url=fake.token_url, concurrency=16,
                                        rate_limit=0, name=f"{backend}-{label}.toml")
                    store = open_bench_store(load(path))
                    try:
                        if filler:
                            secs = bulk_fill(store, filler, user_id_start=10_000_000)
                            print(f"{label}: bulk-loaded {filler:,} rows in {secs:.1f} s",
                                  flush=True)
                        seed_due(store, fake, due, user_id_start=users)
                        users += due
                        print(f"{label}: {count_rows(store):,} grants", flush=True)
                    finally:
                        store.close()
                    configs[label] = path
                rss = {}
                for label, path in configs.items():
                    fake.reset_stats()
                    r = run_child(tokend_cmd(path, "run", "--once"),
                                  log=wd / f"{backend}-{label}.log", timeout=600)
                    stats = fake.stats()
                    ok = r.returncode == 0 and stats["rotations"] == due \
                        and stats["reuse_count"] == 0
                    print(f"{label}: exit {r.returncode}, {stats['rotations']:,} refreshed in "
                          f"{r.wall:.1f} s, peak RSS {r.maxrss_mb:.1f} MiB, "
                          f"CPU {r.cpu:.1f} s", flush=True)
                    if not ok:
                        raise SystemExit(f"run failed, see {r.log}:\n"
                                         + r.log.read_text()[-2000:])
                    rss[label] = r.maxrss_mb
                ratios[backend] = rss["big"] / rss["small"]
    banner("ratios")
    for backend, value in ratios.items():
        print(ratio_line(f"{backend} peak_rss big/small", value, "<=", 1.2))


if __name__ == "__main__":
    main()
