"""Durations as operators write them: ``90s``, ``15m``, ``6h``, ``7d``, ``2w`` or ISO 8601.

A month is a calendar month (league's ``P1M``: 31 January + 1 month = 28/29 February),
so a duration is kept as months plus a fixed ``timedelta`` and applied to a datetime,
never flattened to seconds.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

_SIMPLE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_ISO = re.compile(
    r"^P(?!$)(?:(?P<y>\d+)Y)?(?:(?P<mo>\d+)M)?(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<h>\d+)H)?(?:(?P<mi>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
MAX_MONTHS = 12 * 1000  # beyond this a date can no longer be represented anyway
# Any duration, months counted as 31 days: today plus (or a stored time minus) this
# still fits a datetime (year 1 to 9999), also multiplied by a small factor, so a value
# accepted at load time never raises OverflowError in the middle of a pass.
MAX_SPAN = timedelta(days=31 * MAX_MONTHS)


@dataclass(frozen=True, order=True)
class Duration:
    months: int = 0
    delta: timedelta = timedelta(0)

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse a duration or raise ``ValueError`` with a readable reason."""
        if not isinstance(text, str):
            raise ValueError(f"expected a duration string like '6h' or 'P1M', got {text!r}")
        raw = text.strip()
        try:
            m = _SIMPLE.match(raw)
            if m:
                return cls(0, float(m.group(1)) * _UNITS[m.group(2)])._bounded()
            iso = _ISO.match(raw.upper())
            if iso:
                g = {k: v or "0" for k, v in iso.groupdict().items()}
                months = int(g["y"]) * 12 + int(g["mo"])
                if months > MAX_MONTHS:
                    raise OverflowError
                delta = timedelta(
                    weeks=int(g["w"]),
                    days=int(g["d"]),
                    hours=int(g["h"]),
                    minutes=int(g["mi"]),
                    seconds=float(g["s"]),
                )
                return cls(months, delta)._bounded()
        except OverflowError:
            raise ValueError(f"duration {text!r} is too long (at most 1000 years)") from None
        raise ValueError(
            f"invalid duration {text!r} "
            "(use e.g. '90s', '15m', '6h', '7d' or ISO 8601 'PT6H', 'P1M')"
        )

    def _bounded(self) -> Duration:
        if timedelta(days=31 * self.months) + self.delta > MAX_SPAN:
            raise OverflowError
        return self

    @classmethod
    def of(cls, delta: timedelta) -> Duration:
        return cls(0, delta)

    @property
    def is_zero(self) -> bool:
        return self.months == 0 and self.delta == timedelta(0)

    def after(self, moment: datetime) -> datetime:
        """``moment`` + this duration, months as calendar months."""
        return add_months(moment, self.months) + self.delta

    def before(self, moment: datetime) -> datetime:
        """``moment`` - this duration, months as calendar months."""
        return add_months(moment, -self.months) - self.delta

    def approx(self) -> timedelta:
        """A fixed-length approximation (a month as 30 days), for sizing only."""
        return timedelta(days=30 * self.months) + self.delta

    def __str__(self) -> str:
        """The shortest text that parses back to this duration (ISO 8601 with months)."""
        if self.months == 0:
            return format_timedelta(self.delta)
        out = f"P{self.months}M"
        days, rest = self.delta.days, self.delta - timedelta(days=self.delta.days)
        if days:
            out += f"{days}D"
        if rest:
            seconds = rest.total_seconds()
            hours, seconds = divmod(seconds, 3600)
            minutes, seconds = divmod(seconds, 60)
            out += "T"
            if hours:
                out += f"{int(hours)}H"
            if minutes:
                out += f"{int(minutes)}M"
            if seconds:
                out += f"{seconds:g}S" if seconds != int(seconds) else f"{int(seconds)}S"
        return out


def add_months(moment: datetime, months: int) -> datetime:
    if months == 0:
        return moment
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def parse_timedelta(text: str) -> timedelta:
    """A duration without calendar months (intervals, timeouts)."""
    d = Duration.parse(text)
    if d.months:
        raise ValueError(f"{text!r}: months are not allowed here, use days (e.g. '30d')")
    return d.delta


def format_timedelta(delta: timedelta) -> str:
    total = delta.total_seconds()
    if total == 0:
        return "0s"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if total % size == 0:
            return f"{int(total // size)}{unit}"
    if total == int(total):
        return f"{int(total)}s"
    return f"{total:g}s"
