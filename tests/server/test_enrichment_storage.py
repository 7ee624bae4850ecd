"""Enrichment stored (issue #19), on SQLite and PostgreSQL: the derived columns, each project
IP mode (the full IP appears nowhere: events, dead letters, logs), dropped bots, migration 0008."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from alembic import command
from sqlalchemy import create_engine, text

from apex_ingest.ops import partitions
from apex_ingest.ops.migrate import alembic_config, upgrade
from apex_ingest.server import metrics
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.enrichment import ENRICHED_COLUMNS
from apex_ingest.server.projects import create_project
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer
from tests.server.test_dead_letters import dead_letters
from tests.server.test_enrichment import CHROME, CURL, GOOGLEBOT, HEADLESS, SAFARI_IOS

Event = ingest_pb2.Event
IPV4 = "81.2.69.142"
IPV6 = "2a00:1450:4001:81c::200e"


def project(database_url: str, **settings: Any) -> str:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            return create_project(session, "enriched", **settings).key
    finally:
        engine.dispose()


def table(database_url: str, name: str) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            result = connection.execute(text(f"SELECT * FROM {name} ORDER BY id"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def send(
    stub: ingest_pb2_grpc.IngestServiceStub,
    key: str,
    events: list[ingest_pb2.Event],
    client_ip: str = IPV4,
    user_agent: str = CHROME,
    **extra: Any,
) -> ingest_pb2.IngestEventsResponse:
    request = ingest_pb2.IngestEventsRequest(
        project_key=key,
        events=events,
        context=ingest_pb2.RequestContext(client_ip=client_ip, user_agent=user_agent),
        **extra,
    )
    response: ingest_pb2.IngestEventsResponse = stub.IngestEvents(request, timeout=10)
    return response


def test_the_derived_columns_are_stored(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = project(server.database_url)
    skew = timedelta(hours=4)
    request_sent = datetime.now(UTC) + skew  # a phone whose clock is 4 h ahead
    event = Event(
        id="e1",
        type="pageview",
        visitor_id="v1",
        url="https://shop.example/?utm_source=news&utm_medium=email&utm_campaign=bf&gclid=g1",
        referrer="https://l.facebook.com/",
    )
    event.timestamp.FromDatetime(request_sent - timedelta(seconds=30))
    sent_at = ingest_pb2.IngestEventsRequest().sent_at
    sent_at.FromDatetime(request_sent)
    assert send(stub, key, [event], user_agent=SAFARI_IOS, sent_at=sent_at).received == 1
    row = table(server.database_url, "events")[0]
    assert {k: row[k] for k in ("browser", "browser_version", "os", "device_class")} == {
        "browser": "Mobile Safari",
        "browser_version": "18",
        "os": "iOS",
        "device_class": "mobile",
    }
    assert bool(row["is_bot"]) is False and row["country"] == "GB"
    assert (row["utm_source"], row["utm_medium"], row["utm_campaign"]) == ("news", "email", "bf")
    assert (row["utm_term"], row["gclid"], row["fbclid"]) == (None, "g1", None)
    assert (row["referrer_host"], row["referrer_class"]) == ("l.facebook.com", "social")
    occurred, received = _utc(row["occurred_at"]), _utc(row["received_at"])
    # Stored at the right time, 30 s before the receipt (within the request's own transit).
    assert timedelta(seconds=29) < received - occurred < timedelta(seconds=31)
    assert abs(row["clock_skew_ms"] - skew.total_seconds() * 1000) < 1000
    applied = _utc(row["client_occurred_at"]) - occurred
    assert abs(applied - timedelta(milliseconds=row["clock_skew_ms"])) < timedelta(milliseconds=1)


def _utc(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite through a plain text() query
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@pytest.mark.parametrize("ip_mode", ["full", "truncated", "none"])
def test_each_ip_mode_keeps_no_more_than_it_says(
    server: RunningServer,
    stub: ingest_pb2_grpc.IngestServiceStub,
    ip_mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = project(server.database_url, ip_mode=ip_mode)
    good = Event(id="g", type="pageview", url="https://shop.example/")
    bad = Event(id="b", type="pageview", url="ftp://nope")
    for address in (IPV4, IPV6):
        send(stub, key, [good], client_ip=address)
        with pytest.raises(grpc.RpcError):
            send(stub, key, [good, bad], client_ip=address)  # refused: dead letters
        send(stub, key, [bad], client_ip=address, partial=True)  # partial: a dead letter
    letters = dead_letters(server.database_url, wait_for=6)
    events = table(server.database_url, "events")
    assert len(letters) == 6 and len(events) == 1  # "g" is stored once
    kept = {
        "full": {IPV4, IPV6},
        "truncated": {"81.2.69.0", "2a00:1450:4001::"},
        "none": {None},
    }[ip_mode]
    assert {row["ip"] for row in letters} == kept
    assert events[0]["ip"] in kept
    # The country was looked up before the IP was reduced.
    assert events[0]["country"] == "GB"
    everything = " ".join(str(row) for row in events + letters) + caplog.text
    everything += " ".join(str(vars(record)) for record in caplog.records)
    for address in (IPV4, IPV6):
        if ip_mode == "full":
            assert address in everything  # (the check below can fail)
        else:
            assert address not in everything, f"{address} kept in {ip_mode} mode"
    # Nothing beyond the network in truncated mode; not even the network in none mode.
    assert "2a00:1450:4001:81c" not in everything or ip_mode == "full"
    for network in ("81.2.69.", "2a00:1450:4001"):
        assert (network in everything) is (ip_mode != "none")


def test_a_project_that_drops_bots_answers_accepted_and_stores_nothing_of_them(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    dropping = project(server.database_url, drop_bots=True)
    keeping = make_other_project(server.database_url)
    events = [Event(type="pageview", url="/a"), Event(type="pageview", url="/b")]
    before = metrics.EVENTS_DROPPED.labels(dropping, "bot")._value.get()
    assert send(stub, dropping, events, user_agent=GOOGLEBOT).received == 2
    assert send(stub, dropping, events, user_agent=HEADLESS).received == 2
    assert metrics.EVENTS_DROPPED.labels(dropping, "bot")._value.get() - before == 4
    assert table(server.database_url, "events") == []
    # A backend's own events (curl, SDKs) are not bots: stored.
    assert send(stub, dropping, events, user_agent=CURL).received == 2
    # Another project keeps its bots, flagged.
    assert send(stub, keeping, events[:1], user_agent=GOOGLEBOT).received == 1
    stored = table(server.database_url, "events")
    assert [(row["user_agent"], bool(row["is_bot"])) for row in stored] == [
        (CURL, False),
        (CURL, False),
        (GOOGLEBOT, True),
    ]
    assert stored[2]["device_class"] == "bot"


def make_other_project(database_url: str) -> str:
    return project(database_url)


def test_projects_pick_up_a_changed_ip_mode(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    from apex_ingest.server.projects import find_project, update_privacy

    key = project(server.database_url)
    send(stub, key, [Event(id="1", type="pageview", url="/")])
    engine = create_db_engine(server.database_url)
    try:
        with create_session_factory(engine).begin() as session:
            found = find_project(session, key)
            assert found is not None
            update_privacy(session, found.id, ip_mode="none")
            with pytest.raises(ValueError):
                update_privacy(session, found.id, ip_mode="partial")
    finally:
        engine.dispose()
    send(stub, key, [Event(id="2", type="pageview", url="/")])  # the cache TTL is 0 here
    assert [row["ip"] for row in table(server.database_url, "events")] == [IPV4, None]


# --- migration 0008 -------------------------------------------------------------------------


def test_migration_0008_on_existing_rows(database_url: str) -> None:
    """Down to 0006, rows written as a server of that release writes them (in a monthly
    partition and in events_default on PostgreSQL), up again: the rows stay, with NULL in
    every new column; projects get ip_mode 'full' and drop_bots false; every partition has
    the columns; new rows store them."""
    key = project(database_url)
    command.downgrade(alembic_config(database_url), "0006")
    engine = create_db_engine(database_url)
    postgres = engine.dialect.name == "postgresql"
    now = datetime.now(UTC)
    try:
        with engine.begin() as connection:
            project_id = connection.execute(
                text("SELECT project_id FROM project_keys WHERE key = :k"), {"k": key}
            ).scalar_one()
            if postgres:
                partitions.create_month_partition(connection, now)
            old = datetime(2003, 3, 3, tzinfo=UTC)  # events_default on PostgreSQL
            for event_id, occurred in (("recent", now), ("stray", old)):
                if postgres:
                    connection.execute(
                        text(
                            "INSERT INTO event_ids (project_id, event_id, received_at, "
                            "occurred_at) VALUES (:p, :e, :r, :o)"
                        ),
                        {"p": project_id, "e": event_id, "r": now, "o": occurred},
                    )
                connection.execute(
                    text(
                        "INSERT INTO events (project_id, event_id, type, url, data, occurred_at,"
                        " received_at, ip) VALUES (:p, :e, 'pageview', '/', '{}', :o, :r, :ip)"
                    ),
                    {"p": project_id, "e": event_id, "o": occurred, "r": now, "ip": IPV4},
                )
        upgrade(database_url)
        with engine.begin() as connection:
            new = ", ".join(ENRICHED_COLUMNS)
            old_rows = connection.execute(text(f"SELECT {new} FROM events")).all()
            assert len(old_rows) == 2 and all(v is None for row in old_rows for v in row)
            settings = connection.execute(text("SELECT ip_mode, drop_bots FROM projects")).one()
            assert (settings[0], bool(settings[1])) == ("full", False)
            if postgres:
                tables = connection.execute(
                    text(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c "
                        "ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"
                    )
                ).scalars()
                for partition in tables:
                    columns = set(
                        connection.execute(
                            text(
                                "SELECT column_name FROM information_schema.columns "
                                "WHERE table_name = :t"
                            ),
                            {"t": partition},
                        ).scalars()
                    )
                    assert set(ENRICHED_COLUMNS) <= columns, partition
        command.downgrade(alembic_config(database_url), "0006")
        upgrade(database_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM events")).scalar_one() == 2
    finally:
        engine.dispose()


def test_the_live_feed_carries_the_derived_columns(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    from sqlalchemy import select

    from apex_ingest.server.models import Event as EventRow
    from apex_ingest.server.project_service import event_message

    key = project(server.database_url, ip_mode="none")
    url = "https://shop.example/?utm_source=news"
    send(stub, key, [Event(id="1", type="pageview", url=url)], user_agent=GOOGLEBOT)
    send(stub, key, [Event(id="2", type="pageview", url="/")], user_agent="")
    engine = create_db_engine(server.database_url)
    try:
        with create_session_factory(engine)() as session:
            rows = session.scalars(select(EventRow).order_by(EventRow.id)).all()
            bot, anonymous = (event_message(row) for row in rows)
    finally:
        engine.dispose()
    assert (bot.browser, bot.device_class, bot.is_bot) == ("Googlebot", "bot", True)
    assert (bot.utm_source, bot.referrer_class, bot.country) == ("news", "direct", "GB")
    assert not bot.HasField("clock_skew_ms") and not bot.HasField("client_occurred_at")
    assert not anonymous.HasField("is_bot") and anonymous.browser == ""
    assert IPV4 not in str(bot) + str(anonymous)
