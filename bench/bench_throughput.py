"""Refresh throughput of a maintenance pass against a provider with 50 ms latency.

1. 5,000 due grants, concurrency 16, no rate limit: achieved refreshes/s divided by the
   ideal concurrency / latency = 320/s. Target >= 0.85.
2. provider.rate_limit = 100: achieved / 100 >= 0.95, and never more than 100 token
   requests in any 1-second window (from the fake's own request times).
3. A concurrency sweep (1 ... 32) drawn to docs/throughput.png with the limit line
   concurrency / latency.

The pass runs in this process through tokend's real ``Maintenance`` class and store;
the fake provider runs in a separate process. Both backends.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    Fake,
    backends,
    banner,
    database,
    load,
    max_in_window,
    open_bench_store,
    parse_args,
    quiet_logs,
    ratio_line,
    seed_due,
    workdir,
    write_config,
)

from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.provider import ProviderClient
from tokend.store import Store

LATENCY = 0.05
SWEEP = (1, 2, 4, 8, 16, 32)
_users = itertools.count()  # a fresh range of user ids per pass


def one_pass(store: Store, config_path: Path, fake: Fake, n: int) -> dict[str, Any]:
    """Seed ``n`` due grants, run one pass, return its figures."""
    config = load(config_path)
    seed_due(store, fake, n, user_id_start=next(_users) * 100_000 + 1)
    provider = ProviderClient(config.provider, pool_size=config.schedule.concurrency)
    m = Maintenance(config, store, provider, metrics=Metrics())
    fake.reset_stats()
    try:
        result = m.run_pass()
    finally:
        m.close()
        provider.close()
    stats = fake.stats()
    if result.refreshed != n or stats["reuse_count"] or stats["rotations"] != n:
        raise SystemExit(f"pass went wrong: refreshed {result.refreshed}/{n}, "
                         f"failures {dict(result.failures)}, reuse {stats['reuse_count']}, "
                         f"rotations {stats['rotations']}")
    return {"n": n, "seconds": result.duration, "per_s": result.refreshed / result.duration,
            "max_1s": max_in_window(stats["request_times"]),
            "max_concurrent": stats["max_concurrent"]}


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    n_main = 1000 if quick else 5000
    n_rate = 500 if quick else 3000
    per_c = 20 if quick else 100  # grants per unit of concurrency in the sweep (~5 s each)
    results: dict[str, Any] = {}
    with workdir("throughput") as wd, Fake(latency=LATENCY) as fake:
        for backend in backends(args):
            banner(f"{backend}: throughput")
            with database(backend, "throughput", wd) as url:
                cfg16 = write_config(wd, url, token_url=fake.token_url, concurrency=16,
                                     rate_limit=0, name="c16.toml")
                config = load(cfg16)
                sink = quiet_logs(config)
                store = open_bench_store(config, pool_size=18)
                try:
                    r = one_pass(store, cfg16, fake, n_main)
                    ideal = 16 / LATENCY
                    print(f"{n_main} grants, concurrency 16, latency {LATENCY * 1000:.0f} ms, "
                          f"no limit: {r['seconds']:.2f} s, {r['per_s']:.1f}/s "
                          f"(ideal {ideal:.0f}/s), fake saw max {r['max_concurrent']} "
                          "concurrent", flush=True)
                    out: dict[str, Any] = {"unlimited": r, "unlimited_ratio": r["per_s"] / ideal}

                    rl = write_config(wd, url, token_url=fake.token_url, concurrency=16,
                                      rate_limit=100, name="rl.toml")
                    r = one_pass(store, rl, fake, n_rate)
                    print(f"{n_rate} grants, rate_limit 100: {r['seconds']:.2f} s, "
                          f"{r['per_s']:.1f}/s, max {r['max_1s']} in any 1-s window",
                          flush=True)
                    out["limited"] = r
                    out["limited_ratio"] = r["per_s"] / 100

                    sweep = []
                    for c in SWEEP:
                        path = write_config(wd, url, token_url=fake.token_url, concurrency=c,
                                            rate_limit=0, name=f"sweep{c}.toml")
                        r = one_pass(store, path, fake, per_c * c)
                        print(f"  concurrency {c:2d}: {r['n']:5d} grants in "
                              f"{r['seconds']:5.2f} s = {r['per_s']:6.1f}/s "
                              f"(limit {c / LATENCY:5.0f}/s, {r['per_s'] * LATENCY / c:.2f})",
                              flush=True)
                        sweep.append({"concurrency": c, "per_s": r["per_s"]})
                    out["sweep"] = sweep
                    results[backend] = out
                finally:
                    store.close()
                    sink.close()
    draw(results, ROOT / "docs" / "throughput.png")
    (ROOT / "docs").mkdir(exist_ok=True)
    print("\n" + json.dumps({b: {k: v for k, v in o.items() if k != "sweep"}
                             for b, o in results.items()}, default=str))
    banner("ratios")
    for backend, o in results.items():
        print(ratio_line(f"{backend} throughput/320", o["unlimited_ratio"], ">=", 0.85))
        print(ratio_line(f"{backend} rate_limited/100", o["limited_ratio"], ">=", 0.95))
        print(ratio_line(f"{backend} max_in_1s_window", o["limited"]["max_1s"], "<=", 100))


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = list(SWEEP)
    ax.plot(xs, [c / LATENCY for c in xs], "k--", label="limit: concurrency / latency")
    for backend, o in results.items():
        ax.plot([p["concurrency"] for p in o["sweep"]], [p["per_s"] for p in o["sweep"]],
                "o-", label=f"tokend pass, {backend}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("schedule.concurrency")
    ax.set_ylabel("refreshes per second")
    ax.set_title(f"Refresh throughput, provider latency {LATENCY * 1000:.0f} ms, no rate limit")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
