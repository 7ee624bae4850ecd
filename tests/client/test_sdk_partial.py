"""The SDK's partial mode (issue #17): Apex(partial=True) and IngestClient.ingest_partial."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from typing import Any

from apex_ingest_sdk import Apex, IngestClient
from apex_ingest_sdk.transport import Response

from tests.client.support import Errors, count_rows
from tests.conftest import RunningServer


class PartialGateway:
    """A transport answering as the gateway does for a partial batch: events whose type is
    "bad" are rejected, the others received."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        document = json.loads(gzip.decompress(body) if headers.get("Content-Encoding") else body)
        self.bodies.append(document)
        rejected = [
            {"index": i, "details": [{"field": f"events[{i}].type", "description": "bad"}]}
            for i, event in enumerate(document["events"])
            if event["type"] == "bad"
        ]
        answer = {"received": len(document["events"]) - len(rejected), "rejected": rejected}
        return Response(200, {"Content-Type": "application/json"}, json.dumps(answer).encode())


def test_apex_partial_sends_the_flag_and_hands_rejected_events_to_on_error() -> None:
    transport, errors = PartialGateway(), Errors()
    apex = Apex(
        "pk_live_x", "http://gateway.test", partial=True, transport=transport, on_error=errors
    )
    for event_type in ("ok", "bad", "ok", "bad"):
        apex.track(event_type, "/")
    assert apex.flush(10)
    apex.close()
    assert len(transport.bodies) == 1 and transport.bodies[0]["partial"] is True
    ((error, events),) = errors.calls
    assert error.code == "rejected" and error.status == 200
    assert [e["type"] for e in events] == ["bad", "bad"]
    # Field paths index the events handed over, as for a 400.
    assert [f for f, _ in error.field_violations] == ["events[0].type", "events[1].type"]


def test_without_the_option_no_flag_is_sent() -> None:
    transport, errors = PartialGateway(), Errors()
    apex = Apex("pk_live_x", "http://gateway.test", transport=transport, on_error=errors)
    apex.track("ok", "/")
    assert apex.flush(10)
    apex.close()
    assert "partial" not in transport.bodies[0] and errors.calls == []


def test_ingest_partial_stores_the_valid_events(
    grpc_server: RunningServer, project_key: str
) -> None:
    with IngestClient(grpc_server.target) as client:
        result = client.ingest_partial(
            project_key,
            [{"type": "a", "url": "/"}, {"type": "b", "url": "nope"}, {"type": "", "url": "/"}],
        )
    assert result.received == 1
    assert [index for index, _ in result.rejected] == [1, 2]
    assert result.rejected[0][1][0][0] == "events[1].url"
    assert count_rows(grpc_server.database_url)[0] == 1
