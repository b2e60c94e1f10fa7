"""``/_fake/*``: the fake's control and inspection API over HTTP, for a fake in another
process (tests/faultlib.py FakeProcess, the benchmarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokend.fake.league import Response, json_response

if TYPE_CHECKING:
    from tokend.fake.provider import FakeJustimmo


def handle(fake: FakeJustimmo, method: str, path: str, payload: Any) -> Response:
    try:
        if method == "GET" and path == "/_fake/stats":
            return json_response(200, fake.stats())
        if method != "POST":
            return json_response(405, {"error": "method_not_allowed"})
        args = payload if isinstance(payload, dict) else {}
        if path == "/_fake/issue":
            issued = fake.issue_many(
                str(args["client_id"]),
                int(args.get("n", 1)),
                user_id_start=args.get("user_id_start", 1),
                tenant_id=args.get("tenant_id", 5678),
                with_refresh=bool(args.get("with_refresh", True)),
            )
            return json_response(200, [t.to_json() for t in issued])
        if path == "/_fake/faults":
            fake.inject(
                str(args["fault"]),
                count=args.get("count"),
                grant_type=args.get("grant_type"),
                **(args.get("params") or {}),
            )
        elif path == "/_fake/clear":
            fake.clear_faults()
        elif path == "/_fake/latency":
            fake.set_latency(float(args["seconds"]))
        elif path == "/_fake/reset_stats":
            fake.reset_stats()
        elif path == "/_fake/consent_page":
            fake.consent_page = bool(args.get("on", True))
        elif path == "/_fake/deny":
            fake.deny_authorizations(bool(args.get("deny", True)))
        elif path == "/_fake/expire":
            fake.expire_refresh_token(str(args["refresh_token"]))
        elif path == "/_fake/revoke":
            fake.revoke_refresh_token(str(args["refresh_token"]))
        else:
            return json_response(404, {"error": "not_found"})
        return json_response(200, {"ok": True})
    except (KeyError, ValueError, TypeError) as exc:
        return json_response(400, {"error": "bad_request", "message": str(exc)})

# ------------------------------------------------------------------ called by handlers
