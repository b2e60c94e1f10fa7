"""Drives the django-oauth-toolkit test server (``tests/dot_server``) from a test.

:class:`DotProcess` starts it as a process of its own on a free loopback port and
asks it questions a test needs answered without spending anything: is this access
token accepted (DOT's own protected-resource check, like an API would do), is this
refresh token still live, and how many refresh requests presented a token that was
already used. :func:`dot_importable` says whether Django and DOT are installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

import faultlib as fl

SERVE = Path(__file__).resolve().parent / "dot_server" / "serve.py"
WEB_ID, WEB_SECRET = "dot-web", "dot-web-secret-1"
MACHINE_ID, MACHINE_SECRET = "dot-machine", "dot-machine-secret-1"
REDIRECT_URI = "http://127.0.0.1:8765/callback"


def dot_importable() -> str | None:
    """None when Django and django-oauth-toolkit can be imported, else what is missing."""
    missing = [m for m in ("django", "oauth2_provider") if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None


class DotProcess(fl.Proc):
    """DOT serving on 127.0.0.1 with a fresh SQLite database in ``workdir / "dot"``."""

    def __init__(self, workdir: Path, *, access_ttl: float = 12, latency: float = 0.0,
                 redirect_uri: str = REDIRECT_URI, pkce_required: bool = True,
                 web_secret: str = WEB_SECRET) -> None:
        self.redirect_uri = redirect_uri
        self.web_secret = web_secret
        super().__init__([fl.PYTHON, str(SERVE), "serve", "--dir", str(workdir / "dot"),
                          "--access-ttl", str(access_ttl), "--latency", str(latency),
                          *([] if pkce_required else ["--no-pkce"]),
                          "--client", f"{WEB_ID}:{web_secret}:{redirect_uri}",
                          "--cc-client", f"{MACHINE_ID}:{MACHINE_SECRET}"],
                         workdir / "dot.log")
        self.session = requests.Session()
        self.session.trust_env = False  # loopback only, never a proxy
        self.base_url: str = fl.wait_until(self._listening, 60, interval=0.1,
                                           what="the DOT server to listen")
        self.token_url = f"{self.base_url}/o/token/"
        self.user_url = f"{self.base_url}/api/user/current"

    def _listening(self) -> str | None:
        if not self.running:
            raise AssertionError(f"DOT server exited: {self.output()}")
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("listening on "):
                return line.split()[-1]
        return None

    def seed(self, n: int, path: Path, *, user_start: int = 1) -> Path:
        """N users' first token pairs (the helper, as its own process) into an import file."""
        done = subprocess.run(
            [fl.PYTHON, str(SERVE), "seed", "--url", self.base_url, "--client",
             f"{WEB_ID}:{self.web_secret}", "--n", str(n), "--user-start", str(user_start)],
            capture_output=True, text=True, timeout=120, check=False, env=fl.clean_env())
        assert done.returncode == 0, done.stderr[-2000:]
        path.write_text(done.stdout)
        return path

    def stats(self) -> dict[str, Any]:
        r = self.session.get(f"{self.base_url}/_test/stats", timeout=10)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def reset_stats(self) -> None:
        self.session.post(f"{self.base_url}/_test/reset_stats", timeout=10).raise_for_status()

    def refresh_states(self, tokens: Sequence[str]) -> list[str]:
        """``live`` / ``revoked`` / ``unknown`` for each refresh token, spending none."""
        r = self.session.post(f"{self.base_url}/_test/refresh_state",
                              data=json.dumps({"tokens": list(tokens)}), timeout=30)
        r.raise_for_status()
        out: list[str] = r.json()
        return out

    def whose(self, access_token: str) -> tuple[bool, Any]:
        """(DOT accepts the access token, the user id it belongs to) via a protected API."""
        r = self.session.get(self.user_url, headers={"Authorization": f"Bearer {access_token}"},
                             timeout=10)
        if r.status_code == 200:
            return True, r.json().get("id")
        return False, None

    def wait_idle(self, timeout: float = 20.0) -> None:
        fl.wait_until(lambda: self.stats()["in_flight"] == 0, timeout, interval=0.05,
                      what="DOT to finish the requests in flight")
