"""tokend against an OAuth server nobody on the team wrote: django-oauth-toolkit (DOT).

DOT runs as its own process (``tests/dot_server``), set up like league/oauth2-server:
every refresh rotates both tokens, no grace period, and reuse protection (a refresh
token presented twice revokes the whole grant: its family of tokens). Access tokens
live 12 s. tokend is used the way an operator meets it: ``tokend db upgrade``,
``tokend grants import`` of a file the helper printed, ``tokend run`` as a process,
signals. Every check asks DOT: is the stored access token accepted by a protected
API (and for the right user), is the stored refresh token live, how many refresh
requests presented a token that had already been used.

DOT holds each token response for a moment after the rotation is committed
(``latency``), so that a signal lands while refreshes are in flight.
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import create_engine, text

import dotlib
import faultlib as fl
from conftest import IN_CI
from tokend.config import load_config
from tokend.crypto import generate_key
from tokend.store import open_store
from tokend.testing import free_port

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

N = 20
ACCESS_TTL = 12
LATENCY = 0.3
CONCURRENCY = 4


@pytest.fixture(autouse=True)
def _dot_installed() -> None:
    missing = dotlib.dot_importable()
    if missing is None:
        return
    message = f"django-oauth-toolkit black-box tests need: {missing} (pip install -e '.[test]')"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Row:
    id: int
    client: str
    grant_type: str
    user_id: str | None
    status: str
    reason: str | None
    lease_owner: str | None
    in_doubt: bool
    access_token: str | None
    refresh_token: str | None
    access_expires_at: datetime | None
    last_error: str | None


class World:
    """DOT, a tokend config pointing at it, the grants imported, and a reader of them."""

    def __init__(self, workdir: Path, db_url: str, *, pkce_required: bool = True,
                 web_secret: str = dotlib.WEB_SECRET) -> None:
        self.workdir = workdir
        self.db_url = db_url
        self.dot = dotlib.DotProcess(
            workdir, access_ttl=ACCESS_TTL, latency=LATENCY, pkce_required=pkce_required,
            redirect_uri=f"http://127.0.0.1:{free_port()}/callback", web_secret=web_secret)
        self.daemons: list[fl.Daemon] = []
        self.key = workdir / "tokend-key"
        self.key.write_text(generate_key() + "\n")
        self.key.chmod(0o600)
        self.config_path = workdir / "tokend.toml"
        self.write_config()
        done = fl.tokend(self.config_path, "db", "upgrade")
        assert done.returncode == 0, done.stderr
        self.store = open_store(load_config(self.config_path, env={}))
        self.engine = create_engine(db_url)

    def write_config(self, *, secret: str | None = None, main_cc: bool = False,
                     auth_method: str = "client_secret_post") -> None:
        """tokend's config for DOT; ``main_cc`` asks DOT's authorization-code application
        for client-credentials tokens too (DOT ties one grant type to an application)."""
        base = self.dot.base_url
        secret = json.dumps(self.dot.web_secret if secret is None else secret)
        # What an operator would write for 12 s access tokens: a pass every 2 s, refresh
        # with 7 s left (the 0-10 % spread makes it up to 7.7 s).
        self.config_path.write_text(textwrap.dedent(f"""\
            [database]
            url = "{self.db_url}"

            [provider]
            authorize_url = "{base}/o/authorize/"
            token_url = "{self.dot.token_url}"
            user_url = "{self.dot.user_url}"
            rate_limit = 0
            timeout = "5s"

            [clients.main]
            client_id = "{dotlib.WEB_ID}"
            client_secret = {secret}
            auth_method = "{auth_method}"
            redirect_uri = "{self.dot.redirect_uri}"
            client_credentials = {str(main_cc).lower()}

            [clients.machine]
            client_id = "{dotlib.MACHINE_ID}"
            client_secret = "{dotlib.MACHINE_SECRET}"
            client_credentials = true

            [schedule]
            interval = "2s"
            refresh_before = "7s"
            retry_max = "10s"
            concurrency = {CONCURRENCY}

            [metrics]
            listen = ""

            [logging]
            format = "json"
            level = "info"

            [state]
            dir = "{self.workdir / 'state'}"

            [encryption]
            key_file = "{self.key}"
            """))

    def import_grants(self, n: int, *, expires_in: float | None = None) -> None:
        """N users' grants as the helper prints them; ``expires_in`` overrides DOT's
        lifetime in the file (a smaller one makes them due at once)."""
        path = self.dot.seed(n, self.workdir / "import.json")
        if expires_in is not None:
            records = json.loads(path.read_text())
            for record in records:
                record["expires_in"] = expires_in
            path.write_text(json.dumps(records))
        done = fl.tokend(self.config_path, "grants", "import", str(path))
        assert done.returncode == 0, done.stdout + done.stderr

    def daemon(self, name: str) -> fl.Daemon:
        d = fl.Daemon(self.config_path, "run", log=self.workdir / f"{name}.log")
        self.daemons.append(d)
        return d

    def rows(self) -> list[Row]:
        with self.engine.connect() as conn:
            found = conn.execute(text(
                "SELECT id, client, grant_type, user_id, status, reason, lease_owner, in_doubt, "
                "access_token, refresh_token, access_expires_at, last_error "
                "FROM grants ORDER BY id")).all()
        decrypt = self.store.cipher.decrypt
        return [Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]),
                    decrypt(r[8], grant_id=r[0]) if r[8] else None,
                    decrypt(r[9], grant_id=r[0]) if r[9] else None, _utc(r[10]), r[11])
                for r in found]

    def rejected_access(self, patience: float = 5.0) -> dict[int, str]:
        """Grants whose stored access token DOT refuses (or accepts for another user).

        DOT (like league) revokes the old access token the moment it rotates, before
        tokend has the answer: while a refresh is in flight (the grant is leased) the
        stored access token is refused. So a refusal counts only once the stored token
        is unchanged and the grant not leased; a leased one is asked again shortly.
        """
        bad: dict[int, str] = {}
        for row in self.rows():
            if row.status != "ok":
                continue
            current = row
            for _ in range(max(1, int(patience / 0.25))):
                accepted, owner = (False, None) if current.access_token is None \
                    else self.dot.whose(current.access_token)
                if accepted:
                    expected = None if current.grant_type == "client_credentials" \
                        else int(current.user_id or 0)
                    if owner != expected:
                        bad[row.id] = f"token of user {owner}, grant of user {expected}"
                    else:
                        bad.pop(row.id, None)
                    break
                again = next(r for r in self.rows() if r.id == row.id)
                if again.access_token == current.access_token:
                    bad[row.id] = "no access token" if again.access_token is None \
                        else f"access token refused (status {again.status})"
                    if again.lease_owner is None:
                        break
                    time.sleep(0.25)  # a refresh in flight: its answer is on the way
                current = again
        return bad

    def dead_refresh(self, rows: list[Row]) -> dict[int, str]:
        """Grants whose stored refresh token DOT no longer accepts (spends nothing)."""
        users = [r for r in rows if r.grant_type != "client_credentials"]
        states = self.dot.refresh_states([r.refresh_token or "" for r in users])
        return {r.id: s for r, s in zip(users, states, strict=True) if s != "live"}

    def close(self) -> None:
        for d in self.daemons:
            d.reap()
        self.dot.reap()
        self.store.close()
        self.engine.dispose()


def _utc(value: datetime | str | None) -> datetime | None:
    """A timestamp as raw SQL returns it (SQLite: text) made an aware UTC datetime."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path, db_url)
    try:
        yield w
    finally:
        w.close()


