"""The `apex-ingest` command."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import html
import os
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.common.settings import (
    ConfigError,
    Internal,
    ProcessSettings,
    ServerSettings,
    address_host,
    check_all,
    load,
    reachable_host,
)

#: Commands that run servers: they log JSON lines unless APEX_LOG_FORMAT=text.
_SERVER_COMMANDS = frozenset({"serve", "grpc", "gateway"})


class BadSetting(click.ClickException):
    exit_code = 2


class _Commands(click.Group):
    """A bad setting or an unreachable database is one line naming it, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            raise BadSetting(str(error)) from None
        except DBAPIError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise click.ClickException(f"database error: {reason}") from None


@click.group(cls=_Commands)
@click.version_option(package_name="apex-ingest")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Apex Ingest: the event-ingestion service of Apex."""
    from apex_ingest.common.logs import configure_logging

    try:
        configure_logging("json" if ctx.invoked_subcommand in _SERVER_COMMANDS else "text")
    except ConfigError as error:
        raise BadSetting(str(error)) from None


def _serve_children_metrics(settings: ServerSettings) -> None:
    """Before starting server processes: one metrics directory for all of them, and the
    APEX_METRICS_PORT endpoint (if set) served here, adding up every child's samples."""
    from apex_ingest.common.metrics_dir import prepare_multiprocess_dir

    prepare_multiprocess_dir()
    from apex_ingest.common import metrics  # only now: prometheus-client reads the directory

    metrics.serve_metrics(settings.host, settings.metrics_port)
    Internal.set(Internal.METRICS_SERVED_BY_PARENT, "1")


_COUNT = click.IntRange(min=1)


@main.command()
@click.option("--processes", type=_COUNT, default=None, help="Server processes (default: cores).")
def grpc(processes: int | None) -> None:
    """Run the gRPC server alone."""
    check_all()
    settings = load(ServerSettings)
    count = _count(processes, load(ProcessSettings).grpc_processes)
    _ensure_free(settings.host, settings.grpc_port, "APEX_GRPC_PORT")
    if count == 1:
        from apex_ingest.ops.grpc_process import serve

        serve(settings)
    else:
        _serve_children_metrics(settings)
        from apex_ingest.ops.supervisor import run_grpc_processes

        run_grpc_processes(settings, count)


@main.command()
@click.option("--workers", type=_COUNT, default=None, help="Worker processes (default: cores).")
def gateway(workers: int | None) -> None:
    """Run the HTTP gateway alone (granian)."""
    from apex_ingest.common.metrics_dir import prepare_multiprocess_dir

    check_all()
    settings = load(ServerSettings)
    count = _count(workers, load(ProcessSettings).http_workers)
    # Before anything imports prometheus-client (the gateway package does): it decides at
    # import whether samples go to the shared directory that /metrics adds up.
    prepare_multiprocess_dir()
    _ensure_free(settings.host, settings.http_port, "APEX_HTTP_PORT")
    from gateway.serve import run_gateway

    run_gateway(settings.host, settings.http_port, count)


