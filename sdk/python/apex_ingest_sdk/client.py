"""``Apex``: the batching, non-blocking HTTP client for customers' backends.

``track`` only builds and serialises the event and queues it; the ``Consumer``'s daemon thread
sends the queue to ``POST /api/events``. Standard library only.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from apex_ingest_sdk.consumer import Consumer, dumps
from apex_ingest_sdk.errors import ErrorCallback
from apex_ingest_sdk.limits import MAX_BODY_BYTES, MAX_EVENTS
from apex_ingest_sdk.transport import Transport, UrllibTransport

__all__ = ["DEFAULT_HOST", "EVENTS_PATH", "Apex", "events_url", "format_timestamp", "new_event_id"]

DEFAULT_HOST: Final = "http://127.0.0.1:8080"
EVENTS_PATH: Final = "/api/events"


def new_event_id() -> str:
    """A new event id: 32 lowercase hex characters (``uuid4().hex``), the project's format."""
    return uuid.uuid4().hex


def events_url(host: str) -> str:
    """``host`` (``scheme://host[:port]``) checked and turned into the ingest URL.

    Raises ``ValueError`` for the usual setup mistakes, which would otherwise surface only as
    undelivered events: no scheme, a scheme other than http(s), no host name, a path (including
    ``/api/events`` itself), a query or a fragment.
    """
    if not isinstance(host, str):
        raise TypeError(f"host must be a string such as {DEFAULT_HOST!r}, not {host!r}")
    text = host.strip()
    if not text:
        raise ValueError(f"host is empty: pass the gateway's base URL, e.g. {DEFAULT_HOST!r}")
    parts = urllib.parse.urlsplit(text)
    if "://" not in text:
        raise ValueError(
            f"host {host!r} has no scheme: write it as a URL, e.g. 'http://{text}' or "
            f"'https://{text}'"
        )
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"host {host!r}: the scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError(f"host {host!r} has no host name")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        raise ValueError(f"host {host!r}: {exc}") from None
    path = parts.path.rstrip("/")
    if path.endswith(EVENTS_PATH):
        raise ValueError(
            f"host {host!r} already ends in {EVENTS_PATH}: pass the gateway's base URL, "
            f"e.g. {urllib.parse.urlunsplit((parts.scheme, parts.netloc, '', '', ''))!r}"
        )
    if path:
        raise ValueError(
            f"host {host!r} has a path ({parts.path!r}): pass only scheme://host[:port]; the "
            f"client posts to {EVENTS_PATH} on it"
        )
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"host {host!r} has a query or fragment: pass only scheme://host[:port]")
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, EVENTS_PATH, "", ""))


def format_timestamp(value: datetime | str | float) -> str:
    """RFC 3339 with an explicit offset; naive datetimes and epoch seconds are UTC."""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"timestamp must be a datetime, str or epoch seconds, not {value!r}")
    return datetime.fromtimestamp(value, UTC).isoformat()


