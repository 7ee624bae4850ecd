"""ProjectService (issue #17): dead letters listed, replayed, purged; the live feed; secret keys."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import SECRET, add_key, create_project
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc, project_pb2, project_pb2_grpc
from tests.conftest import RunningServer, start_server
from tests.server.test_dead_letters import count_events, dead_letters

Event = ingest_pb2.Event


def new_project(database_url: str, origins: tuple[str, ...] = ()) -> tuple[str, str]:
    """(public key, secret key) of a new project."""
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            project = create_project(session, "p", allowed_origins=origins)
            return project.key, add_key(session, project.id, SECRET)
    finally:
        engine.dispose()


def bearer(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


def ingest(channel: grpc.Channel) -> ingest_pb2_grpc.IngestServiceStub:
    return ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]


def admin(channel: grpc.Channel) -> project_pb2_grpc.ProjectServiceStub:
    return project_pb2_grpc.ProjectServiceStub(channel)  # type: ignore[no-untyped-call]


def refuse(channel: grpc.Channel, key: str, events: list[Event], origin: str = "") -> None:
    with pytest.raises(grpc.RpcError):
        ingest(channel).IngestEvents(
            ingest_pb2.IngestEventsRequest(
                project_key=key, events=events, context=ingest_pb2.RequestContext(origin=origin)
            ),
            timeout=5,
        )


def calls(stub: project_pb2_grpc.ProjectServiceStub) -> dict[str, Any]:
    return {
        "list": lambda md: stub.ListDeadLetters(
            project_pb2.ListDeadLettersRequest(), metadata=md, timeout=5
        ),
        "replay": lambda md: stub.ReplayDeadLetters(
            project_pb2.ReplayDeadLettersRequest(all=True), metadata=md, timeout=5
        ),
        "purge": lambda md: stub.PurgeDeadLetters(
            project_pb2.PurgeDeadLettersRequest(all=True), metadata=md, timeout=5
        ),
        "tail": lambda md: next(
            iter(stub.TailEvents(project_pb2.TailEventsRequest(), metadata=md, timeout=1))
        ),
    }


def test_every_call_needs_a_secret_key(server: RunningServer, channel: grpc.Channel) -> None:
    public, secret = new_project(server.database_url)
    _, other_secret = new_project(server.database_url)
    for name, call in calls(admin(channel)).items():
        for metadata, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (bearer("sk_live_made_up"), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(public), grpc.StatusCode.PERMISSION_DENIED),
            ((("x-apex-secret-key", public),), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(metadata)
            assert refused.value.code() == code, (name, metadata)
    # The right key is accepted, in either header.
    assert (
        len(
            admin(channel)
            .ListDeadLetters(
                project_pb2.ListDeadLettersRequest(),
                metadata=(("x-apex-secret-key", secret),),
                timeout=5,
            )
            .dead_letters
        )
        == 0
    )
    # Another project's secret key reads that project, not this one (nothing there).
    assert (
        admin(channel)
        .ListDeadLetters(
            project_pb2.ListDeadLettersRequest(), metadata=bearer(other_secret), timeout=5
        )
        .dead_letters
        == []
    )


def test_list_replay_and_purge(server: RunningServer, channel: grpc.Channel) -> None:
    public, secret = new_project(server.database_url, origins=("https://shop.example",))
    other_public, _ = new_project(server.database_url)
    refuse(channel, public, [Event(id="o-1", type="a", url="/")], origin="https://new.example")
    refuse(
        channel,
        public,
        [Event(id="ok-1", type="b", url="/b"), Event(id="bad-1", type="c", url="nope")],
    )
    refuse(channel, other_public, [Event(type="", url="/")])
    dead_letters(server.database_url, wait_for=4)
    stub = admin(channel)
    listed = stub.ListDeadLetters(
        project_pb2.ListDeadLettersRequest(), metadata=bearer(secret), timeout=5
    ).dead_letters
    assert [json.loads(d.event_json)["id"] for d in listed] == ["bad-1", "ok-1", "o-1"]
    assert listed[0].violations[0].field == "events[1].url"
    assert listed[2].reason == "permission_denied" and listed[2].origin == "https://new.example"
    page = stub.ListDeadLetters(
        project_pb2.ListDeadLettersRequest(limit=1, before_id=listed[0].id),
        metadata=bearer(secret),
        timeout=5,
    ).dead_letters
    assert [d.id for d in page] == [listed[1].id]

    # The cause fixed (the origin allowed), a replay stores what is valid now.
    engine = create_db_engine(server.database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE projects SET allowed_origins = '[]'"))
    engine.dispose()
    time.sleep(0.1)
    result = stub.ReplayDeadLetters(
        project_pb2.ReplayDeadLettersRequest(all=True), metadata=bearer(secret), timeout=10
    )
    assert result.replayed == 2
    assert [json.loads(d.event_json)["id"] for d in result.failed] == ["bad-1"]
    assert result.failed[0].violations[0].field == "events[1].url"
    assert count_events(server.database_url) == 2
    again = stub.ReplayDeadLetters(
        project_pb2.ReplayDeadLettersRequest(ids=[listed[0].id]), metadata=bearer(secret), timeout=5
    )
    assert again.replayed == 0 and len(again.failed) == 1  # still failing, still kept
    # Another project's dead letters are out of reach.
    assert (
        stub.PurgeDeadLetters(
            project_pb2.PurgeDeadLettersRequest(all=True), metadata=bearer(secret), timeout=5
        ).purged
        == 1
    )
    remaining = dead_letters(server.database_url)
    assert len(remaining) == 1 and json.loads(remaining[0]["event"])["type"] == ""


def test_the_live_feed_shows_what_every_server_commits(database_url: str) -> None:
    first, second = start_server(database_url), start_server(database_url)
    try:
        public, secret = new_project(database_url)
        with (
            grpc.insecure_channel(first.target) as chan_a,
            grpc.insecure_channel(second.target) as chan_b,
        ):
            ingest(chan_a).IngestEvents(
                ingest_pb2.IngestEventsRequest(
                    project_key=public, events=[Event(id="before", type="old", url="/")]
                ),
                timeout=5,
            )
            stream = admin(chan_a).TailEvents(
                project_pb2.TailEventsRequest(), metadata=bearer(secret), timeout=20
            )
            seen: list[project_pb2.TailEventsResponse] = []

            def read() -> None:
                try:
                    for item in stream:
                        seen.append(item)
                        if len(seen) == 3:
                            return
                except grpc.RpcError:
                    pass

            reader = threading.Thread(target=read)
            reader.start()
            time.sleep(0.5)
            sent = time.monotonic()
            ingest(chan_a).IngestEvents(
                ingest_pb2.IngestEventsRequest(
                    project_key=public, events=[Event(id="from-a", type="a", url="/a")]
                ),
                timeout=5,
            )
            ingest(chan_b).IngestEvents(
                ingest_pb2.IngestEventsRequest(
                    project_key=public,
                    events=[Event(id="from-b", type="b", url="/b", data='{"n":1}')],
                ),
                timeout=5,
            )
            refuse(chan_b, public, [Event(id="bad", type="x", url="nope")])
            reader.join(10)
            stream.cancel()
            assert time.monotonic() - sent < 3
        events = [item.event for item in seen if item.HasField("event")]
        letters = [item.dead_letter for item in seen if item.HasField("dead_letter")]
        assert sorted(e.event_id for e in events) == ["from-a", "from-b"]  # not "before"
        assert json.loads(next(e for e in events if e.event_id == "from-b").data) == {"n": 1}
        assert [json.loads(d.event_json)["id"] for d in letters] == ["bad"]
    finally:
        first.server.stop(0)
        second.server.stop(0)


def test_the_backlog_sends_the_latest_first(server: RunningServer, channel: grpc.Channel) -> None:
    public, secret = new_project(server.database_url)
    data = '{"price": 49.90, "big": 12345678901234567890.123456789}'
    ingest(channel).IngestEvents(
        ingest_pb2.IngestEventsRequest(
            project_key=public,
            events=[Event(id=f"e{n}", type="t", url="/", data=data) for n in range(5)],
        ),
        timeout=5,
    )
    stream = admin(channel).TailEvents(
        project_pb2.TailEventsRequest(backlog=2), metadata=bearer(secret), timeout=5
    )
    first_two = [next(stream).event for _ in range(2)]
    stream.cancel()
    assert [event.event_id for event in first_two] == ["e3", "e4"]
    # The numbers as stored, not as a float would write them (49.9, 1.2345678901234567e+19).
    assert "49.90" in first_two[0].data and "12345678901234567890.123456789" in first_two[0].data
