"""The local token API and on-demand refresh, in-process, on both backends."""

from __future__ import annotations

import json
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import CLIENT_ID, CLIENT_SECRET
from tokend import circuit
from tokend.api import TokenStore, api_request
from tokend.api_server import ApiServer
from tokend.config import Config, load_config
from tokend.fake import FakeJustimmo, IssuedTokens
from tokend.maintenance import Maintenance
from tokend.model import NewGrant, Status
from tokend.ondemand import OnDemand
from tokend.policy import initial
from tokend.provider import ProviderClient
from tokend.store import Store
from tokend.testing import write_config

KEY_ALL = "k" * 32
KEY_OTHER = "o" * 32  # limited to client "other"


class Env:
    """A fake provider, a store, and N "replicas" (engine + API) on one database."""

    def __init__(self, tmp_path: Path, db_url: str, key_file: Path, fake: FakeJustimmo,
                 store_for: Callable[..., Store], *, listen: str = "127.0.0.1:0",
                 api_extra: str = "", extra: str = "") -> None:
        keys = tmp_path / "api-keys"
        keys.write_text(f"# test keys\n{KEY_ALL}\n{KEY_OTHER} other\n")
        self.fake = fake
        path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file, extra=f"""
[clients.other]
client_id = "other-id"
client_secret = "other-secret"

[api]
listen = "{listen}"
key_file = "{keys}"
wait = "8s"
{api_extra}
{extra}""")
        self.config: Config = load_config(path, env={"RUNTIME_DIRECTORY": str(tmp_path / "run")})
        self.store = store_for(self.config)
        self.store_for = store_for
        self.closers: list[Callable[[], None]] = []
        self.engines: list[Maintenance] = []
        self.servers: list[ApiServer] = []

    def replica(self, *, idle_timeout: float | None = None) -> tuple[Maintenance, ApiServer]:
        store = self.store_for(self.config)
        provider = ProviderClient(self.config.provider, pool_size=4)
        m = Maintenance(self.config, store, provider, rand=lambda: 1.0)
        server = ApiServer(self.config, TokenStore(self.config, store=store),
                           OnDemand(m, self.config.api.wait), idle_timeout=idle_timeout).start()
        self.closers += [server.stop, m.close, provider.close]
        self.engines.append(m)
        self.servers.append(server)
        return m, server

    def seed(self, *, user_id: int = 1, access: str | None = None, due: bool = False,
             status: Status | None = None) -> tuple[int, IssuedTokens]:
        t = self.fake.issue(CLIENT_ID, user_id=user_id)
        now = datetime.now(UTC)
        new = NewGrant(client="main", grant_type="authorization_code",
                       access_token=access or t.access_token,
                       access_expires_at=now + (timedelta(hours=1) if due else timedelta(hours=20)),
                       obtained_at=now - timedelta(hours=4), refresh_token=t.refresh_token,
                       refresh_expires_at=t.refresh_expires_at, user_id=str(user_id),
                       tenant_id="5678")
        gid = self.store.insert_grants([new], lambda g: initial(g, now, self.config.schedule))[0]
        if status is not None:
            self.store.set_status(gid, status, "invalid_grant", None)
        return gid, t

    def url(self, server: ApiServer) -> str:
        return f"http://{server.address}"

    def close(self) -> None:
        for fn in reversed(self.closers):
            fn()


@pytest.fixture
def env(tmp_path: Path, db_url: str, key_file: Path, store_for: Callable[..., Store]
        ) -> Iterator[Env]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as fake:
        e = Env(tmp_path, db_url, key_file, fake, store_for)
        try:
            yield e
        finally:
            e.close()


