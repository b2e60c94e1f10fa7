"""The configuration: defaults, every key from TOML and the environment, secrets, errors."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from tokend.config import Config, Secret, load_config, render
from tokend.durations import Duration
from tokend.errors import ConfigError

SECRET = "s3cr3t-value-never-shown"


def write(tmp_path: Path, text: str, name: str = "tokend.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str = "", env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=env or {})


MAIN = f"""
[clients.main]
client_id = "main-id"
client_secret = "{SECRET}"
"""


# --------------------------------------------------------------------------- defaults


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default key file is looked up relative to here
    c = load_config(None, env={})
    assert c.source is None
    assert c.database.url == "sqlite:///tokend.db" and c.database.is_sqlite
    assert c.provider.authorize_url == "https://auth.justimmo.at/authorize"
    assert c.provider.token_url == "https://auth.justimmo.at/access_token"
    assert c.provider.user_url == "https://api.justimmo.at/oauth/user/current"
    assert c.provider.refresh_token_ttl == Duration(months=1)
    assert c.provider.rate_limit == 5
    assert c.provider.timeout == timedelta(seconds=10)
    assert c.provider.verify_tls is True
    assert c.clients == {}
    s = c.schedule
    assert s.interval == timedelta(seconds=60)
    assert s.refresh_before == timedelta(hours=6)
    assert s.retry_max == timedelta(minutes=15)
    assert s.reconsent_before == Duration(delta=timedelta(days=7))
    assert s.concurrency == 8
    assert s.max_grant_age is None
    assert c.metrics.listen == "127.0.0.1:9464"
    assert c.metrics.address == ("127.0.0.1", 9464)
    assert (c.logging.format, c.logging.level) == ("auto", "info")
    assert c.encryption.key_file == Path("tokend-key") and c.encryption.keys == ()
    assert c.notify.webhook_url == "" and c.notify.webhook_secret is None


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    c = load(tmp_path, "")
    assert c.provider.token_url == "https://auth.justimmo.at/access_token"
    assert c.encryption.key_file == tmp_path / "tokend-key"  # next to the config file


def test_tokend_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[logging]\nlevel = "debug"\n')
    assert load_config(None, env={"TOKEND_CONFIG": str(path)}).logging.level == "debug"


# --------------------------------------------------------------------------- every key


def test_every_key_loads_from_toml(tmp_path: Path, key_file: Path) -> None:
    (tmp_path / "hook-secret").write_text("hook-secret-value\n")
    (tmp_path / "other-secret").write_text("other-secret-value\n")
    c = load(tmp_path, f"""
        [database]
        url = "postgresql://tokend@db.example/tokend"

        [provider]
        authorize_url = "https://idp.example/authorize"
        token_url = "https://idp.example/token"
        user_url = "https://api.example/me"
        refresh_token_ttl = "P3M"
        rate_limit = 2.5
        timeout = "30s"
        verify_tls = false

        [clients.main]
        client_id = "main-id"
        client_secret = "{SECRET}"
        auth_method = "client_secret_basic"
        redirect_uri = "http://127.0.0.1:8765/callback"
        client_credentials = true

        [clients.other]
        client_id = "other-id"
        client_secret_file = "other-secret"

        [schedule]
        interval = "30s"
        refresh_before = "PT2H"
        retry_max = "10m"
        reconsent_before = "2w"
        concurrency = 16
        max_grant_age = "P3M"
        batch_size = 50

        [metrics]
        listen = "0.0.0.0:9100"

        [logging]
        format = "json"
        level = "WARNING"

        [encryption]
        key_file = "{key_file}"

        [notify]
        webhook_url = "https://hooks.example/tokend"
        webhook_secret_file = "hook-secret"
        """)
    assert c.database.url == "postgresql+psycopg://tokend@db.example/tokend"
    assert not c.database.is_sqlite
    p = c.provider
    assert (p.authorize_url, p.token_url, p.user_url) == (
        "https://idp.example/authorize", "https://idp.example/token", "https://api.example/me")
    assert p.refresh_token_ttl == Duration(months=3)
    assert p.rate_limit == 2.5 and p.timeout == timedelta(seconds=30) and p.verify_tls is False
    main, other = c.client("main"), c.client("other")
    assert main.name == "main" and main.client_id == "main-id"
    assert main.client_secret.value == SECRET
    assert main.auth_method == "client_secret_basic"
    assert main.redirect_uri == "http://127.0.0.1:8765/callback"
    assert main.client_credentials is True
    assert other.client_secret.value == "other-secret-value"
    assert other.auth_method == "client_secret_post" and other.redirect_uri is None
    assert other.client_credentials is False
    assert c.client_by_id("other-id") is other and c.client_by_id("nobody") is None
    s = c.schedule
    assert s.interval == timedelta(seconds=30) and s.refresh_before == timedelta(hours=2)
    assert s.retry_max == timedelta(minutes=10)
    assert s.reconsent_before == Duration(delta=timedelta(days=14))
    assert s.concurrency == 16 and isinstance(s.concurrency, int)
    assert s.max_grant_age == Duration(months=3) and s.batch_size == 50
    assert c.metrics.address == ("0.0.0.0", 9100)
    assert (c.logging.format, c.logging.level) == ("json", "warning")
    assert c.encryption.key_file == key_file
    assert [k.value for k in c.encryption.keys] == [key_file.read_text().strip()]
    assert c.notify.webhook_url == "https://hooks.example/tokend"
    assert c.notify.webhook_secret == Secret("hook-secret-value")


def test_unknown_client_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown client 'nope' \(clients: main\)"):
        load(tmp_path, MAIN).client("nope")


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgres://u@h:5433/db", "postgresql+psycopg://u@h:5433/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("sqlite:////var/lib/tokend/tokend.db", "sqlite:////var/lib/tokend/tokend.db"),
])
def test_database_url_rewrite(tmp_path: Path, url: str, expected: str) -> None:
    assert load(tmp_path, f'[database]\nurl = "{url}"\n').database.url == expected


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize(("name", "value", "path", "expected"), [
    ("TOKEND_DATABASE__URL", "postgresql://x@h/d", "database.url", "postgresql+psycopg://x@h/d"),
    ("TOKEND_PROVIDER__TOKEN_URL", "https://t.example/t", "provider.token_url",
     "https://t.example/t"),
    ("TOKEND_PROVIDER__REFRESH_TOKEN_TTL", "P2M", "provider.refresh_token_ttl", Duration(2)),
    ("TOKEND_PROVIDER__RATE_LIMIT", "0.5", "provider.rate_limit", 0.5),
    ("TOKEND_PROVIDER__RATE_LIMIT", "3", "provider.rate_limit", 3.0),
    ("TOKEND_PROVIDER__TIMEOUT", "PT1M", "provider.timeout", timedelta(minutes=1)),
    ("TOKEND_PROVIDER__VERIFY_TLS", "false", "provider.verify_tls", False),
    ("TOKEND_PROVIDER__VERIFY_TLS", "0", "provider.verify_tls", False),
    ("TOKEND_PROVIDER__VERIFY_TLS", "Yes", "provider.verify_tls", True),
    ("TOKEND_PROVIDER__VERIFY_TLS", "on", "provider.verify_tls", True),
    ("TOKEND_SCHEDULE__INTERVAL", "2m", "schedule.interval", timedelta(minutes=2)),
    ("TOKEND_SCHEDULE__CONCURRENCY", "32", "schedule.concurrency", 32),
    ("TOKEND_SCHEDULE__CONCURRENCY", " 4 ", "schedule.concurrency", 4),
    ("TOKEND_SCHEDULE__MAX_GRANT_AGE", "P6M", "schedule.max_grant_age", Duration(6)),
    ("TOKEND_SCHEDULE__BATCH_SIZE", "10", "schedule.batch_size", 10),
    ("TOKEND_METRICS__LISTEN", "", "metrics.listen", ""),
    ("TOKEND_METRICS__LISTEN", "[::1]:9000", "metrics.address", ("::1", 9000)),
    ("TOKEND_LOGGING__FORMAT", "console", "logging.format", "console"),
    ("TOKEND_LOGGING__LEVEL", "DEBUG", "logging.level", "debug"),
    ("TOKEND_NOTIFY__WEBHOOK_URL", "http://hook.example/x", "notify.webhook_url",
     "http://hook.example/x"),
    ("TOKEND_CLIENTS__MAIN__CLIENT_ID", "from-env", "client.client_id", "from-env"),
    ("TOKEND_CLIENTS__MAIN__AUTH_METHOD", "client_secret_basic", "client.auth_method",
     "client_secret_basic"),
    ("TOKEND_CLIENTS__MAIN__CLIENT_CREDENTIALS", "true", "client.client_credentials", True),
    ("TOKEND_CLIENTS__MAIN__REDIRECT_URI", "http://localhost:1/cb", "client.redirect_uri",
     "http://localhost:1/cb"),
])
def test_environment_overrides_the_file(tmp_path: Path, name: str, value: str, path: str,
                                        expected: object) -> None:
    c = load(tmp_path, MAIN + '[logging]\nlevel = "info"\n[schedule]\nconcurrency = 2\n',
             env={name: value})
    section, attr = path.split(".")
    obj = c.client("main") if section == "client" else getattr(c, section)
    assert getattr(obj, attr) == expected
    assert type(getattr(obj, attr)) is type(expected)


def test_client_secret_from_the_environment(tmp_path: Path) -> None:
    c = load(tmp_path, '[clients.main]\nclient_id = "main-id"\n',
             env={"TOKEND_CLIENTS__MAIN__CLIENT_SECRET": SECRET})
    assert c.client("main").client_secret.value == SECRET
    # ... overriding one in the file, too
    c = load(tmp_path, MAIN, env={"TOKEND_CLIENTS__MAIN__CLIENT_SECRET": "newer"})
    assert c.client("main").client_secret.value == "newer"


def test_a_client_entirely_from_the_environment(tmp_path: Path) -> None:
    c = load_config(None, env={"TOKEND_CLIENTS__MAIN__CLIENT_ID": "env-id",
                               "TOKEND_CLIENTS__MAIN__CLIENT_SECRET": SECRET})
    assert c.client("main").client_id == "env-id"


def test_environment_finds_a_client_table_spelled_in_another_case(tmp_path: Path) -> None:
    c = load(tmp_path, '[clients.Main]\nclient_id = "main-id"\n',
             env={"TOKEND_CLIENTS__MAIN__CLIENT_SECRET": SECRET})
    assert list(c.clients) == ["Main"]
    assert c.client("Main").client_secret.value == SECRET


def test_unrelated_environment_is_ignored(tmp_path: Path) -> None:
    c = load(tmp_path, MAIN, env={"TOKEND_TEST_DATABASE_URL": "x", "HOME": "/root",
                                  "OTHER__THING": "1"})
    assert c.database.url == "sqlite:///tokend.db"


# --------------------------------------------------------------------------- secret files


def test_bare_secret_file_name_is_a_systemd_credential(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "justimmo-secret").write_text(SECRET + "\n")
    (creds / "tokend-key").write_text("a-key\n")
    (tmp_path / "justimmo-secret").write_text("the wrong one\n")
    c = load(tmp_path, """
        [clients.main]
        client_id = "main-id"
        client_secret_file = "justimmo-secret"
        """, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert c.client("main").client_secret.value == SECRET  # stripped of the newline
    assert c.encryption.key_file == creds / "tokend-key"
    assert c.encryption.keys == (Secret("a-key"),)


def test_bare_secret_file_name_without_credentials_is_next_to_the_config(
        tmp_path: Path) -> None:
    (tmp_path / "justimmo-secret").write_text(SECRET)
    c = load(tmp_path, '[clients.main]\nclient_id = "i"\nclient_secret_file = "justimmo-secret"\n')
    assert c.client("main").client_secret.value == SECRET


def test_relative_secret_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    conf_dir, creds = tmp_path / "etc", tmp_path / "credentials"
    (conf_dir / "secrets").mkdir(parents=True)
    creds.mkdir()
    (conf_dir / "secrets" / "main").write_text(SECRET)
    path = write(conf_dir, '[clients.main]\nclient_id = "i"\n'
                           'client_secret_file = "secrets/main"\n')
    c = load_config(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert c.client("main").client_secret.value == SECRET


def test_absolute_secret_path(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "main.secret"
    secret.parent.mkdir()
    secret.write_text(f"  {SECRET}  \n")
    c = load(tmp_path / "elsewhere", f'[clients.main]\nclient_id = "i"\n'
                                     f'client_secret_file = "{secret}"\n',
             env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert c.client("main").client_secret.value == SECRET


def test_secret_file_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("hook-secret\n")
    c = load(tmp_path, "", env={"TOKEND_NOTIFY__WEBHOOK_SECRET_FILE": str(tmp_path / "hook")})
    assert c.notify.webhook_secret == Secret("hook-secret")


# --------------------------------------------------------------------------- secrets hidden


def test_secrets_never_show_in_repr_str_or_render(tmp_path: Path, key_file: Path) -> None:
    (tmp_path / "hook").write_text("hook-secret-value\n")
    c = load(tmp_path, MAIN + f"""
        [database]
        url = "postgresql://tokend:db-password-value@db.example/tokend?sslmode=require"
        [encryption]
        key_file = "{key_file}"
        [notify]
        webhook_url = "https://hooks.example/x"
        webhook_secret_file = "hook"
        """)
    key = key_file.read_text().strip()
    secrets = [SECRET, "hook-secret-value", "db-password-value", key]
    assert c.client("main").client_secret.value == SECRET  # it is there ...
    shown = [repr(c), str(c), render(c), repr(c.client("main")), str(c.client("main")),
             f"{c.client('main').client_secret}", repr(c.encryption), repr(c.database)]
    for text in shown:  # ... but never shown
        for secret in secrets:
            assert secret not in text
    out = render(c)
    assert 'client_secret = "********"' in out
    assert 'webhook_secret = "********"' in out
    assert "postgresql+psycopg://tokend:********@db.example/tokend?sslmode=require" in out
    assert "1 key(s) loaded" in out


def test_database_password_in_the_query_is_masked(tmp_path: Path) -> None:
    c = load(tmp_path, '[database]\nurl = "postgresql://h/db?user=u&password=pw-value"\n')
    assert "pw-value" not in render(c) and "pw-value" not in repr(c)
    assert "password=********" in render(c)


@pytest.mark.parametrize(("text", "shown", "secrets"), [
    # urlsplit ends the authority at '/', '#' or '?': the rest of the password was printed
    ('[database]\nurl = "postgresql://u:pa/ss#w?rd@db.example/tokend"\n',
     'url = "postgresql+psycopg://u:********@db.example/tokend"', ["pa/ss", "ss#w", "w?rd"]),
    ('[database]\nurl = "postgresql://u:p?w@db.example:5433/tokend?sslmode=require"\n',
     'url = "postgresql+psycopg://u:********@db.example:5433/tokend?sslmode=require"', ["p?w"]),
    ('[database]\nurl = "postgresql://u:x#y@h/db?password=other-pw"\n',
     'url = "postgresql+psycopg://u:********@h/db?password=********"', ["x#y", "other-pw"]),
    # a webhook's path and query are often its only secret (Slack, Teams, ?token=)
    ('[notify]\nwebhook_url = "https://hooks.example/services/T0/B0/hook-path-secret"\n',
     'webhook_url = "https://hooks.example/********"', ["hook-path-secret", "T0/B0"]),
    ('[notify]\nwebhook_url = "https://hooks.example:8443/in?token=hook-query-secret"\n',
     'webhook_url = "https://hooks.example:8443/********"', ["hook-query-secret"]),
    ('[notify]\nwebhook_url = "https://hook:hook-pw@hooks.example/"\n',
     'webhook_url = "https://********@hooks.example/"', ["hook-pw"]),
    ('[notify]\nwebhook_url = "https://hooks.example"\n',
     'webhook_url = "https://hooks.example"', []),
    # user info in any other URL
    ('[provider]\ntoken_url = "https://id:token-url-pw@auth.example/token"\n',
     'token_url = "https://********@auth.example/token"', ["token-url-pw", "id:"]),
    ('[provider]\nauthorize_url = "https://user-token@auth.example/authorize"\n',
     'authorize_url = "https://********@auth.example/authorize"', ["user-token"]),
    ('[provider]\nuser_url = "https://u:user-url-pw@api.example/me"\n',
     'user_url = "https://********@api.example/me"', ["user-url-pw"]),
    (MAIN + 'redirect_uri = "http://cb:redirect-pw@127.0.0.1:8765/cb"\n',
     'redirect_uri = "http://********@127.0.0.1:8765/cb"', ["redirect-pw"]),
])
def test_check_config_masks_every_secret_in_a_url(tmp_path: Path, text: str, shown: str,
                                                  secrets: list[str]) -> None:
    c = load(tmp_path, text)
    out = render(c)
    assert shown in out.splitlines()
    for secret in secrets:
        assert secret not in out and secret not in repr(c)


def test_a_bad_url_is_refused_without_printing_its_user_info(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"provider\.token_url: must be an http") as info:
        load(tmp_path, '[provider]\ntoken_url = "ftp://u:ftp-secret@h/token"\n')
    assert "ftp-secret" not in str(info.value)


def test_render_prints_valid_config_that_loads_to_the_same_settings(tmp_path: Path) -> None:
    c = load(tmp_path, MAIN + """
        [provider]
        refresh_token_ttl = "P1M2DT3H"
        [schedule]
        reconsent_before = "P1M"
        max_grant_age = "P1Y"
        interval = "90s"
        """)
    text = render(c).replace("********", SECRET)
    again = load_config(write(tmp_path, text, "rendered.toml"), env={})
    assert again.provider == c.provider and again.schedule == c.schedule
    assert again.clients == c.clients and again.logging == c.logging


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("text", "env", "message"), [
    # structure
    ("[nope]\n", {}, r"unknown section \[nope\]"),
    ("database = 5\n", {}, r"\[database\]: must be a table"),
    ("[database]\nuri = 'x'\n", {}, r"database\.uri: unknown key"),
    ("[schedule]\nintervall = '1m'\n", {}, r"schedule\.intervall: unknown key"),
    ("[clients.main]\nclient_id = 'i'\nclient_secret = 'x'\nsecret = 'y'\n", {},
     r"clients\.main\.secret: unknown key"),
    ("clients = 5\n", {}, r"clients: must be a table"),
    ("[clients]\nmain = 5\n", {}, r"clients\.main: must be a table"),
    (f"[clients.{'c' * 101}]\nclient_id = 'i'\nclient_secret = 'x'\n", {},
     r"clients\.c+: a client name has 1 to 100 characters"),
    ("[clients.' ']\nclient_id = 'i'\nclient_secret = 'x'\n", {},
     r"clients\. : a client name has 1 to 100 characters"),
    ("", {"TOKEND_NOPE__X": "1"}, r"TOKEND_NOPE__X: unknown section \[nope\]"),
    ("", {"TOKEND_DATABASE__URI": "x"}, r"TOKEND_DATABASE__URI: database\.uri: unknown key"),
    ("", {"TOKEND_DATABASE": "x"}, None),  # no "__": not a config variable, ignored
    # types
    ("[database]\nurl = 5\n", {}, r"database\.url: must be a string"),
    ("[provider]\ntoken_url = ['x']\n", {}, r"provider\.token_url: must be a string"),
    ("[provider]\nrate_limit = 'fast'\n", {}, r"provider\.rate_limit: must be a number"),
    ("[provider]\nrate_limit = true\n", {}, r"provider\.rate_limit: must be a number"),
    ("", {"TOKEND_PROVIDER__RATE_LIMIT": "fast"}, r"provider\.rate_limit: must be a number"),
    ("", {"TOKEND_PROVIDER__RATE_LIMIT": "nan"}, r"provider\.rate_limit: must be a finite"),
    ("", {"TOKEND_PROVIDER__RATE_LIMIT": "1" * 400},
     r"provider\.rate_limit: must be a finite"),
    ("[provider]\nverify_tls = 'yes'\n", {}, r"provider\.verify_tls: must be true or false"),
    ("[provider]\nverify_tls = 1\n", {}, r"provider\.verify_tls: must be true or false"),
    ("", {"TOKEND_PROVIDER__VERIFY_TLS": "maybe"}, r"provider\.verify_tls: must be true or"),
    ("[schedule]\nconcurrency = 2.5\n", {}, r"schedule\.concurrency: must be a whole number"),
    ("[schedule]\nconcurrency = '8'\n", {}, r"schedule\.concurrency: must be a number"),
    ("", {"TOKEND_SCHEDULE__CONCURRENCY": "8.5"}, r"schedule\.concurrency: must be a whole"),
    ("", {"TOKEND_SCHEDULE__CONCURRENCY": "many"}, r"schedule\.concurrency: must be a whole"),
    ("", {"TOKEND_SCHEDULE__BATCH_SIZE": "9" * 400}, r"schedule\.batch_size: must be at most"),
    ("[clients.main]\nclient_id = 'i'\nclient_secret = 'x'\nclient_credentials = 'yes'\n", {},
     r"clients\.main\.client_credentials: must be true or false"),
    ("[clients.main]\nclient_id = 42\nclient_secret = 'x'\n", {},
     r"clients\.main\.client_id: must be a string"),
    # URLs
    ("[provider]\ntoken_url = 'ftp://idp.example/token'\n", {},
     r"provider\.token_url: must be an http\(s\) URL"),
    ("[provider]\nauthorize_url = 'idp.example/authorize'\n", {},
     r"provider\.authorize_url: must be an http\(s\) URL"),
    ("[provider]\nuser_url = 'https://'\n", {}, r"provider\.user_url: must be an http\(s\) URL"),
    ("[provider]\nuser_url = 'http://[::1'\n", {}, r"provider\.user_url: must be an http\(s\)"),
    ("[provider]\ntoken_url = 'http://h:port/x'\n", {},
     r"provider\.token_url: must be an http\(s\) URL"),
    ("[provider]\ntoken_url = 'http://h:99999/x'\n", {},
     r"provider\.token_url: must be an http\(s\) URL"),
    ("[provider]\ntoken_url = ''\n", {}, r"provider\.token_url: must be an http\(s\) URL"),
    ("[notify]\nwebhook_url = 'mailto:ops@example.org'\n", {},
     r"notify\.webhook_url: must be an http\(s\) URL"),
    ("[clients.main]\nclient_id = 'i'\nclient_secret = 'x'\nredirect_uri = 'localhost:8765'\n",
     {}, r"clients\.main\.redirect_uri: must be an http\(s\) URL"),
    # durations
    ("[provider]\ntimeout = '10 seconds'\n", {}, r"provider\.timeout: invalid duration"),
    ("[provider]\ntimeout = 10\n", {}, r"provider\.timeout: expected a duration string"),
    ("[provider]\ntimeout = 'P1M'\n", {}, r"provider\.timeout: .*months are not allowed"),
    ("[provider]\ntimeout = '0s'\n", {}, r"provider\.timeout: must be longer than zero"),
    # below 1 s a healthy provider's answer (a rotated token) is lost to the timeout
    ("[provider]\ntimeout = '500ms'\n", {}, r"provider\.timeout: must be at least 1s, not 0\.5s"),
    ("[provider]\ntimeout = '0.999s'\n", {}, r"provider\.timeout: must be at least 1s"),
    ("", {"TOKEND_PROVIDER__TIMEOUT": "10ms"}, r"provider\.timeout: must be at least 1s"),
    ("[provider]\ntimeout = '1s'\n", {}, None),
    ("[provider]\ntimeout = '5m'\n", {}, None),
    ("[provider]\ntimeout = '301s'\n", {}, r"provider\.timeout: must be at most 5m, not 301s"),
    ("[provider]\ntimeout = '3000000d'\n", {}, r"provider\.timeout: .*too long"),
    # durations that would overflow a date in the daemon (now + d, expiry - d)
    ("[provider]\nrefresh_token_ttl = 'P99999Y'\n", {},
     r"provider\.refresh_token_ttl: .*too long"),
    ("[provider]\nrefresh_token_ttl = '3000000d'\n", {},
     r"provider\.refresh_token_ttl: .*too long"),
    ("[provider]\nrefresh_token_ttl = 'P999Y999999D'\n", {},
     r"provider\.refresh_token_ttl: .*too long"),
    ("[schedule]\ninterval = '3000000d'\nretry_max = '3000000d'\n", {},
     r"schedule\.interval: .*too long"),
    ("[schedule]\nretry_max = '500000w'\n", {}, r"schedule\.retry_max: .*too long"),
    ("", {"TOKEND_SCHEDULE__REFRESH_BEFORE": "P9000000D"},
     r"schedule\.refresh_before: .*too long"),
    ("[schedule]\nreconsent_before = 'P900Y99999D'\n", {},
     r"schedule\.reconsent_before: .*too long"),
    ("[schedule]\nmax_grant_age = '3000000d'\n", {}, r"schedule\.max_grant_age: .*too long"),
    ("[schedule]\nmax_grant_age = 'P1000Y'\n", {}, None),  # the longest: still fits
    ("[provider]\nrefresh_token_ttl = 'PT0S'\n", {},
     r"provider\.refresh_token_ttl: must be longer than zero"),
    ("[provider]\nrefresh_token_ttl = 'one month'\n", {},
     r"provider\.refresh_token_ttl: invalid duration"),
    ("[schedule]\ninterval = '0s'\n", {}, r"schedule\.interval: must be longer than zero"),
    ("[schedule]\ninterval = '-5s'\n", {}, r"schedule\.interval: invalid duration"),
    ("[schedule]\ninterval = '99999999999d'\n", {}, r"schedule\.interval: .*too long"),
    ("[schedule]\nrefresh_before = '0m'\n", {},
     r"schedule\.refresh_before: must be longer than zero"),
    ("[schedule]\nretry_max = '0s'\n", {}, r"schedule\.retry_max: must be longer than zero"),
    ("[schedule]\nretry_max = '30s'\n", {},
     r"schedule\.retry_max \(30s\) must not be shorter than schedule\.interval \(1m\)"),
    ("[schedule]\nreconsent_before = 'soon'\n", {}, r"schedule\.reconsent_before: invalid"),
    ("[schedule]\nmax_grant_age = 'P0M'\n", {}, r"schedule\.max_grant_age: must be longer"),
    ("[schedule]\nmax_grant_age = '3 months'\n", {}, r"schedule\.max_grant_age: invalid"),
    ("", {"TOKEND_SCHEDULE__INTERVAL": "often"}, r"schedule\.interval: invalid duration"),
    # ranges
    ("[provider]\nrate_limit = -1\n", {}, r"provider\.rate_limit: must be at least 0"),
    ("[schedule]\nconcurrency = 0\n", {}, r"schedule\.concurrency: must be at least 1"),
    ("[schedule]\nconcurrency = -3\n", {}, r"schedule\.concurrency: must be at least 1"),
    ("[schedule]\nconcurrency = 257\n", {}, r"schedule\.concurrency: must be at most 256"),
    ("[schedule]\nbatch_size = 0\n", {}, r"schedule\.batch_size: must be at least 1"),
    # enumerations
    ("[clients.main]\nclient_id = 'i'\nclient_secret = 'x'\nauth_method = 'basic'\n", {},
     r"clients\.main\.auth_method: must be client_secret_post or client_secret_basic"),
    ("[logging]\nformat = 'xml'\n", {}, r"logging\.format: must be json, console or auto"),
    ("[logging]\nlevel = 'loud'\n", {}, r"logging\.level: must be one of"),
    ("[logging]\nlevel = 3\n", {}, r"logging\.level: must be a string"),
    # metrics.listen
    ("[metrics]\nlisten = '9464'\n", {}, r"metrics\.listen: expected HOST:PORT"),
    ("[metrics]\nlisten = ':9464'\n", {}, r"metrics\.listen: expected HOST:PORT"),
    ("[metrics]\nlisten = 'localhost:http'\n", {}, r"metrics\.listen: port must be a number"),
    ("[metrics]\nlisten = '127.0.0.1:70000'\n", {}, r"metrics\.listen: port 70000 is out of"),
    ("[metrics]\nlisten = 'bad host!:80'\n", {}, r"metrics\.listen: invalid host"),
    # clients
    ("[clients.main]\nclient_secret = 'x'\n", {}, r"clients\.main\.client_id: is required"),
    ("[clients.main]\nclient_id = ''\nclient_secret = 'x'\n", {},
     r"clients\.main\.client_id: is required"),
    ("[clients.main]\nclient_id = 'i'\n", {},
     r"clients\.main\.client_secret: is required \(or client_secret_file\)"),
    ("[clients.main]\nclient_id = 'i'\nclient_secret = ''\n", {},
     r"clients\.main\.client_secret: is required"),
    ("[clients.main]\nclient_id = 'i'\nclient_secret = 'x'\nclient_secret_file = 'f'\n", {},
     r"clients\.main\.client_secret: set either client_secret or client_secret_file, not both"),
    ("[clients.a]\nclient_id = 'same'\nclient_secret = 'x'\n"
     "[clients.b]\nclient_id = 'same'\nclient_secret = 'y'\n", {},
     r"clients\.b\.client_id: 'same' is already the client_id of clients\.a"),
    ("[notify]\nwebhook_secret = 'x'\nwebhook_secret_file = 'f'\n", {},
     r"notify\.webhook_secret: set either"),
    # database.url
    ("[database]\nurl = 'mysql://u@h/db'\n", {},
     r"database\.url: must start with sqlite:/// or postgresql\+psycopg://, not 'mysql'"),
    ("[database]\nurl = 'postgresql+psycopg2://u@h/db'\n", {}, r"database\.url: must start"),
    ("[database]\nurl = 'tokend.db'\n", {}, r"database\.url: must start"),
    ("[database]\nurl = ''\n", {}, r"database\.url: must start"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                    message: str | None) -> None:
    if message is None:
        load(tmp_path, text, env)
        return
    with pytest.raises(ConfigError, match=message) as info:
        load(tmp_path, text, env)
    assert "\n" not in str(info.value)


def test_a_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clients\.main\.client_secret: must be a string"
                       ) as info:
        load(tmp_path, "[clients.main]\nclient_id = 'i'\nclient_secret = 918273645\n")
    assert "918273645" not in str(info.value)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", r"clients\.main\.client_secret_file: .*/main\.secret does not exist"),
    ("empty", r"clients\.main\.client_secret_file: .*/main\.secret is empty"),
    ("blank", r"clients\.main\.client_secret_file: .*/main\.secret is empty"),
    ("directory", r"clients\.main\.client_secret_file: .*/main\.secret cannot be read: "
                  r"Is a directory"),
    ("binary", r"clients\.main\.client_secret_file: .*/main\.secret cannot be read: "
               r"not UTF-8 text"),
])
def test_secret_file_problems(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "main.secret"
    if setup == "empty":
        path.write_text("")
    elif setup == "blank":
        path.write_text("  \n\n")
    elif setup == "directory":
        path.mkdir()
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00secret")
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, '[clients.main]\nclient_id = "i"\nclient_secret_file = "main.secret"\n')


def test_environment_secret_overrides_a_secret_file_of_the_toml(tmp_path: Path) -> None:
    toml = '[clients.main]\nclient_id = "i"\nclient_secret_file = "/does/not/exist"\n'
    (tmp_path / "tokend.toml").write_text(toml)
    config = load_config(tmp_path / "tokend.toml",
                         env={"TOKEND_CLIENTS__MAIN__CLIENT_SECRET": "from-env"})
    assert config.clients["main"].client_secret.value == "from-env"


@pytest.mark.parametrize(("content", "message"), [
    ("", r"encryption\.key_file: .* holds no key"),
    ("# only a comment\n\n", r"encryption\.key_file: .* holds no key"),
    (None, r"encryption\.key_file: .* cannot be read"),  # a directory
])
def test_key_file_problems(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokend-key"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, "")


def test_key_file_with_an_impossible_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"encryption\.key_file: .* not a usable path"):
        load(tmp_path, "", env={"TOKEND_ENCRYPTION__KEY_FILE": "k" * 5000})


def test_a_missing_key_file_is_not_an_error_at_load_time(tmp_path: Path) -> None:
    c = load(tmp_path, "")
    assert c.encryption.key_file == tmp_path / "tokend-key" and c.encryption.keys == ()


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokend\.toml is not valid TOML: .*line 2"):
        load(tmp_path, "[database]\nurl = \n")


def test_toml_with_a_duplicate_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(tmp_path, "[logging]\nlevel = 'info'\nlevel = 'debug'\n")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*/absent\.toml does not exist"):
        load_config(tmp_path / "absent.toml", env={})


def test_missing_config_file_named_by_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml does not exist"):
        load_config(None, env={"TOKEND_CONFIG": str(tmp_path / "absent.toml")})


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path, env={})


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_bytes(b"[logging]\nlevel = '\xff'\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "bad.toml", env={})