@main.command()
@click.option("--workers", type=_COUNT, default=None, help="Gateway worker processes.")
@click.option(
    "--grpc-processes", type=_COUNT, default=None, help="gRPC processes (default: cores / 2)."
)
def serve(workers: int | None, grpc_processes: int | None) -> None:
    """Run the gRPC server and the HTTP gateway together."""
    from apex_ingest.ops.supervisor import serve_all

    check_all()
    settings = load(ServerSettings)
    processes = load(ProcessSettings)
    http_workers = _count(workers, processes.http_workers)
    # Half the cores: the gateway's workers use most of the CPU per request, and one gRPC
    # process commits bigger groups with fewer wake-ups (bench/README.md has the figures).
    grpc_count = _count(
        grpc_processes, processes.grpc_processes, max(1, (os.cpu_count() or 1) // 2)
    )
    _ensure_free(settings.host, settings.grpc_port, "APEX_GRPC_PORT")
    _ensure_free(settings.host, settings.http_port, "APEX_HTTP_PORT")
    # The gateway's /metrics then shows the gRPC processes' metrics too (one directory).
    _serve_children_metrics(settings)
    serve_all(settings, http_workers, grpc_count)


def _count(option: int | None, setting: int | None, default: int | None = None) -> int:
    """A process count: the option, else the setting, else `default` or the CPU cores."""
    if option is not None:
        return option
    return setting or default or os.cpu_count() or 1


def _ensure_free(host: str, port: int, variable: str) -> None:
    """Refuse to start where something already listens.

    The servers bind with SO_REUSEPORT (several processes share a port), so a second
    apex-ingest on the same port would not fail: it would silently take part of the traffic,
    into its own database. A probe without SO_REUSEPORT fails if anything listens there.
    """
    if Internal.get(Internal.PARENT_PID):
        return  # a supervised child: its siblings hold the port on purpose
    try:
        family, kind, _proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ConfigError(f"APEX_HOST: cannot resolve {host!r}: {error.strerror}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as error:
            where = f"{address_host(reachable_host(host))}:{port} ({variable})"
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{where} is already in use: is another apex-ingest running there?"
                ) from None
            raise ConfigError(f"cannot listen on {where}: {error.strerror}") from None


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
def upgrade() -> None:
    """Apply every pending migration."""
    from apex_ingest.ops.migrate import current_revision
    from apex_ingest.ops.migrate import upgrade as run_upgrade

    url = load(ServerSettings).database_url
    before = current_revision(url)
    run_upgrade(url)
    after = current_revision(url)
    if before == after:
        click.echo(f"database is up to date (revision {after})")
    else:
        click.echo(f"database migrated from revision {before or 'none'} to {after}")


@db.command()
@click.option(
    "--months-ahead",
    type=click.IntRange(0, 120),
    default=3,
    show_default=True,
    help="Create partitions for this many months after the current one.",
)
def partitions(months_ahead: int) -> None:
    """PostgreSQL: create the monthly partitions of events ahead of time (and the default one).

    Run it from cron (e.g. daily); it is idempotent.
    """
    from apex_ingest.ops import partitions as parts

    with _engine_connection() as connection:
        try:
            created = parts.ensure_partitions(connection, months_ahead)
        except RuntimeError as error:
            raise click.ClickException(str(error)) from error
    click.echo("created " + ", ".join(created) if created else "partitions are up to date")


@db.command()
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=None,
    help="Keep this many days (default: APEX_RETENTION_DAYS, what the servers use).",
)
def retention(days: int | None) -> None:
    """Remove events that occurred more than N days ago (APEX_RETENTION_DAYS, or --days).

    PostgreSQL: drops whole monthly partitions and deletes older rows from events_default, then
    forgets the ids of the events removed. SQLite: deletes the older rows.
    """
    from apex_ingest.ops import partitions as parts

    configured = load(ServerSettings).retention_days
    if days is None and configured is None:
        raise click.UsageError(
            "no retention period: set APEX_RETENTION_DAYS (the servers then refuse events "
            "older than it too) or pass --days N"
        )
    if days is not None and configured is not None and days < configured:
        click.echo(
            f"warning: --days {days} is shorter than APEX_RETENTION_DAYS={configured}: the "
            f"servers still accept events up to {configured} days old, which the next run "
            "removes; lower APEX_RETENTION_DAYS too",
            err=True,
        )
    keep = days if days is not None else configured
    assert keep is not None
    source = "--days" if days is not None else "APEX_RETENTION_DAYS"
    with _engine() as engine:
        try:
            report = parts.apply_retention(engine, keep)
        except RuntimeError as error:
            raise click.ClickException(str(error)) from error
    click.echo(f"keeping {keep} days ({source})")
    for line in report.lines():
        click.echo(line)


@contextlib.contextmanager
def _engine() -> Iterator[Engine]:
    """An engine for maintenance (partitions, retention): no statement timeout.

    The servers' timeout is kept short so that callers get a 503 in time; moving a month of rows
    out of the default partition may take longer, and blocks no ingest call meanwhile.
    """
    from apex_ingest.server.database import create_db_engine

    settings = dataclasses.replace(load(ServerSettings), db_statement_timeout_ms=0)
    _require_schema(settings.database_url)
    engine = create_db_engine(settings.database_url, settings)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def _engine_connection() -> Iterator[Connection]:
    """One transaction on the configured database."""
    with _engine() as engine, engine.begin() as connection:
        yield connection


@main.group()
def projects() -> None:
    """Create, list and revoke project keys."""


@projects.command("create")
@click.argument("name")
@click.option("--key", default=None, help="Use this key instead of a generated one.")
@click.option(
    "--allowed-origin",
    "allowed_origins",
    multiple=True,
    help="Browser origin allowed to send events (repeatable); none: any origin.",
)
@click.option(
    "--redact-param",
    "redact_params",
    multiple=True,
    help="Query parameter whose value is stored as [redacted] in url and referrer, beside "
    "the built-in list of secret names (repeatable; whole name, any case).",
)
def projects_create(
    name: str, key: str | None, allowed_origins: tuple[str, ...], redact_params: tuple[str, ...]
) -> None:
    """Create a project and print its key."""
    from apex_ingest.server import projects as project_store

    try:
        with _session_factory().begin() as session:
            project = project_store.create_project(
                session, name, key, allowed_origins, redact_params
            )
            click.echo(project.key)
    except ConfigError:
        raise
    except project_store.InvalidKey as error:
        raise click.BadParameter(str(error), param_hint="--key") from error
    except project_store.InvalidParamName as error:
        raise click.BadParameter(str(error), param_hint="--redact-param") from error
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--allowed-origin") from error
    except Exception as error:
        from sqlalchemy.exc import IntegrityError

        if isinstance(error, IntegrityError):
            raise click.ClickException(f"a project with key {key!r} already exists") from error
        raise


