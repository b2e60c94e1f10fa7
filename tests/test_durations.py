"""Durations: the short forms, ISO 8601, calendar months, and what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tokend.durations import Duration, add_months, format_timedelta, parse_timedelta

H, D = timedelta(hours=1), timedelta(days=1)


@pytest.mark.parametrize(("text", "months", "delta"), [
    ("90s", 0, timedelta(seconds=90)),
    ("15m", 0, timedelta(minutes=15)),
    ("6h", 0, 6 * H),
    ("7d", 0, 7 * D),
    ("2w", 0, 14 * D),
    ("1.5h", 0, 90 * timedelta(minutes=1)),
    ("250ms", 0, timedelta(milliseconds=250)),
    (" 10 s ", 0, timedelta(seconds=10)),
    ("0s", 0, timedelta(0)),
    ("PT6H", 0, 6 * H),
    ("pt6h", 0, 6 * H),
    ("PT90S", 0, timedelta(seconds=90)),
    ("PT0.5S", 0, timedelta(milliseconds=500)),
    ("P7D", 0, 7 * D),
    ("P2W", 0, 14 * D),
    ("P1M", 1, timedelta(0)),
    ("P1Y", 12, timedelta(0)),
    ("P3M", 3, timedelta(0)),
    ("P1Y2M3DT4H5M6S", 14, 3 * D + 4 * H + timedelta(minutes=5, seconds=6)),
])
def test_parse(text: str, months: int, delta: timedelta) -> None:
    assert Duration.parse(text) == Duration(months, delta)


@pytest.mark.parametrize("text", [
    "", " ", "6", "h", "-5s", "+5s", "5 x", "5y", "1M", "5sec", "1e3s", "1,5h",
    "P", "PT", "P1", "P1MT", "PT1D", "P1.5M", "P-1M", "1h30m", "T6H", "P1M 2D", "nan", "infs",
])
def test_invalid_strings(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        Duration.parse(text)


@pytest.mark.parametrize("value", [6, 6.0, None, True, ["6h"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration string"):
        Duration.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["99999999999d", "P99999999999D", "P99999999999Y",
                                  "P100000Y", f"{10**30}s"])
def test_absurdly_long_durations_are_a_value_error_not_an_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="too long"):
        Duration.parse(text)


@pytest.mark.parametrize("text", ["3000000d", "400000w", "P9000000D", "P999Y999999D",
                                  "P1000Y1D", "PT99999999999S", "P12000MT1S"])
def test_durations_that_would_overflow_a_date_are_refused(text: str) -> None:
    # These parsed, and then ``now + d`` raised OverflowError in the middle of a pass.
    with pytest.raises(ValueError, match=r"too long \(at most 1000 years\)"):
        Duration.parse(text)


@pytest.mark.parametrize("text", ["P1000Y", "372000d", "P999Y11M", "53142w"])
def test_every_accepted_duration_fits_any_date_the_daemon_computes(text: str) -> None:
    d = Duration.parse(text)
    now = datetime(2100, 1, 1, tzinfo=UTC)
    assert d.after(now).year < 9999 and d.before(datetime(1970, 1, 1, tzinfo=UTC)).year > 1
    assert now + d.approx() * 3 > now  # ready(): interval * 3; lead * (1 + jitter)


@pytest.mark.parametrize(("start", "text", "expected"), [
    # A month is a calendar month, clamped to the end of a shorter month.
    ("2023-01-31T10:00:00", "P1M", "2023-02-28T10:00:00"),
    ("2024-01-31T10:00:00", "P1M", "2024-02-29T10:00:00"),  # leap year
    ("2024-01-15T10:00:00", "P1M", "2024-02-15T10:00:00"),
    ("2024-03-31T00:00:00", "P1M", "2024-04-30T00:00:00"),
    ("2024-12-31T23:59:59", "P1M", "2025-01-31T23:59:59"),  # across the year
    ("2024-11-30T00:00:00", "P3M", "2025-02-28T00:00:00"),
    ("2024-02-29T00:00:00", "P1Y", "2025-02-28T00:00:00"),
    ("2024-01-31T00:00:00", "P1Y2M3DT4H5M6S", "2025-04-03T04:05:06"),  # Mar 31 + 3 d
    ("2024-01-31T00:00:00", "30d", "2024-03-01T00:00:00"),  # days are fixed
])
def test_after_uses_calendar_months(start: str, text: str, expected: str) -> None:
    moment = datetime.fromisoformat(start).replace(tzinfo=UTC)
    assert Duration.parse(text).after(moment) == datetime.fromisoformat(expected).replace(
        tzinfo=UTC)


@pytest.mark.parametrize(("start", "text", "expected"), [
    ("2024-03-31T12:00:00", "P1M", "2024-02-29T12:00:00"),
    ("2023-03-31T12:00:00", "P1M", "2023-02-28T12:00:00"),
    ("2024-01-15T12:00:00", "P1M", "2023-12-15T12:00:00"),
    ("2024-02-29T12:00:00", "7d", "2024-02-22T12:00:00"),
    ("2024-05-31T12:00:00", "P1MT12H", "2024-04-30T00:00:00"),
])
def test_before_uses_calendar_months(start: str, text: str, expected: str) -> None:
    moment = datetime.fromisoformat(start).replace(tzinfo=UTC)
    assert Duration.parse(text).before(moment) == datetime.fromisoformat(expected).replace(
        tzinfo=UTC)


def test_month_arithmetic_keeps_the_time_zone() -> None:
    vienna = timezone(timedelta(hours=1))
    moment = datetime(2024, 1, 31, 9, 30, tzinfo=vienna)
    assert Duration(months=1).after(moment) == datetime(2024, 2, 29, 9, 30, tzinfo=vienna)
    assert add_months(moment, -13) == datetime(2022, 12, 31, 9, 30, tzinfo=vienna)
    assert add_months(moment, 0) is moment


@pytest.mark.parametrize("text", ["P1M", "P1Y", "P2M1D", "P1Y2M3DT4H5M6S"])
def test_parse_timedelta_refuses_months(text: str) -> None:
    with pytest.raises(ValueError, match="months are not allowed"):
        parse_timedelta(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)), ("PT6H", 6 * H), ("P7D", 7 * D), ("2w", 14 * D),
])
def test_parse_timedelta(text: str, expected: timedelta) -> None:
    assert parse_timedelta(text) == expected


@pytest.mark.parametrize(("delta", "text"), [
    (timedelta(0), "0s"),
    (timedelta(seconds=90), "90s"),
    (timedelta(minutes=15), "15m"),
    (6 * H, "6h"),
    (7 * D, "1w"),
    (9 * D, "9d"),
    (timedelta(milliseconds=1500), "1.5s"),
])
def test_format_timedelta(delta: timedelta, text: str) -> None:
    assert format_timedelta(delta) == text
    assert parse_timedelta(text) == delta


@pytest.mark.parametrize("text", ["P1M", "P14M", "P1M1D", "P1MT6H", "P1M2DT3H4M5S",
                                  "P1MT0.5S", "6h", "90s", "2w"])
def test_str_parses_back(text: str) -> None:
    """check-config prints durations with str(); what it prints must be valid config."""
    d = Duration.parse(text)
    assert Duration.parse(str(d)) == d


def test_helpers() -> None:
    assert Duration.of(6 * H) == Duration(0, 6 * H)
    assert Duration().is_zero and Duration.parse("PT0S").is_zero
    assert not Duration(months=1).is_zero
    assert Duration.parse("P2M1D").approx() == 61 * D
