"""The django-oauth-toolkit test server as a process of its own, and its seeding helper.

``python tests/dot_server/serve.py serve --dir D [--access-ttl 12] [--latency 0.3]
[--no-pkce] --client ID:SECRET:REDIRECT_URI [--cc-client ID:SECRET]`` migrates a fresh SQLite file
in ``D``, registers the applications (confidential, client_secret_post; DOT stores
the secret hashed, the clear one stays with the caller for tokend's config), and serves
on a free loopback port, printing ``listening on http://127.0.0.1:PORT`` when ready.

DOT ties one grant type to an application, so the authorization-code client (which may
also refresh) and the client-credentials client are two applications.

``python tests/dot_server/serve.py seed --url URL --client ID:SECRET --n 20`` makes N
users consent (an authorization code each, exchanged at the real token endpoint) and
prints the token pairs as ``tokend grants import`` JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _django(workdir: Path, access_ttl: float, latency: float, pkce: bool) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "dot_server.settings"
    os.environ["DOT_PKCE_REQUIRED"] = "1" if pkce else "0"
    os.environ["DOT_DB"] = str(workdir / "dot.sqlite3")
    os.environ["DOT_ACCESS_TTL"] = str(int(access_ttl))
    os.environ["DOT_LATENCY"] = str(latency)
    sys.path.insert(0, str(HERE.parent))
    import django

    django.setup()


def _register(client: str, grant_type: str) -> None:
    from oauth2_provider.models import get_application_model

    app_model = get_application_model()
    # ID:SECRET[:REDIRECT_URI]; the secret may hold anything but ':'.
    parts = client.split(":", 2)
    client_id, secret = parts[0], parts[1]
    redirect = parts[2] if len(parts) > 2 else ""
    app_model.objects.create(
        name=client_id, client_id=client_id, client_secret=secret, hash_client_secret=True,
        client_type=app_model.CLIENT_CONFIDENTIAL, authorization_grant_type=grant_type,
        redirect_uris=redirect, skip_authorization=True)


def serve(args: argparse.Namespace) -> None:
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    _django(workdir, args.access_ttl, args.latency, not args.no_pkce)
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from oauth2_provider.models import get_application_model

    call_command("migrate", verbosity=0, interactive=False)
    app_model = get_application_model()
    _register(args.client, app_model.GRANT_AUTHORIZATION_CODE)
    if args.cc_client:
        _register(args.cc_client, app_model.GRANT_CLIENT_CREDENTIALS)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = 64

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = make_server("127.0.0.1", args.port, get_wsgi_application(),
                        server_class=Server, handler_class=Quiet)
    print(f"listening on http://127.0.0.1:{httpd.server_port}", flush=True)
    httpd.serve_forever()


def seed(url: str, client_id: str, secret: str, n: int, *, user_start: int = 1,
         client: str = "main") -> list[dict[str, Any]]:
    """N users' first token pairs through DOT's authorization-code grant, as import records."""
    import requests

    session = requests.Session()
    session.trust_env = False  # loopback only, never a proxy
    r = session.post(f"{url}/_test/issue", json={"client_id": client_id, "n": n,
                                                 "user_start": user_start}, timeout=60)
    r.raise_for_status()
    records = []
    for item in r.json():
        obtained = datetime.now(UTC)
        t = session.post(f"{url}/o/token/", data={
            "grant_type": "authorization_code", "code": item["code"],
            "redirect_uri": item["redirect_uri"], "code_verifier": item["code_verifier"],
            "client_id": client_id, "client_secret": secret}, timeout=30)
        if t.status_code != 200:
            raise RuntimeError(f"code exchange failed: HTTP {t.status_code} {t.text[:200]}")
        body = t.json()
        records.append({
            "client": client, "grant_type": "authorization_code",
            "access_token": body["access_token"], "refresh_token": body["refresh_token"],
            "expires_in": body["expires_in"], "obtained_at": obtained.isoformat(),
            "user_id": str(item["user_id"])})
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="serve.py")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--access-ttl", type=float, default=3600)
    s.add_argument("--latency", type=float, default=0.0)
    s.add_argument("--no-pkce", action="store_true",
                   help="PKCE_REQUIRED = False (DOT's default requires PKCE)")
    s.add_argument("--client", required=True, help="ID:SECRET:REDIRECT_URI")
    s.add_argument("--cc-client", default="", help="ID:SECRET (client_credentials)")
    d = sub.add_parser("seed")
    d.add_argument("--url", required=True)
    d.add_argument("--client", required=True, help="ID:SECRET")
    d.add_argument("--n", type=int, default=1)
    d.add_argument("--user-start", type=int, default=1)
    d.add_argument("--name", default="main", help="the client's name in tokend's config")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
    else:
        client_id, secret = args.client.split(":", 1)
        json.dump(seed(args.url, client_id, secret, args.n, user_start=args.user_start,
                       client=args.name), sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