def _wait_in_flight(world: World, d: fl.Daemon, *, at_least: int = 1,
                    timeout: float = 40) -> dict[str, Any]:
    """Until DOT holds ``at_least`` token requests whose answers tokend has not got (after
    every grant was refreshed once: the daemon is in its steady state)."""
    def busy() -> dict[str, Any] | None:
        if not d.running:
            raise AssertionError(f"tokend exited: {d.output()}")
        stats = world.dot.stats()
        return stats if stats["in_flight"] >= at_least and stats["rotations"] >= N else None

    return dict(fl.wait_until(busy, timeout, interval=0.01, what="a refresh in flight"))


def _problems(d: fl.Daemon) -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("level") in ("error", "critical")]


# --------------------------------------------------------------------------- (a) + (c)


def test_grants_stay_served_and_sigterm_loses_nothing(world: World) -> None:
    """(a) 20 grants with 12 s access tokens, ``tokend run`` for 24 s (two lifetimes):
    at every check DOT accepts each stored access token, for the right user, and no
    refresh token is ever presented twice. (c) Then SIGTERM while DOT holds answers:
    exit 0 within seconds, every rotation DOT made is saved, nothing flagged."""
    world.import_grants(N)
    d = world.daemon("run")
    # the daemon creates the client-credentials grant and gets its first token
    fl.wait_until(lambda: [bool(r.access_token) for r in world.rows()] == [True] * (N + 1),
                  20, interval=0.2,
                  what="the client-credentials token")
    started = time.monotonic()
    checks, worst = 0, {}
    while time.monotonic() - started < 2 * ACCESS_TTL:
        time.sleep(3)
        bad = world.rejected_access()
        bad.update({r.id: f"{r.status} ({r.reason})" for r in world.rows() if r.status != "ok"})
        checks += 1
        worst = worst or bad
        assert d.running, d.output()
    stats = world.dot.stats()
    assert not worst, f"DOT refused stored access tokens: {worst}\n{d.output()}"
    assert stats["reuse"] == stats["revoked"] == stats["unknown_refresh"] == 0, stats
    assert stats["errors"] == {}, stats
    # each user grant went through at least three 12 s tokens
    assert stats["rotations"] >= 3 * N, stats

    before = _wait_in_flight(world, d)
    d.signal(signal.SIGTERM)
    t0 = time.monotonic()
    code = d.wait(20)
    took = time.monotonic() - t0
    assert code == 0, f"exit {code} after SIGTERM:\n{d.output()}"
    assert took < 10, f"SIGTERM took {took:.1f}s"
    assert any(e.get("event") == "stopped" for e in d.log_events()), d.output()
    assert not _problems(d), _problems(d)
    world.dot.wait_idle()

    stats = world.dot.stats()
    rows = world.rows()
    assert [r for r in rows if (r.status, r.lease_owner, r.in_doubt) != ("ok", None, False)] \
        == [], rows
    assert world.dead_refresh(rows) == {}, "a rotation DOT made was not saved"
    assert world.rejected_access() == {}
    assert stats["reuse"] == stats["revoked"] == 0, stats
    print(f"\nDOT (a): {stats['rotations']} rotations in {checks} checks, "
          f"{stats['requests']} token requests, reuse 0; (c) SIGTERM with "
          f"{before['in_flight']} in flight: exit 0 in {took:.2f}s, nothing lost")


