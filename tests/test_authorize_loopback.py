"""`tokend authorize --listen HOST:PORT` without a redirect_uri: the RFC 8252 loopback URI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

from tokend.fake import FakeJustimmo
from tokend.testing import write_config


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_listen_without_redirect_uri_uses_the_loopback_callback(
        tmp_path: Path, db_url: str, key_file: Path, fake: FakeJustimmo) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file)
    path.write_text(path.read_text().replace(
        'redirect_uri = "http://127.0.0.1:8765/callback"\n', ""))
    assert "redirect_uri" not in path.read_text()
    tokend = [sys.executable, "-m", "tokend", "--config", str(path)]
    if db_url.startswith("postgresql"):
        subprocess.run([*tokend, "db", "upgrade"], check=True, capture_output=True)
    port = _port()
    proc = subprocess.Popen([*tokend, "authorize", "--client", "main", "--no-browser",
                             "--listen", f"127.0.0.1:{port}", "--timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith(fake.authorize_url), proc.stderr.read() if proc.stderr else ""
        redirect = parse_qs(urlsplit(url).query)["redirect_uri"]
        assert redirect == [f"http://127.0.0.1:{port}/callback"]
        assert parse_qs(urlsplit(url).query)["code_challenge_method"] == ["S256"]
        resp = requests.get(url, allow_redirects=False, timeout=10)
        assert resp.headers["Location"].startswith(redirect[0] + "?")
        requests.get(resp.headers["Location"], timeout=10)
        assert proc.wait(timeout=30) == 0
        assert fake.stats()["last_code_challenge"] == parse_qs(
            urlsplit(url).query)["code_challenge"][0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stored grant 1 for user 1234" in (proc.stderr.read() if proc.stderr else "")
    listing = subprocess.run([*tokend, "grants", "list", "--json"], capture_output=True,
                             text=True, check=True)
    assert [g["user_id"] for g in json.loads(listing.stdout)] == ["1234"]


def test_without_listen_or_redirect_uri_it_is_still_a_config_error(
        tmp_path: Path, db_url: str, key_file: Path, fake: FakeJustimmo) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file)
    path.write_text(path.read_text().replace(
        'redirect_uri = "http://127.0.0.1:8765/callback"\n', ""))
    out = subprocess.run([sys.executable, "-m", "tokend", "--config", str(path), "authorize",
                          "--client", "main", "--no-browser"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 78 and "redirect_uri: is required" in out.stderr
