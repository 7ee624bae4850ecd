"""The `apex-ingest` command."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import os
import re
import shlex
import socket
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Connection, Engine
    from sqlalchemy.orm import Session, sessionmaker

    from apex_ingest.server.models import Project, ProjectKey

from apex_ingest.common.settings import (
    MAX_KEPT_DAYS,
    ConfigError,
    Internal,
    ProcessSettings,
    ServerSettings,
    address_host,
    cannot_listen,
    check_all,
    load,
    reachable_host,
)
from apex_ingest.common.settings import variable as setting_variable
from apex_ingest.ops import tsv

#: Commands that run servers: they log JSON lines unless APEX_LOG_FORMAT=text.
_SERVER_COMMANDS = frozenset({"serve", "grpc", "gateway", "loader"})


class BadSetting(click.ClickException):
    exit_code = 2


class _Commands(click.Group):
    """A bad setting or an unreachable database is one line naming it, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            raise BadSetting(str(error)) from None
        except Exception as error:
            # SQLAlchemy is imported only by the commands that use it: `serve` keeps it out of
            # its own process (and so out of the gateway workers it forks), ~20 MB each.
            exc = sys.modules.get("sqlalchemy.exc")
            if exc is None or not isinstance(error, exc.DBAPIError):
                raise
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
#: A row id (a key's, a dead letter's): a larger number than the databases' BIGINT would
#: fail in the driver (SQLite: OverflowError) instead of matching no row.
_ROW_ID = click.IntRange(1, 2**63 - 1)


@main.command()
@click.option("--processes", type=_COUNT, default=None, help="Server processes (default: cores).")
def grpc(processes: int | None) -> None:
    """Run the gRPC server alone."""
    check_all()
    settings = load(ServerSettings)
    count = _count(processes, load(ProcessSettings).grpc_processes)
    _ensure_ports_free(settings, "grpc_port", "metrics_port")
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
    # Before anything imports prometheus-client (gateway.serve does, with the app): it decides
    # at import whether samples go to the shared directory that /metrics adds up.
    prepare_multiprocess_dir()
    _ensure_ports_free(settings, "http_port")
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
    _ensure_ports_free(settings, "grpc_port", "http_port", "metrics_port")
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
            raise cannot_listen(host, port, variable, error) from None


def _ensure_ports_free(settings: ServerSettings, *fields: str) -> None:
    """`_ensure_free` for each port field this command listens on (unset ones skipped), and
    none given twice: two of our own servers on one port would fail only once started (the
    metrics server first, then granian with a panic)."""
    owners: dict[int, str] = {}
    for field in fields:
        port: int | None = getattr(settings, field)
        if port is None:
            continue
        name = setting_variable(field)
        if port in owners:
            raise ConfigError(f"{name} and {owners[port]} are both {port}: give each its own port")
        owners[port] = name
        _ensure_free(settings.host, port, name)


@main.group()
def stream() -> None:
    """Stream mode: the NATS JetStream stream between the servers and the database."""


def _stream_settings() -> ServerSettings:
    check_all()
    settings = load(ServerSettings)
    if not settings.stream_url:
        raise BadSetting("APEX_STREAM_URL is not set: stream mode needs a NATS server")
    return settings


@stream.command("setup")
def stream_setup() -> None:
    """Create the stream and the loaders' consumer, or check and update them."""
    import asyncio

    from apex_ingest.ops.loader import setup_stream

    settings = _stream_settings()
    try:
        done = asyncio.run(setup_stream(settings))
    except Exception as error:  # nats-py errors: one line, not a traceback
        raise click.ClickException(f"stream setup failed: {error!r}") from None
    for line in done:
        click.echo(line)


