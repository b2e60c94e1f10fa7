"""ProviderClient over real HTTP against a scripted server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest

from tokend import __version__, sendgate
from tokend.config import ClientConfig, ProviderConfig, Secret
from tokend.errors import ErrorKind, NotSent, ProviderError
from tokend.provider import ProviderClient, basic_auth_header
from tokend.testing import ManualClock, free_port

SECRET = "s3cr3t-client-secret"
REFRESH = "def50200-refresh-token-value"
NEW_REFRESH = "def50200-new-refresh-token"
ACCESS = "eyJ.new-access-token"
# RFC 7636 Appendix B
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
SENT = datetime(2024, 1, 31, 12, 0, tzinfo=UTC)
TOKEN_BODY = {"token_type": "Bearer", "expires_in": 86400, "access_token": ACCESS,
              "refresh_token": NEW_REFRESH}
ALL_SECRETS = (SECRET, REFRESH, NEW_REFRESH, ACCESS)


# --------------------------------------------------------------------------- scripted server


@dataclass
class Canned:
    """One scripted answer. ``action``: respond | drop (close without answering) |
    reset (RST without answering) | partial (promise more body than is sent, close)."""

    status: int = 200
    body: bytes | dict[str, Any] | list[Any] = field(default_factory=lambda: dict(TOKEN_BODY))
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    action: str = "respond"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    client_port: int

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=False))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up (timeouts, size cap) leave broken pipes behind: expected.
        pass


class ScriptedServer:
    """Answers from a queue of canned responses and records every request."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.canned: queue.Queue[Canned] = queue.Queue()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                server.handle(self)

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/access_token") -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def push(self, *answers: Canned) -> None:
        for answer in answers:
            self.canned.put(answer)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length)
        with self._lock:
            self.seen.append(Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()},
                                  body, h.client_address[1]))
        try:
            answer = self.canned.get_nowait()
        except queue.Empty:
            answer = Canned(599, b"no canned response left")
        if answer.delay:
            time.sleep(answer.delay)
        if answer.action == "drop":
            h.close_connection = True
            return
        if answer.action == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        payload = (answer.body if isinstance(answer.body, bytes)
                   else json.dumps(answer.body).encode())
        h.send_response(answer.status)
        headers = {"Content-Type": "application/json", **answer.headers}
        for name, value in headers.items():
            h.send_header(name, value)
        if answer.action == "partial":
            h.send_header("Content-Length", str(len(payload) + 1000))
            h.end_headers()
            h.wfile.write(payload)
            h.close_connection = True
            return
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.stop()


def provider_for(srv: ScriptedServer, **changes: Any) -> ProviderConfig:
    base = ProviderConfig(
        authorize_url="https://auth.example/authorize",
        token_url=srv.url("/access_token"),
        user_url=srv.url("/oauth/user/current"),
        timeout=timedelta(seconds=5),
    )
    return replace(base, **changes)


def client_config(**changes: Any) -> ClientConfig:
    base = ClientConfig(name="main", client_id="client-1", client_secret=Secret(SECRET),
                        redirect_uri="http://127.0.0.1:8765/callback")
    return replace(base, **changes)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(SENT)


@pytest.fixture
def client(server: ScriptedServer, clock: ManualClock) -> Iterator[ProviderClient]:
    with ProviderClient(provider_for(server), clock=clock) as pc:
        yield pc


def assert_no_secrets(err: BaseException) -> None:
    text = f"{err} {err!r} {getattr(err, 'description', '')} {getattr(err, 'hint', '')}"
    for secret in ALL_SECRETS:
        assert secret not in text
    # Not chained either: a traceback shows the chain.
    assert err.__context__ is None
    assert err.__cause__ is None


def refresh_error(client: ProviderClient) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        client.refresh(client_config(), REFRESH)
    assert_no_secrets(info.value)
    return info.value


# --------------------------------------------------------------------------- requests sent