# --------------------------------------------------------------------------- (b)


def test_kill_9_mid_run_and_restart(world: World) -> None:
    """(b) kill -9 while DOT holds committed rotations, then restart at once.

    The rotations in flight are lost (DOT rotated, the answer died with the process);
    those grants may end ``reconsent_required`` (``rotation_lost``), and the reuse they
    cost when tokend tried their dead token is all the reuse DOT may see. Every other
    grant must be ``ok`` and stay served: within one access-token lifetime after the
    restart DOT accepts its stored access token. Nothing else is broken silently."""
    world.import_grants(N)
    d = world.daemon("first")
    stats = _wait_in_flight(world, d, at_least=2)
    at_kill = stats["in_flight"]
    d.signal(signal.SIGKILL)
    assert d.wait(10) == -signal.SIGKILL
    world.dot.wait_idle()
    rows = world.rows()
    leased = {r.id for r in rows if r.lease_owner is not None}
    lost = set(world.dead_refresh(rows))
    assert lost <= leased, f"lost without a lease: {sorted(lost - leased)}"
    assert 1 <= len(lost) <= CONCURRENCY, (lost, at_kill)
    reuse_before = world.dot.stats()["reuse"]
    assert reuse_before == 0

    restarted = world.daemon("second")
    t0 = time.monotonic()

    def settled() -> tuple[list[Row], dict[int, str]] | None:
        assert restarted.running, restarted.output()
        now = world.rows()
        if any(r.lease_owner is not None and r.id in leased for r in now):
            return None  # the dead process's claims are not resolved yet
        bad = world.rejected_access()
        return (now, bad) if not bad else None

    try:
        fl.wait_until(settled, ACCESS_TTL + 8, interval=0.5,
                                 what="every grant served again after the restart")
    except AssertionError:
        now = world.rows()
        expired = [r.id for r in now if r.status == "ok" and r.access_expires_at is not None
                   and r.access_expires_at < datetime.now(UTC)]
        raise AssertionError(
            f"{time.monotonic() - t0:.0f}s after the restart: grants still leased by the "
            f"dead process {sorted(r.id for r in now if r.lease_owner and r.id in leased)}, "
            f"stored access token refused by DOT {world.rejected_access(patience=0)}, "
            f"'ok' with an expired access token {expired} (lost in flight: {sorted(lost)}, "
            f"leased at the kill: {sorted(leased)})") from None
    resolved_in = time.monotonic() - t0
    # The rest is checked at rest: a graceful stop, then every stored token asked at DOT.
    restarted.signal(signal.SIGTERM)
    assert restarted.wait(20) == 0, restarted.output()
    world.dot.wait_idle()
    stats = world.dot.stats()
    final = world.rows()
    assert world.rejected_access(patience=0) == {}
    flagged = {r.id: (r.status, r.reason) for r in final if r.status != "ok"}
    assert set(flagged) <= lost, f"healthy grants flagged: {flagged}"
    assert all(v == ("reconsent_required", "rotation_lost") for v in flagged.values()), flagged
    healthy = [r for r in final if r.status == "ok"]
    assert world.dead_refresh(healthy) == {}, "an 'ok' grant holds a dead refresh token"
    # each lost grant cost at most one presentation of its spent token, nothing else did
    assert stats["reuse"] <= len(lost), stats
    assert stats["reuse"] == len(flagged), (stats, flagged)
    print(f"\nDOT (b): kill -9 with {at_kill} in flight, {len(leased)} leased; "
          f"{len(lost)} rotations lost, {len(flagged)} flagged reconsent_required; "
          f"reuse {stats['reuse']}; all others served {resolved_in:.1f}s after the restart")


