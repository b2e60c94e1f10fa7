"""tokend against what a user would write instead: a sequential cron-style script.

2,000 due grants (``--quick``: 600), provider latency 50 ms. The script
(``bench/cron_refresh.py``: requests-oauthlib's ``OAuth2Session.refresh_token`` and one
plain UPDATE per grant) and ``tokend run --once`` (concurrency 16, no rate limit) each
run as their own process on their own grants in the same database, back to back; both
wall times include interpreter start-up. Neither may reuse a refresh token.

Target: tokend's wall time / the script's <= 0.125 (8 times faster), reuse 0 for both.
"""

from __future__ import annotations

from common import (
    CLIENT_ID,
    CLIENT_SECRET,
    PY,
    ROOT,
    Fake,
    backends,
    banner,
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
from cron_refresh import create_table

LATENCY = 0.05


def main() -> None:
    args = parse_args(__doc__)
    n = 600 if args.quick else 2000
    results: dict[str, dict[str, float]] = {}
    with workdir("cron") as wd, Fake(latency=LATENCY) as fake:
        for backend in backends(args):
            banner(f"{backend}: {n:,} due grants, latency {LATENCY * 1000:.0f} ms")
            with database(backend, "cron", wd) as url:
                path = write_config(wd, url, token_url=fake.token_url, concurrency=16,
                                    rate_limit=0, name=f"{backend}.toml")
                store = open_bench_store(load(path))
                try:
                    seed_due(store, fake, n, user_id_start=1)
                finally:
                    store.close()
                issued = fake.issue(n, user_id_start=1_000_001)
                create_table(url, [(i, t["access_token"], t["refresh_token"])
                                   for i, t in enumerate(issued, 1)])
                out: dict[str, float] = {}
                runs = {
                    "script": [PY, str(ROOT / "bench" / "cron_refresh.py"), "--db", url,
                               "--token-url", fake.token_url, "--client-id", CLIENT_ID,
                               "--client-secret", CLIENT_SECRET],
                    "tokend": tokend_cmd(path, "run", "--once"),
                }
                for label, cmd in runs.items():
                    fake.reset_stats()
                    r = run_child(cmd, log=wd / f"{backend}-{label}.log", timeout=900)
                    stats = fake.stats()
                    print(f"{label}: exit {r.returncode}, {stats['rotations']:,} rotations, "
                          f"reuse {stats['reuse_count']}, wall {r.wall:.2f} s "
                          f"({stats['rotations'] / r.wall:.1f}/s), CPU {r.cpu:.2f} s",
                          flush=True)
                    if r.returncode != 0 or stats["rotations"] != n:
                        raise SystemExit(f"{label} failed, see its log:\n"
                                         + r.log.read_text()[-2000:])
                    out[f"{label}_wall"] = r.wall
                    out[f"{label}_reuse"] = stats["reuse_count"]
                results[backend] = out
    banner("ratios")
    for backend, o in results.items():
        print(ratio_line(f"{backend} reuse script+tokend", o["script_reuse"] + o["tokend_reuse"],
                         "<=", 0))
        print(ratio_line(f"{backend} wall tokend/script", o["tokend_wall"] / o["script_wall"],
                         "<=", 0.125))


if __name__ == "__main__":
    main()
