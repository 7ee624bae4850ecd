"""Reading a request body safely: content type, content encoding, and the size limit."""

from __future__ import annotations

import zlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import IO

from flask import Request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_input_stream

from gateway.errors import BODY, ApiError, FieldViolation, body_error, header_error

#: text/plain is what navigator.sendBeacon sends for a string body (it needs no CORS preflight).
ACCEPTED_MIMETYPES = frozenset({"application/json", "text/plain"})
_GZIP = frozenset({"gzip", "x-gzip"})
_IDENTITY = frozenset({"", "identity"})
_READ_SIZE = 64 * 1024


def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request's body, decoded from gzip if need be, at most ``limit`` bytes either way.

    Raises ApiError 415 for another content type or encoding, 413 over the limit (also for a
    chunked body, which has no Content-Length, and after decompression), 400 for a corrupt
    gzip stream, 408 (BodyTimeout) when the body has not arrived within ``timeout`` seconds.
    """
    if request.mimetype not in ACCEPTED_MIMETYPES:
        shown = _shown(request.mimetype)
        rule = "must be application/json or text/plain" + (f", not {shown}" if shown else "")
        if not shown:
            rule = "is missing: it " + rule
        raise header_error(415, "Content-Type", f"Content-Type {rule}.", rule)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    gzipped = encoding in _GZIP
    if not gzipped and encoding not in _IDENTITY:
        rule = f"must be gzip or absent, not {_shown(encoding)}"
        raise header_error(415, "Content-Encoding", f"Content-Encoding {rule}.", rule)
    if timeout is None:
        raw = _read_at_most(request, limit)
    else:
        raw = _read_within(request, limit, timeout)
    return gunzip(raw, limit) if gzipped else raw


class BodyTimeout(ApiError):
    """408: the body did not arrive in time. The read goes on in a reader thread: granian's
    input stream cannot be interrupted, and a request that ends while its read is pending stalls
    the whole worker (seen with granian 2.8), so the answer waits for the reader when it is
    closed (`wait_for_reader`, registered by the error handler): the client gets its 408 at
    once, and the worker's thread is free when the client closes or finishes."""

    def __init__(self, seconds: float, reader: Future[bytes]) -> None:
        super().__init__(
            408,
            f"The request body was not received within {seconds:g} seconds.",
            [FieldViolation(BODY, f"was not received within {seconds:g} seconds")],
        )
        self.reader = reader

    def wait_for_reader(self) -> None:
        wait([self.reader])


#: Reads bodies for the requests that wait on them with a deadline. Idle threads are reused, and
#: there are never more than requests in flight (granian's threads), so a stalled client holds
#: one reader as it holds one request thread, and never delays anybody else's read.
_readers = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="body-reader")


def _read_within(request: Request, limit: int, timeout: float) -> bytes:
    # The Request itself, not Flask's context-bound proxy: the reader thread has no context.
    actual = request._get_current_object() if hasattr(request, "_get_current_object") else request
    reader = _readers.submit(_read_at_most, actual, limit)
    try:
        return reader.result(timeout)
    except FutureTimeout:
        raise BodyTimeout(timeout, reader) from None


def _shown(header: str) -> str:
    # Echo enough of the client's header to recognise it, not a kilobyte of it.
    return header if len(header) <= 60 else header[:60] + "..."


def too_large(limit: int) -> ApiError:
    return body_error(
        413,
        f"The request body exceeds the limit of {limit} bytes.",
        f"exceeds the limit of {limit} bytes",
    )


def _read_at_most(request: Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        # Refuse before reading a byte.
        raise too_large(limit)
    # Bounded by Content-Length when there is one. A chunked body has none: werkzeug gives
    # the raw stream only when the server marks it terminated (granian does), and the loop
    # below stops one byte past the limit. (werkzeug's own max_content_length would refuse
    # a chunked body of exactly the limit, so it is not used.)
    stream: IO[bytes] = get_input_stream(request.environ, max_content_length=None)
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = stream.read(min(_READ_SIZE, limit + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnected:
        raise body_error(
            400,
            "The client sent less than its Content-Length.",
            "is shorter than its Content-Length",
        ) from None
    return b"".join(chunks)


def gunzip(raw: bytes, limit: int) -> bytes:
    """Decompress a gzip body without ever holding more than ``limit`` + 1 output bytes.

    A gzip bomb (a few KiB that inflate to gigabytes) stops at the limit: each step asks zlib
    for no more than the room left. Concatenated gzip members (RFC 1952) are all read.
    """
    out = bytearray()
    pending = raw
    while True:
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        try:
            while True:
                out += inflater.decompress(pending, limit + 1 - len(out))
                if len(out) > limit:
                    raise too_large(limit)
                pending = inflater.unconsumed_tail
                if inflater.eof or not pending:
                    break
        except zlib.error:
            corrupt = body_error(400, "The body is not valid gzip data.", "is not valid gzip data")
            raise corrupt from None
        if not inflater.eof:
            raise body_error(400, "The gzip body is truncated.", "is truncated gzip data")
        pending = inflater.unused_data
        if not pending:
            return bytes(out)
