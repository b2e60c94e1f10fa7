"""What a user would write instead of tokend: a cron job refreshing tokens one by one.

Used by ``bench_cron.py`` (run as its own process, like tokend). It reads the due rows of
its own table ``cron_tokens`` (tokens in clear), refreshes each with requests-oauthlib's
``OAuth2Session.refresh_token`` (``client_secret_post``), and stores the answer with one
plain ``UPDATE`` and a commit per token. Sequential, as such scripts are.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from requests_oauthlib import OAuth2Session

os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the fake speaks plain http


def connect(url: str) -> tuple[Any, str]:
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("///", 1)[1])
        conn.execute("PRAGMA synchronous=NORMAL")  # tokend's durability, not slower
        return conn, "?"
    import psycopg

    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")), "%s"


def create_table(url: str, rows: list[tuple[int, str, str]]) -> None:
    """(id, access_token, refresh_token) rows, all due."""
    conn, m = connect(url)
    conn.execute("CREATE TABLE cron_tokens (id INTEGER PRIMARY KEY, access_token TEXT, "
                 "refresh_token TEXT, expires_at TEXT)")
    due = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    cur = conn.cursor()
    cur.executemany(f"INSERT INTO cron_tokens VALUES ({m}, {m}, {m}, {m})",
                    [(i, a, r, due) for i, a, r in rows])
    conn.commit()
    conn.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--token-url", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    args = p.parse_args()
    conn, m = connect(args.db)
    soon = (datetime.now(UTC) + timedelta(hours=6)).isoformat()
    rows = conn.execute(f"SELECT id, refresh_token FROM cron_tokens WHERE expires_at < {m}",
                        (soon,)).fetchall()
    conn.commit()
    oauth = OAuth2Session(client_id=args.client_id)
    failed = 0
    for gid, refresh in rows:
        try:
            token = oauth.refresh_token(args.token_url, refresh_token=refresh,
                                        client_id=args.client_id,
                                        client_secret=args.client_secret, timeout=10)
        except Exception as exc:
            print(f"grant {gid}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed += 1
            continue
        expires = (datetime.now(UTC) + timedelta(seconds=int(token["expires_in"]))).isoformat()
        conn.execute(f"UPDATE cron_tokens SET access_token = {m}, refresh_token = {m}, "
                     f"expires_at = {m} WHERE id = {m}",
                     (token["access_token"], token["refresh_token"], expires, gid))
        conn.commit()
    conn.close()
    print(f"refreshed {len(rows) - failed} of {len(rows)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
