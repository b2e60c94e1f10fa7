"""CPU used by an idle daemon: ``tokend run`` with nothing due.

A real ``tokend run`` subprocess per backend (run at the same time, side by side), each
on 10,000 grants none of which is due, default ``schedule.interval`` (60 s), the
metrics endpoint on, and scraped every 15 s as Prometheus would. After its first pass
(``/readyz`` answers 200) the process's CPU (utime + stime of all its threads, from
/proc) is sampled over 60 s (``--quick``: 15 s).

Target: < 1 % of one core.
"""

from __future__ import annotations

import contextlib
import subprocess
import time

import requests
from common import (
    backends,
    banner,
    bulk_fill,
    database,
    load,
    open_bench_store,
    parse_args,
    proc_cpu_seconds,
    ratio_line,
    tokend_cmd,
    workdir,
    write_config,
)

from tokend.testing import free_port

GRANTS = 10_000


def stop_all(procs: dict[str, tuple[subprocess.Popen[bytes], str]]) -> None:
    for proc, _ in procs.values():
        proc.terminate()
    for backend, (proc, _) in procs.items():
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            print(f"warning: {backend} tokend exited {code} on SIGTERM")


def main() -> None:
    args = parse_args(__doc__)
    window = 15.0 if args.quick else 60.0
    names = backends(args)
    with workdir("idle") as wd, contextlib.ExitStack() as stack:
        urls = {b: stack.enter_context(database(b, "idle", wd)) for b in names}
        procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        stack.callback(stop_all, procs)
        for backend in names:
            port = free_port()
            path = write_config(wd, urls[backend], token_url="http://127.0.0.1:9/t",
                                listen=f"127.0.0.1:{port}", rate_limit=0,
                                name=f"{backend}.toml")
            store = open_bench_store(load(path))
            try:
                bulk_fill(store, GRANTS, user_id_start=1)
            finally:
                store.close()
            log = open(wd / f"{backend}.log", "wb")  # noqa: SIM115 - closed with the dir
            proc = subprocess.Popen(tokend_cmd(path, "run"), stdout=log,
                                    stderr=subprocess.STDOUT)
            procs[backend] = (proc, f"http://127.0.0.1:{port}")
        for backend, (proc, base) in procs.items():
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{backend}: tokend exited "
                                     f"{proc.returncode}: "
                                     + (wd / f"{backend}.log").read_text()[-2000:])
                try:
                    if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{backend}: not ready within 60 s")
                time.sleep(0.2)
        time.sleep(1.0)  # let the first pass's gauges update finish
        banner(f"idle tokend run, {GRANTS:,} grants, nothing due, {window:.0f} s window")
        start = {b: proc_cpu_seconds(p.pid) for b, (p, _) in procs.items()}
        t0 = time.monotonic()
        scrapes = 0
        while (elapsed := time.monotonic() - t0) < window:
            for _, base in procs.values():
                r = requests.get(f"{base}/metrics", timeout=5)
                assert r.status_code == 200 and "tokend_grants" in r.text
            scrapes += 1
            time.sleep(min(15.0, max(0.0, window - elapsed)))
        elapsed = time.monotonic() - t0
        used = {b: proc_cpu_seconds(p.pid) - start[b] for b, (p, _) in procs.items()}
        for backend in names:
            print(f"{backend}: {used[backend]:.3f} CPU s in {elapsed:.1f} s = "
                  f"{used[backend] / elapsed * 100:.3f} % of one core "
                  f"({scrapes} scrapes)")
    banner("ratios")
    for backend in names:
        print(ratio_line(f"{backend} idle_cpu_percent_of_core", used[backend] / elapsed * 100,
                         "<", 1.0))


if __name__ == "__main__":
    main()
