"""Generated inputs against the edges of tokend: token endpoint answers over real HTTP,
config files and import files through the real CLI, with real PostgreSQL.

* Token endpoint: a scripted HTTP server answers tokend's refresh with generated
  bodies, statuses and headers (wrong types, missing fields, huge or negative
  ``expires_in``, non-JSON, oversized, broken HTTP). A real pass runs and the grant is
  read back: never a crash, never a bad token stored, the tokens unchanged on every
  failure, and the outcome classified as docs/contract.md says.
* ``tokend check-config``: exit 0 with the effective settings, or exit 78 with one line
  on stderr; never a traceback, never a secret printed.
* ``tokend grants import``: exit 0 with every record stored, or exit 1 with one line on
  stderr and nothing stored; never a token echoed.

Inputs that once hit a bug are kept out of the generators and pinned by the
tests at the end (each names the bug).

Examples are derandomized (stable in CI); ``FUZZ_RANDOM=1`` explores new ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import make_url

import faultlib as fl
from tokend import cli
from tokend.circuit import Circuit
from tokend.config import load_config
from tokend.crypto import generate_key
from tokend.durations import Duration
from tokend.maintenance import Maintenance, PassResult
from tokend.metrics import Metrics
from tokend.model import NewGrant, Status
from tokend.policy import initial
from tokend.provider import ProviderClient
from tokend.store import Store, open_store
from tokend.testing import pg_database, quiet_logs, write_config

pytestmark = [pytest.mark.faults]


@pytest.fixture(scope="module", autouse=True)
def _quiet_logs() -> Iterator[None]:
    with quiet_logs():
        yield


def fuzz(n: int) -> Any:
    return settings(
        max_examples=n, deadline=None, database=None,
        derandomize=not os.environ.get("FUZZ_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])


# =========================================================================== token endpoint

OLD_ACCESS = "AT-original-0123456789"
OLD_REFRESH = "RT-original-" + "ab" * 40
SECRET = fl.CLIENT_SECRET
MAX_BODY = 64 * 1024
TEN_YEARS = 10 * 366 * 86400.0
PERMANENT = ("invalid_request", "invalid_grant", "unauthorized_client", "invalid_scope")
CLIENT_FAULT = ("invalid_client", "unsupported_grant_type")
_VSCHAR = re.compile(r"[\x20-\x7e]+")
_NUMERIC = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*", re.ASCII)


@dataclass
class Expect:
    kind: str  # ok | transient | permanent | client
    in_doubt: bool | None = False  # None: either (see expect())
    access: str | None = None
    refresh: str | None = None  # the refresh token the grant must hold afterwards
    expires_in: float | None = None
    reason: str | None = None


def _token(value: Any) -> bool:
    return isinstance(value, str) and _VSCHAR.fullmatch(value) is not None


def _expires(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = float(value) if abs(value) < 10**20 else math.inf
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str) and _NUMERIC.fullmatch(value):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) and 0 < number <= TEN_YEARS else None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return ValueError


def expect(answer: fl.Scripted, encoding_broken: bool) -> Expect:
    """What docs/contract.md says tokend must make of this answer to a refresh."""
    if answer.hang_up or answer.raw is not None:
        return Expect("transient", in_doubt=True)  # the request was sent: maybe rotated
    if encoding_broken:
        # urllib3 may or may not notice a body that is not the gzip/deflate it claims
        # (short bodies are silently decoded to nothing): a decoding error is a maybe-
        # rotated transient failure, an undetected one is classified by status. Either
        # way nothing usable arrived.
        return Expect("transient", in_doubt=None)
    status, body = answer.status, answer.body
    data = ValueError if len(body) > MAX_BODY else _json(body)
    if 200 <= status <= 299:
        if isinstance(data, dict):
            access, refresh = data.get("access_token"), data.get("refresh_token")
            expires = _expires(data.get("expires_in"))
            kind = data.get("token_type", "Bearer")
            if _token(access) and expires is not None and isinstance(kind, str) \
                    and kind.lower() == "bearer" and (refresh is None or _token(refresh)):
                return Expect("ok", access=access, refresh=refresh or OLD_REFRESH,
                              expires_in=expires)
        return Expect("transient", in_doubt=True)  # malformed 2xx: may have rotated
    if 500 <= status <= 599:
        return Expect("transient", in_doubt=True)
    if 400 <= status <= 499 and status != 429 and isinstance(data, dict):
        code = data.get("error")
        if code in PERMANENT:
            return Expect("permanent", reason=code)
        if code in CLIENT_FAULT:
            return Expect("client")
    return Expect("transient")


# ----------------------------------------------------------------- strategies

printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                    max_size=40)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6)
texts = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["Token has expired", "The refresh token is invalid.",
                     f"echo {OLD_REFRESH} and {SECRET}", "x" * 5000, "line\nbreak\x00nul"]),
    any_json)
access_values = st.one_of(printable.map(lambda s: "AT-" + s), st.sampled_from(
    ["", " ", "tab\tin", "ünïcode", "AT with space"]), any_json)
expires_values = st.one_of(
    st.integers(1, 10**9), st.floats(min_value=1.0, max_value=1e12),
    st.integers(-10**9, 0), st.integers(10**9, 10**30), st.floats(max_value=0.0),
    st.sampled_from([0, 0.0, -0.0, math.nan, math.inf, -math.inf, True, False, "3600",
                     " 86400 ", "1e3", "", "abc", "-5", "3600.5", "0x10", "٣٦٠٠", "1" * 400]),
    any_json)
token_types = st.one_of(st.sampled_from(["Bearer", "bearer", "BEARER", "mac", "", "Bearer "]),
                        any_json)
refresh_values = st.one_of(printable.map(lambda s: "RT-new-" + s), st.just(OLD_REFRESH),
                           st.sampled_from(["", " x", "ünïcode"]), st.none(), any_json)
codes = st.one_of(
    st.sampled_from([*PERMANENT, *CLIENT_FAULT, "server_error", "temporarily_unavailable",
                     "access_denied", "slow_down", "", "INVALID_GRANT", "invalid grant",
                     "a" * 41]),
    st.text(max_size=45), any_json)
statuses = st.sampled_from([200, 201, 203, 301, 302, 307, 400, 401, 403, 404, 405, 409, 418,
                            422, 429, 500, 501, 502, 503, 504, 520, 599])
retry_afters = st.one_of(
    st.none(), st.integers(-100, 200_000).map(str),
    st.sampled_from(["", "soon", "1.5", "1e3", " 120 ", "Wed, 21 Oct 2015 07:28:00 GMT",
                     "99999999999999999999999", "DATE+600", "DATE+90000", "DATE-60"]))
content_types = st.sampled_from([None, "application/json", "application/json; charset=UTF-8",
                                 "text/html", "text/plain", "application/x-www-form-urlencoded"])


@st.composite
def token_bodies(draw: st.DrawFn) -> bytes:
    shape = draw(st.integers(0, 9))
    if shape == 0:  # not an object at all
        return json.dumps(draw(any_json)).encode()
    fields = {"access_token": access_values, "expires_in": expires_values,
              "token_type": token_types, "refresh_token": refresh_values}
    data: dict[str, Any] = {}
    for key, strategy in fields.items():
        if draw(st.integers(0, 9)) > 0:
            data[key] = draw(strategy)
    if draw(st.booleans()):
        data.update(draw(st.dictionaries(st.sampled_from(["scope", "id_token", "error"]),
                                         any_json, max_size=2)))
    return json.dumps(data, allow_nan=True).encode()


@st.composite
def error_bodies(draw: st.DrawFn) -> bytes:
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(st.binary(max_size=200))
    if shape == 1:
        return b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
    data: dict[str, Any] = {}
    for key, strategy in (("error", codes), ("error_description", texts),
                          ("message", texts), ("hint", texts)):
        if draw(st.integers(0, 4)) > 0:
            data[key] = draw(strategy)
    return json.dumps(data, allow_nan=True).encode()


@st.composite
def answers(draw: st.DrawFn) -> tuple[fl.Scripted, bool]:
    """(the answer, whether its body is declared gzip but is not)."""
    kind = draw(st.sampled_from(["token", "token", "token", "error", "error", "error",
                                 "raw", "oversized", "encoding"]))
    if kind == "raw":
        raw = draw(st.sampled_from([
            b"garbage\r\n\r\n",
            b'HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n{"access_token":"AT-x"',
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}",
            b"",
        ]))
        return fl.Scripted(raw=raw, hang_up=not raw), False
    status = draw(statuses)
    headers: list[tuple[str, str]] = []
    ctype = draw(content_types)
    if ctype:
        headers.append(("Content-Type", ctype))
    retry = draw(retry_afters)
    if retry is not None:
        headers.append(("Retry-After", retry))
    if status in (301, 302, 307):
        headers.append(("Location", "http://127.0.0.1:9/elsewhere"))
    if kind == "token":
        body = draw(token_bodies())
        if draw(st.integers(0, 3)) == 0:
            status = draw(statuses)  # a token-looking body with any status
        elif status >= 300:
            status = 200
    else:
        body = draw(error_bodies())
        if status < 300 and draw(st.booleans()):
            status = 400
    if kind == "oversized":
        pad = draw(st.integers(MAX_BODY - 100, 3 * MAX_BODY))
        body = json.dumps({"access_token": "AT-big", "expires_in": 3600, "token_type": "Bearer",
                           "error": "invalid_grant", "pad": "x" * pad}).encode()
    broken = kind == "encoding" and bool(body)
    if broken:
        headers.append(("Content-Encoding", draw(st.sampled_from(["gzip", "deflate"]))))
    return fl.Scripted(status=status, headers=headers, body=body), broken


# ----------------------------------------------------------------- the environment


class ProviderEnv:
    def __init__(self, pg: str, workdir: Path) -> None:
        key = workdir / "tokend-key"
        key.write_text(generate_key() + "\n")
        self.server = fl.ScriptedServer().__enter__()
        path = write_config(workdir / "tokend.toml", db_url=pg, token_url=self.server.url,
                               key_file=key, timeout="3s")
        self.config = load_config(path, env={})
        self.store: Store = open_store(self.config, auto_upgrade=True)
        self.sql = fl.Sql(pg)
        self.provider = ProviderClient(self.config.provider, pool_size=8)
        self.engine = Maintenance(self.config, self.store, self.provider, metrics=Metrics(),
                                  rand=lambda: 1.0)
        now = datetime.now(UTC)
        [self.gid] = self.store.insert_grants([NewGrant(
            client="main", grant_type="authorization_code", access_token=OLD_ACCESS,
            access_expires_at=now + timedelta(hours=1), obtained_at=now - timedelta(hours=23),
            refresh_token=OLD_REFRESH, refresh_expires_at=now + timedelta(days=20),
            user_id="1", tenant_id="2")], lambda g: initial(g, now, self.config.schedule))
        self.original = self.sql.rows(
            "SELECT access_token, refresh_token FROM grants WHERE id = :id", id=self.gid)[0]

    def reset(self, failure_count: int = 0) -> None:
        """The grant as it was: original tokens, due now, no failures."""
        self.sql.run(
            "UPDATE grants SET access_token = :a, refresh_token = :r, status = 'ok', "
            "reason = NULL, failure_count = :f, last_error = NULL, in_doubt = false, "
            "lease_owner = NULL, lease_expires_at = NULL, "
            "access_expires_at = now() + interval '1 hour', "
            "refresh_expires_at = now() + interval '20 days', "
            "obtained_at = now() - interval '23 hours', "
            "next_attempt_at = now() - interval '1 second' WHERE id = :id",
            a=self.original[0], r=self.original[1], f=failure_count, id=self.gid)
        self.sql.run("DELETE FROM events")
        self.server.queue.clear()
        self.server.requests.clear()
        # The engine as after a restart: an earlier example's invalid_client must not
        # keep this one's grant back (tokend.circuit).
        self.engine.circuits = {name: Circuit() for name in self.engine.circuits}

    def refresh(self, *answers: fl.Scripted) -> tuple[PassResult, datetime, datetime]:
        self.server.queue.extend(answers)
        before = datetime.now(UTC)
        result = self.engine.run_pass()
        return result, before, datetime.now(UTC)

    def close(self) -> None:
        self.engine.close()
        self.provider.close()
        self.server.__exit__()
        self.store.close()
        self.sql.close()


@pytest.fixture(scope="module")
def penv(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderEnv]:
    with pg_database(pg_url, f"{make_url(pg_url).database}_provider") as url:
        env = ProviderEnv(url, tmp_path_factory.mktemp("fuzz-provider"))
        yield env
        env.close()


def _materialize(answer: fl.Scripted) -> float | None:
    """Fill in HTTP-date Retry-After values; the delay tokend must at least wait."""
    floor: float | None = None
    for i, (name, value) in enumerate(answer.headers):
        if name != "Retry-After":
            continue
        if value.startswith("DATE"):
            offset = int(value[4:])
            value = format_datetime(datetime.now(UTC) + timedelta(seconds=offset), usegmt=True)
            answer.headers[i] = (name, value)
            floor = max(min(offset, 86400) - 2, 0)  # tokend caps Retry-After at a day
        elif value.strip().isdigit() and len(value.strip()) < 10:
            floor = min(int(value.strip()), 86400)
    return floor


@pytest.mark.postgres
@fuzz(300)
@given(answers())
def test_token_endpoint_answers_never_store_a_bad_token(
        penv: ProviderEnv, answer_and_flag: tuple[fl.Scripted, bool]) -> None:
    answer, encoding_broken = answer_and_flag
    penv.reset()
    retry_floor = _materialize(answer)
    want = expect(answer, encoding_broken)
    result, before, after = penv.refresh(answer)

    assert result.failures.get("internal", 0) == 0, result
    # exactly one request, the refresh token sent once, no redirect_uri, no retry
    assert len(penv.server.requests) == 1, penv.server.requests
    form = penv.server.requests[0]["body"].decode()
    assert "grant_type=refresh_token" in form and "redirect_uri" not in form

    g = penv.store.get(penv.gid, with_tokens=True)
    access, refresh = penv.store.tokens(g)
    if want.kind == "ok":
        assert result.refreshed == 1, (result, g)
        assert (access, refresh) == (want.access, want.refresh)
        assert (g.status, g.failure_count, g.in_doubt, g.last_error) == (Status.OK, 0, False, None)
        assert want.expires_in is not None and g.access_expires_at is not None
        earliest = before + timedelta(seconds=want.expires_in)
        latest = after + timedelta(seconds=want.expires_in)
        assert earliest - timedelta(milliseconds=1) <= g.access_expires_at <= latest
        if want.refresh != OLD_REFRESH:  # a new refresh token: a fresh month from sending
            month = Duration(months=1)
            assert g.refresh_expires_at is not None
            assert month.after(before) - timedelta(milliseconds=1) <= g.refresh_expires_at \
                <= month.after(after)
        else:
            assert g.refresh_expires_at is not None
            assert g.refresh_expires_at < before + timedelta(days=21)
        return

    # any failure: the stored tokens are exactly the old ones
    assert (access, refresh) == (OLD_ACCESS, OLD_REFRESH), "a failed refresh changed the tokens"
    assert result.refreshed == 0 and result.failed == 1
    assert g.failure_count == 1 and g.last_error
    assert OLD_REFRESH not in g.last_error and SECRET not in g.last_error
    assert "\n" not in g.last_error and len(g.last_error) <= 500
    if want.kind == "permanent":
        assert result.failures == {"permanent": 1}, result
        assert (g.status, g.reason, g.next_attempt_at) == (
            Status.RECONSENT_REQUIRED, want.reason, None)
        return
    assert g.status == Status.OK and g.reason is None
    assert g.next_attempt_at is not None
    if want.kind == "client":
        assert result.failures == {"client": 1}, result
        retry_max = penv.config.schedule.retry_max
        assert before + retry_max <= g.next_attempt_at <= after + retry_max
        assert not g.in_doubt
        return
    assert result.failures == {"transient": 1}, result
    if want.in_doubt is not None:
        assert g.in_doubt == want.in_doubt, (g.in_doubt, want)
    interval = penv.config.schedule.interval
    assert g.next_attempt_at >= before + interval - timedelta(milliseconds=1)
    assert g.next_attempt_at <= after + max(interval, timedelta(days=1))
    if retry_floor is not None and not (200 <= answer.status <= 299) and not answer.raw \
            and not encoding_broken:
        assert g.next_attempt_at >= before + timedelta(seconds=retry_floor), "Retry-After"


# =========================================================================== check-config


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``tokend.cli.main`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("TOKEND_") and k != "CREDENTIALS_DIRECTORY"}
    environ.update(env or {})
    with mock.patch.dict(os.environ, environ, clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_text(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, table in doc.items():
        if section == "clients" and isinstance(table, dict) and all(
                isinstance(v, dict) for v in table.values()):
            for name, client in table.items():
                lines.append(f"[clients.{json.dumps(name, ensure_ascii=False)}]")
                lines += [f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}"
                          for k, v in client.items()]
            continue
        if not isinstance(table, dict):
            lines.insert(0, f"{json.dumps(section, ensure_ascii=False)} = {toml_value(table)}")
            continue
        lines.append(f"[{json.dumps(section, ensure_ascii=False)}]")
        lines += [f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}"
                  for k, v in table.items()]
    return "\n".join(lines) + "\n"


CLIENT_SECRET_VALUE = "S3CRET-client-7f3a9c"
WEBHOOK_SECRET_VALUE = "S3CRET-webhook-b81d2e"
DB_PASSWORD = "PW-S3CRET-4411"

DURATION_KEYS = {("provider", "refresh_token_ttl"), ("provider", "timeout"),
                 ("schedule", "interval"), ("schedule", "refresh_before"),
                 ("schedule", "retry_max"), ("schedule", "reconsent_before"),
                 ("schedule", "max_grant_age")}
URL_KEYS = {("provider", "authorize_url"), ("provider", "token_url"), ("provider", "user_url"),
            ("notify", "webhook_url"), ("clients", "redirect_uri")}


def base_config(workdir: Path) -> dict[str, Any]:
    return {
        "database": {"url": f"sqlite:///{workdir / 'fuzz.db'}"},
        "provider": {"token_url": "http://127.0.0.1:9/access_token", "rate_limit": 5,
                     "timeout": "10s", "refresh_token_ttl": "P1M"},
        "clients": {"main": {"client_id": "demo-client", "client_secret": CLIENT_SECRET_VALUE,
                             "auth_method": "client_secret_post",
                             "redirect_uri": "http://127.0.0.1:8765/callback"}},
        "schedule": {"interval": "60s", "refresh_before": "6h", "retry_max": "15m",
                     "reconsent_before": "7d", "concurrency": 8},
        "metrics": {"listen": "127.0.0.1:9464"},
        "logging": {"format": "json", "level": "info"},
        "encryption": {"key_file": str(workdir / "tokend-key")},
        "notify": {"webhook_url": "", "webhook_secret": WEBHOOK_SECRET_VALUE},
    }


KEYS = [
    ("database", "url"), ("provider", "authorize_url"), ("provider", "token_url"),
    ("provider", "user_url"), ("provider", "refresh_token_ttl"), ("provider", "rate_limit"),
    ("provider", "timeout"), ("provider", "verify_tls"), ("schedule", "interval"),
    ("schedule", "refresh_before"), ("schedule", "retry_max"), ("schedule", "reconsent_before"),
    ("schedule", "concurrency"), ("schedule", "max_grant_age"), ("schedule", "batch_size"),
    ("metrics", "listen"), ("logging", "format"), ("logging", "level"),
    ("encryption", "key_file"), ("notify", "webhook_url"), ("notify", "webhook_secret"),
    ("notify", "webhook_secret_file"), ("clients", "client_id"), ("clients", "client_secret"),
    ("clients", "client_secret_file"), ("clients", "auth_method"), ("clients", "redirect_uri"),
    ("clients", "client_credentials"), ("schedule", "bogus"), ("bogus", "key"),
]
# Names as an operator might type them: no control characters (a key name with a line
# break makes a two-line error: see test_error_naming_a_key_with_a_line_break_is_one_line).
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)
nasty_strings = st.sampled_from([
    "", " ", "5 minutes", "90s", "15m", "6h", "7d", "2w", "P1M", "PT6H", "P", "PT", "-5s", "0s",
    "0", "1e400s", "99999999999999999999d", "P99999999999999999999D", "PT1e3S", "P1000Y",
    "P1001Y", "1.5h", "500ms", "P1M2DT3H4M5.5S", "http://", "https://x", "ftp://x",
    "http://[::1", "http://h:99999/", "http://h/ with space", "127.0.0.1:99999", ":80",
    "[::1]:80", "localhost:0", "host_name:80", "0.0.0.0:0", "sqlite:///", "sqlite://",
    "postgresql://u@/db", "mysql://x", "postgres://u:" + DB_PASSWORD + "@127.0.0.1/db",
    "postgresql+psycopg://u:" + DB_PASSWORD + "@h/db?password=" + DB_PASSWORD,
    "client_secret_basic", "client_secret_jwt", "json", "console", "auto", "xml", "DEBUG",
    "trace", "true", "yes", "/nonexistent/dir/file", "/", ".", "tokend-key", "x" * 5000,
    "é" * 10, "🎉", "\t", "line\nbreak",
])
values = st.one_of(
    nasty_strings, st.text(max_size=30), st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 256, 257, 10000, 10001, 2**63 - 1]),
    st.floats(), st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "url"]), st.integers(), max_size=2),
    st.datetimes(timezones=st.just(UTC)), st.dates().map(lambda d: datetime(d.year, d.month,
                                                                            d.day)),
)


@st.composite
def config_docs(draw: st.DrawFn, workdir: Path) -> dict[str, Any]:
    doc = base_config(workdir)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 19))
        if op == 0:  # a section that is not a table
            doc[draw(st.sampled_from(list(doc)))] = draw(values)
            continue
        clients = doc["clients"]
        if op == 1:  # a second client, maybe with the same client_id
            if isinstance(clients, dict):
                clients[draw(names)] = {
                    "client_id": draw(st.sampled_from(["demo-client", "other"])),
                    "client_secret": CLIENT_SECRET_VALUE}
            continue
        section, key = draw(st.sampled_from(KEYS))
        if section == "clients":
            table = clients.get("main") if isinstance(clients, dict) else None
        else:
            table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        if op == 2:
            table.pop(key, None)
        else:
            table[key] = draw(values)
    return doc


def _check_config_result(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    for secret in (CLIENT_SECRET_VALUE, WEBHOOK_SECRET_VALUE, DB_PASSWORD):
        assert secret not in out + err, f"a secret was printed: {out}{err}"
    if code == 0:
        assert err == "" and out.startswith("# effective configuration"), (out, err)
        return
    assert code == 78, (code, out, err)
    assert out == ""
    assert err.startswith("tokend: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert len(err.strip()) > len("tokend: ") + 5, err


@fuzz(200)
@given(st.data())
def test_check_config_gives_settings_or_one_error_line(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    workdir = tmp_path_factory.getbasetemp() / "fuzz-config"
    workdir.mkdir(exist_ok=True)
    (workdir / "tokend-key").write_text(generate_key() + "\n")
    doc = data.draw(config_docs(workdir))
    path = workdir / "tokend.toml"
    path.write_text(toml_text(doc), encoding="utf-8")
    code, out, err = run_cli("--config", str(path), "check-config")
    _check_config_result(code, out, err)


env_names = st.sampled_from([
    "TOKEND_SCHEDULE__INTERVAL", "TOKEND_PROVIDER__RATE_LIMIT", "TOKEND_PROVIDER__VERIFY_TLS",
    "TOKEND_SCHEDULE__CONCURRENCY", "TOKEND_DATABASE__URL", "TOKEND_CLIENTS__MAIN__CLIENT_SECRET",
    "TOKEND_CLIENTS__MAIN__CLIENT_CREDENTIALS", "TOKEND_CLIENTS__NEW__CLIENT_ID",
    "TOKEND_SCHEDULE__BOGUS", "TOKEND_BOGUS__KEY", "TOKEND_SCHEDULE", "TOKEND_SCHEDULE__",
    "TOKEND___X", "TOKEND_CLIENTS__MAIN", "TOKEND_METRICS__LISTEN__DEEP",
    "TOKEND_LOGGING__LEVEL", "TOKEND_ENCRYPTION__KEY_FILE",
])
env_values = st.one_of(nasty_strings, st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20))


@fuzz(100)
@given(st.data())
def test_environment_settings_give_settings_or_one_error_line(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    workdir = tmp_path_factory.getbasetemp() / "fuzz-env"
    workdir.mkdir(exist_ok=True)
    (workdir / "tokend-key").write_text(generate_key() + "\n")
    path = workdir / "tokend.toml"
    path.write_text(toml_text(base_config(workdir)), encoding="utf-8")
    env = data.draw(st.dictionaries(env_names, env_values, min_size=1, max_size=3))
    code, out, err = run_cli("--config", str(path), "check-config", env=env)
    _check_config_result(code, out, err)


@fuzz(100)
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.lists(st.sampled_from(["[schedule]", "[clients.main]", "interval = ", '"60s"', "=",
                              "[[x]]", "[", "]", "\n", '"', "'''", "#", "a.b = 1", "\\u0000",
                              "nan", "1979-05-27T07:32:00Z", "{", "}", ","]),
             max_size=30).map(" ".join),
))
def test_any_config_file_content_gives_settings_or_one_error_line(
        tmp_path_factory: pytest.TempPathFactory, content: bytes | str) -> None:
    workdir = tmp_path_factory.getbasetemp() / "fuzz-bytes"
    workdir.mkdir(exist_ok=True)
    path = workdir / "tokend.toml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    code, out, err = run_cli("--config", str(path), "check-config")
    _check_config_result(code, out, err)


# =========================================================================== grants import


class ImportEnv:
    def __init__(self, pg: str, workdir: Path) -> None:
        key = workdir / "tokend-key"
        key.write_text(generate_key() + "\n")
        self.workdir = workdir
        self.config = write_config(workdir / "tokend.toml", db_url=pg,
                                      token_url="http://127.0.0.1:9/access_token", key_file=key)
        done = fl.tokend(self.config, "db", "upgrade")
        assert done.returncode == 0, done.stderr
        self.sql = fl.Sql(pg)

    def count(self) -> int:
        return int(self.sql.scalar("SELECT count(*) FROM grants"))

    def clear(self) -> None:
        self.sql.run("DELETE FROM grants")

    def run(self, content: bytes) -> tuple[int, str, str]:
        path = self.workdir / "import.json"
        path.write_bytes(content)
        return run_cli("--config", str(self.config), "grants", "import", str(path))


@pytest.fixture(scope="module")
def ienv(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImportEnv]:
    # A database of its own: clearing the import table must not touch penv's grant.
    with pg_database(pg_url, f"{make_url(pg_url).database}_imports") as url:
        env = ImportEnv(url, tmp_path_factory.mktemp("fuzz-import"))
        yield env
        env.sql.close()


hexes = st.text("0123456789abcdef", min_size=16, max_size=16)
iso_times = st.one_of(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1),
                 timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.sampled_from(["2024-01-01T00:00:00", "2024-13-01T00:00:00Z", "yesterday", "",
                     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00",
                     "1969-12-31T23:59:59Z", "8999-12-31T23:59:59Z", "2024-01-01",
                     "2024-01-01T00:00:00.123456789Z", "+002024-01-01T00:00:00Z"]),
)
# ids as an application would send them; NUL characters and integers longer than the
# column are pinned by the tests at the end.
id_values = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=20),
    st.integers(-(10**30), 10**30), st.sampled_from(["", " ", "x" * 255, "x" * 256, "é" * 255]),
    st.none(), st.booleans(), st.floats(), st.lists(st.integers(), max_size=2))
field_values: dict[str, Any] = {
    "client": st.one_of(st.sampled_from(["main", "Main", "other", "", " main"]), any_json),
    "grant_type": st.one_of(st.sampled_from(["authorization_code", "client_credentials",
                                             "refresh_token", "", "password"]), any_json),
    "access_token": st.one_of(st.sampled_from(["", " ", "x" * 16385]), any_json),
    "refresh_token": st.one_of(st.sampled_from(["", " ", "x" * 16385]), st.none(), any_json),
    "expires_in": st.one_of(st.integers(-10, 400 * 86400 * 366), st.floats(),
                            st.sampled_from(["3600", True, None, 10 * 365 * 86400 + 1])),
    "access_expires_at": st.one_of(iso_times, any_json),
    "obtained_at": st.one_of(iso_times, any_json),
    "refresh_expires_at": st.one_of(iso_times, any_json),
    "consented_at": st.one_of(iso_times, any_json),
    "user_id": id_values, "tenant_id": id_values, "token_type": any_json,
    "bogus": any_json,
}


@st.composite
def import_files(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """(file content, the tokens in it)"""
    records: list[Any] = []
    tokens: list[str] = []
    for n in range(draw(st.integers(1, 4))):
        access, refresh = f"AT-{draw(hexes)}", f"RT-{draw(hexes)}"
        tokens += [access, refresh]
        rec: dict[str, Any] = {"client": "main", "grant_type": "authorization_code",
                               "access_token": access, "refresh_token": refresh,
                               "expires_in": 86400, "user_id": str(1000 + n), "tenant_id": 7}
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from(sorted(field_values)))
            if draw(st.integers(0, 4)) == 0:
                rec.pop(key, None)
            else:
                rec[key] = draw(field_values[key])
        records.append(rec if draw(st.integers(0, 19)) else draw(any_json))
    shape = draw(st.sampled_from(["array", "array", "lines", "lines", "object", "bom",
                                  "garbage", "truncated"]))
    if shape == "array":
        text = json.dumps(records, allow_nan=True, indent=draw(st.sampled_from([None, 2])))
    elif shape == "lines":
        text = "\n".join(json.dumps(r, allow_nan=True) for r in records) + "\n"
    elif shape == "object":
        text = json.dumps(records[0], allow_nan=True)
    elif shape == "bom":
        text = "\ufeff" + json.dumps(records, allow_nan=True)
    elif shape == "truncated":
        full = json.dumps(records)
        text = full[:draw(st.integers(0, max(len(full) - 1, 0)))]
    else:
        raw = draw(st.binary(max_size=200))
        return raw, tokens
    return text.encode("utf-8"), tokens


@pytest.mark.postgres
@fuzz(150)
@given(import_files())
def test_import_is_all_or_nothing_with_one_error_line(
        ienv: ImportEnv, file_and_tokens: tuple[bytes, list[str]]) -> None:
    content, tokens = file_and_tokens
    ienv.clear()
    code, out, err = ienv.run(content)
    try:
        assert "Traceback" not in out + err, err
        for token in tokens:
            assert token not in out + err, "a token was echoed"
        stored = ienv.count()
        if code == 0:
            match = re.fullmatch(r"imported (\d+) grant\(s\) \(ids \d+-\d+\)\n", out)
            assert match and err == "", (out, err)
            assert stored == int(match.group(1)) >= 1
            return
        assert code == 1, (code, out, err)
        assert out == "" and stored == 0, f"a failed import stored {stored} grants"
        assert err.startswith("tokend: import: ") and err.count("\n") == 1, err
    finally:
        ienv.clear()


# =========================================================================== found bugs, pinned

@pytest.mark.postgres
def test_a_long_error_answer_is_saved(penv: ProviderEnv) -> None:
    penv.reset()
    body = json.dumps({"error": "e" * 40, "message": "m" * 300, "hint": "h" * 300}).encode()
    result, before, _after = penv.refresh(fl.Scripted(503, [("Retry-After", "86400")], body))
    assert result.failures == {"transient": 1}, result
    g = penv.store.get(penv.gid)
    assert g.failure_count == 1 and g.lease_owner is None
    assert g.next_attempt_at is not None
    assert g.next_attempt_at >= before + timedelta(seconds=86400)


@pytest.mark.postgres
def test_an_error_text_with_a_lone_surrogate_is_saved(penv: ProviderEnv) -> None:
    penv.reset()
    body = b'{"error": "server_error", "message": "bad \\ud800 text"}'
    result, _before, _after = penv.refresh(fl.Scripted(500, [], body))
    assert result.failures == {"transient": 1}, result
    g = penv.store.get(penv.gid)
    assert g.failure_count == 1 and g.lease_owner is None


@pytest.mark.postgres
def test_a_pass_refreshes_each_grant_at_most_once(penv: ProviderEnv) -> None:
    penv.reset()
    now = datetime.now(UTC)
    extra = [NewGrant(
        client="main", grant_type="authorization_code", access_token=f"AT-{i}",
        access_expires_at=now + timedelta(hours=1), obtained_at=now - timedelta(hours=23),
        refresh_token=f"RT-{i}", refresh_expires_at=now + timedelta(days=20),
        user_id=f"u{i}") for i in range(29)]
    penv.store.insert_grants(extra, lambda g: initial(g, now, penv.config.schedule))
    tiny = [fl.Scripted(200, [("Content-Type", "application/json")], json.dumps(
        {"access_token": f"AT-tiny-{i}", "expires_in": 0.001, "token_type": "Bearer",
         "refresh_token": f"RT-tiny-{i}"}).encode()) for i in range(90)]
    try:
        penv.refresh(*tiny)
        sent = [r["body"] for r in penv.server.requests]
        assert len(sent) <= 30, f"{len(sent)} refreshes of 30 grants in one pass"
    finally:
        penv.sql.run("DELETE FROM grants WHERE id <> :id", id=penv.gid)


@pytest.mark.postgres
def test_backoff_after_many_failures_with_a_long_interval(penv: ProviderEnv) -> None:
    from dataclasses import replace

    config = replace(penv.config, schedule=replace(
        penv.config.schedule, interval=timedelta(hours=6), retry_max=timedelta(days=1)))
    engine = Maintenance(config, penv.store, penv.provider, metrics=Metrics(), rand=lambda: 1.0)
    try:
        penv.reset(failure_count=40)
        penv.server.queue.append(fl.Scripted(503, [], b"<html>down</html>"))
        result = engine.run_pass()
        assert result.failures == {"transient": 1}, result
    finally:
        engine.close()


@pytest.mark.postgres
def test_import_of_deeply_nested_json_is_one_error_line(ienv: ImportEnv) -> None:
    code, _out, err = ienv.run(b"[" * 100_000)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err[-500:]


@pytest.mark.postgres
def test_import_of_a_huge_integer_is_one_error_line(ienv: ImportEnv) -> None:
    code, _out, err = ienv.run(b'[{"client": "main", "expires_in": ' + b"9" * 5000 + b"}]")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err[-500:]


@pytest.mark.postgres
@pytest.mark.parametrize("field", ["user_id", "tenant_id"])
def test_import_names_the_record_of_a_300_digit_id(ienv: ImportEnv, field: str) -> None:
    rec = {"client": "main", "access_token": "AT-1", "refresh_token": "RT-1",
           "expires_in": 3600, field: 10**300}
    try:
        code, _out, err = ienv.run(json.dumps([{**rec, field: 5}, rec]).encode())
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err[-500:]
        assert ienv.count() == 0
        assert "record 2" in err and field in err, err
    finally:
        ienv.clear()


@pytest.mark.postgres
@pytest.mark.parametrize("field", ["user_id", "tenant_id"])
def test_import_names_the_record_of_an_id_with_nul(ienv: ImportEnv, field: str) -> None:
    rec = {"client": "main", "access_token": "AT-1", "refresh_token": "RT-1",
           "expires_in": 3600, field: "12\u000034"}
    try:
        code, _out, err = ienv.run(json.dumps([{**rec, field: "ok"}, rec]).encode())
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err[-500:]
        assert ienv.count() == 0
        assert "record 2" in err and field in err, err
    finally:
        ienv.clear()


def test_error_naming_a_key_with_a_line_break_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tokend.toml"
    path.write_text('[schedule]\n"bad\\nkey" = 1\n')
    code, out, err = run_cli("--config", str(path), "check-config")
    assert code == 78 and out == "" and err.count("\n") == 1, err


def test_check_config_never_prints_a_database_password(tmp_path: Path) -> None:
    path = tmp_path / "tokend.toml"
    path.write_text(f'[database]\nurl = "postgresql://u:{DB_PASSWORD}@[::1/db"\n'
                    f'[encryption]\nkey_file = "{tmp_path / "k"}"\n')
    code, out, err = run_cli("--config", str(path), "check-config")
    assert DB_PASSWORD not in out + err, (code, out, err)


def test_strategies_are_sane() -> None:
    """The oracle agrees with hand-picked answers (guards the fuzz test's own logic)."""
    ok = fl.Scripted(200, [], json.dumps({"access_token": "AT-1", "expires_in": 60,
                                          "token_type": "bearer"}).encode())
    assert expect(ok, False).kind == "ok" and expect(ok, False).refresh == OLD_REFRESH
    assert expect(fl.Scripted(200, [], b"{}"), False) == Expect("transient", in_doubt=True)
    dead = fl.Scripted(401, [], b'{"error": "invalid_request"}')
    assert expect(dead, False) == Expect("permanent", reason="invalid_request")
    assert expect(fl.Scripted(401, [], b'{"error": "invalid_client"}'), False).kind == "client"
    assert expect(fl.Scripted(429, [], b'{"error": "invalid_grant"}'), False).kind == "transient"
    assert expect(fl.Scripted(503, [], b"<html>"), False) == Expect("transient", in_doubt=True)
    assert _expires(" 86400 ") == 86400.0 and _expires(True) is None
    assert _expires(10**30) is None and _expires(math.nan) is None