def test_refresh_with_client_secret_post(server: ScriptedServer, client: ProviderClient,
                                         clock: ManualClock) -> None:
    server.push(Canned())
    resp = client.refresh(client_config(), REFRESH)
    assert resp.access_token == ACCESS
    assert resp.refresh_token == NEW_REFRESH
    assert resp.sent_at == SENT
    assert resp.access_expires_at == SENT + timedelta(days=1)
    assert clock.calls == 1
    [seen] = server.seen
    assert seen.method == "POST"
    assert seen.path == "/access_token"
    assert seen.form == {"grant_type": "refresh_token", "refresh_token": REFRESH,
                         "client_id": "client-1", "client_secret": SECRET}
    assert "redirect_uri" not in seen.form
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen.headers["user-agent"] == f"tokend/{__version__}"
    assert seen.headers["accept"] == "application/json"
    assert "authorization" not in seen.headers


def test_refresh_with_client_secret_basic(server: ScriptedServer, clock: ManualClock) -> None:
    secret = "s3cr:t/+ é%"
    server.push(Canned())
    cfg = client_config(client_id="id with space", client_secret=Secret(secret),
                        auth_method="client_secret_basic")
    with ProviderClient(provider_for(server), clock=clock) as pc:
        pc.refresh(cfg, REFRESH)
    [seen] = server.seen
    assert seen.form == {"grant_type": "refresh_token", "refresh_token": REFRESH}
    scheme, _, encoded = seen.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(encoded).decode("ascii").partition(":")
    # RFC 6749 2.3.1: form-urlencoded before base64.
    assert user == "id+with+space"
    assert password == "s3cr%3At%2F%2B+%C3%A9%25"
    assert parse_qs(f"u={user}&p={password}") == {"u": ["id with space"], "p": [secret]}


def test_basic_auth_header_plain_credentials() -> None:
    assert basic_auth_header("client", "secret") == "Basic " + base64.b64encode(
        b"client:secret").decode()


def test_client_credentials(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(body={"token_type": "Bearer", "expires_in": 2678400,
                             "access_token": ACCESS}))
    resp = client.client_credentials(client_config())
    assert resp.refresh_token is None
    assert resp.expires_in == 2678400
    assert server.seen[0].form == {"grant_type": "client_credentials", "client_id": "client-1",
                                   "client_secret": SECRET}


def test_exchange_code(server: ScriptedServer, client: ProviderClient) -> None:
    # Justimmo returns no refresh token on the code exchange, says docs/contract.md.
    server.push(Canned(body={"token_type": "Bearer", "expires_in": 86400,
                             "access_token": ACCESS}))
    resp = client.exchange_code(client_config(), "auth-code-1", "http://127.0.0.1:8765/cb",
                                VERIFIER)
    assert resp.refresh_token is None
    assert server.seen[0].form == {
        "grant_type": "authorization_code", "code": "auth-code-1",
        "redirect_uri": "http://127.0.0.1:8765/cb", "client_id": "client-1",
        "client_secret": SECRET, "code_verifier": VERIFIER,
    }