def get(url: str, key: str | None = KEY_ALL, **params: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(url + "/v1/token", params=params, headers=headers, timeout=30)


def refresh(url: str, gid: int, key: str | None = KEY_ALL) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/grants/{gid}/refresh", headers=headers, timeout=30)


def refreshes(fake: FakeJustimmo) -> int:
    return int(fake.stats(request_times=False)["by_grant"]["refresh_token"])


def test_token_by_user_and_by_id(env: Env, caplog: pytest.LogCaptureFixture,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, server = env.replica()
    gid, t = env.seed(user_id=7)
    r = get(env.url(server), client="main", user_id="7")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_at", "grant_id", "status"}
    assert body["access_token"] == t.access_token and body["grant_id"] == gid
    assert body["token_type"] == "Bearer" and body["status"] == "ok"
    assert body["expires_at"].endswith("Z")
    assert get(env.url(server), grant_id=str(gid)).json()["access_token"] == t.access_token
    assert r.headers["Cache-Control"] == "no-store"
    out = capsys.readouterr()
    assert t.access_token not in out.out + out.err + caplog.text
    assert refreshes(env.fake) == 0


def test_unknown_grant_is_404(env: Env) -> None:
    _, server = env.replica()
    env.seed(user_id=7)
    assert get(env.url(server), client="main", user_id="8").status_code == 404
    assert get(env.url(server), grant_id="99999").status_code == 404
    assert refresh(env.url(server), 99999).status_code == 404
    assert get(env.url(server), client="nope", user_id="7").status_code == 404
    assert get(env.url(server), grant_id="x").status_code == 400


def test_reconsent_is_409_with_reason(env: Env) -> None:
    _, server = env.replica()
    gid, _ = env.seed(user_id=7, status=Status.RECONSENT_REQUIRED)
    for r in (get(env.url(server), client="main", user_id="7"), refresh(env.url(server), gid)):
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["reason"] == "invalid_grant" and body["grant_id"] == gid
        assert body["status"] == "reconsent_required" and "access_token" not in body
        assert "consent_url" not in body  # no [consent] configured
    assert refreshes(env.fake) == 0


def test_reconsent_409_carries_the_consent_link(tmp_path: Path, db_url: str, key_file: Path,
                                                store_for: Callable[..., Store]) -> None:
    link_key = tmp_path / "link-key"
    link_key.write_text("L" * 40)
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as fake:
        e = Env(tmp_path, db_url, key_file, fake, store_for, extra=f"""
[consent]
public_url = "https://tokens.example.com"
link_key_file = "{link_key}"
""")
        try:
            _, server = e.replica()
            gid, _ = e.seed(user_id=7, status=Status.RECONSENT_REQUIRED)
            r = get(e.url(server), grant_id=str(gid))
            assert r.status_code == 409
            assert r.json()["consent_url"].startswith("https://tokens.example.com/consent/")
        finally:
            e.close()


def test_missing_or_bad_key_is_401_and_other_clients_403(env: Env) -> None:
    _, server = env.replica()
    gid, _t = env.seed(user_id=7)
    for key in (None, "wrong" * 8, KEY_ALL[:-1]):
        r = get(env.url(server), key=key, client="main", user_id="7")
        assert r.status_code == 401 and "access_token" not in r.json()
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert refresh(env.url(server), gid, key=key).status_code == 401
    # KEY_OTHER may read client "other" only
    assert get(env.url(server), key=KEY_OTHER, client="main", user_id="7").status_code == 403
    assert get(env.url(server), key=KEY_OTHER, grant_id=str(gid)).status_code == 403
    assert refresh(env.url(server), gid, key=KEY_OTHER).status_code == 403
    assert refreshes(env.fake) == 0


def test_on_demand_refresh_and_the_10s_rule(env: Env) -> None:
    _, server = env.replica()
    gid, t = env.seed(user_id=7)
    r = refresh(env.url(server), gid)
    assert r.status_code == 200, r.text
    new = r.json()["access_token"]
    assert new != t.access_token and env.fake.access_token_valid(new)
    assert not env.fake.access_token_valid(t.access_token)  # league revokes it
    # many workers that all got a 401 at once: one refresh, the same token
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: refresh(env.url(server), gid), range(6)))
    assert {a.json()["access_token"] for a in answers} == {new}
    assert refreshes(env.fake) == 1
    assert env.fake.reuse_count() == 0


def test_on_demand_while_a_pass_refreshes_it(env: Env) -> None:
    m, server = env.replica()
    gid, t = env.seed(user_id=7, due=True)
    env.fake.set_latency(1.5)
    passing = threading.Thread(target=m.run_pass)
    passing.start()
    deadline = time.monotonic() + 20
    while env.store.get(gid).lease_owner is None:
        assert time.monotonic() < deadline, "the pass never claimed the grant"
        time.sleep(0.02)
    r = refresh(env.url(server), gid)
    passing.join(30)
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] != t.access_token
    assert env.fake.access_token_valid(r.json()["access_token"])
    assert refreshes(env.fake) == 1 and env.fake.reuse_count() == 0


def test_two_replicas_asked_at_once(env: Env) -> None:
    _, a = env.replica()
    _, b = env.replica()
    gid, t = env.seed(user_id=7)
    env.fake.set_latency(1.0)
    with ThreadPoolExecutor(2) as pool:
        ra, rb = pool.map(lambda s: refresh(env.url(s), gid), (a, b))
    assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
    assert ra.json()["access_token"] == rb.json()["access_token"] != t.access_token
    assert refreshes(env.fake) == 1 and env.fake.reuse_count() == 0


def test_blocked_client_is_503_with_retry_after(env: Env) -> None:
    m, server = env.replica()
    gid, _ = env.seed(user_id=7)
    m.circuits["main"] = circuit.Circuit(circuit.State.OPEN, 1,
                                         datetime.now(UTC) + timedelta(seconds=90))
    r = refresh(env.url(server), gid)
    assert r.status_code == 503
    assert 60 <= int(r.headers["Retry-After"]) <= 91
    assert refreshes(env.fake) == 0


