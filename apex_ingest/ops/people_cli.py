"""`apex-ingest people`: delete, suppress, unsuppress and export a person's data.

The work is `apex_ingest.server.people`, shared with PeopleService (gRPC). Every command but
`suppressions` writes a `privacy_audit` row: who (`--actor`, else the OS user), when, the ids
as their SHA-256, and how many rows of each table.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from apex_ingest.ops import tsv

if TYPE_CHECKING:
    from apex_ingest.server.people import Person


@click.group()
def people() -> None:
    """A person's data on request: delete (and suppress), unsuppress, export."""


_PROJECT = click.option(
    "--project", "project", required=True, help="The project: a public key, its id or its name."
)
_USERS = click.option(
    "--user-id", "user_ids", multiple=True, help="A user id of the person (repeatable)."
)
_VISITORS = click.option(
    "--visitor-id", "visitor_ids", multiple=True, help="A visitor id of the person (repeatable)."
)
_IDS_FILE = click.option(
    "--ids-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A UTF-8 file of ids, one a line: a user id, or `visitor:ID` for a visitor id "
    "(`user:ID` also reads as a user id); blank lines and lines starting with # are skipped.",
)
_ACTOR = click.option(
    "--actor", default=None, help="Who asks, for the audit record (default: the OS user)."
)


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (containers): still audited
        return "unknown"


def _read_ids_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise click.BadParameter(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start})",
            param_hint="--ids-file",
        ) from None
    except OSError as error:
        raise click.BadParameter(
            f"cannot read {path}: {error.strerror}", param_hint="--ids-file"
        ) from None


def _open_output(path: Path) -> TextIO:
    """--output opened for writing; a path that cannot be written is a bad --output, said
    before anything is exported (and audited)."""
    try:
        return path.open("w", encoding="utf-8")
    except OSError as error:
        raise click.BadParameter(
            f"cannot write {path}: {error.strerror}", param_hint="--output"
        ) from None


def _people(
    user_ids: tuple[str, ...], visitor_ids: tuple[str, ...], ids_file: Path | None
) -> Iterator[Person]:
    """The ids given, as requests of at most people.MAX_IDS ids each."""
    from apex_ingest.server.people import MAX_IDS, InvalidIds, Person

    users, visitors = list(user_ids), list(visitor_ids)
    if ids_file is not None:
        for raw in _read_ids_file(ids_file).splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("visitor:"):
                visitors.append(line.removeprefix("visitor:"))
            else:
                users.append(line.removeprefix("user:"))
    if not users and not visitors:
        raise click.UsageError("give --user-id, --visitor-id or --ids-file")
    tagged = [(True, u) for u in users] + [(False, v) for v in visitors]
    for start in range(0, len(tagged), MAX_IDS):
        chunk = tagged[start : start + MAX_IDS]
        try:
            yield Person.of([v for is_user, v in chunk if is_user], [v for u, v in chunk if not u])
        except InvalidIds as error:
            raise click.BadParameter(str(error)) from error


@people.command("delete")
@_PROJECT
@_USERS
@_VISITORS
@_IDS_FILE
@click.option(
    "--suppress",
    is_flag=True,
    help="Also drop the person's later events at ingest (answered 200, counted in "
    "apex_grpc_events_suppressed) until `people unsuppress`.",
)
@_ACTOR
def people_delete(
    project: str,
    user_ids: tuple[str, ...],
    visitor_ids: tuple[str, ...],
    ids_file: Path | None,
    suppress: bool,
    actor: str | None,
) -> None:
    """Delete a person's events, identity links and dead letters.

    A user id also deletes the anonymous events of the visitors first identified as that
    user. Rows go in transactions of 1000, so ingestion carries on meanwhile; events arriving
    during the deletion may survive it unless --suppress is given.
    """
    from apex_ingest.ops.cli import _project_id, _session_factory
    from apex_ingest.server import people as store

    factory = _session_factory()
    with factory() as session:
        project_id, _ = _project_id(session, project)
    for person in _people(user_ids, visitor_ids, ids_file):
        report = store.delete_person(
            factory, project_id, person, suppress=suppress, actor=_actor(actor), via="cli"
        )
        click.echo(
            f"deleted {report.events} events, {report.identity_links} identity links, "
            f"{report.dead_letters} dead letters ({len(person.user_ids)} user ids, "
            f"{len(person.visitor_ids)} visitor ids, {report.linked_visitors} linked visitors); "
            f"{report.suppressed} ids newly suppressed; audit record {report.audit_id}"
        )


@people.command("unsuppress")
@_PROJECT
@_USERS
@_VISITORS
@_IDS_FILE
@_ACTOR
def people_unsuppress(
    project: str,
    user_ids: tuple[str, ...],
    visitor_ids: tuple[str, ...],
    ids_file: Path | None,
    actor: str | None,
) -> None:
    """Lift a suppression: the ids' events are stored again (within APEX_PROJECT_CACHE_TTL)."""
    from apex_ingest.ops.cli import _project_id, _session_factory
    from apex_ingest.server import people as store

    factory = _session_factory()
    with factory() as session:
        project_id, _ = _project_id(session, project)
    lifted = 0
    for person in _people(user_ids, visitor_ids, ids_file):
        lifted += store.lift_suppressions(
            factory, project_id, person, actor=_actor(actor), via="cli"
        )
    click.echo(f"lifted {lifted} suppressions")


@people.command("suppressions")
@_PROJECT
def people_suppressions(project: str) -> None:
    """List the project's suppressed ids: id, kind, value, since, by whom."""
    from apex_ingest.ops.cli import _project_id, _session_factory
    from apex_ingest.server import people as store

    with _session_factory()() as session:
        project_id, _ = _project_id(session, project)
        after = 0
        while True:
            rows = store.list_suppressions(session, project_id, 1000, after)
            for row in rows:
                created = f"{row.created_at:%Y-%m-%d %H:%M:%S}"
                click.echo(tsv.row(row.id, row.kind, row.value, created, row.actor))
            if len(rows) < 1000:
                return
            after = rows[-1].id


@people.command("export")
@_PROJECT
@_USERS
@_VISITORS
@_IDS_FILE
@_ACTOR
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write here instead of stdout.",
)
def people_export(
    project: str,
    user_ids: tuple[str, ...],
    visitor_ids: tuple[str, ...],
    ids_file: Path | None,
    actor: str | None,
    output: Path | None,
) -> None:
    """Export a person's data as JSON lines: every event ({"record": "event", ...}), then
    every identity link ({"record": "identity_link", ...}). What `people delete` would delete,
    dead letters aside (`dead-letters list` shows those)."""
    from apex_ingest.ops.cli import _project_id, _session_factory
    from apex_ingest.server import people as store

    factory = _session_factory()
    with factory() as session:
        project_id, _ = _project_id(session, project)
    sink = _open_output(output) if output is not None else None
    try:
        for person in _people(user_ids, visitor_ids, ids_file):
            for record in store.export_person(
                factory, project_id, person, actor=_actor(actor), via="cli"
            ):
                line = store.export_line(record)
                if sink is not None:
                    sink.write(line + "\n")
                else:
                    click.echo(line)
    finally:
        if sink is not None:
            sink.close()
