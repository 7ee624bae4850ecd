"""Identity (issue #18): identify and alias events, per-event user ids, the links they record
and the view `events_with_user`, on SQLite and on (partitioned) PostgreSQL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from sqlalchemy import text

from apex_ingest.server.database import create_db_engine
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project

Event = ingest_pb2.Event


def send(
    stub: ingest_pb2_grpc.IngestServiceStub, key: str, events: list[Event], user_id: str = ""
) -> int:
    response = stub.IngestEvents(
        ingest_pb2.IngestEventsRequest(project_key=key, user_id=user_id, events=events), timeout=5
    )
    return int(response.received)


def query(database_url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params))
    finally:
        engine.dispose()


def attributed(database_url: str) -> dict[str, str | None]:
    """event_id -> resolved_user_id, from the view."""
    return {
        row[0]: row[1]
        for row in query(database_url, "SELECT event_id, resolved_user_id FROM events_with_user")
    }


def links(database_url: str) -> list[tuple[str, str, str, bool]]:
    return [
        (row[0], row[1], row[2], bool(row[3]))
        for row in query(
            database_url,
            "SELECT visitor_id, user_id, source, conflict FROM identity_links ORDER BY id",
        )
    ]


def test_identify_attributes_earlier_anonymous_events(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    send(stub, key, [Event(id="a1", type="pageview", visitor_id="v1", url="/")])
    send(stub, key, [Event(id="a2", type="click", visitor_id="v1", url="/pricing")])
    send(stub, key, [Event(id="other", type="pageview", visitor_id="v2", url="/")])
    # An identify needs no url; its data are the user's traits.
    assert (
        send(
            stub,
            key,
            [Event(id="id1", type="identify", visitor_id="v1", data='{"plan":"pro"}')],
            user_id="u1",
        )
        == 1
    )
    send(stub, key, [Event(id="after", type="pageview", visitor_id="v1", user_id="u1", url="/")])

    seen = attributed(server.database_url)
    assert seen == {"a1": "u1", "a2": "u1", "id1": "u1", "after": "u1", "other": None}
    # The events themselves are not rewritten.
    rows = query(server.database_url, "SELECT event_id, user_id, url, data FROM events")
    stored = {row[0]: row for row in rows}
    assert stored["a1"][1] is None
    assert stored["id1"][2] == ""
    assert "pro" in str(stored["id1"][3])
    assert links(server.database_url) == [("v1", "u1", "identify", False)]


def test_a_second_user_on_a_visitor_is_recorded_not_merged(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    send(stub, key, [Event(id="anon", type="pageview", visitor_id="v1", url="/")])
    send(stub, key, [Event(id="i1", type="identify", visitor_id="v1", user_id="alice")])
    send(stub, key, [Event(id="i2", type="identify", visitor_id="v1", user_id="bob")])
    # Repeating the first identify changes nothing.
    send(stub, key, [Event(id="i3", type="identify", visitor_id="v1", user_id="alice")])

    assert links(server.database_url) == [
        ("v1", "alice", "identify", False),
        ("v1", "bob", "identify", True),
    ]
    seen = attributed(server.database_url)
    # The anonymous event stays with the first user; each identify keeps its own user.
    assert seen == {"anon": "alice", "i1": "alice", "i2": "bob", "i3": "alice"}


def test_two_users_for_a_new_visitor_in_one_request(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    send(
        stub,
        key,
        [
            Event(id="e0", type="pageview", visitor_id="v9", url="/"),
            Event(id="e1", type="identify", visitor_id="v9", user_id="zed"),
            Event(id="e2", type="identify", visitor_id="v9", user_id="amy"),
        ],
    )
    # The first in the request wins, whatever the order of the names.
    assert attributed(server.database_url)["e0"] == "zed"
    assert sorted(links(server.database_url)) == [
        ("v9", "amy", "identify", True),
        ("v9", "zed", "identify", False),
    ]


def test_a_repeated_event_id_shows_only_its_first_rows_link(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    """The second event of an id is not stored: its user id links nothing, on either
    database (SQLite's insert and PostgreSQL's group commit)."""
    key = make_project(server.database_url)
    send(
        stub,
        key,
        [
            Event(id="same", type="identify", visitor_id="v7", user_id="first"),
            Event(id="same", type="identify", visitor_id="v7", user_id="second"),
        ],
    )
    assert attributed(server.database_url) == {"same": "first"}
    assert links(server.database_url) == [("v7", "first", "identify", False)]


def test_alias_and_per_event_user_ids(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    send(stub, key, [Event(id="old", type="pageview", visitor_id="anon-7", url="/")])
    send(
        stub,
        key,
        [
            Event(id="al", type="alias", previous_id="anon-7"),
            # The event's own user id overrides the batch's.
            Event(id="mine", type="signup", url="/signup", user_id="someone-else"),
        ],
        user_id="u7",
    )
    stored = dict(query(server.database_url, "SELECT event_id, user_id FROM events"))
    assert stored == {"old": None, "al": "u7", "mine": "someone-else"}
    assert links(server.database_url) == [("anon-7", "u7", "alias", False)]
    assert attributed(server.database_url)["old"] == "u7"


def test_any_event_with_both_ids_links_them(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    send(stub, key, [Event(id="x1", type="pageview", visitor_id="v3", url="/")])
    for n in range(3):
        send(stub, key, [Event(id=f"y{n}", type="click", visitor_id="v3", url="/")], user_id="u3")
    assert links(server.database_url) == [("v3", "u3", "event", False)]
    first, last = query(server.database_url, "SELECT first_seen, last_seen FROM identity_links")[0]
    assert first <= last
    assert attributed(server.database_url)["x1"] == "u3"


@pytest.mark.parametrize(
    ("event", "user_id", "field"),
    [
        (Event(type="identify", visitor_id="v"), "", "events[0].user_id"),
        (Event(type="alias", user_id="u"), "", "events[0].previous_id"),
        (Event(type="pageview", url="/", previous_id="p"), "u", "events[0].previous_id"),
        (Event(type="pageview", visitor_id="v"), "u", "events[0].url"),
        (Event(type="click", url="/", user_id="x" * 129), "", "events[0].user_id"),
        (Event(type="identify", user_id="u", visitor_id="v", data="[1]"), "", "events[0].data"),
    ],
)
def test_identity_rules(
    server: RunningServer,
    stub: ingest_pb2_grpc.IngestServiceStub,
    event: Event,
    user_id: str,
    field: str,
) -> None:
    from grpc_status import rpc_status

    from apex_ingest.common.rpc import field_violations

    key = make_project(server.database_url)
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, key, [event], user_id=user_id)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [name for name, _ in field_violations(rpc_status.from_call(caught.value))]
    assert field in fields
    assert query(server.database_url, "SELECT count(*) FROM identity_links")[0][0] == 0
