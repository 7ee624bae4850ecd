"""PeopleService: deletion, suppression and export of a person's data, over gRPC.

Authenticated exactly as ProjectService (`project_service.authenticate`: a secret key of the
project in the call's metadata; a public key is PERMISSION_DENIED). The work itself is
`people.py`, shared with `apex-ingest people`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server import people
from apex_ingest.server.project_service import (
    authenticate,
    page_limit,
    storage_errors_unavailable,
)
from apex_ingest.server.projects import ProjectDirectory
from apex_ingest.v1 import people_pb2, people_pb2_grpc

log = logging.getLogger(__name__)

#: The audit record's actor when the call names none.
DEFAULT_ACTOR = "grpc"


def _timestamp(value: datetime) -> Timestamp:
    if value.tzinfo is None:  # SQLite gives naive datetimes (UTC) back
        value = value.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _person(user_ids: object, visitor_ids: object, context: grpc.ServicerContext) -> people.Person:
    try:
        return people.Person.of(list(user_ids), list(visitor_ids))  # type: ignore[call-overload]
    except people.InvalidIds as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        raise  # abort raises; this line satisfies the type checker


class PeopleServicer(people_pb2_grpc.PeopleServiceServicer):
    def __init__(self, projects: ProjectDirectory, session_factory: sessionmaker[Session]) -> None:
        self._projects = projects
        self._factory = session_factory

    @storage_errors_unavailable
    def DeletePerson(
        self, request: people_pb2.DeletePersonRequest, context: grpc.ServicerContext
    ) -> people_pb2.DeletePersonResponse:
        project = authenticate(context, self._projects)
        person = _person(request.user_ids, request.visitor_ids, context)
        report = people.delete_person(
            self._factory,
            project.id,
            person,
            suppress=request.suppress,
            actor=request.actor or DEFAULT_ACTOR,
            via="grpc",
        )
        return people_pb2.DeletePersonResponse(
            events=report.events,
            identity_links=report.identity_links,
            dead_letters=report.dead_letters,
            suppressed=report.suppressed,
            audit_id=report.audit_id,
        )

    @storage_errors_unavailable
    def LiftSuppression(
        self, request: people_pb2.LiftSuppressionRequest, context: grpc.ServicerContext
    ) -> people_pb2.LiftSuppressionResponse:
        project = authenticate(context, self._projects)
        person = _person(request.user_ids, request.visitor_ids, context)
        lifted = people.lift_suppressions(
            self._factory, project.id, person, actor=request.actor or DEFAULT_ACTOR, via="grpc"
        )
        return people_pb2.LiftSuppressionResponse(lifted=lifted)

    @storage_errors_unavailable
    def ListSuppressions(
        self, request: people_pb2.ListSuppressionsRequest, context: grpc.ServicerContext
    ) -> people_pb2.ListSuppressionsResponse:
        project = authenticate(context, self._projects)
        limit = page_limit(request.limit, context)
        with self._factory() as session:
            rows = people.list_suppressions(session, project.id, limit, request.after_id)
            return people_pb2.ListSuppressionsResponse(
                suppressions=[
                    people_pb2.Suppression(
                        id=row.id,
                        kind=row.kind,
                        value=row.value,
                        created_at=_timestamp(row.created_at),
                        actor=row.actor,
                    )
                    for row in rows
                ]
            )

    @storage_errors_unavailable
    def ExportPerson(
        self, request: people_pb2.ExportPersonRequest, context: grpc.ServicerContext
    ) -> Iterator[people_pb2.ExportPersonResponse]:
        project = authenticate(context, self._projects)
        person = _person(request.user_ids, request.visitor_ids, context)
        for record in people.export_person(
            self._factory, project.id, person, actor=request.actor or DEFAULT_ACTOR, via="grpc"
        ):
            yield people_pb2.ExportPersonResponse(json=people.export_line(record))