@pytest.mark.parametrize("bad", ["", "short", "x" * 129, "a" * 42 + " ", "ä" * 43])
def test_exchange_code_refuses_a_malformed_verifier_unsent(
        server: ScriptedServer, client: ProviderClient, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        client.exchange_code(client_config(), "auth-code-1", "http://127.0.0.1:8765/cb", bad)
    assert bad not in str(info.value) or not bad
    assert server.seen == []


def test_exchange_code_keeps_the_verifier_out_of_errors(
        server: ScriptedServer, client: ProviderClient) -> None:
    # A server echoing the request (a proxy's error page) must not put it in the error.
    server.push(Canned(status=400, body={"error": "invalid_grant", "hint": f"got {VERIFIER}"}))
    with pytest.raises(ProviderError) as info:
        client.exchange_code(client_config(), "auth-code-1", "http://127.0.0.1:8765/cb",
                             VERIFIER)
    assert VERIFIER not in str(info.value) and VERIFIER not in repr(info.value.__dict__)


@pytest.mark.parametrize("bad", ["", "a\nb", "tök"])
def test_unusable_refresh_token_is_never_sent(server: ScriptedServer, client: ProviderClient,
                                              bad: str) -> None:
    # An empty refresh token would earn invalid_request = PERMANENT.
    with pytest.raises(ValueError) as info:
        client.refresh(client_config(), bad)
    assert bad not in str(info.value) or not bad
    assert server.seen == []


def test_connections_are_pooled(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(), Canned(), Canned())
    for _ in range(3):
        client.refresh(client_config(), REFRESH)
    assert len({s.client_port for s in server.seen}) == 1


def test_cookies_are_not_kept(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(headers={"Set-Cookie": "PHPSESSID=abc; Path=/"}), Canned())
    client.refresh(client_config(), REFRESH)
    client.refresh(client_config(), REFRESH)
    assert "cookie" not in server.seen[1].headers


def test_netrc_credentials_are_not_added(server: ScriptedServer, client: ProviderClient,
                                         tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server.push(Canned())
    client.refresh(client_config(), REFRESH)
    assert "authorization" not in server.seen[0].headers


def test_shared_between_threads(server: ScriptedServer, clock: ManualClock) -> None:
    server.push(*(Canned() for _ in range(40)))
    with ProviderClient(provider_for(server), clock=clock, pool_size=4) as pc, \
            ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: pc.refresh(client_config(), REFRESH), range(40)))
    assert [r.access_token for r in results] == [ACCESS] * 40
    assert len(server.seen) == 40


def test_default_clock_is_utc_now(server: ScriptedServer) -> None:
    server.push(Canned())
    before = datetime.now(UTC)
    with ProviderClient(provider_for(server)) as pc:
        resp = pc.refresh(client_config(), REFRESH)
    assert before <= resp.sent_at <= datetime.now(UTC)
    assert resp.sent_at.tzinfo is UTC


# --------------------------------------------------------------------------- HTTP errors


def test_league_dead_refresh_token_is_permanent(server: ScriptedServer,
                                                client: ProviderClient) -> None:
    server.push(Canned(401, {"error": "invalid_request",
                             "message": "The refresh token is invalid.",
                             "hint": "Token has been revoked"}))
    err = refresh_error(client)
    assert (err.kind, err.error, err.status) == (ErrorKind.PERMANENT, "invalid_request", 401)
    assert err.hint == "Token has been revoked"
    assert not err.maybe_applied


def test_invalid_client_is_client_error(server: ScriptedServer,
                                        client: ProviderClient) -> None:
    server.push(Canned(401, {"error": "invalid_client", "message": "Client authentication failed"},
                       headers={"WWW-Authenticate": 'Basic realm="OAuth"'}))
    with pytest.raises(ProviderError) as info:
        client.client_credentials(client_config())
    assert (info.value.kind, info.value.error) == (ErrorKind.CLIENT, "invalid_client")


def test_rate_limited(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(429, b"slow down", headers={"Retry-After": "12",
                                                   "Content-Type": "text/plain"}))
    err = refresh_error(client)
    assert (err.kind, err.error, err.retry_after) == (ErrorKind.TRANSIENT, "rate_limited", 12.0)


def test_html_bad_gateway(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(502, b"<html><body>Bad Gateway</body></html>",
                       headers={"Content-Type": "text/html"}))
    err = refresh_error(client)
    assert (err.kind, err.error, err.status) == (ErrorKind.TRANSIENT, "http_502", 502)
    assert err.maybe_applied


def test_provider_echoing_secrets_is_redacted(server: ScriptedServer,
                                              client: ProviderClient) -> None:
    server.push(Canned(400, {"error": "invalid_request",
                             "message": f"bad client_secret {SECRET}",
                             "hint": f"refresh_token={REFRESH}"}))
    err = refresh_error(client)
    assert err.description == "bad client_secret ********"
    assert err.hint == "refresh_token=********"


