"""The `apex-ingest` command."""

from __future__ import annotations

import logging
import os
import shlex

import click
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.config import Settings


@click.group()
def main() -> None:
    """Apex Ingest: the event-ingestion service of Apex."""
    logging.basicConfig(
        level=os.environ.get("APEX_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option("--processes", type=int, default=None, help="Server processes (default: CPU cores).")
def grpc(processes: int | None) -> None:
    """Run the gRPC server alone."""
    settings = Settings.from_env()
    count = _count(processes, "APEX_GRPC_PROCESSES")
    if count == 1:
        from apex_ingest.server import serve

        serve(settings)
    else:
        from apex_ingest.supervisor import run_grpc_processes

        run_grpc_processes(settings, count)


@main.command()
@click.option("--workers", type=int, default=None, help="Worker processes (default: CPU cores).")
def gateway(workers: int | None) -> None:
    """Run the HTTP gateway alone (granian)."""
    from gateway.serve import run_gateway

    settings = Settings.from_env()
    run_gateway(settings.host, settings.http_port, _count(workers, "APEX_HTTP_WORKERS"))


@main.command()
@click.option("--workers", type=int, default=None, help="Gateway worker processes.")
@click.option("--grpc-processes", type=int, default=None, help="gRPC server processes.")
def serve(workers: int | None, grpc_processes: int | None) -> None:
    """Run the gRPC server and the HTTP gateway together."""
    from apex_ingest.supervisor import serve_all

    serve_all(
        Settings.from_env(),
        _count(workers, "APEX_HTTP_WORKERS"),
        _count(grpc_processes, "APEX_GRPC_PROCESSES"),
    )


def _count(option: int | None, variable: str) -> int:
    """A process count: the option, else the variable, else the CPU cores."""
    if option:
        return option
    raw = os.environ.get(variable, "").strip()
    return int(raw) if raw else (os.cpu_count() or 1)


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
def upgrade() -> None:
    """Apply every pending migration."""
    from apex_ingest.migrate import upgrade as run_upgrade

    run_upgrade(Settings.from_env().database_url)
    click.echo("database is up to date")


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
    """Create a project and print its key."""
    from apex_ingest import projects as project_store

    try:
        with _session_factory().begin() as session:
            project = project_store.create_project(session, name, key, allowed_origins)
            click.echo(project.key)
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
    from apex_ingest import projects as project_store

    with _session_factory()() as session:
        for project in project_store.list_projects(session):
            state = f"revoked {project.revoked_at:%Y-%m-%d}" if project.revoked_at else "active"
            origins = ",".join(project.allowed_origins) or "*"
            click.echo(f"{project.key}\t{project.name}\t{state}\torigins={origins}")


@projects.command("revoke")
@click.argument("key")
def projects_revoke(key: str) -> None:
    """Revoke a project key (takes effect within APEX_PROJECT_CACHE_TTL seconds)."""
    from apex_ingest import projects as project_store

    with _session_factory().begin() as session:
        if not project_store.revoke_project(session, key):
            raise click.ClickException(f"no active project with key {key!r}")
    click.echo(f"revoked {key}")


@main.command()
def demo() -> None:
    """Make sure a project named "demo" exists; print its key and curl examples."""
    from sqlalchemy import select

    from apex_ingest import projects as project_store
    from apex_ingest.models import Project

    settings = Settings.from_env()
    with _session_factory().begin() as session:
        project = session.scalars(
            select(Project).where(Project.name == "demo", Project.revoked_at.is_(None)).limit(1)
        ).first() or project_store.create_project(session, "demo")
        key = project.key
    url = f"http://{_display_host(settings.host)}:{settings.http_port}/api/events"
    snippet = (
        f'{{"type":"pageview","visitorId":"v_123","projectKey":"{key}",'
        f'"url":"https://example.com/pricing","data":{{"plan":"pro","seats":3}}}}'
    )
    click.echo(f"\nDemo project key: {key}\n\nSend an event:\n")
    click.echo(
        f"  curl -sS -X POST {url} -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(snippet)}\n"
    )


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _session_factory() -> sessionmaker[Session]:
    from apex_ingest.database import create_db_engine, create_session_factory

    settings = Settings.from_env()
    return create_session_factory(create_db_engine(settings.database_url, settings))