def test_busy_elsewhere_is_503_after_the_wait(env: Env) -> None:
    _, server = env.replica()
    gid, _ = env.seed(user_id=7)
    env.store.claim_one(gid, "someone-else", timedelta(minutes=5))
    started = time.monotonic()
    r = refresh(env.url(server), gid)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert 7 <= time.monotonic() - started < 20  # [api] wait = 8s
    assert refreshes(env.fake) == 0


def test_idle_connections_are_closed(env: Env) -> None:
    _, server = env.replica(idle_timeout=0.5)
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as idle:
        time.sleep(1.5)
        assert idle.recv(1) == b""  # closed by the server
    assert server.server.open_connections == 0


def test_unix_socket_mode_and_no_key(tmp_path: Path, db_url: str, key_file: Path,
                                     store_for: Callable[..., Store]) -> None:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as fake:
        e = Env(tmp_path, db_url, key_file, fake, store_for, listen="tokend-api.sock",
                api_extra='clients = ["main"]')
        try:
            _, _server = e.replica()
            path = tmp_path / "run" / "tokend-api.sock"
            assert e.config.api.socket_path == path
            mode = path.stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
            gid, t = e.seed(user_id=7)
            status, _, body = api_request(e.config, "GET", "/v1/token?client=main&user_id=7",
                                          None)
            assert status == 200 and body["access_token"] == t.access_token
            status, _, body = api_request(e.config, "GET", "/v1/token?client=other", None)
            assert status == 403  # [api] clients = ["main"]
            # tokens.refresh_now goes through the socket
            tokens = TokenStore(e.config, store=e.store)
            new = tokens.refresh_now(gid)
            assert new != t.access_token and fake.access_token_valid(new)
            assert refreshes(fake) == 1
        finally:
            e.close()
        assert not path.exists()


def test_refresh_now_in_process_and_bearer_auth(tmp_path: Path, db_url: str, key_file: Path,
                                                store_for: Callable[..., Store]) -> None:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as fake:
        e = Env(tmp_path, db_url, key_file, fake, store_for, listen="")
        _gid, _t = e.seed(user_id=7, access="stale-token-the-provider-never-issued")
        tokens = TokenStore(e.config, store=e.store)
        try:
            from tokend.api import BearerAuth

            session = requests.Session()
            session.trust_env = False
            session.auth = BearerAuth(tokens, client="main", user_id=7)
            r = session.get(fake.user_url, timeout=30)
            assert r.status_code == 200, r.text
            assert json.loads(r.text)["id"] == 7
            assert r.history and r.history[0].status_code == 401
            assert refreshes(fake) == 1
        finally:
            tokens.close()


def test_held_grant_is_not_refreshed(env: Env) -> None:
    """Its rotated token waits to be saved (spooled): the stored one is spent."""
    from tokend import spool
    from tokend.model import Outcome

    m, server = env.replica()
    gid, _ = env.seed(user_id=7)
    g = env.store.get(gid)
    outcome = Outcome(status=Status.OK, reason=None, next_attempt_at=None, failure_count=0,
                      last_error=None, in_doubt=False, access_token="held-access",
                      refresh_token="held-refresh", obtained_at=datetime.now(UTC))
    entry = spool.Entry.of(g, outcome, m.owner, None, datetime.now(UTC))
    m.held.hold(entry)
    try:
        r = refresh(env.url(server), gid)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "held" not in r.text
        assert refreshes(env.fake) == 0
    finally:
        m.held.done(entry)


@pytest.mark.parametrize(("api", "keys", "error"), [
    ('listen = "0.0.0.0:8471"', None, "not a loopback address"),
    ('listen = "127.0.0.1:8471"', None, "api.key_file: is required"),
    ('listen = "127.0.0.1:8471"', "short\n", "at least 16 characters"),
    ('listen = "127.0.0.1:8471"', "k" * 20 + " nope\n", "unknown client 'nope'"),
    ('listen = "127.0.0.1:8471"', "# only a comment\n", "holds no key"),
    ('listen = "api.sock"\nclients = ["nope"]', None, "api.clients: unknown client"),
    ('listen = "api.sock"\nwait = "1h"', None, "api.wait: must be at most"),
])
def test_bad_api_config_is_one_line(tmp_path: Path, key_file: Path, api: str,
                                    keys: str | None, error: str) -> None:
    from tokend.errors import ConfigError

    extra = f"\n[api]\n{api}\n"
    if keys is not None:
        (tmp_path / "keys").write_text(keys)
        extra += f'key_file = "{tmp_path / "keys"}"\n'
    path = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 't.db'}", key_file=key_file,
                        extra=extra)
    with pytest.raises(ConfigError, match=re.escape(error)) as info:
        load_config(path, env={})
    assert "\n" not in str(info.value)
    assert "k" * 20 not in str(info.value)