def test_redirect_is_not_followed(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(302, b"", headers={"Location": server.url("/elsewhere")}), Canned())
    err = refresh_error(client)
    assert (err.kind, err.error) == (ErrorKind.TRANSIENT, "http_302")
    assert [s.path for s in server.seen] == ["/access_token"]


def test_a_redirects_body_is_capped_too(server: ScriptedServer, clock: ManualClock) -> None:
    """requests' Session.send reads a 3xx answer's whole body before returning it."""
    import tracemalloc

    server.push(Canned(302, b"x" * 20_000_000, headers={"Location": server.url("/x")}))
    with ProviderClient(provider_for(server), clock=clock, max_body=1024) as pc:
        tracemalloc.start()
        try:
            with pytest.raises(ProviderError) as info:
                pc.refresh(client_config(), REFRESH)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert info.value.error == "http_302"
    assert peak < 2_000_000


def test_oversized_success_is_bad_response(server: ScriptedServer, clock: ManualClock) -> None:
    body = dict(TOKEN_BODY, padding="x" * 5000)
    server.push(Canned(body=body), Canned())
    with ProviderClient(provider_for(server), clock=clock, max_body=4096) as pc:
        with pytest.raises(ProviderError) as info:
            pc.refresh(client_config(), REFRESH)
        err = info.value
        assert (err.kind, err.error) == (ErrorKind.TRANSIENT, "bad_response")
        assert err.maybe_applied
        assert_no_secrets(err)
        # The connection with the unread rest was dropped, not reused mid-body.
        assert pc.refresh(client_config(), REFRESH).access_token == ACCESS


def test_body_exactly_at_the_cap_is_fine(server: ScriptedServer, clock: ManualClock) -> None:
    payload = json.dumps(TOKEN_BODY).encode()
    server.push(Canned(body=payload))
    with ProviderClient(provider_for(server), clock=clock, max_body=len(payload)) as pc:
        assert pc.refresh(client_config(), REFRESH).access_token == ACCESS


def test_oversized_error_page_is_transient(server: ScriptedServer, clock: ManualClock) -> None:
    server.push(Canned(503, b"<html>" + b"x" * 10_000, headers={"Content-Type": "text/html",
                                                                  "Retry-After": "5"}))
    with ProviderClient(provider_for(server), clock=clock, max_body=1024) as pc, \
            pytest.raises(ProviderError) as info:
        pc.refresh(client_config(), REFRESH)
    assert (info.value.error, info.value.retry_after) == ("http_503", 5.0)


# --------------------------------------------------------------------------- transport


def test_read_timeout_may_have_rotated(server: ScriptedServer, clock: ManualClock) -> None:
    server.push(Canned(delay=1.0))
    cfg = provider_for(server, timeout=timedelta(seconds=0.2))
    with ProviderClient(cfg, clock=clock) as pc, pytest.raises(ProviderError) as info:
        pc.refresh(client_config(), REFRESH)
    err = info.value
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "timeout", True)
    assert_no_secrets(err)
    assert len(server.seen) == 1


def test_read_timeout_on_client_credentials_is_not_flagged(server: ScriptedServer,
                                                           clock: ManualClock) -> None:
    server.push(Canned(delay=1.0))
    cfg = provider_for(server, timeout=timedelta(seconds=0.2))
    with ProviderClient(cfg, clock=clock) as pc, pytest.raises(ProviderError) as info:
        pc.client_credentials(client_config())
    assert (info.value.error, info.value.maybe_applied) == ("timeout", False)


def test_dropped_connection_is_not_resent(server: ScriptedServer,
                                          client: ProviderClient) -> None:
    server.push(Canned(action="drop"), Canned())
    err = refresh_error(client)
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "connection", True)
    # The one thing that must never happen: urllib3 quietly sending the refresh again.
    assert len(server.seen) == 1


