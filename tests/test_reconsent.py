"""Re-consent end to end: authorize flow, webhooks from the outbox, the public API."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests
from sqlalchemy import text

from conftest import CLIENT_ID, CLIENT_SECRET
from tokend import authorize as authorize_module
from tokend import notify, pkce
from tokend.api import GrantUnavailable, TokenStore
from tokend.authorize import authorize
from tokend.config import Config, load_config
from tokend.fake import FakeJustimmo
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import Status
from tokend.provider import ProviderClient
from tokend.sharedlimit import SharedRateLimiter
from tokend.store import Store
from tokend.testing import write_config

WEBHOOK_SECRET = "whsec-test"


class Receiver:
    """A real local webhook receiver that can be down (503) for a while."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.down = False
        self.failed = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.down:
                    outer.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                assert notify.verify(WEBHOOK_SECRET, self.headers["X-Tokend-Signature"], body)
                outer.events.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def fake() -> Iterator[FakeJustimmo]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, users={1234: 5678, 99: 7}) as f:
        yield f


@pytest.fixture
def config(make_config: Callable[..., Config], fake: FakeJustimmo,
           receiver: Receiver) -> Config:
    return make_config(fake=fake, extra=f'\n[notify]\nwebhook_url = "{receiver.url}"\n'
                                         f'webhook_secret = "{WEBHOOK_SECRET}"\n')


def browser(user_id: int | None = None, *, tamper: Callable[[str], str] | None = None,
            delay: float = 0.0) -> Callable[[str], None]:
    """Plays the user's browser: follows the authorize URL to the local listener."""

    def on_url(url: str) -> None:
        def go() -> None:
            if delay:
                threading.Event().wait(delay)
            target = url + (f"&user_id={user_id}" if user_id else "")
            resp = requests.get(target, allow_redirects=False, timeout=5)
            location = resp.headers["Location"]
            requests.get(tamper(location) if tamper else location, timeout=5)

        threading.Thread(target=go, daemon=True).start()

    return on_url


def run_authorize(config: Config, store: Store, on_url: Callable[[str], None],
                  timeout: float = 10) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = authorize(config, client="main", redirect_uri=f"http://127.0.0.1:{_port()}/callback",
                     open_browser=False, timeout=timeout, out=out, err=err, store=store,
                     on_url=on_url)
    return code, out.getvalue(), err.getvalue()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_authorize_stores_a_grant(config: Config, store_for: Callable[..., Store],
                                  fake: FakeJustimmo) -> None:
    store = store_for(config)
    code, out, err = run_authorize(config, store, browser())
    assert code == 0, err
    url = out.strip()
    assert url.startswith(fake.authorize_url) and "state=" in url and "response_type=code" in url
    [g] = store.iter_grants()
    assert (g.user_id, g.tenant_id, g.status, g.grant_type) == ("1234", "5678", Status.OK,
                                                                "authorization_code")
    access, refresh = store.tokens(store.get(g.id, with_tokens=True))
    assert access and fake.access_token_valid(access)
    assert refresh and fake.refresh_token_valid(refresh)


def test_authorize_sends_pkce_s256(config: Config, store_for: Callable[..., Store],
                                   fake: FakeJustimmo) -> None:
    store = store_for(config)
    code, out, err = run_authorize(config, store, browser())
    assert code == 0, err
    query = parse_qs(urlsplit(out.strip()).query)
    assert query["code_challenge_method"] == ["S256"]
    assert fake.stats()["last_code_challenge"] == query["code_challenge"][0]
    assert [g.user_id for g in store.iter_grants()] == ["1234"]  # the verifier matched
    assert "code_verifier" not in out + err


def test_authorize_with_another_challenge_stores_nothing(
        config: Config, store_for: Callable[..., Store], fake: FakeJustimmo) -> None:
    """A code issued for another challenge (an injected or intercepted code) is refused
    by the provider: this flow's verifier does not match it."""
    store = store_for(config)
    other = pkce.new_pair()
    follow = browser()

    def on_url(url: str) -> None:
        parts = urlsplit(url)
        query = [(k, other.challenge if k == "code_challenge" else v)
                 for k, v in parse_qsl(parts.query)]
        follow(urlunsplit(parts._replace(query=urlencode(query))))

    code, _out, err = run_authorize(config, store, on_url)
    assert fake.stats()["last_code_challenge"] == other.challenge
    assert code == 1 and "code exchange failed" in err and "invalid_grant" in err, err
    assert "nothing stored" in err
    assert list(store.iter_grants()) == []