@main.command()
def loader() -> None:
    """Load the stream into the database (stream mode); run several to load faster."""
    from apex_ingest.ops.loader import run_loader

    settings = _stream_settings()
    _ensure_ports_free(settings, "loader_port")
    run_loader(settings)


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
def upgrade() -> None:
    """Apply every pending migration."""
    from apex_ingest.ops.migrate import current_revision, is_known_revision
    from apex_ingest.ops.migrate import upgrade as run_upgrade

    settings = load(ServerSettings)
    url, timeout = settings.database_url, settings.db_connect_timeout
    before = current_revision(url, timeout)
    if before is not None and not is_known_revision(before):
        # A newer release migrated it (a rolling upgrade): nothing for this one to do, and not
        # an error, or every older server would fail (and retry) its migration at start.
        click.echo(f"database is at revision {before}, newer than this release's migrations")
        return
    run_upgrade(url, connect_timeout=timeout)
    after = current_revision(url, timeout)
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
    type=click.IntRange(1, MAX_KEPT_DAYS),
    default=None,
    help=f"Keep this many days, 1-{MAX_KEPT_DAYS} (default: APEX_RETENTION_DAYS, what the "
    "servers use).",
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
    _require_schema(settings.database_url, settings.db_connect_timeout)
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
@click.option(
    "--ip-mode",
    type=click.Choice(["full", "truncated", "none"]),
    default="full",
    show_default=True,
    help="What is kept of client IPs (events, dead letters): all of it, its network (IPv4 /24, "
    "IPv6 /48), or nothing. The country is looked up first in every mode.",
)
@click.option(
    "--drop-bots",
    is_flag=True,
    help="Drop events flagged as bots (crawlers, headless browsers) instead of storing them "
    "with is_bot: they are answered as accepted and counted in apex_grpc_events_dropped.",
)
@click.option(
    "--cookieless",
    is_flag=True,
    help="Accept snippet events without visitorId: the server derives a visitor id that "
    "changes every day (docs/snippet.md, Cookieless mode).",
)
def projects_create(
    name: str,
    key: str | None,
    allowed_origins: tuple[str, ...],
    redact_params: tuple[str, ...],
    ip_mode: str,
    drop_bots: bool,
    cookieless: bool,
) -> None:
    """Create a project; print its public key, and its secret key once (on stderr).

    The public key (`pk_live_...`, sent with events) is the one line on stdout, for scripts;
    the secret key (`sk_live_...`, reads events and dead letters) is shown on stderr, this once:
    only its SHA-256 is stored.
    """
    from apex_ingest.server import projects as project_store

    try:
        with _session_factory().begin() as session:
            project_store.check_name(session, name)
            project = project_store.create_project(
                session,
                name,
                key,
                allowed_origins,
                redact_params,
                ip_mode,
                drop_bots,
                cookieless=cookieless,
            )
            secret = project_store.add_key(session, project.id, project_store.SECRET)
            public = project.key
    except ConfigError:
        raise
    except project_store.NameTaken as error:
        raise click.ClickException(f"{error}: choose another name") from error
    except project_store.InvalidName as error:
        raise click.BadParameter(str(error), param_hint="NAME") from error
    except project_store.KeyExists as error:
        raise click.ClickException(f"a project with key {key!r} already exists") from error
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
            redacted = ",".join(project.redact_params or ())
            extra = f"\tredact={redacted}" if redacted else ""
            if project.rate_limit:
                extra += f"\trate_limit={project.rate_limit}"
            if project.ip_mode != "full":
                extra += f"\tip_mode={project.ip_mode}"
            if project.drop_bots:
                extra += "\tdrop_bots"
            extra += "\tcookieless" if project.cookieless else ""
            click.echo(tsv.row(shown, project.name, state, f"origins={origins}") + extra)


_FORCE = click.option(
    "--force",
    is_flag=True,
    default=False,
    help="Revoke even the project's last active key of its kind (it then stops receiving "
    "events, or cannot be administered with a secret key).",
)


@projects.command("revoke")
@click.argument("key")
@_FORCE
def projects_revoke(key: str, force: bool) -> None:
    """Revoke a public or secret key of any project (takes effect within
    APEX_PROJECT_CACHE_TTL seconds).

    Only that key: the project's other keys stay valid. The last active key of a kind is kept
    unless --force, as with `projects keys revoke`.
    """
    from apex_ingest.server import projects as project_store

    with _session_factory().begin() as session:
        row = project_store.find_key(session, None, key)
        if row is None or row.revoked_at is not None:
            raise click.ClickException(f"no active project with key {key!r}")
        _revoke_key_row(session, row, force)
    click.echo(f"revoked {key}")


def _revoke_key_row(session: Session, row: ProjectKey, force: bool) -> None:
    """Revoke a ProjectKey row; the last active key of its kind only with --force."""
    from apex_ingest.server import projects as project_store

    try:
        revoked = project_store.revoke_key_row(session, row, allow_last=force)
    except project_store.LastKey as error:
        raise click.ClickException(
            f"{error}: add a new one first (`projects keys add`), or pass --force"
        ) from None
    if not revoked:
        raise click.ClickException(f"key {row.id} was revoked already")