class Apex:
    """Batching, non-blocking client for ``POST /api/events``.

    >>> apex = Apex("pk_live_...", "https://ingest.example.com")
    >>> apex.track("signup", "/welcome", {"plan": "pro"}, user_id="u_42")
    >>> apex.flush()  # optional: close() runs at interpreter exit

    Delivery is at least once on the wire and exactly once in storage: every event is given an id
    when tracked and the server stores a repeated id once, so retries never duplicate. Events that
    cannot be delivered are handed to ``on_error(error, events)``, called on the sender thread
    (or on the caller's thread for ``queue_full`` and ``closed``); without a callback they are
    logged as warnings on the ``apex_ingest_sdk`` logger.

    ``partial=True`` sends partial batches (``"partial": true``): the server stores the valid
    events of a batch and answers which ones it rejected; those are handed to ``on_error`` with
    code ``"rejected"`` (status 200) and their violations, and kept by the server as dead letters.
    Without it, a batch with invalid events is refused whole (400) and the client sends its
    valid events again without the invalid ones (one more request).
    """

    def __init__(
        self,
        project_key: str,
        host: str = DEFAULT_HOST,
        *,
        max_batch: int = MAX_EVENTS,
        max_queue: int = 10_000,
        flush_interval: float = 2.0,
        timeout: float = 10.0,
        max_retries: int = 6,
        on_error: ErrorCallback | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        shutdown_timeout: float | None = 30.0,
        compress: bool = True,
        transport: Transport | None = None,
        partial: bool = False,
    ) -> None:
        if not project_key or not isinstance(project_key, str):
            raise ValueError("project_key is required")
        url = events_url(host)
        if not 1 <= max_batch <= MAX_EVENTS:
            raise ValueError(f"max_batch must be between 1 and {MAX_EVENTS}")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.project_key = project_key
        self.url = url
        self._consumer = Consumer(
            url,
            project_key,
            transport if transport is not None else UrllibTransport(),
            max_batch=max_batch,
            max_queue=max_queue,
            flush_interval=flush_interval,
            timeout=timeout,
            max_retries=max_retries,
            on_error=on_error,
            max_body_bytes=max_body_bytes,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            shutdown_timeout=shutdown_timeout,
            compress=compress,
            partial=partial,
        )

    def track(
        self,
        type: str,
        url: str,
        data: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        timestamp: datetime | str | float | None = None,
        id: str | None = None,
        visitor_id: str | None = None,
    ) -> str:
        """Queue one event and return its id; never waits for the network.

        ``data`` is serialised immediately, so later changes to the caller's dict are not sent,
        and values JSON cannot represent raise ``TypeError``/``ValueError`` here rather than
        failing a whole batch later. ``timestamp`` defaults to now: batches are sent seconds
        later (longer under retries), so the server's receipt time would be wrong.
        """
        if not isinstance(type, str) or not isinstance(url, str):
            raise TypeError("type and url must be strings")
        if data is not None and not isinstance(data, Mapping):
            raise TypeError("data must be a mapping (a JSON object)")
        for name, value in (("user_id", user_id), ("id", id), ("visitor_id", visitor_id)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
        if user_id == "":
            user_id = None  # the server treats "" as no user: send none
        event_id = id if id is not None else new_event_id()
        event: dict[str, Any] = {"id": event_id, "type": type, "url": url}
        event["timestamp"] = format_timestamp(timestamp if timestamp is not None else time.time())
        if visitor_id is not None:
            event["visitorId"] = visitor_id
        if user_id is not None:
            event["userId"] = user_id
        if data is not None:
            event["data"] = dict(data)  # json only encodes real dicts
        return self._queue(event)

    def identify(
        self,
        user_id: str,
        traits: Mapping[str, Any] | None = None,
        visitor_id: str | None = None,
        *,
        url: str | None = None,
        timestamp: datetime | str | float | None = None,
        id: str | None = None,
    ) -> str:
        """Queue an ``identify`` event: ``visitor_id`` (the browser's anonymous id, if known) is
        the user ``user_id``; ``traits`` are stored as the event's ``data`` (same limits).

        The server records the link visitor -> user, so that visitor's earlier anonymous events
        are attributed to the user (database view ``events_with_user``). A visitor links to one
        user: identifying it later as someone else is recorded but not merged. Returns the
        event id.
        """
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        return self._send_identity(
            "identify", user_id, traits, visitor_id, None, url, timestamp, id
        )

    def alias(
        self,
        previous_id: str,
        user_id: str,
        *,
        url: str | None = None,
        timestamp: datetime | str | float | None = None,
        id: str | None = None,
    ) -> str:
        """Queue an ``alias`` event: ``previous_id`` (usually a visitor id the server never saw
        identified) is the same person as ``user_id``. Returns the event id."""
        for name, value in (("previous_id", previous_id), ("user_id", user_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        return self._send_identity("alias", user_id, None, None, previous_id, url, timestamp, id)

    def _send_identity(
        self,
        type: str,
        user_id: str,
        traits: Mapping[str, Any] | None,
        visitor_id: str | None,
        previous_id: str | None,
        url: str | None,
        timestamp: datetime | str | float | None,
        id: str | None,
    ) -> str:
        if traits is not None and not isinstance(traits, Mapping):
            raise TypeError("traits must be a mapping (a JSON object)")
        for name, value in (("visitor_id", visitor_id), ("url", url), ("id", id)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
        event_id = id if id is not None else new_event_id()
        # No url needed: identify and alias say who, not where.
        event: dict[str, Any] = {"id": event_id, "type": type}
        if url is not None:
            event["url"] = url
        event["timestamp"] = format_timestamp(timestamp if timestamp is not None else time.time())
        event["userId"] = user_id
        if visitor_id is not None:
            event["visitorId"] = visitor_id
        if previous_id is not None:
            event["previousId"] = previous_id
        if traits is not None:
            event["data"] = dict(traits)
        return self._queue(event)

    def _queue(self, event: dict[str, Any]) -> str:
        """Serialise ``event`` and queue it (or report why not); returns its id."""
        encoded = dumps(event)
        rejected = self._consumer.put(encoded)
        if rejected is not None:
            self._consumer.report(rejected, [json.loads(encoded)])
        return str(event["id"])

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event tracked before this call is sent or handed to ``on_error``.

        Returns False if ``timeout`` (seconds) passed first, or when called from ``on_error``
        (the sender thread cannot wait for itself).
        """
        return self._consumer.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Send everything queued, then stop the sender; later ``track`` calls are reported.

        If ``timeout`` passes first, retries are abandoned and what is left is handed to
        ``on_error`` with code ``"shutdown"``; returns False in that case. Runs at interpreter
        exit with ``shutdown_timeout``.
        """
        return self._consumer.close(timeout)

    def __enter__(self) -> Apex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by the sender (in-flight batches not counted)."""
        return self._consumer.pending
