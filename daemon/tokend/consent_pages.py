"""The pages of the re-consent endpoint: plain HTML, no external assets, strict headers.

Each page is a pure function of its words; the one stylesheet is inline and allowed by
its hash in the Content-Security-Policy, so no script or foreign asset can ever run.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from html import escape
from urllib.parse import urlsplit

_CSS = ("body{font-family:system-ui,sans-serif;max-width:34em;margin:4em auto;padding:0 1em;"
        "color:#222;line-height:1.5}h1{font-size:1.5em}"
        "button{font-size:1.1em;padding:.6em 1.4em;border:0;border-radius:.3em;"
        "background:#1a5fb4;color:#fff;cursor:pointer}.muted{color:#666;font-size:.9em}")
_CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()


@dataclass(frozen=True)
class Page:
    status: int
    title: str
    html: bytes
    location: str | None = None  # a redirect


def security_headers(authorize_url: str) -> list[tuple[str, str]]:
    """Sent with every response. The form may only go to us and, through our redirect,
    to the provider's authorize page (browsers check form-action on redirects too)."""
    parts = urlsplit(authorize_url)
    provider = f"{parts.scheme}://{parts.netloc}"
    csp = (f"default-src 'none'; style-src '{_CSS_HASH}'; form-action 'self' {provider}; "
           "frame-ancestors 'none'; base-uri 'none'")
    return [
        ("Content-Security-Policy", csp),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ]


def _page(status: int, title: str, paragraphs: list[str], *, extra: str = "") -> Page:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><h1>{escape(title)}</h1>{body}{extra}</body></html>")
    return Page(status, title, html.encode())


def start(client: str) -> Page:
    c = escape(client)
    return _page(200, "Renew access", [
        f"The application <strong>{c}</strong> works with your account on your behalf. "
        "Its permission ends soon (or has ended): to let it keep working, please approve "
        "it once more.",
        "The button takes you to the provider's sign-in page. Sign in as the same user "
        "who approved before and choose to allow access; you come back here afterwards.",
    ], extra='<form method="post"><button type="submit" id="continue">Continue</button>'
             '</form><p class="muted">If you do not want to continue, close this page: '
             "nothing changes.</p>")


def done(client: str) -> Page:
    return _page(200, "Access renewed", [
        f"Thank you. <strong>{escape(client)}</strong> can keep working with your account.",
        "You can close this window.",
    ])


def denied() -> Page:
    return _page(403, "Access not renewed", [
        "You declined at the provider, so nothing was changed.",
        "If that was a mistake, open the link again.",
    ])


def wrong_user() -> Page:
    return _page(403, "Wrong account", [
        "You signed in as a different user than the one this link was made for. "
        "Nothing was stored.",
        "Sign out at the provider, open the link again and sign in as the right user.",
    ])


def expired() -> Page:
    return _page(410, "Link expired", [
        "This link has expired. Please ask for a new one.",
    ])


def used() -> Page:
    return _page(410, "Link already used", [
        "Access was already renewed with this link or a newer one: there is nothing "
        "more to do. If something still does not work, please ask for a new link.",
    ])


def invalid() -> Page:
    return _page(404, "Invalid link", [
        "This link is not valid. Please check that it was copied completely, or ask "
        "for a new one.",
    ])


def unavailable() -> Page:
    return _page(409, "Not available", [
        "Access through this link cannot be renewed at the moment. Please contact the "
        "people who sent it to you.",
    ])


def session_expired() -> Page:
    return _page(400, "Sign-in expired", [
        "This sign-in took too long or was already completed. Please open your link "
        "again. Nothing was changed.",
    ])


def failed() -> Page:
    return _page(502, "Something went wrong", [
        "The provider could not complete the request. Nothing was changed; please open "
        "your link again in a few minutes.",
    ])


def not_found() -> Page:
    return _page(404, "Not found", ["There is nothing here."])


def not_allowed() -> Page:
    return _page(405, "Method not allowed", ["There is nothing here."])


def busy() -> Page:
    return _page(503, "Busy", ["Too many requests at once. Please try again in a moment."])


def redirect(location: str) -> Page:
    page = _page(303, "Continue", ["Continue at the provider."])
    return Page(303, page.title, page.html, location)
