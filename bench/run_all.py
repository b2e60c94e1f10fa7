"""Run every ``bench/bench_*.py`` in turn and print a summary of their ratios.

    .venv/bin/python bench/run_all.py [--quick] [--out DIR]

Each script's full output goes to the terminal and, with ``--out``, to ``DIR/NAME.txt``;
the machine, the date and each ``RATIO`` line (PASS/MISS) are summarised at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common import ROOT, machine

ORDER = ("scan", "throughput", "cpu", "cron", "memory", "idle", "scaleout")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="keep each script's output here")
    p.add_argument("only", nargs="*", help=f"some of: {' '.join(ORDER)}")
    args = p.parse_args()
    names = args.only or list(ORDER)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    started = time.monotonic()
    for name in names:
        script = ROOT / "bench" / f"bench_{name}.py"
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"\n##### {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = proc.wait()
        took = time.monotonic() - t0
        if args.out:
            (args.out / f"{name}.txt").write_text("".join(lines))
        ratios = [ln.strip() for ln in lines if ln.startswith("RATIO ")]
        summary.append(f"{name} ({took:.0f} s, exit {code}):")
        summary += [f"  {r}" for r in ratios] or ["  (no ratios: failed)"]
    total = time.monotonic() - started
    print("\n##### summary")
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: "
          + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print("\n".join(summary))
    print(f"total: {total / 60:.1f} min")
    return 0 if all("MISS" not in s and "failed" not in s for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
