"""The live event debugger (issue #17): `GET /debugger` and its feed.

The page (gateway/static/debugger.html and debugger.js) asks for one of the project's secret
keys, keeps it in the tab's sessionStorage (never in a URL, never in a cookie) and sends it in
the `X-Apex-Secret-Key` header to `GET /debugger/feed`, which proxies ProjectService.TailEvents
as Server-Sent Events (`text/event-stream`, read by the page with fetch: EventSource cannot send
a header). Each feed response lasts at most FEED_SECONDS; the page then calls again with the
last ids it saw (`after_event`, `after_dead_letter`), so a gateway stopping or restarting ends
no page for good and holds no request long.

The feed is not under /api/: no CORS, so no other site's script can read it even with a key.
Registered by one line in gateway/app.py (`app.register_blueprint(debugger.bp)`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from flask import Blueprint, Response, request, stream_with_context
from google.protobuf import json_format

from apex_ingest.v1 import project_pb2, project_pb2_grpc
from gateway import shutdown
from gateway.config import get_settings
from gateway.errors import ApiError, FieldViolation, header_error

log = logging.getLogger(__name__)

bp = Blueprint("debugger", __name__)

SECRET_HEADER = "X-Apex-Secret-Key"
#: Seconds one feed response lasts; the page reconnects with the last ids it saw.
FEED_SECONDS = 25.0
_STATIC = Path(__file__).parent / "static"
_PAGE = (_STATIC / "debugger.html").read_bytes()
_SCRIPT = (_STATIC / "debugger.js").read_bytes()
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_channels: dict[str, grpc.Channel] = {}
_channels_lock = threading.Lock()
#: The feeds being streamed by this worker: ended when it starts draining, so a feed (up to
#: FEED_SECONDS) never holds the worker past its drain; the page reconnects to another.
_open_feeds: set[grpc.Future] = set()
_open_feeds_lock = threading.Lock()


def _end_open_feeds() -> None:
    with _open_feeds_lock:
        feeds = list(_open_feeds)
    for call in feeds:
        call.cancel()


def _forget_feed(call: grpc.Future) -> None:
    with _open_feeds_lock:
        _open_feeds.discard(call)


shutdown.on_drain(_end_open_feeds)


def _stub() -> project_pb2_grpc.ProjectServiceStub:
    target = get_settings().grpc_target
    with _channels_lock:
        channel = _channels.get(target)
        if channel is None:
            channel = _channels[target] = grpc.insecure_channel(target)
    return project_pb2_grpc.ProjectServiceStub(channel)  # type: ignore[no-untyped-call]


@bp.get("/debugger")
def page() -> Response:
    response = Response(_PAGE, content_type="text/html; charset=utf-8")
    response.headers.update(_SECURITY_HEADERS)
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.get("/debugger.js")
def script() -> Response:
    response = Response(_SCRIPT, content_type="application/javascript; charset=utf-8")
    response.headers.update(_SECURITY_HEADERS)
    return response


def _int_arg(name: str) -> int:
    value = request.args.get(name, "0")
    if not value.isdigit() or len(value) > 19:
        raise ApiError(
            400,
            f"{name} must be a non-negative integer",
            [FieldViolation(name, "must be a non-negative integer")],
        )
    return int(value)


@bp.get("/debugger/feed")
def feed() -> Response:
    """The project's new events and dead letters as Server-Sent Events (`data: {json}`).

    401 without a secret key or with an unknown one, 403 with a public key: checked before
    the stream starts, so a wrong key sees an error and nothing else.
    """
    secret = request.headers.get(SECRET_HEADER, "").strip()
    if not secret:
        raise header_error(
            401, SECRET_HEADER, f"The {SECRET_HEADER} header must carry a secret key.", "is missing"
        )
    if shutdown.draining():
        raise ApiError(503, retry_after=1)  # stopping: the page reconnects to another worker
    metadata = (("x-apex-secret-key", secret),)
    after_event = _int_arg("after_event")
    after_letter = _int_arg("after_dead_letter")
    backlog = min(_int_arg("backlog"), 100)
    stub = _stub()
    timeout = get_settings().grpc_timeout
    try:
        # Authenticates the key first: the stream's own refusal would come after its headers.
        stub.ListDeadLetters(
            project_pb2.ListDeadLettersRequest(limit=1), metadata=metadata, timeout=timeout
        )
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            message = "Unknown or revoked secret key."
            raise header_error(401, SECRET_HEADER, message, "is unknown or revoked") from None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            public = "is a public key: reading events takes a secret key"
            message = "A public key cannot read events: use a secret key."
            raise header_error(403, SECRET_HEADER, message, public) from None
        log.warning("debugger feed: %s", code.name)
        raise ApiError(503, retry_after=1) from None
    call = stub.TailEvents(
        project_pb2.TailEventsRequest(
            after_event_id=after_event, after_dead_letter_id=after_letter, backlog=backlog
        ),
        metadata=metadata,
        timeout=FEED_SECONDS,
    )

    with _open_feeds_lock:
        _open_feeds.add(call)
    call.add_done_callback(_forget_feed)  # however it ends, even if never read
    if shutdown.draining():  # the drain began after the check above: _end_open_feeds missed it
        call.cancel()

    def stream() -> Iterator[bytes]:
        yield b": connected\n\n"
        try:
            for item in call:
                yield b"data: " + _item_json(item).encode() + b"\n\n"
        except grpc.RpcError as error:
            if error.code() not in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            ):
                yield b"event: error\ndata: " + json.dumps(error.code().name).encode() + b"\n\n"
        finally:
            call.cancel()  # the page went away: stop the server's tail

    response = Response(stream_with_context(stream()), content_type="text/event-stream")
    response.headers.update(_SECURITY_HEADERS)
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _item_json(item: project_pb2.TailEventsResponse) -> str:
    message: project_pb2.StoredEvent | project_pb2.DeadLetter
    if item.HasField("event"):
        kind, message = "event", item.event
    else:
        kind, message = "dead_letter", item.dead_letter
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    body["kind"] = kind
    body["id"] = int(message.id)
    return json.dumps(body, ensure_ascii=False)
