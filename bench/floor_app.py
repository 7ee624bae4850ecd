"""The floor of the architecture: Flask on granian, one gRPC call per request, nothing else.

`bench/grpc_ceiling.py --floor` serves this app in front of a trivial IngestService (no
validation, no storage): what the full path would cost if our own code cost nothing.
"""

from __future__ import annotations

import os

import grpc
from flask import Flask, Response, jsonify, request

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc

app = Flask(__name__)
_stubs: list[ingest_pb2_grpc.IngestServiceStub] = []


def _stub() -> ingest_pb2_grpc.IngestServiceStub:
    if not _stubs:  # per worker process, after the fork, as the gateway does
        target = os.environ["APEX_GRPC_TARGET"]
        for _ in range(4):
            channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            _stubs.append(ingest_pb2_grpc.IngestServiceStub(channel))  # type: ignore[no-untyped-call]
    _stubs.append(_stubs.pop(0))
    return _stubs[0]


@app.post("/api/events")
def events() -> Response:
    body = request.get_json(force=True)
    event = ingest_pb2.Event(type=body["type"], visitor_id=body["visitorId"], url=body["url"])
    answer = _stub().IngestEvents(
        ingest_pb2.IngestEventsRequest(project_key=body["projectKey"], events=[event]), timeout=5
    )
    return jsonify(received=answer.received)