def _project(session: Session, reference: str) -> Project:
    """A project named by a public key, its id or its (unique) name."""
    from sqlalchemy import select

    from apex_ingest.server import projects as project_store
    from apex_ingest.server.models import Project

    project = project_store.find_project(session, reference)
    if project is None and reference.isdigit():
        project = session.get(Project, int(reference))
    if project is None:
        named = session.scalars(select(Project).where(Project.name == reference)).all()
        if len(named) > 1:
            raise click.ClickException(
                f"{len(named)} projects are named {reference!r}: give a public key or an id"
            )
        project = named[0] if named else None
    if project is None:
        raise click.ClickException(f"no project {reference!r} (a public key, an id or a name)")
    return project


def _project_id(session: Session, reference: str) -> tuple[int, frozenset[str]]:
    """A project named by a public key, its id or its (unique) name: (id, allowed origins)."""
    project = _project(session, reference)
    return project.id, frozenset(project.allowed_origins)


_PROJECT = click.option(
    "--project", "project", required=True, help="The project: a public key, its id or its name."
)


@projects.group("keys")
def project_keys() -> None:
    """A project's keys: add, list, revoke (rotation).

    Public keys (pk_live_...) send events; secret keys (sk_live_...) read and administer. A
    project holds several of each; rotate by adding a new key, moving clients to it, then
    revoking the old one. A revoked key is refused (401 / UNAUTHENTICATED, like an unknown one)
    within APEX_PROJECT_CACHE_TTL seconds; events keep their project, whichever key sent them.
    """


_KIND = click.option(
    "--kind",
    type=click.Choice(["public", "secret"]),
    default="public",
    show_default=True,
    help="public: sends events; secret: reads and administers.",
)


@project_keys.command("add")
@_PROJECT
@_KIND
@click.option("--label", default="default", show_default=True, help="What you call the key.")
def project_keys_add(project: str, kind: str, label: str) -> None:
    """Give the project a new key and print it (a secret key is shown this once)."""
    from apex_ingest.server import projects as project_store

    if not 1 <= len(label.strip()) <= 200 or any(ord(ch) < 32 for ch in label):
        raise click.BadParameter(
            "a label is 1-200 characters, no control characters", param_hint="--label"
        )
    with _session_factory().begin() as session:
        project_id = _project(session, project).id
        key = project_store.add_key(session, project_id, kind, label=label.strip())
    click.echo(key)
    if kind == project_store.SECRET:
        click.echo(
            "secret key shown once (only its SHA-256 is stored): keep it safe; it reads and "
            "administers this project",
            err=True,
        )


@project_keys.command("list")
@_PROJECT
def project_keys_list(project: str) -> None:
    """Every key of the project, revoked ones too: id, kind, key, label, created, state.

    A secret key is shown by the start of its SHA-256 (the key itself is never stored).
    """
    from apex_ingest.server import projects as project_store

    with _session_factory()() as session:
        project_id = _project(session, project).id
        for row in project_store.list_keys(session, project_id):
            revoked = row.revoked_at
            state = "active" if revoked is None else f"revoked {revoked:%Y-%m-%d %H:%M:%S}"
            click.echo(
                f"{row.id}\t{row.kind}\t{project_store.shown_key(row)}\t{row.label}\t"
                f"{row.created_at:%Y-%m-%d %H:%M:%S}\t{state}"
            )


@project_keys.command("revoke")
@_PROJECT
@click.argument("key", required=False)
@click.option("--id", "key_id", type=_ROW_ID, default=None, help="The key's id (`keys list`).")
@_FORCE
def project_keys_revoke(project: str, key: str | None, key_id: int | None, force: bool) -> None:
    """Revoke one key, given as it is (a public or a secret key) or by --id.

    Refused within APEX_PROJECT_CACHE_TTL seconds; the project's other keys stay valid. The
    last active key of a kind is kept unless --force: add the new key first.
    """
    from apex_ingest.server import projects as project_store
    from apex_ingest.server.models import ProjectKey

    if (key is None) == (key_id is None):
        raise click.UsageError("give the key, or --id N")
    with _session_factory().begin() as session:
        project_id = _project(session, project).id
        if key_id is not None:
            row = session.get(ProjectKey, key_id)
            if row is not None and row.project_id != project_id:
                row = None
        else:
            assert key is not None
            row = project_store.find_key(session, project_id, key)
        if row is None:
            raise click.ClickException("no such key in this project")
        _revoke_key_row(session, row, force)
        shown = project_store.shown_key(row)
    click.echo(f"revoked {row.kind} key {shown} (id {row.id})")


