"""The re-consent endpoint end to end: a real headless Chromium, the fake's authorize page,
SQLite and PostgreSQL. Screenshots of every page go to tests/artifacts/ (git-ignored).

The browser is Debian's ``chromium`` + ``chromium-driver``, both given explicitly so that
Selenium never downloads one. Missing browser: skipped, unless CI is set (then a failure).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import text

from conftest import CLIENT_ID, CLIENT_SECRET, IN_CI
from tokend import consent, pkce, policy
from tokend.config import Config
from tokend.consent_server import ConsentServer
from tokend.daemon import Daemon
from tokend.fake import FakeJustimmo
from tokend.model import Grant, GrantType, NewGrant, Status
from tokend.provider import ProviderClient
from tokend.store import Store
from tokend.testing import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LINK_KEY = "test-link-key-0123456789-abcdefghijklmnop"
HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(message + " under CI")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1000,700", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def fake() -> Iterator[FakeJustimmo]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, users={1234: 5678, 99: 7},
                      consent_page=True) as f:
        yield f


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def config(make_config: Callable[..., Config], fake: FakeJustimmo, port: int) -> Config:
    return make_config(fake=fake, extra=(
        f'\n[consent]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'link_key = "{LINK_KEY}"\n'))


@pytest.fixture
def store(config: Config, store_for: Callable[..., Store]) -> Store:
    return store_for(config)


@pytest.fixture
def server(config: Config, store: Store) -> Iterator[ConsentServer]:
    provider = ProviderClient(config.provider)
    srv = ConsentServer(config, store, provider).start()
    yield srv
    srv.stop()
    provider.close()


def seed(store: Store, config: Config, fake: FakeJustimmo, user_id: int = 1234,
         status: Status = Status.RECONSENT_REQUIRED) -> Grant:
    issued = fake.issue(CLIENT_ID, user_id=user_id, tenant_id=5678)
    now = store.clock()
    new = NewGrant(client="main", grant_type=GrantType.AUTHORIZATION_CODE.value,
                   access_token=issued.access_token, access_expires_at=issued.access_expires_at,
                   obtained_at=now - timedelta(days=29), refresh_token=issued.refresh_token,
                   refresh_expires_at=now + timedelta(days=1), user_id=str(user_id),
                   tenant_id="5678", consented_at=now - timedelta(days=29))
    [gid] = store.insert_grants([new], lambda g: policy.initial(g, now, config.schedule))
    if status == Status.RECONSENT_REQUIRED:
        store.set_status(gid, status, "invalid_grant", None)
    return store.get(gid)


def snap(driver: Any, request: pytest.FixtureRequest, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    backend = "postgresql" if "postgresql" in request.node.name else "sqlite"
    driver.save_screenshot(str(ARTIFACTS / f"consent-{backend}-{name}.png"))


def heading(driver: Any, expected: str, timeout: float = 20) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page may be replaced between finding the heading and reading it: read it in
    # one script (no element handle to go stale), and let a navigation in progress
    # (Chromium's "Node with given id does not belong to the document") try again.
    read = "const h = document.querySelector('h1'); return h ? h.textContent.trim() : null;"
    WebDriverWait(driver, timeout, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(read) == expected,
        message=f"page with heading {expected!r}")


def click(driver: Any, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def approve_as(driver: Any, user_id: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "user")).select_by_value(str(user_id))
    click(driver, "approve")


def unchanged(store: Store, before: Grant) -> None:
    after = store.get(before.id)
    assert (after.status, after.token_version, after.consented_at, after.refresh_expires_at) \
        == (before.status, before.token_version, before.consented_at, before.refresh_expires_at)
    assert [e for e in store.events() if e["event"] == "recovered"] == []


# --------------------------------------------------------------------------- in a browser


def test_browser_flow_recovers_the_linked_grant(
        browser: Any, request: pytest.FixtureRequest, config: Config, store: Store,
        fake: FakeJustimmo, server: ConsentServer) -> None:
    other = seed(store, config, fake, user_id=99)
    grant = seed(store, config, fake)
    _old_access, old_refresh = store.tokens(store.get(grant.id, with_tokens=True))
    link = consent.link_for(config, grant, store.clock())

    browser.get(link)
    heading(browser, "Renew access")
    assert "main" in browser.page_source
    snap(browser, request, "1-link")
    click(browser, "continue")
    heading(browser, "Authorize application")
    assert browser.current_url.startswith(fake.authorize_url)
    snap(browser, request, "2-provider")
    approve_as(browser, 1234)
    heading(browser, "Access renewed")
    snap(browser, request, "3-done")

    after = store.get(grant.id, with_tokens=True)
    assert (after.id, after.status, after.reason, after.user_id) == (
        grant.id, Status.OK, None, "1234")
    access, refresh = store.tokens(after)
    assert access and fake.access_token_valid(access)
    assert refresh and refresh != old_refresh and fake.refresh_token_valid(refresh)
    assert after.refresh_expires_at and after.refresh_expires_at > store.clock() + \
        timedelta(days=25)
    assert [(e["event"], e["grant_id"]) for e in store.events()] == [("recovered", grant.id)]
    assert len(list(store.iter_grants())) == 2  # no new grant; the other one untouched
    assert store.get(other.id).token_version == other.token_version

    browser.get(link)  # a second use of the link
    heading(browser, "Link already used")
    snap(browser, request, "4-used")


def test_browser_denial_and_wrong_user_store_nothing(
        browser: Any, request: pytest.FixtureRequest, config: Config, store: Store,
        fake: FakeJustimmo, server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    link = consent.link_for(config, grant, store.clock())

    browser.get(link)
    click(browser, "continue")
    heading(browser, "Authorize application")
    click(browser, "deny")
    heading(browser, "Access not renewed")
    snap(browser, request, "5-denied")
    unchanged(store, grant)

    browser.get(link)  # the link still works after a denial
    click(browser, "continue")
    heading(browser, "Authorize application")
    approve_as(browser, 99)
    heading(browser, "Wrong account")
    snap(browser, request, "6-wrong-user")
    unchanged(store, grant)


def test_browser_expired_and_forged_links(
        browser: Any, request: pytest.FixtureRequest, config: Config, store: Store,
        fake: FakeJustimmo, server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    expired = consent.url(config, consent.mint(LINK_KEY, grant.id, grant.consented_at,
                                               store.clock() - timedelta(seconds=1)))
    browser.get(expired)
    heading(browser, "Link expired")
    snap(browser, request, "7-expired")
    browser.get(consent.link_for(config, grant, store.clock())[:-2] + "xx")
    heading(browser, "Invalid link")
    snap(browser, request, "8-invalid")
    unchanged(store, grant)


# --------------------------------------------------------------------------- over HTTP


def start_flow(link: str) -> str:
    """POST the link's button; returns the provider authorize URL it redirects to."""
    resp = requests.post(link, allow_redirects=False, timeout=10)
    assert resp.status_code == 303, resp.text
    return resp.headers["Location"]


