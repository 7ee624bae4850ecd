"""The database schema. `events` is a public surface read by analytics jobs:
change it only through an Alembic migration (apex_ingest/ops/migrations)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class JSONBText(UserDefinedType[str]):
    """A JSONB column that binds the client's JSON text unchanged.

    SQLAlchemy's JSONB would re-serialize a Python object; we already hold the
    exact text the client sent (numbers and all), and PostgreSQL parses it.
    """

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "JSONB"


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
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