def _with_setting_options(command: Any) -> Any:
    """Attach the options of every row of project_settings.SETTINGS to `command`."""
    from apex_ingest.ops.project_settings import SETTINGS

    for setting in SETTINGS:
        command.params.extend(setting.options)
    return command


@_with_setting_options
@projects.command("update")
@_PROJECT
def projects_update(project: str, **values: Any) -> None:
    """Change a project's settings (see the options); print what changed.

    Takes effect within APEX_PROJECT_CACHE_TTL seconds on running servers, without a restart.
    """
    from apex_ingest.ops.project_settings import apply_settings

    with _session_factory().begin() as session:
        row = _project(session, project)
        changes = apply_settings(row, values)
        if not changes:
            raise click.UsageError("nothing to change: give at least one setting's option")
        project_id = row.id
    for name, shown in changes:
        click.echo(f"project {project_id}: {name} = {shown}")


@main.group("dead-letters")
def dead_letters() -> None:
    """Events of refused requests: list, show, replay, purge."""


@dead_letters.command("list")
@_PROJECT
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
def dead_letters_list(project: str, limit: int) -> None:
    """The newest dead letters: id, time, reason, event type and id, violations."""
    import json

    from apex_ingest.server import deadletters

    with _session_factory()() as session:
        project_id, _ = _project_id(session, project)
        for letter in deadletters.list_dead_letters(session, project_id, limit):
            event = json.loads(letter.event)
            reasons = "; ".join(
                f"{v.field}: {v.description}" for v in deadletters.dead_letter_violations(letter)
            )
            click.echo(
                tsv.row(
                    letter.id,
                    f"{letter.received_at:%Y-%m-%d %H:%M:%S}",
                    letter.reason,
                    event.get("type", ""),
                    event.get("id", ""),
                    reasons or "valid: refused with its request",
                )
            )


@dead_letters.command("show")
@_PROJECT
@click.argument("letter_id", type=_ROW_ID)
def dead_letters_show(project: str, letter_id: int) -> None:
    """One dead letter as JSON."""
    import json

    from apex_ingest.server import deadletters
    from apex_ingest.server.models import DeadLetter

    with _session_factory()() as session:
        project_id, _ = _project_id(session, project)
        letter = session.get(DeadLetter, letter_id)
        if letter is None or letter.project_id != project_id:
            raise click.ClickException(f"no dead letter {letter_id} in this project")
        click.echo(
            json.dumps(
                {
                    "id": letter.id,
                    "received_at": letter.received_at.isoformat(),
                    "reason": letter.reason,
                    "violations": [
                        {"field": v.field, "description": v.description}
                        for v in deadletters.dead_letter_violations(letter)
                    ],
                    "event_index": letter.event_index,
                    "event": json.loads(letter.event),
                    "user_id": letter.user_id,
                    "origin": letter.origin,
                    "ip": letter.ip,
                    "user_agent": letter.user_agent,
                    "request_id": letter.request_id,
                },
                indent=2,
                ensure_ascii=False,
            )
        )


def _chosen(ids: tuple[int, ...], every: bool) -> list[int] | None:
    if every == bool(ids):
        raise click.UsageError("give dead letter ids, or --all")
    return None if every else list(ids)


def _require_letters(session: Session, project_id: int, ids: list[int] | None, done: str) -> None:
    """Refuse (doing nothing) ids that are no dead letter of the project: a mistyped id would
    otherwise read as done, `replayed 0` or `purged 0` and exit 0."""
    from sqlalchemy import select

    from apex_ingest.server.models import DeadLetter

    if ids is None:
        return
    found = session.scalars(
        select(DeadLetter.id).where(DeadLetter.project_id == project_id, DeadLetter.id.in_(ids))
    )
    missing = sorted(set(ids) - set(found))
    if missing:
        listed = ", ".join(map(str, missing))
        raise click.ClickException(f"no dead letter {listed} in this project; nothing {done}")


