"""Partial batches (issue #17): opt-in, valid events stored, every invalid one reported."""

from __future__ import annotations

import json

import grpc
import pytest

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project
from tests.server.test_dead_letters import count_events, dead_letters

Event = ingest_pb2.Event


def mixed(key: str, partial: bool = True) -> ingest_pb2.IngestEventsRequest:
    return ingest_pb2.IngestEventsRequest(
        project_key=key,
        partial=partial,
        events=[
            Event(id="good-0", type="pageview", url="/a"),
            Event(id="bad-1", type="click", url="nope"),
            Event(id="bad-2", type="", url="/c", data="[1]"),
            Event(id="good-3", type="signup", url="/d"),
        ],
    )


def test_valid_events_are_stored_and_every_invalid_one_reported(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    answer = stub.IngestEvents(mixed(key), timeout=5)
    assert answer.received == 2
    assert [r.index for r in answer.rejected] == [1, 2]
    assert [v.field for v in answer.rejected[0].violations] == ["events[1].url"]
    assert {v.field for v in answer.rejected[1].violations} == {"events[2].type", "events[2].data"}
    assert count_events(server.database_url) == 2
    kept = dead_letters(server.database_url, wait_for=2)
    assert [row["event_index"] for row in kept] == [1, 2]
    assert json.loads(kept[0]["violations"])[0]["field"] == "events[1].url"
    # A retry gives the same answer and stores nothing twice.
    again = stub.IngestEvents(mixed(key), timeout=5)
    assert again.received == 2 and len(again.rejected) == 2
    assert count_events(server.database_url) == 2


def test_without_the_flag_the_request_stays_atomic(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    with pytest.raises(grpc.RpcError) as refused:
        stub.IngestEvents(mixed(key, partial=False), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert count_events(server.database_url) == 0


def test_all_invalid_is_ok_with_nothing_received(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    events = [Event(type="", url="/") for _ in range(500)]
    answer = stub.IngestEvents(
        ingest_pb2.IngestEventsRequest(project_key=key, partial=True, events=events), timeout=5
    )
    assert answer.received == 0
    assert [r.index for r in answer.rejected] == list(range(500))  # complete
    assert count_events(server.database_url) == 0


def test_what_concerns_the_whole_request_still_refuses_it(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url, allowed_origins=("https://shop.example",))
    cases = {
        grpc.StatusCode.UNAUTHENTICATED: ingest_pb2.IngestEventsRequest(
            project_key="pk_live_nobody", partial=True, events=[Event(type="x", url="/")]
        ),
        grpc.StatusCode.PERMISSION_DENIED: ingest_pb2.IngestEventsRequest(
            project_key=key,
            partial=True,
            events=[Event(type="x", url="/")],
            context=ingest_pb2.RequestContext(origin="https://evil.example"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT: ingest_pb2.IngestEventsRequest(
            project_key=key,
            partial=True,
            user_id="bad\x01user",
            events=[Event(type="x", url="/")],
        ),
    }
    for code, request in cases.items():
        with pytest.raises(grpc.RpcError) as refused:
            stub.IngestEvents(request, timeout=5)
        assert refused.value.code() == code
    assert count_events(server.database_url) == 0


def test_ingest_many_carries_the_per_event_outcomes(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    answer = stub.IngestMany(
        ingest_pb2.IngestManyRequest(requests=[mixed(key), mixed(key, partial=False)]), timeout=5
    )
    partial, atomic = answer.results
    assert partial.status.code == 0 and partial.received == 2
    assert [r.index for r in partial.rejected] == [1, 2]
    assert atomic.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert count_events(server.database_url) == 2
