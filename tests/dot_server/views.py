"""DOT's own token view, wrapped for the tests; a user endpoint; a loopback control API.

The wrapper serialises token requests (one at a time) so that its counts are exact.
Before DOT sees a refresh request, the presented refresh token is classified: ``reuse``
when an earlier request through this view already rotated it (a token used twice),
``revoked`` when DOT had revoked it without it being used (its family was killed by a
reuse, or an operator revoked it), ``unknown`` when DOT never issued it.
After DOT answered, an optional delay (``DOT_LATENCY``) holds the response:
the rotation is committed but the client has not got the new tokens yet, which is the
window a ``kill -9`` of the client must survive.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from base64 import urlsafe_b64encode
from collections import Counter
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model, login
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.decorators import protected_resource
from oauth2_provider.models import get_application_model, get_grant_model, get_refresh_token_model
from oauth2_provider.views import TokenView

LATENCY = float(os.environ.get("DOT_LATENCY", "0"))
_token_view = TokenView.as_view()
_serial = threading.Lock()  # one token request at a time (see the module docstring)
_counts = threading.Lock()
STATS: dict[str, Any] = {}
_rotated: set[str] = set()  # checksums of refresh tokens DOT rotated (never reset)


def _reset() -> None:
    STATS.clear()
    STATS.update(requests=0, in_flight=0, rotations=0, reuse=0, revoked=0, unknown_refresh=0,
                 by_grant=Counter(), errors=Counter(), statuses=Counter())


_reset()


def _checksum(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _refresh_state(token: str) -> str:
    """``live`` (usable now), ``revoked`` (used or killed), or ``unknown`` (never issued)."""
    rows = list(get_refresh_token_model().objects.filter(token_checksum=_checksum(token))
                .values_list("revoked", flat=True))
    if not rows:
        return "unknown"
    return "live" if any(r is None for r in rows) else "revoked"


@csrf_exempt
def token(request: HttpRequest) -> HttpResponse:
    request.body  # noqa: B018 - cache the raw body: DOT reads it after we read the form
    grant_type = request.POST.get("grant_type", "")
    with _counts:
        STATS["in_flight"] += 1
    try:
        with _serial:
            state = None
            presented = request.POST.get("refresh_token")
            if grant_type == "refresh_token" and presented:
                state = _refresh_state(presented)
                if _checksum(presented) in _rotated:
                    state = "reuse"
            response = _token_view(request)
            error = None
            if response.status_code != 200:
                try:
                    error = json.loads(response.content).get("error")
                except (ValueError, AttributeError):
                    error = "not_json"
            with _counts:
                STATS["requests"] += 1
                STATS["by_grant"][grant_type] += 1
                STATS["statuses"][f"{grant_type}:{response.status_code}"] += 1
                if error:
                    STATS["errors"][f"{grant_type}:{error}"] += 1
                if state == "reuse":
                    STATS["reuse"] += 1
                elif state == "revoked":
                    STATS["revoked"] += 1
                elif state == "unknown":
                    STATS["unknown_refresh"] += 1
                if grant_type == "refresh_token" and response.status_code == 200 and presented:
                    STATS["rotations"] += 1
                    _rotated.add(_checksum(presented))
        if LATENCY:
            time.sleep(LATENCY)
        return response
    finally:
        with _counts:
            STATS["in_flight"] -= 1


@protected_resource()
def current_user(request: HttpRequest) -> HttpResponse:
    """Like league's ``/oauth/user/current``: who the bearer token belongs to."""
    user = request.resource_owner
    if user is None:  # a client-credentials token: no user behind it
        return JsonResponse({"id": None})
    return JsonResponse({"id": user.pk, "username": user.get_username()})


def login_consenter(request: HttpRequest) -> HttpResponse:
    """The login page, without a form: the user ``consenter`` is logged in at once and
    sent on to where DOT wanted him (its authorization view, which then redirects to the
    client with a code, the application being set to skip the consent screen)."""
    user, _ = get_user_model().objects.get_or_create(username="consenter")
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    target = request.GET.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    return HttpResponseRedirect(target)


def _body(request: HttpRequest) -> dict[str, Any]:
    data = json.loads(request.body or b"{}")
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


@csrf_exempt
def issue_codes(request: HttpRequest) -> HttpResponse:
    """Users and one authorization code each (PKCE S256), as if each had consented.

    The caller exchanges the codes at ``/o/token/``: DOT's real authorization-code
    grant mints the first token pair (and starts the family reuse protection tracks).
    """
    data = _body(request)
    n, start = int(data["n"]), int(data.get("user_start", 1))
    app = get_application_model().objects.get(client_id=data["client_id"])
    users = get_user_model()
    out = []
    with _serial:
        for number in range(start, start + n):
            user, _ = users.objects.get_or_create(username=f"user{number}")
            verifier = secrets.token_urlsafe(48)
            challenge = urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            code = secrets.token_urlsafe(30)
            get_grant_model().objects.create(
                user=user, code=code, application=app, redirect_uri=app.redirect_uris.split()[0],
                scope="read write", expires=timezone.now() + timedelta(minutes=1),
                code_challenge=challenge.decode().rstrip("="), code_challenge_method="S256")
            out.append({"user_id": user.pk, "code": code, "code_verifier": verifier,
                        "redirect_uri": app.redirect_uris.split()[0]})
    return JsonResponse(out, safe=False)


def stats(request: HttpRequest) -> HttpResponse:
    with _counts:
        return JsonResponse({k: dict(v) if isinstance(v, Counter) else v
                             for k, v in STATS.items()})


@csrf_exempt
def reset_stats(request: HttpRequest) -> HttpResponse:
    with _counts:
        in_flight = STATS["in_flight"]
        _reset()
        STATS["in_flight"] = in_flight
    return JsonResponse({})


@csrf_exempt
def refresh_state(request: HttpRequest) -> HttpResponse:
    """For each refresh token: live / revoked / unknown, without spending it."""
    tokens = _body(request)["tokens"]
    with _serial:
        return JsonResponse([_refresh_state(t) for t in tokens], safe=False)