def provider_redirect(authorize: str, user_id: int = 1234) -> str:
    resp = requests.get(authorize + f"&user_id={user_id}", allow_redirects=False, timeout=10)
    assert resp.status_code == 302
    return str(resp.headers["Location"])


def test_links_are_refused_used_expired_forged_or_for_another_grant(
        config: Config, store: Store, fake: FakeJustimmo, server: ConsentServer) -> None:
    a = seed(store, config, fake)
    b = seed(store, config, fake, user_id=99)
    link_a = consent.link_for(config, a, store.clock())
    token = link_a.rsplit("/", 1)[1]
    _gid, rest = token.split(".", 1)
    forged = {
        "changed signature": link_a[:-3] + ("abc" if link_a[-3:] != "abc" else "abd"),
        "another grant": consent.url(config, f"{b.id}.{rest}"),
        "expired": consent.url(config, consent.mint(
            LINK_KEY, a.id, a.consented_at, store.clock() - timedelta(seconds=1))),
        "another key": consent.url(config, consent.mint(
            "another-key-of-forty-characters-xxxxxxxx", a.id, a.consented_at,
            store.clock() + timedelta(days=1))),
    }
    for name, link in forged.items():
        page = requests.get(link, timeout=10)
        assert page.status_code in (404, 410), name
        assert requests.post(link, allow_redirects=False, timeout=10).status_code \
            in (404, 410), name
    # used: the first consent through the link ends it, and every older link with it
    older = consent.url(config, consent.mint(LINK_KEY, a.id, a.consented_at,
                                             store.clock() + timedelta(days=2)))
    callback = provider_redirect(start_flow(link_a))
    assert "Access renewed" in requests.get(callback, timeout=10).text
    for link in (link_a, older):
        assert "Link already used" in requests.get(link, timeout=10).text
        assert requests.post(link, allow_redirects=False, timeout=10).status_code == 410
    # the callback itself cannot be replayed
    replay = requests.get(callback, timeout=10)
    assert replay.status_code == 400 and "Sign-in expired" in replay.text
    assert store.get(b.id).token_version == b.token_version
    assert [e["grant_id"] for e in store.events()] == [a.id]


