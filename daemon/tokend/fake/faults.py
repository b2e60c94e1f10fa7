"""The failures the fake serves on ``POST /access_token``: which, when, and what they look like."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

from tokend.fake.league import JSON, NO_STORE, Outcome, Response, json_response

FAULTS = frozenset(
    {
        "html_500",
        "json_500",
        "rate_limited",
        "timeout",
        "timeout_after_rotate",
        "drop",
        "drop_after_rotate",
        "invalid_client",
        "malformed_json",
        "empty_200",
    }
)


@dataclass(slots=True)
class Fault:
    kind: str
    remaining: int | None
    grant_type: str | None
    params: dict[str, Any]


def check(fault: str, count: int | None, params: dict[str, Any]) -> None:
    """Refuse a fault at injection time, not in a handler thread."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(FAULTS))}")
    if count is not None and count < 1:
        raise ValueError("count must be at least 1 (or None for unlimited)")
    if fault == "html_500":
        HTTPStatus(int(params.get("status", 503)))


def take(faults: list[Fault], grant_type: str) -> Fault | None:
    """The first queued fault for ``grant_type``, used up by one; caller holds the lock."""
    for i, fault in enumerate(faults):
        if fault.grant_type not in (None, grant_type):
            continue
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                del faults[i]
        return fault
    return None


def outcome(
    fault: Fault,
    *,
    process: Callable[[], Response],
    server_error: Callable[[], Response],
    invalid_client: Callable[[], Response],
) -> Outcome:
    """What a request meeting ``fault`` gets; ``process`` really handles it (the rotation
    happens, then the answer is lost)."""
    p = fault.params
    seconds = float(p.get("seconds", 30.0))
    match fault.kind:
        case "drop":
            return Outcome(None)
        case "timeout":
            return Outcome(None, hang=seconds)
        case "drop_after_rotate":
            process()
            return Outcome(None)
        case "timeout_after_rotate":
            process()
            return Outcome(None, hang=seconds)
        case "html_500":
            status = int(p.get("status", 503))
            phrase = HTTPStatus(status).phrase
            html = (
                f"<!DOCTYPE html>\n<html><head><title>{status} {phrase}</title></head>"
                f"<body><h1>{phrase}</h1><p>nginx</p></body></html>\n"
            )
            html_type = (("Content-Type", "text/html; charset=UTF-8"),)
            return Outcome(Response(status, html.encode(), html_type, f"http_{status}"))
        case "json_500":
            return Outcome(server_error())
        case "rate_limited":
            retry_after = p.get("retry_after", 2)
            headers = (("Retry-After", str(retry_after)),)
            if p.get("empty"):
                return Outcome(Response(429, b"", headers, "http_429"))
            resp = json_response(429, {"message": "Too Many Requests"}, headers)
            return Outcome(replace(resp, error="http_429"))
        case "invalid_client":
            return Outcome(invalid_client())
        case "malformed_json":
            body = b'{"token_type":"Bearer","expires_in":86400,"access_token":"fjat_'
            return Outcome(Response(200, body, (("Content-Type", JSON), *NO_STORE)))
        case _:  # "empty_200"
            return Outcome(Response(200, b"", (("Content-Type", JSON), *NO_STORE)))