@dead_letters.command("replay")
@_PROJECT
@click.option("--all", "every", is_flag=True, help="Every dead letter of the project.")
@click.argument("ids", type=_ROW_ID, nargs=-1)
def dead_letters_replay(project: str, every: bool, ids: tuple[int, ...]) -> None:
    """Submit dead letters again through validation and storage.

    Those accepted become events and leave the dead letters; those refused again stay, with
    their new violations.
    """
    from apex_ingest.server import deadletters

    chosen = _chosen(ids, every)
    factory = _session_factory()
    with factory() as session:
        project_id, origins = _project_id(session, project)
        _require_letters(session, project_id, chosen, "replayed")
    result = deadletters.replay(factory, project_id, origins, chosen)
    click.echo(f"replayed {result.replayed}; {len(result.failed)} refused again")
    for letter in result.failed:
        reasons = "; ".join(
            f"{v.field}: {v.description}" for v in deadletters.dead_letter_violations(letter)
        )
        click.echo(tsv.row(letter.id, reasons))


@dead_letters.command("purge")
@_PROJECT
@click.option("--all", "every", is_flag=True, help="Every dead letter of the project.")
@click.argument("ids", type=_ROW_ID, nargs=-1)
def dead_letters_purge(project: str, every: bool, ids: tuple[int, ...]) -> None:
    """Delete dead letters."""
    from apex_ingest.server import deadletters

    chosen = _chosen(ids, every)
    with _session_factory().begin() as session:
        project_id, _ = _project_id(session, project)
        _require_letters(session, project_id, chosen, "purged")
        purged = deadletters.purge(session, project_id, chosen)
    click.echo(f"purged {purged}")


@main.group()
def events() -> None:
    """A project's events."""