def test_a_flow_started_twice_completes_once(config: Config, store: Store,
                                             fake: FakeJustimmo, server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    link = consent.link_for(config, grant, store.clock())
    first, second = start_flow(link), start_flow(link)  # two tabs
    assert "Access renewed" in requests.get(provider_redirect(first), timeout=10).text
    late = requests.get(provider_redirect(second), timeout=10)
    assert late.status_code == 410 and "Link already used" in late.text
    assert store.get(grant.id).token_version == grant.token_version + 1


def test_the_callback_may_reach_another_replica(
        config: Config, store: Store, store_for: Callable[..., Store], fake: FakeJustimmo,
        server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    other_store = store_for(config)
    provider = ProviderClient(config.provider)
    replica = ConsentServer(config, other_store, provider,
                            address=("127.0.0.1", 0)).start()
    try:
        callback = provider_redirect(start_flow(consent.link_for(config, grant,
                                                                 store.clock())))
        parts = urlsplit(callback)
        assert parts.port == server.address[1]
        moved = callback.replace(f":{parts.port}/", f":{replica.address[1]}/", 1)
        assert "Access renewed" in requests.get(moved, timeout=10).text
    finally:
        replica.stop()
        provider.close()
    assert store.get(grant.id).status == Status.OK


def test_the_flow_sends_pkce_and_keeps_the_verifier_encrypted_with_the_state(
        config: Config, store: Store, store_for: Callable[..., Store], fake: FakeJustimmo,
        server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    authorize = start_flow(consent.link_for(config, grant, store.clock()))
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"]
    with store.engine.connect() as conn:
        [stored] = conn.execute(text("SELECT code_verifier FROM consent_states")).scalars()
    verifier = store.cipher.decrypt(stored)
    assert stored.startswith("enc:v1:") and verifier not in stored
    assert pkce.challenge_for(verifier) == query["code_challenge"][0]
    callback = provider_redirect(authorize)
    assert fake.stats()["last_code_challenge"] == query["code_challenge"][0]
    # the replica that receives the callback knows the verifier only from the database
    other_store = store_for(config)
    provider = ProviderClient(config.provider)
    replica = ConsentServer(config, other_store, provider, address=("127.0.0.1", 0)).start()
    try:
        moved = callback.replace(f":{server.address[1]}/", f":{replica.address[1]}/", 1)
        assert "Access renewed" in requests.get(moved, timeout=10).text
    finally:
        replica.stop()
        provider.close()
    assert store.get(grant.id).status == Status.OK


def test_a_code_for_another_verifier_stores_nothing(
        config: Config, store: Store, fake: FakeJustimmo, server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    callback = provider_redirect(start_flow(consent.link_for(config, grant, store.clock())))
    with store.engine.begin() as conn:  # as if the code had been issued for another flow
        conn.execute(text("UPDATE consent_states SET code_verifier = :v"),
                     {"v": store.cipher.encrypt(pkce.new_pair().verifier)})
    fake.reset_stats()
    page = requests.get(callback, timeout=10)
    assert page.status_code >= 400 and "Access renewed" not in page.text
    assert fake.stats()["errors_by_code"] == {"invalid_grant": 1}
    unchanged(store, grant)


def test_wrong_user_over_http_stores_nothing(config: Config, store: Store,
                                            fake: FakeJustimmo, server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    callback = provider_redirect(start_flow(consent.link_for(config, grant, store.clock())),
                                 user_id=99)
    page = requests.get(callback, timeout=10)
    assert page.status_code == 403 and "Wrong account" in page.text
    unchanged(store, grant)
    assert len(list(store.iter_grants())) == 1


def test_every_response_carries_the_security_headers(
        config: Config, store: Store, fake: FakeJustimmo, server: ConsentServer) -> None:
    grant = seed(store, config, fake)
    link = consent.link_for(config, grant, store.clock())
    base = config.consent.public_url
    responses = {
        "link page": requests.get(link, timeout=10),
        "redirect": requests.post(link, allow_redirects=False, timeout=10),
        "invalid link": requests.get(base + "/consent/nope", timeout=10),
        "callback without state": requests.get(base + "/callback", timeout=10),
        "denial": requests.get(base + "/callback?error=access_denied&state=x", timeout=10),
        "unknown path": requests.get(base + "/", timeout=10),
        "wrong method": requests.put(link, timeout=10),
        "head": requests.head(link, timeout=10),
    }
    for name, resp in responses.items():
        for header, value in HEADERS.items():
            assert resp.headers.get(header) == value, (name, header)
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, name
        assert f"form-action 'self' {fake.base_url}" in csp, name
        assert "http" not in resp.text.split("<body>", 1)[-1].replace(
            fake.authorize_url, "") or name == "redirect", name  # no external assets
    assert responses["redirect"].headers["Location"].startswith(fake.authorize_url)
    query = parse_qs(urlsplit(responses["redirect"].headers["Location"]).query)
    assert query["redirect_uri"] == [f"{base}/callback"]
    assert len(query["state"][0]) >= 40


def test_idle_connections_do_not_block_and_connections_are_bounded(
        config: Config, store: Store, fake: FakeJustimmo) -> None:
    grant = seed(store, config, fake)
    provider = ProviderClient(config.provider)
    srv = ConsentServer(config, store, provider, address=("127.0.0.1", 0), max_connections=3,
                        idle_timeout=3.0, max_lifetime=6.0).start()
    link = consent.link_for(config, grant, store.clock()).replace(
        config.consent.public_url, f"http://127.0.0.1:{srv.address[1]}")
    idle = []
    try:
        # a browser's pre-connects: open, say nothing
        idle = [socket.create_connection(srv.address) for _ in range(2)]
        began = time.monotonic()
        assert requests.get(link, timeout=10).status_code == 200
        assert time.monotonic() - began < 2.5  # served beside them, not after them
        # the bound: a third idle connection fills it; one more is answered 503 at once
        def serving(n: int) -> None:  # the server's own count of open connections
            deadline = time.monotonic() + 5
            while srv.server.open_connections != n:
                assert time.monotonic() < deadline, srv.server.open_connections
                time.sleep(0.02)

        serving(2)  # the request above has finished on the server's side too
        idle.append(socket.create_connection(srv.address))
        serving(3)
        busy = requests.get(link, timeout=10)
        assert busy.status_code == 503 and busy.headers["X-Frame-Options"] == "DENY"
        # idle ones are dropped after idle_timeout, then requests are served again
        deadline = time.monotonic() + 10
        while requests.get(link, timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # a client that drips bytes to stay just inside idle_timeout is cut at max_lifetime
        drip = socket.create_connection(srv.address)
        drip.sendall(b"GET / HTTP/1.1\r\n")
        began = time.monotonic()
        drip.settimeout(10)
        closed = False
        while time.monotonic() - began < 12:
            try:
                drip.sendall(b"X-A: b\r\n")
                if drip.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.5)
        assert closed and time.monotonic() - began < 9
        drip.close()
    finally:
        for s in idle:
            s.close()
        srv.stop()
        provider.close()


def test_the_daemon_serves_the_endpoint(config: Config, store: Store, fake: FakeJustimmo,
                                        port: int) -> None:
    grant = seed(store, config, fake)
    daemon = Daemon(config, store)
    daemon.start()
    try:
        page = requests.get(consent.link_for(config, grant, store.clock()), timeout=10)
        assert page.status_code == 200 and "Renew access" in page.text
    finally:
        daemon.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)


def test_required_event_carries_a_working_consent_url(
        config: Config, store: Store, fake: FakeJustimmo, server: ConsentServer) -> None:
    from tokend.maintenance import Maintenance

    grant = seed(store, config, fake, status=Status.OK)
    fake.revoke_refresh_token(store.tokens(store.get(grant.id, with_tokens=True))[1] or "")
    with store.engine.begin() as conn:  # due now
        conn.execute(text("UPDATE grants SET next_attempt_at = created_at, "
                          "access_expires_at = created_at"))
    provider = ProviderClient(config.provider)
    engine = Maintenance(config, store, provider)
    try:
        engine.run_pass()
    finally:
        engine.close()
        provider.close()
    [event] = store.events()
    import json

    payload = json.loads(event["payload"])
    assert payload["event"] == "reconsent_required"
    url = payload["consent_url"]
    assert url.startswith(config.consent.public_url + "/consent/")
    callback = provider_redirect(start_flow(url))
    assert "Access renewed" in requests.get(callback, timeout=10).text
    assert store.get(grant.id).status == Status.OK


def test_consent_link_cli_and_api(config: Config, store: Store, fake: FakeJustimmo,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tokend.api import TokenStore
    from tokend.cli import main

    grant = seed(store, config, fake)
    assert config.source is not None
    assert main(["--config", str(config.source), "consent-link", str(grant.id),
                 "--ttl", "2h"]) == 0
    printed = capsys.readouterr().out.strip()
    link = consent.verify(LINK_KEY, printed.rsplit("/", 1)[1], datetime.now(UTC))
    assert link.grant_id == grant.id
    assert timedelta(minutes=119) < link.expires_at - datetime.now(UTC) <= timedelta(hours=2)
    with TokenStore(config) as api:
        made = api.consent_link(grant.id)
    assert consent.verify(LINK_KEY, made.rsplit("/", 1)[1], datetime.now(UTC)).grant_id \
        == grant.id
    assert main(["--config", str(config.source), "consent-link", "999"]) == 1
    assert "grant 999 not found" in capsys.readouterr().err
    assert main(["--config", str(config.source), "consent-link", "1", "--ttl", "soon"]) == 2
