"""Validation of ``tokend grants import`` files: every record checked before any is stored.

Accepted: a JSON array of objects, or JSON lines (one object per line). Errors name the
record (1-based) and the field, and never echo a token.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .classify import is_token
from .config import Config
from .errors import InputError
from .model import GrantType, NewGrant

_FIELDS = {
    "client", "grant_type", "access_token", "refresh_token", "expires_in", "access_expires_at",
    "obtained_at", "refresh_expires_at", "user_id", "tenant_id", "token_type", "consented_at",
}
MAX_EXPIRES_IN = 10 * 365 * 86400
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # before this a token time is a mistake
LATEST = datetime(9000, 1, 1, tzinfo=UTC)  # after this date arithmetic would overflow


def parse_records(text: str) -> list[Any]:
    stripped = text.lstrip()
    if not stripped:
        raise InputError("import: the input is empty")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"import: not valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from None
        except (RecursionError, ValueError) as exc:  # nesting too deep, integer too long
            raise InputError(f"import: unusable JSON: {_reason(exc)}") from None
        if not isinstance(data, list):
            raise InputError("import: expected a JSON array of objects")
        return data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"import: line {number} is not valid JSON: {exc.msg}") from None
        except (RecursionError, ValueError) as exc:
            raise InputError(f"import: line {number} is unusable JSON: {_reason(exc)}") from None
    return records


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def validate(records: list[Any], config: Config, now: datetime) -> list[NewGrant]:
    """The grants of ``records`` (record n is the n-th grant), or the first problem."""
    out = []
    cc_clients: dict[str, int] = {}  # a client has at most one client_credentials grant
    users: dict[tuple[str, str], int] = {}  # (client, user) -> record
    # Each refresh token is a one-time credential at the provider (rotation, reuse
    # detection): two grants holding it would spend it twice, and the second refresh
    # would revoke both. Kept as hashes, not as a second copy of every token.
    refresh_tokens: dict[bytes, int] = {}
    for number, record in enumerate(records, 1):
        grant = _record(number, record, config, now)
        where = f"import: record {number}"
        if grant.grant_type == GrantType.CLIENT_CREDENTIALS:
            if grant.client in cc_clients:
                raise InputError(
                    f"{where}: field 'client': a second client_credentials "
                    f"grant for {grant.client!r} (the first is record {cc_clients[grant.client]})")
            cc_clients[grant.client] = number
        if grant.refresh_token is not None:
            digest = hashlib.sha256(grant.refresh_token.encode("ascii")).digest()
            if digest in refresh_tokens:
                raise InputError(
                    f"{where}: field 'refresh_token': the same refresh token as record "
                    f"{refresh_tokens[digest]} (a refresh token can be used only once)")
            refresh_tokens[digest] = number
        key = _user_key(grant)
        if key is not None:
            if key in users:
                raise InputError(
                    f"{where}: field 'user_id': a second grant of client {key[0]!r} for user "
                    f"{key[1]!r} (the first is record {users[key]})")
            users[key] = number
        out.append(grant)
    if not out:
        raise InputError("import: no records")
    return out


def _user_key(grant: NewGrant) -> tuple[str, str] | None:
    """The (client, user) of a grant a user consented to; one such grant per pair."""
    if grant.grant_type != GrantType.AUTHORIZATION_CODE or grant.user_id is None:
        return None
    return grant.client, grant.user_id


def check_stored(grants: list[NewGrant], stored: Mapping[tuple[str, str], int]) -> None:
    """Refuse the file if a user of it already has a grant of that client in the store.

    Applications read one grant per user (``TokenStore.grant`` takes the newest), so a
    second one would silently hide the first; replacing a user's grant is
    ``tokend authorize``'s job, which keeps the id.
    """
    for number, grant in enumerate(grants, 1):
        key = _user_key(grant)
        if key is not None and key in stored:
            raise InputError(
                f"import: record {number}: field 'user_id': user {key[1]!r} of client "
                f"{key[0]!r} already has grant {stored[key]} (delete it first, or re-consent "
                "with tokend authorize); nothing was imported")


def _record(n: int, rec: Any, config: Config, now: datetime) -> NewGrant:
    where = f"import: record {n}"
    if not isinstance(rec, Mapping):
        raise InputError(f"{where}: must be a JSON object")
    unknown = sorted(set(rec) - _FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}")

    def string(key: str, *, required: bool = False, ids: bool = False) -> str | None:
        value = rec.get(key)
        if value is None:
            if required:
                raise InputError(f"{where}: field {key!r} is required")
            return None
        if ids and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 10**255:
                raise InputError(f"{where}: field {key!r} is too long")
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            kind = "a non-empty string or integer" if ids else "a non-empty string"
            raise InputError(f"{where}: field {key!r} must be {kind}")
        if len(value) > (255 if ids else 16384):
            raise InputError(f"{where}: field {key!r} is too long")
        if _CONTROL.search(value):
            raise InputError(f"{where}: field {key!r} contains control characters")
        return value.strip() if ids else value

    def token(key: str, *, required: bool = False) -> str | None:
        value = string(key, required=required)
        if value is not None and not is_token(value):
            # The provider client sends nothing else (RFC 6749 VSCHAR); such a grant
            # could never be refreshed.
            raise InputError(f"{where}: field {key!r} is not printable ASCII text")
        return value

    def moment(key: str) -> datetime | None:
        value = rec.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InputError(f"{where}: field {key!r} must be an ISO 8601 string")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InputError(f"{where}: field {key!r} is not an ISO 8601 time: {value!r}") from None
        if parsed.tzinfo is None:
            raise InputError(f"{where}: field {key!r} needs a time zone (e.g. 'Z'): {value!r}")
        try:
            parsed = parsed.astimezone(UTC)
        except OverflowError:
            parsed = EARLIEST - timedelta(days=1)
        if not EARLIEST <= parsed < LATEST:
            raise InputError(f"{where}: field {key!r} is out of range "
                             f"(1970 to 8999): {value!r}")
        return parsed

    client = string("client", required=True)
    assert client is not None
    if client not in config.clients:
        known = ", ".join(sorted(config.clients)) or "none configured"
        raise InputError(f"{where}: field 'client': unknown client {client!r} (clients: {known})")
    grant_type = string("grant_type") or GrantType.AUTHORIZATION_CODE.value
    if grant_type not in (GrantType.AUTHORIZATION_CODE, GrantType.CLIENT_CREDENTIALS):
        raise InputError(f"{where}: field 'grant_type' must be authorization_code or "
                         f"client_credentials, not {grant_type!r}")
    access = token("access_token", required=True)
    assert access is not None
    refresh = token("refresh_token")
    if grant_type == GrantType.CLIENT_CREDENTIALS and refresh is not None:
        raise InputError(f"{where}: field 'refresh_token': client_credentials grants have none")
    if grant_type == GrantType.AUTHORIZATION_CODE and refresh is None:
        raise InputError(f"{where}: field 'refresh_token' is required for authorization_code")
    obtained = moment("obtained_at") or now
    if obtained > now + timedelta(minutes=5):
        raise InputError(f"{where}: field 'obtained_at' is in the future")
    consented = moment("consented_at") or obtained
    if consented > now + timedelta(minutes=5):
        # schedule.max_grant_age is counted from it: a far future date overflows there
        raise InputError(f"{where}: field 'consented_at' is in the future")
    expires_at = moment("access_expires_at")
    expires_in = rec.get("expires_in")
    if expires_at is None and expires_in is None:
        raise InputError(f"{where}: field 'expires_in' or 'access_expires_at' is required")
    if expires_at is not None and expires_in is not None:
        raise InputError(f"{where}: give either 'expires_in' or 'access_expires_at', not both")
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) \
                or not math.isfinite(expires_in) or not 0 < expires_in <= MAX_EXPIRES_IN:
            raise InputError(f"{where}: field 'expires_in' must be a positive number of "
                             f"seconds (at most {MAX_EXPIRES_IN})")
        expires_at = obtained + timedelta(seconds=expires_in)
    assert expires_at is not None
    refresh_expires = moment("refresh_expires_at")
    if refresh is not None and refresh_expires is None:
        refresh_expires = config.provider.refresh_token_ttl.after(obtained)
    if refresh_expires is not None and refresh is None:
        raise InputError(f"{where}: field 'refresh_expires_at' without a refresh_token")
    user = string("user_id", ids=True)
    if grant_type == GrantType.CLIENT_CREDENTIALS and user is not None:
        raise InputError(f"{where}: field 'user_id': client_credentials grants have no user")
    return NewGrant(
        client=client, grant_type=grant_type, access_token=access, access_expires_at=expires_at,
        obtained_at=obtained, refresh_token=refresh, refresh_expires_at=refresh_expires,
        user_id=user, tenant_id=string("tenant_id", ids=True),
        consented_at=consented,
    )
