"""Signed consent links, the [consent] configuration, and reminder decisions (pure tables)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokend import consent, policy
from tokend.config import ConfigError, ScheduleConfig, load_config
from tokend.durations import Duration
from tokend.model import Grant, Outcome, Status

KEY = "k" * 40
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CONSENTED = datetime(2026, 11, 1, 9, 30, 0, 123456, tzinfo=UTC)


def grant(**kw: object) -> Grant:
    base = Grant(
        id=7, client="main", grant_type="authorization_code", user_id="1234", tenant_id="5678",
        status=Status.OK, reason=None, access_expires_at=NOW + timedelta(hours=20),
        refresh_expires_at=NOW + timedelta(days=30), obtained_at=NOW - timedelta(hours=4),
        consented_at=CONSENTED, failure_count=0, last_error=None, next_attempt_at=None,
        in_doubt=False, token_version=1, has_refresh_token=True, created_at=NOW,
        updated_at=NOW)
    return replace(base, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- links


def test_a_minted_link_verifies_and_names_its_grant() -> None:
    token = consent.mint(KEY, 7, CONSENTED, NOW + timedelta(days=7))
    link = consent.verify(KEY, token, NOW)
    assert (link.grant_id, link.expires_at) == (7, NOW + timedelta(days=7))
    consent.check_grant(link, grant())
    assert "2026" not in token  # the consent mark is a digest, not the date


def _swap_id(token: str) -> str:
    return "8" + token[token.index("."):]


def _flip_sig(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


@pytest.mark.parametrize(("name", "change", "now", "key", "reason"), [
    ("changed signature", _flip_sig, NOW, KEY, consent.Refusal.SIGNATURE),
    ("another grant", _swap_id, NOW, KEY, consent.Refusal.SIGNATURE),
    ("later expiry", lambda t: t.replace(".", ".9", 1), NOW, KEY, consent.Refusal.SIGNATURE),
    ("another key", lambda t: t, NOW, "x" * 40, consent.Refusal.SIGNATURE),
    ("expired", lambda t: t, NOW + timedelta(days=7), KEY, consent.Refusal.EXPIRED),
    ("truncated", lambda t: t.rsplit(".", 1)[0], NOW, KEY, consent.Refusal.MALFORMED),
    ("empty", lambda t: "", NOW, KEY, consent.Refusal.MALFORMED),
    ("huge", lambda t: t + "." * 300, NOW, KEY, consent.Refusal.MALFORMED),
])
def test_links_are_refused(name: str, change: object, now: datetime, key: str,
                           reason: consent.Refusal) -> None:
    token = consent.mint(KEY, 7, CONSENTED, NOW + timedelta(days=7))
    with pytest.raises(consent.LinkRefused) as info:
        consent.verify(key, change(token), now)  # type: ignore[operator]
    assert info.value.reason == reason, name


@pytest.mark.parametrize(("name", "g", "reason"), [
    ("consented since (single use)", grant(consented_at=NOW), consent.Refusal.USED),
    ("never consented", grant(consented_at=None), consent.Refusal.USED),
    ("disabled", grant(status=Status.DISABLED), consent.Refusal.UNAVAILABLE),
    ("client credentials", grant(grant_type="client_credentials", user_id=None),
     consent.Refusal.UNAVAILABLE),
])
def test_a_valid_link_does_not_fit_every_grant(name: str, g: Grant,
                                               reason: consent.Refusal) -> None:
    link = consent.verify(KEY, consent.mint(KEY, 7, CONSENTED, NOW + timedelta(days=1)), NOW)
    with pytest.raises(consent.LinkRefused) as info:
        consent.check_grant(link, g)
    assert info.value.reason == reason, name


def test_required_grants_can_use_links() -> None:
    link = consent.verify(KEY, consent.mint(KEY, 7, CONSENTED, NOW + timedelta(days=1)), NOW)
    consent.check_grant(link, grant(status=Status.RECONSENT_REQUIRED, reason="invalid_grant"))


# --------------------------------------------------------------------------- configuration



def test_consent_config(tmp_path: Path) -> None:
    (tmp_path / "link-key").write_text(KEY + "\n")
    cfg = load_config(_write(tmp_path, '[consent]\nlisten = "127.0.0.1:8780"\n'
                                       'public_url = "https://tokend.example/x/"\n'
                                       'link_key_file = "link-key"\nreminders = ["1d", "3d", "1d"]\n'
                                       'link_ttl = "2d"\n'), env={})
    c = cfg.consent
    assert c.enabled and c.address == ("127.0.0.1", 8780)
    assert c.public_url == "https://tokend.example/x"
    assert c.redirect_uri == "https://tokend.example/x/callback"
    assert c.reminders == (Duration.parse("3d"), Duration.parse("1d"))
    assert cfg.schedule.reminders == c.reminders
    assert c.link_ttl == Duration.parse("2d")
    assert c.link_key is not None and KEY not in repr(c)
    env = {"TOKEND_CONSENT__REMINDERS": "12h, 2d", "TOKEND_CONSENT__LINK_KEY": KEY}
    from_env = load_config(_write(tmp_path, ""), env=env).consent
    assert from_env.reminders == (Duration.parse("2d"), Duration.parse("12h"))
    default = load_config(None, env={})
    assert not default.consent.enabled and default.consent.address is None
    assert default.schedule.reminders == tuple(Duration.parse(x) for x in ("7d", "3d", "1d"))


@pytest.mark.parametrize(("body", "message"), [
    ('listen = "127.0.0.1:1"\nlink_key = "' + KEY + '"', "consent.public_url: is required"),
    ('listen = "127.0.0.1:1"\npublic_url = "https://a.example"', "consent.link_key_file: is req"),
    ('link_key = "short"', "consent.link_key: too short"),
    ('public_url = "ftp://a.example"', "consent.public_url: must be an http(s) URL"),
    ('public_url = "https://a.example/?x=1"', "must not have a query"),
    ('reminders = ["0s"]', "consent.reminders: each must be longer than zero"),
    ('reminders = "3d"', "consent.reminders: must be a list"),
    ('reminders = ["soon"]', "consent.reminders: invalid duration"),
    ('listen = "nowhere"', "consent.listen: expected HOST:PORT"),
    ('colour = "red"', "consent.colour: unknown key"),
])
def test_bad_consent_config_is_one_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(_write(tmp_path, "[consent]\n" + body + "\n"), env={})


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(body)
    return path


# --------------------------------------------------------------------------- reminders

DEADLINE = NOW + timedelta(days=5)
S = ScheduleConfig(reminders=tuple(Duration.parse(x) for x in ("7d", "3d", "1d")))
D = timedelta(days=1)


@pytest.mark.parametrize(("reminders", "before", "points"), [
    (("7d", "3d", "1d"), "7d", [DEADLINE - 3 * D, DEADLINE - D]),  # 7d: reconsent_due covers
    (("7d", "3d", "1d"), "2d", [DEADLINE - D]),
    (("7d", "3d", "1d"), "10d", [DEADLINE - 7 * D, DEADLINE - 3 * D, DEADLINE - D]),
    (("1d", "1d"), "7d", [DEADLINE - D]),
    ((), "7d", []),
    (("P1M",), "P2M", [DEADLINE - 30 * D]),  # calendar month before 2026-12-06
])
def test_reminder_points(reminders: tuple[str, ...], before: str,
                         points: list[datetime]) -> None:
    s = ScheduleConfig(reminders=tuple(Duration.parse(r) for r in reminders),
                       reconsent_before=Duration.parse(before))
    assert policy.reminder_points(DEADLINE, s) == points


DUE = grant(status=Status.RECONSENT_DUE, reason="refresh_token_expiring",
            refresh_expires_at=DEADLINE)


@pytest.mark.parametrize(("name", "g", "now", "due", "nxt"), [
    ("before any point", DUE, NOW, None, DEADLINE - 3 * D),
    ("at the 3d point", DUE, DEADLINE - 3 * D, DEADLINE - 3 * D, DEADLINE - D),
    ("3d sent", replace(DUE, reminder_deadline=DEADLINE, reminder_point=DEADLINE - 3 * D),
     DEADLINE - 2 * D, None, DEADLINE - D),
    ("both missed: one reminder", DUE, DEADLINE - D / 2, DEADLINE - D, None),
    ("all sent", replace(DUE, reminder_deadline=DEADLINE, reminder_point=DEADLINE - D),
     DEADLINE - D / 2, None, None),
    ("sent for an older deadline", replace(DUE, reminder_deadline=DEADLINE - D,
                                           reminder_point=DEADLINE - 2 * D),
     DEADLINE - 2 * D, DEADLINE - 3 * D, DEADLINE - D),
    ("past the deadline", DUE, DEADLINE, None, None),
    ("required: none", replace(DUE, status=Status.RECONSENT_REQUIRED), DEADLINE - D, None, None),
    ("disabled: none", replace(DUE, status=Status.DISABLED), DEADLINE - D, None, None),
    ("client credentials: none", replace(DUE, grant_type="client_credentials"),
     DEADLINE - D, None, None),
])
def test_due_and_next_reminder(name: str, g: Grant, now: datetime, due: datetime | None,
                               nxt: datetime | None) -> None:
    assert policy.due_reminder(g, now, S) == due, name
    assert policy.next_reminder(g, now, S) == nxt, name


def test_the_next_attempt_includes_the_next_reminder() -> None:
    # the access token is refreshed in ~20 h; the 3d reminder comes first
    g = replace(DUE, access_expires_at=DEADLINE - 3 * D + timedelta(hours=20))
    now = DEADLINE - 3 * D - timedelta(hours=1)
    assert policy.next_attempt(g, now, S) == DEADLINE - 3 * D
    assert policy.next_attempt(g, now, replace(S, reminders=())) > DEADLINE - 3 * D
    # once sent, the next is the refresh or the 1d reminder, whichever is first
    sent = replace(g, reminder_deadline=DEADLINE, reminder_point=DEADLINE - 3 * D)
    assert policy.next_attempt(sent, DEADLINE - 3 * D, S) == policy.refresh_at(
        sent, S.refresh_before)


def _outcome(status: Status, **kw: object) -> Outcome:
    return Outcome(status=status, reason=None, next_attempt_at=None, failure_count=0,
                   last_error=None, in_doubt=False, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "g", "out", "now", "point", "send"), [
    ("a due grant at its 3d point", DUE, _outcome(Status.RECONSENT_DUE), DEADLINE - 3 * D,
     DEADLINE - 3 * D, True),
    ("entering due covers it", replace(DUE, status=Status.OK), _outcome(Status.RECONSENT_DUE),
     DEADLINE - 2 * D, DEADLINE - 3 * D, False),
    ("rotated to a new deadline", DUE,
     _outcome(Status.OK, refresh_expires_at=DEADLINE + 30 * D), DEADLINE - 2 * D, None, False),
    ("now required", DUE, _outcome(Status.RECONSENT_REQUIRED), DEADLINE - D, None, False),
    ("nothing due", DUE, _outcome(Status.RECONSENT_DUE), NOW, None, False),
])
def test_remind(name: str, g: Grant, out: Outcome, now: datetime, point: datetime | None,
                send: bool) -> None:
    marked, sent = policy.remind(g, out, now, S)
    assert (marked.reminder_point, sent) == (point, send), name
    if point is not None:
        assert marked.reminder_deadline == DEADLINE