@projects.command("list")
def projects_list() -> None:
    """List projects."""
    from apex_ingest.server import projects as project_store

    with _session_factory()() as session:
        for project in project_store.list_projects(session):
            state = f"revoked {project.revoked_at:%Y-%m-%d}" if project.revoked_at else "active"
            origins = ",".join(project.allowed_origins) or "*"
            redacted = ",".join(project.redact_params or ())
            extra = f"\tredact={redacted}" if redacted else ""
            click.echo(f"{project.key}\t{project.name}\t{state}\torigins={origins}{extra}")


@projects.command("revoke")
@click.argument("key")
def projects_revoke(key: str) -> None:
    """Revoke a project key (takes effect within APEX_PROJECT_CACHE_TTL seconds)."""
    from apex_ingest.server import projects as project_store

    with _session_factory().begin() as session:
        if not project_store.revoke_project(session, key):
            raise click.ClickException(f"no active project with key {key!r}")
    click.echo(f"revoked {key}")


@main.command()
def demo() -> None:
    """Migrate the database (as `db upgrade`), make sure a project named "demo" exists, print
    its key, the snippet tag for this gateway and curl examples."""
    from sqlalchemy import select

    from apex_ingest.ops.migrate import upgrade as run_upgrade
    from apex_ingest.server import projects as project_store
    from apex_ingest.server.models import Project

    settings = load(ServerSettings)
    # The one admin command that may create the database: through the migrations, like
    # `db upgrade` (what `make run` runs just before), never as an empty file.
    run_upgrade(settings.database_url)
    with _session_factory().begin() as session:
        project = session.scalars(
            select(Project).where(Project.name == "demo", Project.revoked_at.is_(None)).limit(1)
        ).first() or project_store.create_project(session, "demo")
        key = project.key
    base = f"http://{address_host(reachable_host(settings.host))}:{settings.http_port}"
    url = f"{base}/api/events"
    snippet = (
        f'{{"type":"pageview","visitorId":"v_123","projectKey":"{key}",'
        f'"url":"https://example.com/pricing","data":{{"plan":"pro","seats":3}}}}'
    )
    batch = (
        f'{{"projectKey":"{key}","userId":"user_42","events":['
        '{"type":"signup","url":"/signup","id":"evt-1","data":{"plan":"pro"}},'
        '{"type":"form_submit","url":"/contact","visitorId":"v_123"},'
        '{"type":"purchase","url":"/checkout","data":{"amount":49.90,"currency":"EUR"}}]}'
    )
    click.echo(f"\nDatabase: {_describe_database(settings.database_url)}")
    click.echo(f"Demo project key: {key}\n")
    click.echo("The snippet tag for a page (served from any origin) to send events here:")
    click.echo(f"  {snippet_tag(base, key)}\n")
    for title, body in (("A browser event", snippet), ("A server-side batch", batch)):
        click.echo(f"{title}:\n  curl -sS -X POST {url} -H 'Content-Type: application/json' \\")
        click.echo(f"    -d {shlex.quote(body)}\n")


def snippet_tag(base_url: str, key: str) -> str:
    """The tag a page needs to send events to the gateway at `base_url` (scheme included)."""
    return (
        f'<script async src="{html.escape(base_url)}/apex.js"'
        f' data-project-key="{html.escape(key)}"></script>'
    )


def _describe_database(url: str) -> str:
    """`url`, and for SQLite the absolute path of its file (relative paths depend on the
    directory the command runs in)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return f"{url} (the file {Path(parsed.database or '').resolve()})"
    return parsed.render_as_string(hide_password=True)


class NoDatabase(click.ClickException):
    """An admin command pointed at a database that does not exist or has no schema."""


def _require_schema(url: str) -> None:
    """Admin commands work on an existing, migrated database and never create one: a SQLite
    file that does not exist is not opened (SQLite would create it, empty)."""
    from sqlalchemy.engine import make_url

    from apex_ingest.ops.migrate import current_revision

    fix = (
        "set APEX_DATABASE_URL to the database the servers use, or run "
        "`apex-ingest db upgrade` first to create it here"
    )
    parsed = make_url(url)
    sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (
        None,
        "",
        ":memory:",
    )
    if sqlite_file and not Path(parsed.database or "").exists():
        raise NoDatabase(
            f"no database at {_describe_database(url)}: "
            f"APEX_DATABASE_URL is {'the default' if _is_default(url) else 'set'} "
            f"and relative paths start in {Path.cwd()}; {fix}"
        )
    if current_revision(url) is None:
        raise NoDatabase(f"the database {_describe_database(url)} has no Apex Ingest tables; {fix}")


def _is_default(url: str) -> bool:
    from apex_ingest.common.settings import DEFAULT_DATABASE_URL

    return url == DEFAULT_DATABASE_URL


def _session_factory() -> sessionmaker[Session]:
    from apex_ingest.server.database import create_db_engine, create_session_factory

    settings = load(ServerSettings)
    _require_schema(settings.database_url)
    return create_session_factory(create_db_engine(settings.database_url, settings))