def test_dropped_pooled_connection_is_not_resent(server: ScriptedServer,
                                                 client: ProviderClient) -> None:
    server.push(Canned(), Canned(action="drop"), Canned())
    client.refresh(client_config(), REFRESH)
    err = refresh_error(client)
    assert (err.error, err.maybe_applied) == ("connection", True)
    assert len(server.seen) == 2
    assert server.seen[0].client_port == server.seen[1].client_port


def test_reset_connection(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(action="reset"))
    err = refresh_error(client)
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "connection", True)
    assert len(server.seen) == 1


def test_body_cut_short(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(action="partial"))
    err = refresh_error(client)
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "connection", True)


def test_connection_refused_was_not_sent(clock: ManualClock) -> None:
    cfg = ProviderConfig(token_url=f"http://127.0.0.1:{free_port()}/access_token")
    with ProviderClient(cfg, clock=clock) as pc:
        err = refresh_error(pc)
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "connection", False)
    assert err.description is not None
    assert "refused" in err.description


def test_dns_failure_was_not_sent(clock: ManualClock) -> None:
    cfg = ProviderConfig(token_url="http://tokend-test.invalid/access_token")
    with ProviderClient(cfg, clock=clock) as pc:
        err = refresh_error(pc)
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "connection", False)


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(self_signed: tuple[Path, Path]) -> Iterator[ScriptedServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*self_signed)
    srv = ScriptedServer(tls=ctx)
    yield srv
    srv.stop()