@pytest.mark.parametrize(("case", "message"), [
    ("deny", "authorization denied: access_denied"),
    ("state", "state does not match"),
    ("no_state", "state does not match"),
])
def test_authorize_failures_store_nothing(config: Config, store_for: Callable[..., Store],
                                          fake: FakeJustimmo, case: str, message: str) -> None:
    store = store_for(config)
    tamper = None
    if case == "deny":
        fake.deny_authorizations()
    elif case == "state":
        def tamper(loc: str) -> str:
            return loc.replace("state=", "state=forged")
    else:
        def tamper(loc: str) -> str:
            return loc.split("&state=")[0]
    code, _out, err = run_authorize(config, store, browser(tamper=tamper))
    assert code == 1 and message in err
    assert "nothing stored" in err
    assert list(store.iter_grants()) == []


@pytest.mark.parametrize("intruders", ["idle", "partial", "favicon", "many_idle"])
def test_idle_connections_do_not_block_the_authorize_listener(
        config: Config, store_for: Callable[..., Store], intruders: str) -> None:
    """A browser pre-connects (and asks for /favicon.ico) before it follows the redirect;
    a scanner opens connections and sends nothing. The real callback is still served."""
    store = store_for(config)
    opened: list[socket.socket] = []
    answers: list[bytes] = []
    follow = browser()

    def on_url(url: str) -> None:
        redirect = urlsplit(parse_qs(urlsplit(url).query)["redirect_uri"][0])
        address = (redirect.hostname or "", redirect.port or 80)
        for _ in range(40 if intruders == "many_idle" else 1):
            opened.append(socket.create_connection(address, timeout=5))
        if intruders == "partial":
            opened[0].sendall(b"GET /callback?code=x")
        elif intruders == "favicon":
            opened[0].sendall(b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(opened[0].recv(100))
        time.sleep(0.3)  # the listener has accepted them before the real redirect arrives
        follow(url)

    def close_all() -> None:
        for sock in opened:
            sock.close()

    # Before, the listener waited for the idle client forever (and so did its shutdown).
    rescue = threading.Timer(10, close_all)
    rescue.start()
    t0 = time.monotonic()
    try:
        code, _out, err = run_authorize(config, store, on_url, timeout=15)
    finally:
        rescue.cancel()
        close_all()
    assert code == 0, err
    assert time.monotonic() - t0 < 8
    assert [g.user_id for g in store.iter_grants()] == ["1234"]
    if intruders == "favicon":
        assert answers[0].startswith(b"HTTP/1.0 404 ")  # only the callback path is answered


def test_authorize_times_out(config: Config, store_for: Callable[..., Store]) -> None:
    store = store_for(config)
    code, _out, err = run_authorize(config, store, lambda url: None, timeout=0.5)
    assert code == 1 and "no redirect received" in err
    assert list(store.iter_grants()) == []


def test_expired_code_fails_cleanly(make_config: Callable[..., Config],
                                   store_for: Callable[..., Store], receiver: Receiver) -> None:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, code_ttl=0.0) as short:
        config = make_config(fake=short)
        store = store_for(config)
        code, _out, err = run_authorize(config, store, browser())
    assert code == 1 and "code exchange failed" in err and "Authorization code has expired" in err
    assert list(store.iter_grants()) == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_authorize_takes_slots_of_the_shared_rate_limit(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    """On PostgreSQL the code exchange and the user look-up each wait for a slot of the
    budget all replicas share (table rate_slots), behind the slots others have taken."""
    config = make_config(fake=fake, rate_limit=2)
    store = store_for(config)
    interval = SharedRateLimiter(store, 2).interval  # 0.515 s
    with store.tx() as conn:  # other replicas have taken the slots of the next 1.5 s
        taken = conn.execute(text(
            "INSERT INTO rate_slots (name, next_at) "
            "VALUES ('token_endpoint', now() + interval '1.5 seconds') "
            "ON CONFLICT (name) DO UPDATE SET next_at = EXCLUDED.next_at "
            "RETURNING next_at")).scalar_one()
    started = time.monotonic()
    code, _out, err = run_authorize(config, store, browser())
    assert code == 0, err
    [exchanged] = fake.stats()["request_times"]  # the one token request: the exchange
    assert exchanged - started >= 1.5 - 0.05
    with store.tx() as conn:
        next_at = conn.execute(text(
            "SELECT next_at FROM rate_slots WHERE name = 'token_endpoint'")).scalar_one()
    # two slots after the others': the exchange's and the user look-up's
    assert (next_at - taken).total_seconds() >= 2 * interval - 0.001


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_authorize_gives_up_when_the_shared_rate_limit_does_not_answer(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database stops answering the rate limit between the consent and the exchange:
    the flow ends (exit 1, nothing sent, nothing stored) within SLOT_WAIT, with a message,
    instead of waiting for ever in silence (the code it would send lives one minute)."""
    monkeypatch.setattr(authorize_module, "SLOT_WAIT", 1.0)
    config = make_config(fake=fake, rate_limit=2)
    store = store_for(config)

    def break_budget(location: str) -> str:  # after the consent, before the redirect
        with store.tx() as conn:
            conn.execute(text("ALTER TABLE rate_slots RENAME TO rate_slots_gone"))
        return location

    done: list[tuple[int, str, str]] = []
    worker = threading.Thread(target=lambda: done.append(
        run_authorize(config, store, browser(tamper=break_budget))), daemon=True)
    worker.start()
    try:
        worker.join(timeout=15)
        waiting = worker.is_alive()
    finally:
        with store.tx() as conn:  # a flow still waiting goes on now
            conn.execute(text("ALTER TABLE IF EXISTS rate_slots_gone RENAME TO rate_slots"))
        worker.join(timeout=15)
    assert not waiting, "authorize was still waiting for a rate-limit slot after 15 s"
    code, _out, err = done[0]
    assert code == 1 and "rate_limit" in err and "nothing stored" in err, err
    assert fake.stats()["token_requests"] == 0
    assert list(store.iter_grants()) == []


def test_cli_authorize_prints_the_url_on_its_own_line(tmp_path: Path, db_url: str,
                                                      key_file: Path, fake: FakeJustimmo) -> None:
    port = _port()
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file)
    path.write_text(path.read_text().replace("127.0.0.1:8765", f"127.0.0.1:{port}"))
    if db_url.startswith("postgresql"):
        subprocess.run([sys.executable, "-m", "tokend", "--config", str(path), "db", "upgrade"],
                       check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "tokend", "--config", str(path), "authorize",
                             "--client", "main", "--no-browser", "--timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith(fake.authorize_url)
    resp = requests.get(url, allow_redirects=False, timeout=5)
    requests.get(resp.headers["Location"], timeout=5)
    assert proc.wait(timeout=30) == 0
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "stored grant 1 for user 1234" in stderr
    # stdout holds the URL alone (a script reads it); log lines go to stderr
    assert proc.stdout.read().strip() == ""
    assert "consent_stored" in stderr
    listing = subprocess.run([sys.executable, "-m", "tokend", "--config", str(path), "grants",
                              "list", "--json"], capture_output=True, text=True, check=True)
    assert [g["user_id"] for g in json.loads(listing.stdout)] == ["1234"]


def test_reconsent_due_webhook_then_authorize_recovers(
        config: Config, store_for: Callable[..., Store], fake: FakeJustimmo,
        receiver: Receiver) -> None:
    store = store_for(config)
    metrics = Metrics()
    assert run_authorize(config, store, browser())[0] == 0
    [g] = store.iter_grants()
    # the refresh token now ends in 2 days: inside reconsent_before (7 days)
    soon = datetime.now(UTC) + timedelta(days=2)
    _set(store, "refresh_expires_at = :t, next_attempt_at = :n",
         t=soon, n=datetime.now(UTC) - timedelta(seconds=1))
    provider = ProviderClient(config.provider)
    engine = Maintenance(config, store, provider, metrics=metrics)
    try:
        engine.run_pass()
    finally:
        engine.close()
        provider.close()
    assert store.get(g.id).status == Status.RECONSENT_DUE
    notifier = notify.WebhookNotifier(config, store, metrics)
    assert notifier.deliver_due() == 1
    [event] = receiver.events
    assert (event["event"], event["grant_id"], event["reason"], event["user_id"]) == (
        "reconsent_due", g.id, "refresh_token_expiring", "1234")
    assert receiver.headers[0]["X-Tokend-Event-Id"] == event["id"]
    assert metrics.registry.get_sample_value(
        "tokend_notifications_total", {"event": "reconsent_due", "outcome": "delivered"}) == 1
    # the person re-consents: same grant id, ok again, and a "recovered" event
    assert run_authorize(config, store, browser())[0] == 0
    [again] = store.iter_grants()
    assert again.id == g.id and again.status == Status.OK
    assert notifier.deliver_due() == 1
    assert [e["event"] for e in receiver.events] == ["reconsent_due", "recovered"]
    assert notifier.deliver_due() == 0


def test_events_survive_a_receiver_outage_exactly_once(
        config: Config, store_for: Callable[..., Store], receiver: Receiver) -> None:
    store = store_for(config)
    metrics = Metrics()
    for i in range(5):
        store.add_event({"event": "reconsent_required", "grant_id": i}, None)
    notifier = notify.WebhookNotifier(config, store, metrics)
    receiver.down = True
    assert notifier.deliver_due() == 0
    assert receiver.failed == 5
    assert notifier.deliver_due() == 0  # backing off: nothing due yet
    _set(store, "next_attempt_at = :n", table="events", n=datetime.now(UTC))  # time passes
    receiver.down = False
    assert notifier.deliver_due() == 5
    ids = [e["id"] for e in receiver.events]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert notifier.deliver_due() == 0
    assert metrics.registry.get_sample_value(
        "tokend_notifications_total", {"event": "reconsent_required", "outcome": "failed"}) == 5


def test_signature_verification() -> None:
    body = b'{"id": "1"}'
    header = notify.sign("s3cret", 1_700_000_000, body)
    assert notify.verify("s3cret", header, body, now=1_700_000_100)
    assert not notify.verify("s3cret", header, body + b" ", now=1_700_000_100)
    assert not notify.verify("other", header, body, now=1_700_000_100)
    assert not notify.verify("s3cret", header, body, now=1_700_009_999)  # too old
    assert not notify.verify("s3cret", "garbage", body)


def test_api_returns_the_current_token_or_says_why_not(
        config: Config, store_for: Callable[..., Store], fake: FakeJustimmo) -> None:
    store = store_for(config)
    assert run_authorize(config, store, browser())[0] == 0
    [g] = store.iter_grants()
    with TokenStore(config) as api:
        token = api.access_token(client="main", user_id=1234)
        assert fake.access_token_valid(token)
        assert api.access_token_by_id(g.id) == token
        with pytest.raises(GrantUnavailable, match="no grant for user 42"):
            api.access_token(client="main", user_id=42)
        store.set_status(g.id, Status.RECONSENT_REQUIRED, "invalid_grant", None)
        with pytest.raises(GrantUnavailable, match="needs re-consent"):
            api.access_token(client="main", user_id="1234")
    with pytest.raises(Exception, match="unknown client"):
        TokenStore(config).access_token(client="nope", user_id=1)


def test_no_token_in_clear_in_a_database_dump(config: Config, store_for: Callable[..., Store],
                                              db_url: str, tmp_path: Path) -> None:
    store = store_for(config)
    assert run_authorize(config, store, browser())[0] == 0
    [g] = store.iter_grants()
    access, refresh = store.tokens(store.get(g.id, with_tokens=True))
    assert access and refresh
    if db_url.startswith("sqlite"):
        dump = b"".join(p.read_bytes() for p in tmp_path.glob("tokend.db*"))
    else:
        url = db_url.replace("postgresql+psycopg://", "postgresql://")
        dump = subprocess.run(["pg_dump", url], capture_output=True, check=True).stdout
        with store.engine.connect() as conn:
            dump += str(conn.execute(text("SELECT * FROM grants")).all()).encode()
    assert access.encode() not in dump and refresh.encode() not in dump
    assert b"enc:v1:" in dump


def _set(store: Store, assignments: str, table: str = "grants", **params: datetime) -> None:
    bound = {k: (v.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if store.dialect == "sqlite" else v)
             for k, v in params.items()}
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {table} SET {assignments}"), bound)


def test_config_from_env_for_the_api(config: Config) -> None:
    assert load_config(config.source, env={}).notify.webhook_url == config.notify.webhook_url
