"""The keys model (issue #17): public keys send, secret keys read; several of each per project."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from sqlalchemy import select, text

from apex_ingest.ops.migrate import alembic_config, upgrade
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.models import ProjectKey
from apex_ingest.server.projects import (
    PUBLIC,
    SECRET,
    ProjectDirectory,
    add_key,
    create_project,
    revoke_key,
    secret_digest,
)


def test_public_and_secret_keys_authenticate_apart(database_url: str) -> None:
    engine = create_db_engine(database_url)
    factory = create_session_factory(engine)
    try:
        with factory.begin() as session:
            project = create_project(session, "shop")
            public, project_id = project.key, project.id
            secret = add_key(session, project_id, SECRET)
            second_public = add_key(session, project_id, PUBLIC, label="rotated")
        directory = ProjectDirectory(factory, ttl=0)
        assert secret.startswith("sk_live_")
        for key in (public, second_public):
            info = directory.lookup(key)
            assert info is not None and info.id == project_id
        secret_info = directory.lookup_secret(secret)
        assert secret_info is not None and secret_info.id == project_id
        # A public key is no secret, and a secret key sends no events.
        assert directory.lookup_secret(public) is None
        assert directory.lookup(secret) is None
        with factory() as session:
            stored = set(session.scalars(select(ProjectKey.key)))
        assert secret not in stored and secret_digest(secret) in stored  # only its hash

        with factory.begin() as session:
            assert revoke_key(session, PUBLIC, public)
            assert not revoke_key(session, PUBLIC, public)
        assert directory.lookup(public) is None
        assert directory.lookup(second_public) is not None  # the other keys stay valid
        assert directory.lookup_secret(secret) is not None
        with factory.begin() as session:
            assert revoke_key(session, SECRET, secret)
        assert directory.lookup_secret(secret) is None
    finally:
        engine.dispose()


def test_migration_0006_turns_each_project_key_into_a_public_key(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "0002")
    engine = create_db_engine(database_url)
    created = datetime(2026, 11, 1, tzinfo=UTC)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO projects (key, name, allowed_origins, created_at, revoked_at) "
                    "VALUES ('pk_live_old', 'old', '[]', :t, NULL), "
                    "('pk_live_gone', 'gone', '[]', :t, :t)"
                ),
                {"t": created},
            )
        upgrade(database_url)
        directory = ProjectDirectory(create_session_factory(engine), ttl=0)
        assert directory.lookup("pk_live_old") is not None
        assert directory.lookup("pk_live_gone") is None  # revoked before stays revoked
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT kind, key, label FROM project_keys ORDER BY id")
            ).all()
        assert [tuple(row) for row in rows] == [
            ("public", "pk_live_old", "default"),
            ("public", "pk_live_gone", "default"),
        ]
    finally:
        engine.dispose()
