"""TailEvents' filters and backlog_only (issue #18 item 5): what `events list|tail` read."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from apex_ingest.v1 import ingest_pb2, project_pb2
from tests.conftest import RunningServer
from tests.server.test_dead_letters import dead_letters
from tests.server.test_project_service import admin, bearer, ingest, new_project, refuse
from tests.service import wait_for

Event = ingest_pb2.Event


def send(channel: grpc.Channel, key: str, user: str, *events: Event) -> None:
    ingest(channel).IngestEvents(
        ingest_pb2.IngestEventsRequest(project_key=key, user_id=user, events=events), timeout=5
    )


def test_a_filtered_tail_follows_only_matching_events(
    server: RunningServer, channel: grpc.Channel
) -> None:
    public, secret = new_project(server.database_url)
    send(channel, public, "", Event(id="old-click", type="click", url="/old", visitor_id="v1"))
    stream = admin(channel).TailEvents(
        project_pb2.TailEventsRequest(type="click", visitor_id="v1", backlog=5),
        metadata=bearer(secret),
        timeout=20,
    )
    seen: list[project_pb2.TailEventsResponse] = []

    def read() -> None:
        try:
            for item in stream:
                seen.append(item)
                if len(seen) == 2:
                    return
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    send(channel, public, "", Event(id="signup", type="signup", url="/s", visitor_id="v1"))
    send(channel, public, "", Event(id="other-visitor", type="click", url="/o", visitor_id="v2"))
    refuse(channel, public, [Event(id="bad", type="click", url="nope", visitor_id="v1")])
    send(channel, public, "", Event(id="new-click", type="click", url="/n", visitor_id="v1"))
    reader.join(15)
    stream.cancel()
    # The backlog's match, then the new one; no dead letter under a filter on type or person.
    assert [item.WhichOneof("item") for item in seen] == ["event", "event"]
    assert [item.event.event_id for item in seen] == ["old-click", "new-click"]


def test_backlog_only_lists_and_ends(server: RunningServer, channel: grpc.Channel) -> None:
    public, secret = new_project(server.database_url)
    for n in range(5):
        send(channel, public, f"u{n % 2}", Event(id=f"e{n}", type="t", url=f"/{n}"))
    refuse(channel, public, [Event(id="bad", type="t", url="nope")])
    # Dead letters are written by a thread of their own, after the answer.
    assert wait_for(lambda: len(dead_letters(server.database_url)) == 1, 15) is not None
    stub = admin(channel)

    def listed(**fields: object) -> list[str]:
        answers = stub.TailEvents(
            project_pb2.TailEventsRequest(backlog_only=True, **fields),  # type: ignore[arg-type]
            metadata=bearer(secret),
            timeout=10,
        )
        return [
            item.event.event_id if item.HasField("event") else "dead:" + str(item.dead_letter.id)
            for item in answers  # the stream ends by itself: no cancel, no timeout needed
        ]

    every = listed()
    assert [x for x in every if not x.startswith("dead:")] == ["e0", "e1", "e2", "e3", "e4"]
    assert len([x for x in every if x.startswith("dead:")]) == 1
    assert listed(events_only=True, backlog=2) == ["e3", "e4"]  # the newest two, oldest first
    assert listed(user_id="u1") == ["e1", "e3"]
    first_id = next(
        iter(
            stub.TailEvents(
                project_pb2.TailEventsRequest(backlog_only=True, events_only=True, backlog=1000),
                metadata=bearer(secret),
                timeout=10,
            )
        )
    ).event.id
    assert listed(after_event_id=first_id, events_only=True, backlog=2) == ["e1", "e2"]  # pages on
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    assert listed(since=future) == []
    assert listed(since=past, events_only=True) == ["e0", "e1", "e2", "e3", "e4"]
