"""The tables (SQLAlchemy 2.0 declarative models). Migrations in ``tokend/migrations``.

Every timestamp is stored timezone-aware (``TIMESTAMP WITH TIME ZONE`` on PostgreSQL);
SQLite has no such type, so :class:`UTCDateTime` stores ISO text in UTC and gives back
aware datetimes on both backends. ISO text sorts like time, so range scans still work.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; tokend uses aware UTC")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # isoformat pads the year to 4 digits (strftime's %Y does not below 1000),
            # so the text sorts like time for every year.
            return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# SQLite's INTEGER PRIMARY KEY is the rowid only when spelled INTEGER.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class GrantRow(Base):
    __tablename__ = "grants"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    client: Mapped[str] = mapped_column(String(100))
    grant_type: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str | None] = mapped_column(String(255))
    tenant_id: Mapped[str | None] = mapped_column(String(255))
    # Both tokens are Fernet-encrypted (``tokend.crypto``); never selected by listings.
    access_token: Mapped[str | None] = mapped_column(Text)
    access_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    refresh_token: Mapped[str | None] = mapped_column(Text)
    refresh_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    obtained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    consented_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(32), default="ok")
    reason: Mapped[str | None] = mapped_column(String(64))
    failure_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500))
    # When the daemon next has work on this grant; NULL = never (disabled or
    # reconsent_required). A claimed grant's value is its lease expiry, so a crashed
    # attempt comes due again by itself.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # True while a request that may have rotated the refresh token has no known outcome.
    in_doubt: Mapped[bool] = mapped_column(Boolean, default=False)
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Reminders sent (migration 0003): the refresh expiry they were for, and the latest
    # reminder moment covered, so each reminder goes out once per grant and deadline.
    reminder_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reminder_point: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_grants_next_attempt_at", "next_attempt_at"),
        Index("ix_grants_client_status", "client", "status"),
        Index("ix_grants_client_user", "client", "user_id"),
        Index("ix_grants_client_access_expires", "client", "access_expires_at"),
        Index("ix_grants_client_refresh_expires", "client", "refresh_expires_at"),
        Index(
            "uq_grants_client_credentials",
            "client",
            unique=True,
            sqlite_where=text("grant_type = 'client_credentials'"),
            postgresql_where=text("grant_type = 'client_credentials'"),
        ),
        # Ids are never reused (migration 0002): a save guarded by the id can never
        # land in a grant imported after the one it was meant for was deleted.
        {"sqlite_autoincrement": True},
    )


class EventRow(Base):
    """The notification outbox: written in the transaction that changes a status."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    event: Mapped[str] = mapped_column(String(32))
    grant_id: Mapped[int | None] = mapped_column(_ID)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(500))

    __table_args__ = (Index("ix_events_next_attempt_at", "next_attempt_at"),)


class ConsentStateRow(Base):
    """A consent started at the web endpoint (migration 0003), consumed by its callback.

    In the database, not in a process, so the provider's redirect may reach any replica.
    Only a digest of ``state`` is stored: a reader of the table cannot finish a flow.
    """

    __tablename__ = "consent_states"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of state
    grant_id: Mapped[int] = mapped_column(_ID)
    mark: Mapped[str] = mapped_column(String(64))  # the link's consent mark
    redirect_uri: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The flow's PKCE verifier, encrypted (tokend.crypto): the callback may reach any replica.
    code_verifier: Mapped[str] = mapped_column(String(400))

    __table_args__ = (Index("ix_consent_states_expires_at", "expires_at"),)


class ReplicaRow(Base):
    """One tokend process's heartbeat (migration 0004), read by ``tokend status``."""

    __tablename__ = "replicas"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_pass_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_pass: Mapped[str | None] = mapped_column(Text)  # JSON: counts, duration, ok
    held_outcomes: Mapped[int] = mapped_column(Integer, default=0)
    open_circuits: Mapped[str | None] = mapped_column(Text)  # JSON list of client names
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RateSlotRow(Base):
    """The next free start of a rate limit shared by all replicas (migration 0005,
    tokend.sharedlimit; PostgreSQL only)."""

    __tablename__ = "rate_slots"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_at: Mapped[datetime] = mapped_column(UTCDateTime)