# --------------------------------------------------------------------------- (d)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # about answers, not the store
def test_refused_client_spends_nothing_and_a_refused_grant_type_blocks_nothing(
        world: World) -> None:
    """DOT's answers to a client at fault, as tokend classifies them.

    A wrong secret: DOT answers ``401 invalid_client`` (checked before the refresh
    token, so nothing is spent): no grant may be flagged, every refresh token stays
    live. Then the operator fixes the secret and, by mistake, also asks for a
    client-credentials token of the authorization-code application (DOT allows one
    grant type per application: ``400 unauthorized_client``): the user grants of that
    client must be served again at once all the same, no token presented twice."""
    world.write_config(secret="not-the-secret")
    world.import_grants(N)
    d = world.daemon("wrong-secret")

    def refused() -> bool:
        assert d.running, d.output()
        return world.dot.stats()["errors"].get("refresh_token:invalid_client", 0) >= 1

    fl.wait_until(refused, 30, interval=0.2, what="DOT refusing the client")
    time.sleep(4)  # two passes more
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0, d.output()
    world.dot.wait_idle()
    rows = world.rows()
    stats = world.dot.stats()
    assert stats["rotations"] == stats["reuse"] == 0, stats
    assert [(r.id, r.status, r.reason) for r in rows if r.status != "ok"] == []
    assert world.dead_refresh(rows) == {}, "a refused client spent a refresh token"
    refusals = stats["errors"].get("refresh_token:invalid_client", 0)

    world.write_config(main_cc=True)
    world.dot.reset_stats()
    fixed = world.daemon("fixed")
    t0 = time.monotonic()

    def served() -> bool:
        assert fixed.running, fixed.output()
        # By the fixed daemon: its first pass is done (the old access tokens may still
        # be valid, and a SIGTERM before its handlers are installed would kill it).
        if not any(e.get("event") == "pass_done" for e in fixed.log_events()):
            return False
        users = {r.id: r for r in world.rows() if r.grant_type != "client_credentials"}
        bad = set(world.rejected_access(patience=1)) & set(users)
        return len(users) == N and not bad and all(r.status == "ok" for r in users.values())

    fl.wait_until(served, 10 + ACCESS_TTL + 5, interval=0.5,
                  what="the user grants served again after the fix")
    recovered_in = time.monotonic() - t0
    fixed.signal(signal.SIGTERM)
    assert fixed.wait(20) == 0, fixed.output()
    world.dot.wait_idle()
    stats = world.dot.stats()
    rows = world.rows()
    assert stats["reuse"] == stats["revoked"] == stats["unknown_refresh"] == 0, stats
    assert set(stats["errors"]) <= {"client_credentials:unauthorized_client"}, stats
    users = [r for r in rows if r.grant_type != "client_credentials"]
    assert world.dead_refresh(users) == {}
    cc_main = [r for r in rows if r.client == "main" and r.grant_type == "client_credentials"]
    assert len(cc_main) == 1 and cc_main[0].access_token is None, cc_main
    assert "unauthorized_client" in (cc_main[0].last_error or ""), cc_main
    print(f"\nDOT (d): invalid_client x{refusals} spent nothing, nothing flagged; after the fix "
          f"every user grant served in {recovered_in:.1f}s; the refused client-credentials "
          f"grant: status {cc_main[0].status}, {cc_main[0].last_error!r}")


