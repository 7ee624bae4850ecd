"""The `apex-ingest` command."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
from collections.abc import Iterator
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
@click.option("--days", type=click.IntRange(min=1), required=True, help="Keep this many days.")
def retention(days: int) -> None:
    """PostgreSQL: drop the monthly partitions of events older than --days (whole months)."""
    from apex_ingest.ops import partitions as parts

    with _engine() as engine:
        try:
            dropped = parts.apply_retention(engine, days)
        except RuntimeError as error:
            raise click.ClickException(str(error)) from error
    click.echo("dropped " + ", ".join(dropped) if dropped else "no partition is old enough")


@contextlib.contextmanager
def _engine() -> Iterator[Engine]:
    """An engine for maintenance (partitions, retention): no statement timeout.

    The servers' timeout is kept short so that callers get a 503 in time; moving a month of rows
    out of the default partition may take longer, and blocks no ingest call meanwhile.
    """
    from apex_ingest.server.database import create_db_engine

    settings = load(ServerSettings).model_copy(update={"db_statement_timeout_ms": 0})
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
def projects_create(name: str, key: str | None, allowed_origins: tuple[str, ...]) -> None:
    """Create a project; print its public key, and its secret key once (on stderr).

    The public key (`pk_live_...`, sent with events) is the one line on stdout, for scripts;
    the secret key (`sk_live_...`, reads events and dead letters) is shown on stderr, this once:
    only its SHA-256 is stored.
    """
    from apex_ingest.server import projects as project_store

    try:
        with _session_factory().begin() as session:
            project = project_store.create_project(session, name, key, allowed_origins)
            secret = project_store.add_key(session, project.id, project_store.SECRET)
            public = project.key
    except ConfigError:
        raise
    except project_store.KeyExists as error:
        raise click.ClickException(f"a project with key {key!r} already exists") from error
    except project_store.InvalidKey as error:
        raise click.BadParameter(str(error), param_hint="--key") from error
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--allowed-origin") from error
    except Exception as error:
        from sqlalchemy.exc import IntegrityError

        if isinstance(error, IntegrityError):
            raise click.ClickException(f"a project with key {key!r} already exists") from error
        raise
    click.echo(public)
    click.echo(
        f"secret key (shown once, keep it safe; it reads this project's events): {secret}",
        err=True,
    )


@projects.command("list")
def projects_list() -> None:
    """List projects."""
    from apex_ingest.server import projects as project_store

    with _session_factory()() as session:
        for project in project_store.list_projects(session):
            keys = project_store.active_public_keys(session, project.id)
            state = "active" if keys else "revoked"
            origins = ",".join(project.allowed_origins) or "*"
            shown = keys[0] if keys else project.key
            click.echo(f"{shown}\t{project.name}\t{state}\torigins={origins}")


@projects.command("revoke")
@click.argument("key")
def projects_revoke(key: str) -> None:
    """Revoke a public or secret key (takes effect within APEX_PROJECT_CACHE_TTL seconds).

    Only that key: the project's other keys stay valid.
    """
    from apex_ingest.server import projects as project_store

    with _session_factory().begin() as session:
        if not (
            project_store.revoke_key(session, project_store.PUBLIC, key)
            or project_store.revoke_key(session, project_store.SECRET, key)
        ):
            raise click.ClickException(f"no active project with key {key!r}")
    click.echo(f"revoked {key}")


@main.command()
def demo() -> None:
    """Make sure a project named "demo" exists; print its key and curl examples."""
    from sqlalchemy import select

    from apex_ingest.server import projects as project_store
    from apex_ingest.server.models import Project, ProjectKey

    settings = load(ServerSettings)
    with _session_factory().begin() as session:
        key = session.scalars(
            select(ProjectKey.key)
            .join(Project, Project.id == ProjectKey.project_id)
            .where(
                Project.name == "demo",
                ProjectKey.kind == project_store.PUBLIC,
                ProjectKey.revoked_at.is_(None),
            )
            .order_by(ProjectKey.id)
            .limit(1)
        ).first()
        if key is None:
            key = project_store.create_project(session, "demo").key
    url = f"http://{address_host(reachable_host(settings.host))}:{settings.http_port}/api/events"
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
    click.echo(f"\nDemo project key: {key}\n")
    for title, body in (("A browser event", snippet), ("A server-side batch", batch)):
        click.echo(f"{title}:\n  curl -sS -X POST {url} -H 'Content-Type: application/json' \\")
        click.echo(f"    -d {shlex.quote(body)}\n")


def _session_factory() -> sessionmaker[Session]:
    from apex_ingest.server.database import create_db_engine, create_session_factory

    settings = load(ServerSettings)
    return create_session_factory(create_db_engine(settings.database_url, settings))