def test_untrusted_certificate_is_refused_before_sending(tls_server: ScriptedServer,
                                                         clock: ManualClock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    tls_server.push(Canned())
    with ProviderClient(provider_for(tls_server), clock=clock) as pc:
        err = refresh_error(pc)
    assert (err.kind, err.error, err.maybe_applied) == (ErrorKind.TRANSIENT, "connection", False)
    assert err.description is not None
    assert "certificate" in err.description
    assert tls_server.seen == []


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_tls_false_accepts_it(tls_server: ScriptedServer, clock: ManualClock,
                                     self_signed: tuple[Path, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets REQUESTS_CA_BUNDLE override a session-level verify=False.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(self_signed[0].parent / "nothing.pem"))
    tls_server.push(Canned())
    with ProviderClient(provider_for(tls_server, verify_tls=False), clock=clock) as pc:
        assert pc.refresh(client_config(), REFRESH).access_token == ACCESS


def test_ca_bundle_from_environment_is_honoured(tls_server: ScriptedServer, clock: ManualClock,
                                                self_signed: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(self_signed[0]))
    tls_server.push(Canned())
    with ProviderClient(provider_for(tls_server), clock=clock) as pc:
        assert pc.refresh(client_config(), REFRESH).access_token == ACCESS


# --------------------------------------------------------------------------- user lookup


def test_current_user(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(body={"id": 1234, "tenant": {"id": 5678}}))
    assert client.current_user(ACCESS) == ("1234", "5678")
    [seen] = server.seen
    assert (seen.method, seen.path) == ("GET", "/oauth/user/current")
    assert seen.headers["authorization"] == f"Bearer {ACCESS}"
    assert seen.body == b""


def test_current_user_without_tenant(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(body={"id": "42"}))
    assert client.current_user(ACCESS) == ("42", None)


def test_current_user_401_is_permanent(server: ScriptedServer, client: ProviderClient) -> None:
    server.push(Canned(401, {"error": "access_denied", "message": f"token {ACCESS} revoked"}))
    with pytest.raises(ProviderError) as info:
        client.current_user(ACCESS)
    assert (info.value.kind, info.value.error) == (ErrorKind.PERMANENT, "invalid_token")
    assert_no_secrets(info.value)


@pytest.mark.parametrize(
    ("canned", "error"),
    [(Canned(200, b"<html>"), "bad_response"), (Canned(200, {"tenant": {}}), "bad_response"),
     (Canned(503, b"down", headers={"Content-Type": "text/plain"}), "http_503"),
     (Canned(action="drop"), "connection")],
)
def test_current_user_failures_are_transient(server: ScriptedServer, client: ProviderClient,
                                             canned: Canned, error: str) -> None:
    server.push(canned)
    with pytest.raises(ProviderError) as info:
        client.current_user(ACCESS)
    assert (info.value.kind, info.value.error) == (ErrorKind.TRANSIENT, error)
    assert not info.value.maybe_applied
    assert_no_secrets(info.value)


def test_current_user_refuses_a_token_that_breaks_the_header(server: ScriptedServer,
                                                            client: ProviderClient) -> None:
    with pytest.raises(ValueError) as info:
        client.current_user("abc\r\nX-Injected: 1")
    assert "abc" not in str(info.value)
    assert server.seen == []


# --------------------------------------------------------------------------- authorize URL


def test_authorize_url_justimmo(clock: ManualClock) -> None:
    with ProviderClient(ProviderConfig(), clock=clock) as pc:
        url = pc.authorize_url(client_config(client_id="my client"),
                               "http://127.0.0.1:8765/callback?x=1&y=2", "st&te=/+", CHALLENGE)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "auth.justimmo.at",
                                                        "/authorize")
    assert parse_qs(parts.query) == {
        "response_type": ["code"], "client_id": ["my client"],
        "redirect_uri": ["http://127.0.0.1:8765/callback?x=1&y=2"], "state": ["st&te=/+"],
        "code_challenge": [CHALLENGE], "code_challenge_method": ["S256"],
    }


def test_authorize_url_keeps_existing_query(clock: ManualClock) -> None:
    cfg = ProviderConfig(authorize_url="https://idp.example/oauth/authorize?prompt=consent"
                                       "&audience=api&state=stale&empty="
                                       "&code_challenge_method=plain")
    with ProviderClient(cfg, clock=clock) as pc:
        url = pc.authorize_url(client_config(), "http://127.0.0.1:8765/callback", "fresh",
                               CHALLENGE)
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    assert query == [("prompt", "consent"), ("audience", "api"), ("empty", ""),
                     ("response_type", "code"), ("client_id", "client-1"),
                     ("redirect_uri", "http://127.0.0.1:8765/callback"), ("state", "fresh"),
                     ("code_challenge", CHALLENGE), ("code_challenge_method", "S256")]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        ProviderClient(ProviderConfig(), pool_size=0)
    with pytest.raises(ValueError):
        ProviderClient(ProviderConfig(), max_body=0)


def test_a_request_past_its_rate_limit_slot_waits_for_a_new_one_before_it_is_written(
        server: ScriptedServer, client: ProviderClient) -> None:
    """The send gate (tokend.sendgate) is checked right before the request is written:
    past its slot's window it takes a new slot first; stopping meanwhile, nothing is sent."""
    retakes: list[str] = []
    missed: list[str] = []

    def retake(ok: bool) -> bool:
        retakes.append("new slot")
        if ok:  # the new slot is held, within its window
            sendgate.hold(sendgate.Held(time.monotonic() + 60, lambda: False,
                                        lambda: missed.append("again")))
        return ok

    sendgate.hold(sendgate.Held(time.monotonic() - 0.001, lambda: retake(False),
                                lambda: missed.append("slot")))
    with pytest.raises(NotSent):
        client.refresh(client_config(), REFRESH)
    assert server.seen == [] and missed == ["slot"] and retakes == ["new slot"]

    server.push(Canned())
    sendgate.hold(sendgate.Held(time.monotonic() - 0.001, lambda: retake(True),
                                lambda: missed.append("slot")))
    assert client.refresh(client_config(), REFRESH).access_token == ACCESS
    assert len(server.seen) == 1 and missed == ["slot", "slot"]
    assert retakes == ["new slot", "new slot"]
