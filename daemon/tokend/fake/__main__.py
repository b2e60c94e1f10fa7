"""``python -m tokend.fake``: run a fake Justimmo OAuth server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType

from tokend.durations import Duration, parse_timedelta
from tokend.fake.provider import FakeJustimmo


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return parse_timedelta(text).total_seconds()


def _duration(text: str) -> Duration:
    try:
        return Duration.of(timedelta(seconds=float(text)))
    except ValueError:
        return Duration.parse(text)


def _pair(text: str) -> tuple[str, str]:
    left, sep, right = text.partition(":")
    if not sep or not left:
        raise argparse.ArgumentTypeError(f"expected A:B, got {text!r}")
    return left, right


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokend.fake",
        description="Run a fake Justimmo OAuth server until SIGTERM/SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--access-ttl", type=_seconds, default=86400.0, help="e.g. 30, 15m")
    parser.add_argument(
        "--refresh-ttl",
        type=_duration,
        default=Duration(months=1),
        help="e.g. 3m (minutes), P1M (a calendar month)",
    )
    parser.add_argument("--code-ttl", type=_seconds, default=60.0)
    parser.add_argument("--cc-ttl", type=_seconds, default=86400.0)
    parser.add_argument("--league", choices=["5", "7", "8", "9"], default="5")
    parser.add_argument(
        "--client",
        type=_pair,
        action="append",
        metavar="ID:SECRET",
        help="repeatable; default demo-client:demo-secret",
    )
    parser.add_argument(
        "--user",
        type=_pair,
        action="append",
        metavar="USER:TENANT",
        help="repeatable; default 1234:5678",
    )
    parser.add_argument(
        "--consent-page",
        action="store_true",
        help="show an authorize page (choose user, approve or deny) instead of redirecting",
    )
    args = parser.parse_args(argv)
    try:
        users = {int(u): int(t) for u, t in args.user} if args.user else None
    except ValueError:
        parser.error("--user takes integer ids, e.g. 1234:5678")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake = FakeJustimmo(
        clients=dict(args.client) if args.client else None,
        access_ttl=args.access_ttl,
        refresh_ttl=args.refresh_ttl,
        code_ttl=args.code_ttl,
        cc_ttl=args.cc_ttl,
        league=args.league,
        latency=args.latency,
        host=args.host,
        port=args.port,
        users=users,
        consent_page=args.consent_page,
    ).start()
    print(f"listening on {fake.base_url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