# --------------------------------------------------------------------------- (e)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("pkce_required", [
    pytest.param(True, id="dot-default-pkce"),  # DOT 2.x and later: PKCE required
    pytest.param(False, id="pkce-not-required"),
])
def test_authorize_against_dot(tmp_path: Path, db_url: str, pkce_required: bool) -> None:
    """``tokend authorize`` with DOT's real authorization endpoint; the test is the
    user's browser (DOT's login page logs ``consenter`` in without a form). The grant is
    stored for the user DOT's protected API names, with an access token DOT accepts."""
    world = World(tmp_path, db_url, pkce_required=pkce_required)
    proc = fl.Proc([fl.TOKEND, "--config", str(world.config_path), "authorize",
                    "--client", "main", "--no-browser", "--timeout", "30"],
                   tmp_path / "authorize.log")
    try:
        prefix = f"{world.dot.base_url}/o/authorize/"

        def url() -> str | None:
            lines = proc.log.read_text(errors="replace").splitlines()
            return next((line.strip() for line in lines if line.startswith(prefix)), None)

        browser = requests.Session()
        browser.trust_env = False
        page = browser.get(fl.wait_until(url, 30, interval=0.1, what="the authorize URL"),
                           timeout=30)
        code = proc.wait(30)
        out = proc.output()
        assert code == 0, f"exit {code}; the browser ended at {page.status_code} " \
            f"{page.url.split('?')[0]}?{sorted(parse_qs(urlsplit(page.url).query))}:\n{out}"
        rows = [r for r in world.rows() if r.grant_type == "authorization_code"]
        assert len(rows) == 1, rows
        accepted, owner = world.dot.whose(rows[0].access_token or "")
        assert accepted and str(owner) == rows[0].user_id, (accepted, owner, rows[0])
        assert world.dead_refresh(rows) == {}
    finally:
        proc.reap()
        world.close()


# --------------------------------------------------------------------------- (f)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("auth_method", ["client_secret_post", "client_secret_basic"])
def test_both_auth_methods_with_a_secret_that_needs_encoding(
        tmp_path: Path, db_url: str, auth_method: str) -> None:
    """DOT decodes HTTP Basic credentials as RFC 6749 2.3.1 says (form-urlencoded), so
    a secret with ``+ / = % & ~`` and a space works both ways; one ``run --once``
    refreshes every due grant and DOT rotates each exactly once."""
    secret = "p+ss/w=rd%26 &~x"
    world = World(tmp_path, db_url, web_secret=secret)
    try:
        world.write_config(auth_method=auth_method)
        world.import_grants(3, expires_in=1)
        done = fl.tokend(world.config_path, "run", "--once", timeout=60)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        world.dot.wait_idle()
        stats = world.dot.stats()
        assert stats["rotations"] == 3 and stats["errors"] == {}, stats
        rows = world.rows()
        assert [r.status for r in rows] == ["ok"] * len(rows)
        assert world.rejected_access(patience=0) == {}
        assert world.dead_refresh(rows) == {}
    finally:
        world.close()
