"""``tokend demo``: the whole daemon against an embedded fake Justimmo, in a minute.

Everything is real except the provider: the grants are obtained through the
authorization-code flow (``tokend authorize``'s code), stored encrypted in SQLite in a
temp dir, and kept alive by the same scheduler and maintenance pass as in production,
with lifetimes shrunk (access 30 s, refresh 3 min) so that refreshes, a re-consent flag
and the metrics show up within a minute.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from . import logs
from .authorize import authorize
from .config import Config, load_config
from .daemon import Daemon
from .durations import Duration
from .fake import FakeJustimmo
from .store import open_store
from .testing import CLIENT_ID, CLIENT_SECRET, free_port, write_config

SECRET_FILE = "demo-secret"  # beside the config, as an operator would keep it
USERS = {1001: 501, 1002: 501, 1003: 502, 1004: 503}


def demo_config(workdir: Path, fake: FakeJustimmo, listen: str, webhook: str) -> Path:
    path = workdir / "tokend.toml"
    (workdir / SECRET_FILE).write_text(CLIENT_SECRET + "\n")
    (workdir / SECRET_FILE).chmod(0o600)
    return write_config(
        path, db_url=f"sqlite:///{workdir / 'tokend.db'}", key_file="tokend-key",
        token_url=fake.token_url, client="demo", client_secret_file=SECRET_FILE,
        redirect_uri="http://127.0.0.1:0/callback", rate_limit=20, interval="5s",
        retry_max="30s", concurrency=4, listen=listen, log_format="console", state_dir=None,
        provider_extra='refresh_token_ttl = "3m"', client_extra="client_credentials = true",
        schedule_extra='refresh_before = "10s"\nreconsent_before = "150s"\nmax_grant_age = "30s"',
        extra=f'\n[notify]\nwebhook_url = "{webhook}"\n',
        header="# written by `tokend demo`: a real config, pointing at the embedded fake\n",
    )


def _consent(config: Config, user_id: int) -> None:
    """One person clicking "allow": the browser is played by requests."""

    def browse(url: str) -> None:
        def go() -> None:
            requests.get(f"{url}&user_id={user_id}", timeout=10)

        threading.Thread(target=go, daemon=True).start()

    with open(_devnull(), "w") as quiet:
        code = authorize(config, client="demo", listen=None,
                         redirect_uri=_free_redirect(), open_browser=False, timeout=15,
                         out=quiet, err=quiet, on_url=browse)
    if code != 0:
        raise RuntimeError(f"demo consent for user {user_id} failed")


def _devnull() -> str:
    return "/dev/null"


def _free_redirect() -> str:
    return f"http://127.0.0.1:{free_port()}/callback"


def run_demo(*, duration: float | None = None, listen: str = "127.0.0.1:9464",
             workdir: str | None = None) -> int:
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tokend-demo-")
        workdir = tmp.name
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    say = _say
    fake = FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, access_ttl=30,
                        refresh_ttl=Duration(delta=timedelta(minutes=3)), cc_ttl=40,
                        users=USERS).start()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    daemon = None
    store = None
    try:
        hooks = _WebhookPrinter(wd / "tokend.toml")
        config = load_config(demo_config(wd, fake, listen, hooks.url), env={})
        logs.configure(config.logging)
        say(f"fake Justimmo listening on {fake.base_url}; working directory {wd}")
        say(f"config: {wd / 'tokend.toml'} (access tokens live 30s, refresh tokens 3m)")
        for user in USERS:
            _consent(config, user)
        say(f"{len(USERS)} users consented through the authorization-code flow")
        store = open_store(config)
        daemon = Daemon(config, store)
        daemon.start()
        say(f"daemon started; metrics on http://{listen}/metrics, health on /healthz, /readyz")
        say("watch: each grant refreshes every ~15-20s (rotating its refresh token); in ~10s "
            "user 1004 revokes access at the provider, so its grant is flagged "
            "reconsent_required; after ~30s the grants pass max_grant_age (30s here) and are "
            "flagged reconsent_due: they keep working, but a person should re-consent")
        started = time.monotonic()
        revoked = False
        while not stop.wait(1.0):
            elapsed = time.monotonic() - started
            if not revoked and elapsed > 10:
                token = fake.current_refresh_token(1004, CLIENT_ID)
                if token:
                    fake.revoke_refresh_token(token)
                    say("provider: user 1004 revoked tokend's access")
                revoked = True
            if int(elapsed) % 15 == 0:
                _summary(store, fake, say)
                _metrics(listen)
            if duration is not None and elapsed >= duration:
                break
        say(f"summary after {round(time.monotonic() - started)}s:")
        _summary(store, fake, say)
        say("stopping" + (" (the --duration is over)" if not stop.is_set() else ""))
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        if store is not None:
            store.close()
        fake.stop()
        if "hooks" in locals():
            hooks.close()
        if tmp is not None:
            tmp.cleanup()


def _summary(store: object, fake: FakeJustimmo, say: object) -> None:
    from .store import Store

    assert isinstance(store, Store)
    rows = list(store.iter_grants())
    stats = fake.stats(request_times=False)
    _say("grants: " + ", ".join(
        f"#{g.id} {g.user_id or 'client-credentials'}={g.status.value}"
        + (f"({g.reason})" if g.reason else "") for g in rows))
    _say(f"provider saw {stats['by_grant'].get('refresh_token', 0)} refreshes, "
         f"{stats['by_grant'].get('client_credentials', 0)} client-credentials grants, "
         f"refresh-token reuse: {stats['reuse_count']}")


def _metrics(listen: str) -> None:
    """A few lines of our own /metrics, as Prometheus would scrape them."""
    try:
        body = requests.get(f"http://{listen}/metrics", timeout=2).text
    except requests.RequestException:
        return
    keep = ("tokend_grants{", "tokend_refresh_attempts_total{", "tokend_due_grants{")
    for line in body.splitlines():
        if line.startswith(keep) and not line.endswith(" 0.0"):
            _say(f"metrics: {line}")


class _WebhookPrinter:
    """The webhook receiver an operator would point at chat or a ticket system."""

    def __init__(self, config_path: Path) -> None:
        outer_say = _say

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer_say(f"webhook: {event['event']} for grant {event['grant_id']} "
                          f"(user {event['user_id']}, reason {event['reason']}); "
                          f"a person fixes it with: tokend --config {config_path} "
                          f"authorize --client {event['client']}")
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _say(text: str) -> None:
    print(f"demo | {text}", file=sys.stdout, flush=True)