def _feed_options(command: Any) -> Any:
    """The options `events list` and `events tail` share: the key, the server, the filters."""
    options = [
        click.option(
            "--secret-key",
            prompt="Secret key",
            hide_input=True,
            help="One of the project's secret keys (sk_live_...); asked for when not given.",
        ),
        click.option(
            "--project",
            default=None,
            help="Check that the key is this project's (a public key, its id or its name).",
        ),
        click.option(
            "--target", default=None, help="The gRPC server (default: APEX_GRPC_TARGET's)."
        ),
        click.option("--type", "event_type", default=None, help="Only events of this type."),
        click.option("--visitor", default=None, help="Only events of this visitor id."),
        click.option("--user", default=None, help="Only events of this user id."),
        click.option(
            "--since",
            default=None,
            help="Only those received since: an ISO 8601 time (UTC without an offset) or an "
            "age like 30s, 15m, 2h, 7d.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str | None) -> Any:
    """--since as a protobuf Timestamp, or None."""
    from google.protobuf.timestamp_pb2 import Timestamp

    if text is None:
        return None
    stamp = Timestamp()
    try:
        stamp.FromDatetime(_since_moment(text))
    except OverflowError:  # an age, or a time in another zone, that reaches before year 1
        raise click.BadParameter(
            f"{text.strip()!r} is before year 1", param_hint="--since"
        ) from None
    return stamp


def _since_moment(text: str) -> datetime:
    from datetime import UTC, datetime, timedelta

    age = re.fullmatch(r"\s*(\d{1,9})\s*([smhd])\s*", text)
    if age:
        return datetime.now(UTC) - timedelta(seconds=int(age[1]) * _AGE_UNITS[age[2]])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            "an ISO 8601 time (2026-12-02T10:00:00Z) or an age (30s, 15m, 2h, 7d)",
            param_hint="--since",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _feed_line(item: Any) -> tuple[str, int, int]:
    """One line for a TailEventsResponse, and the event / dead letter id it carries (or 0)."""
    import json

    if item.HasField("event"):
        event = item.event
        return (
            tsv.row(
                f"{event.received_at.ToDatetime():%Y-%m-%d %H:%M:%S}",
                "event",
                event.type,
                event.visitor_id or "-",
                event.user_id or "-",
                event.url,
                event.data,
            ),
            event.id,
            0,
        )
    letter = item.dead_letter
    reasons = "; ".join(f"{v.field}: {v.description}" for v in letter.violations)
    kept = json.loads(letter.event_json)
    return (
        tsv.row(
            f"{letter.received_at.ToDatetime():%Y-%m-%d %H:%M:%S}",
            "rejected",
            kept.get("type", ""),
            kept.get("visitor_id") or "-",
            letter.user_id or "-",
            kept.get("url", ""),
            reasons or letter.reason,
        ),
        0,
        letter.id,
    )


@contextlib.contextmanager
def _project_stub(
    secret_key: str, target: str | None, project: str | None
) -> Iterator[tuple[Any, tuple[tuple[str, str]]]]:
    """A ProjectService stub and the call metadata; with --project, the key checked first."""
    import grpc as grpc_lib

    from apex_ingest.common.settings import GatewaySettings
    from apex_ingest.v1 import project_pb2, project_pb2_grpc

    address = target or load(GatewaySettings).grpc_target
    metadata = (("authorization", f"Bearer {secret_key}"),)
    with grpc_lib.insecure_channel(address) as channel:
        stub = project_pb2_grpc.ProjectServiceStub(channel)  # type: ignore[no-untyped-call]
        if project is not None:
            try:
                info = stub.GetProject(
                    project_pb2.GetProjectRequest(), metadata=metadata, timeout=10
                )
            except grpc_lib.RpcError as error:
                raise click.ClickException(error.details() or error.code().name) from None
            names = {str(info.id), info.name, *info.public_keys}
            if project not in names:
                raise click.ClickException(
                    f"this secret key is project {info.id} ({info.name!r})'s, not {project!r}"
                )
        yield stub, metadata


def _check_rejected(rejected: bool, *filters: str | None) -> None:
    """Refuse --rejected asked for with a filter: the feed cannot filter refused requests'
    events by type or person, so it would show none without a word."""
    source = click.get_current_context().get_parameter_source("rejected")
    if rejected and any(filters) and source == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(
            "--rejected shows refused requests' events only without --type, --visitor and "
            "--user (`apex-ingest dead-letters list` shows them all)"
        )


def _feed_request(
    event_type: str | None, visitor: str | None, user: str | None, since: str | None, **more: Any
) -> Any:
    from apex_ingest.v1 import project_pb2

    request = project_pb2.TailEventsRequest(
        type=event_type or "", visitor_id=visitor or "", user_id=user or "", **more
    )
    moment = _since(since)
    if moment is not None:
        request.since.CopyFrom(moment)
    return request


_FATAL_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT")


@events.command("list")
@_feed_options
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="The newest this many events (and rejections, with --rejected), oldest first.",
)
@click.option(
    "--rejected/--no-rejected",
    default=False,
    show_default=True,
    help="Also the events of refused requests (dead letters; only without --type, --visitor, "
    "--user).",
)
def events_list(
    secret_key: str,
    project: str | None,
    target: str | None,
    event_type: str | None,
    visitor: str | None,
    user: str | None,
    since: str | None,
    limit: int,
    rejected: bool,
) -> None:
    """The newest events stored for the project of --secret-key, oldest first, then exit.

    One line each: received, kind, type, visitor, user, url, data. Reads
    ProjectService.TailEvents (backlog_only): the same feed as `events tail` and the debugger.
    """
    import grpc as grpc_lib

    _check_rejected(rejected, event_type, visitor, user)
    request = _feed_request(
        event_type, visitor, user, since, backlog=limit, backlog_only=True, events_only=not rejected
    )
    with _project_stub(secret_key, target, project) as (stub, metadata):
        try:
            # The server sends up to `limit` of each kind, oldest first: the last `limit` of
            # them are the newest of both together.
            newest = deque(stub.TailEvents(request, metadata=metadata, timeout=60), maxlen=limit)
        except grpc_lib.RpcError as error:
            raise click.ClickException(error.details() or error.code().name) from None
    for item in newest:
        click.echo(_feed_line(item)[0])


@events.command("tail")
@_feed_options
@click.option("--backlog", type=click.IntRange(0, 100), default=10, show_default=True)
@click.option(
    "--rejected/--no-rejected",
    default=True,
    show_default=True,
    help="Also the events of refused requests (dead letters; only without --type, --visitor, "
    "--user).",
)
def events_tail(
    secret_key: str,
    project: str | None,
    target: str | None,
    event_type: str | None,
    visitor: str | None,
    user: str | None,
    since: str | None,
    backlog: int,
    rejected: bool,
) -> None:
    """Follow the events stored for the project of --secret-key, and its dead letters.

    One line each (received, kind, type, visitor, user, url, data or reasons), as they are
    committed (whichever server stored them), until Ctrl-C. Uses ProjectService.TailEvents:
    the same live feed as the debugger page.
    """
    import time

    import grpc as grpc_lib

    _check_rejected(rejected, event_type, visitor, user)
    after_event = after_letter = 0
    with _project_stub(secret_key, target, project) as (stub, metadata):
        while True:
            request = _feed_request(
                event_type,
                visitor,
                user,
                since,
                after_event_id=after_event,
                after_dead_letter_id=after_letter,
                backlog=backlog if not (after_event or after_letter) else 0,
                events_only=not rejected,
            )
            try:
                for item in stub.TailEvents(request, metadata=metadata):
                    line, event_id, letter_id = _feed_line(item)
                    after_event = max(after_event, event_id)
                    after_letter = max(after_letter, letter_id)
                    click.echo(line)
            except grpc_lib.RpcError as error:
                if error.code().name in _FATAL_CODES:
                    raise click.ClickException(error.details() or error.code().name) from None
                click.echo(f"(feed interrupted: {error.code().name}; reconnecting)", err=True)
                time.sleep(1)
            if not (after_event or after_letter):
                backlog = 0


@main.command()
@click.option(
    "--ports-free",
    is_flag=True,
    help="Fail first if APEX_HTTP_PORT, APEX_GRPC_PORT or APEX_METRICS_PORT is taken "
    "(`make run`, before `serve`).",
)
def demo(ports_free: bool) -> None:
    """Migrate the database (as `db upgrade`), make sure a project named "demo" exists, print
    its key (and, when it creates the project, a secret key), the snippet tag for this gateway
    and curl examples."""
    from sqlalchemy import select

    from apex_ingest.ops.migrate import upgrade as run_upgrade
    from apex_ingest.server import projects as project_store
    from apex_ingest.server.models import Project, ProjectKey

    settings = load(ServerSettings)
    if ports_free:  # else a key and curl lines for a port `serve` is about to fail on
        _ensure_ports_free(settings, "grpc_port", "http_port", "metrics_port")
    # The one admin command that may create the database: through the migrations, like
    # `db upgrade` (what `make run` runs just before), never as an empty file.
    run_upgrade(settings.database_url, connect_timeout=settings.db_connect_timeout)
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
        secret = None
        if key is None:
            # A demo project whose public keys were all revoked gets a new one: a second project
            # named "demo" would break every `--project demo`.
            project_id = session.scalars(
                select(Project.id).where(Project.name == "demo").order_by(Project.id).limit(1)
            ).first()
            if project_id is None:
                project = project_store.create_project(session, "demo")
                key, project_id = project.key, project.id
            else:
                key = project_store.add_key(session, project_id, project_store.PUBLIC)
            # What the debugger and `events list`/`tail` ask for; only its digest is kept.
            secret = project_store.add_key(session, project_id, project_store.SECRET)
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
    click.echo(f"Demo project key: {key}")
    if secret is not None:
        click.echo(f"Demo secret key (shown this once; only its SHA-256 is kept): {secret}")
    else:
        click.echo(
            "Demo secret key: printed when the project was created; another one: "
            "apex-ingest projects keys add --project demo --kind secret"
        )
    click.echo(
        f"It reads the project's events: {base}/debugger, "
        "apex-ingest events tail --secret-key sk_live_...\n"
    )
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


def _require_schema(url: str, connect_timeout: float) -> None:
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
    if current_revision(url, connect_timeout) is None:
        raise NoDatabase(f"the database {_describe_database(url)} has no Apex Ingest tables; {fix}")


def _is_default(url: str) -> bool:
    from apex_ingest.common.settings import DEFAULT_DATABASE_URL

    return url == DEFAULT_DATABASE_URL


def _session_factory() -> sessionmaker[Session]:
    from apex_ingest.server.database import create_db_engine, create_session_factory

    settings = load(ServerSettings)
    _require_schema(settings.database_url, settings.db_connect_timeout)
    return create_session_factory(create_db_engine(settings.database_url, settings))


# Last: `people` (ops/people_cli.py) reads this module's helpers when it runs.
from apex_ingest.ops.people_cli import people as _people_group  # noqa: E402

main.add_command(_people_group)
