"""The database schema. `events` is a public surface read by analytics jobs:
change it only through an Alembic migration (apex_ingest/ops/migrations)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    cast,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

#: The newest migration (apex_ingest/ops/migrations/versions): the schema this code reads and
#: writes. A database behind it cannot take events (health says so); one ahead of it (a newer
#: release migrated it during a rolling upgrade) can. tests/server/test_database.py keeps it
#: equal to Alembic's head.
SCHEMA_REVISION = "0010"

# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class JSONBText(UserDefinedType[str]):
    """A JSONB column that binds the client's JSON text unchanged, and reads back text.

    SQLAlchemy's JSONB would re-serialize a Python object; we already hold the
    exact text the client sent (numbers and all), and PostgreSQL parses it. Read back as
    jsonb, psycopg would parse it into Python floats (49.90 -> 49.9, a 20-digit number
    rounded): as text, every number is the one stored.
    """

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "JSONB"

    def column_expression(self, colexpr: Any) -> Any:
        return cast(colexpr, Text)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: The project's first public key, kept for readers of this table (analytics). The server
    #: authenticates through `project_keys` only (migration 0006).
    key: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Browser origins allowed to send events, e.g. ["https://shop.example"]; empty: any.
    allowed_origins: Mapped[list[str]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Extra query parameter names whose values are stored as "[redacted]" (migration 0003);
    # null: only the built-in list (apex_ingest/server/redaction.py).
    redact_params: Mapped[list[str] | None] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"), nullable=True
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The project's own gateway rate limit, e.g. "100/second;5000/hour", all its keys together
    # (migration 0009); null: APEX_RATE_LIMIT.
    rate_limit: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: What is kept of a client IP (migration 0008): "full", "truncated" (IPv4 /24, IPv6 /48)
    #: or "none" (apex_ingest/server/enrichment.py, `scrub_ip`).
    ip_mode: Mapped[str] = mapped_column(String(16), default="full", server_default="full")
    #: Drop events flagged as bots at ingest (answered as accepted, counted in metrics).
    drop_bots: Mapped[bool] = mapped_column(Boolean(), default=False, server_default=text("false"))
    #: Snippet events may come without visitorId: the server derives one from a daily salt, the
    #: IP and the User-Agent (apex_ingest/server/cookieless.py; migration 0010). Null: false.
    cookieless: Mapped[bool | None] = mapped_column(
        Boolean(), nullable=True, server_default=text("false")
    )


class VisitorSalt(Base):
    """The secret salt of one UTC day for cookieless visitor ids (apex_ingest/server/cookieless.py).

    One row per day, created by the first server that needs it (`day` is the key: concurrent
    creators keep the first row); rows older than yesterday are deleted then (migration 0010).
    """

    __tablename__ = "visitor_salts"

    day: Mapped[date] = mapped_column(Date(), primary_key=True)
    #: 32 random bytes in hex.
    salt: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProjectKey(Base):
    """A key of a project: `public` keys send events, `secret` keys read and administer.

    A project holds several of each (rotation): each has a label, a creation and a revocation
    time. Public keys are stored as they are (they are public); secret keys only as their
    SHA-256 (`key_sha256`), so a database dump reveals none.
    """

    __tablename__ = "project_keys"
    __table_args__ = (
        UniqueConstraint("kind", "key", name="uq_project_keys_kind_key"),
        Index("ix_project_keys_project", "project_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    #: "public" or "secret".
    kind: Mapped[str] = mapped_column(String(16))
    #: A public key as it is; a secret key's SHA-256 in hex.
    key: Mapped[str] = mapped_column(String(128))
    #: What the owner calls the key ("default", "ci", "rotated 2027-01"...).
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeadLetter(Base):
    """One event of a request refused for its content (INVALID_ARGUMENT, or PERMISSION_DENIED
    for its origin), kept with the reasons so that the owner can see and replay it.

    Not an event: nothing reads it as one. Scrubbed as events are (`deadletters.scrub_event`),
    capped in size, and bounded per project (rows, age) and in all (`deadletters.prune`).
    """

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_project_id", "project_id", "id"),
        Index("ix_dead_letters_received", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: "invalid_argument" or "permission_denied".
    reason: Mapped[str] = mapped_column(String(32))
    #: JSON list of {"field", "description"}: the event's own violations and the request's.
    violations: Mapped[str] = mapped_column(Text())
    #: Position of the event in its request.
    event_index: Mapped[int] = mapped_column(Integer())
    #: The event as received (JSON text of its fields), at most 8 KiB; a bigger one is kept as
    #: {"truncated": true, "bytes": N, "head": "..."} and cannot be replayed.
    event: Mapped[str] = mapped_column(Text())
    user_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    origin: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    ip: Mapped[str | None] = mapped_column(String(45), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        # Insert-or-ignore on this makes client retries idempotent.
        UniqueConstraint("project_id", "event_id", name="uq_events_project_event"),
        # SQLite only: PostgreSQL dropped this per-row check (migration 0005; the server resolves
        # the project before it writes, and projects are never deleted).
        ForeignKeyConstraint(["project_id"], ["projects.id"]).ddl_if(dialect="sqlite"),
        # Which query each index serves: migration 0005. On PostgreSQL the person indexes are
        # partial: rows without that id stay out of them.
        Index("ix_events_project_occurred", "project_id", "occurred_at"),
        Index(
            "ix_events_project_visitor",
            "project_id",
            "visitor_id",
            "occurred_at",
            postgresql_where=text("visitor_id IS NOT NULL"),
        ),
        Index(
            "ix_events_project_user",
            "project_id",
            "user_id",
            "occurred_at",
            postgresql_where=text("user_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(100))
    visitor_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    url: Mapped[str] = mapped_column(String(4096))
    referrer: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    data: Mapped[str] = mapped_column(Text().with_variant(JSONBText(), "postgresql"))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ip: Mapped[str | None] = mapped_column(String(45), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # Derived at ingest (migration 0008; docs/enrichment.md): null for rows stored before it,
    # and wherever the rule found nothing.
    #: The client's own `timestamp` when the server corrected its clock skew (else null).
    client_occurred_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    #: Skew applied (client clock minus server clock, ms); 0 when measured but under the
    #: threshold; null without `sent_at`.
    clock_skew_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    browser: Mapped[str | None] = mapped_column(String(64), nullable=True)
    browser_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    os: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: desktop, mobile, tablet or bot.
    device_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    is_bot: Mapped[bool | None] = mapped_column(Boolean(), nullable=True)
    utm_source: Mapped[str | None] = mapped_column(String(256), nullable=True)
    utm_medium: Mapped[str | None] = mapped_column(String(256), nullable=True)
    utm_campaign: Mapped[str | None] = mapped_column(String(256), nullable=True)
    utm_term: Mapped[str | None] = mapped_column(String(256), nullable=True)
    utm_content: Mapped[str | None] = mapped_column(String(256), nullable=True)
    gclid: Mapped[str | None] = mapped_column(String(256), nullable=True)
    fbclid: Mapped[str | None] = mapped_column(String(256), nullable=True)
    referrer_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: search, social, email, internal, direct or other.
    referrer_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: ISO 3166-1 alpha-2 code of the client IP's country.
    country: Mapped[str | None] = mapped_column(String(2), nullable=True)


class IdentityLink(Base):
    """A visitor (anonymous browser id, or an alias's previous id) known to be a user.

    Written in the transaction of the events that show it (storage.py): an `identify` or
    `alias` event, or any event carrying both ids. One row per (visitor, user); a visitor
    attributed to one user only, its FIRST link (lowest id): a later link to another user is
    kept with `conflict` true and never merged (view `events_with_user`, migration 0007).
    """

    __tablename__ = "identity_links"
    __table_args__ = (
        UniqueConstraint(
            "project_id", "visitor_id", "user_id", name="uq_identity_links_project_visitor_user"
        ),
        Index("ix_identity_links_project_user", "project_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(BigInteger)
    #: The visitor id (for an alias: its previous id).
    visitor_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    #: What recorded it first: "identify", "alias" or "event" (an event carrying both ids).
    source: Mapped[str] = mapped_column(String(16))
    #: Occurrence times of the earliest and latest event showing the link.
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: The visitor was already linked to another user when this link was recorded.
    conflict: Mapped[bool] = mapped_column(Boolean(), default=False)


class Suppression(Base):
    """A user or visitor id whose events are dropped at ingest (answered as accepted)."""

    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("project_id", "kind", "value", name="uq_suppressions_project_kind_value"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(BigInteger)
    #: "user" or "visitor".
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))


class PrivacyAudit(Base):
    """One request about a person's data: deletion, suppression, lifting, export."""

    __tablename__ = "privacy_audit"
    __table_args__ = (Index("ix_privacy_audit_project", "project_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(BigInteger)
    #: "delete", "unsuppress" or "export" (a deletion with --suppress is one "delete" row).
    action: Mapped[str] = mapped_column(String(32))
    #: Who asked: --actor, else the OS user (CLI), or the call's actor, else "grpc".
    actor: Mapped[str] = mapped_column(String(200))
    #: "cli" or "grpc".
    via: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: JSON {"user": [sha256...], "visitor": [sha256...]}: the ids as their SHA-256 in hex.
    ids: Mapped[str] = mapped_column(Text())
    #: JSON {"events": n, "identity_links": n, "dead_letters": n, "suppressed": n, ...}.
    counts: Mapped[str] = mapped_column(Text())
    suppress: Mapped[bool] = mapped_column(Boolean(), default=False)
