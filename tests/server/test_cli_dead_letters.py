"""`apex-ingest dead-letters ...` and `apex-ingest events tail` (issue #17)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

import grpc
import pytest

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import start_server
from tests.server.test_cli import COMMAND, run
from tests.server.test_dead_letters import count_events, dead_letters

Event = ingest_pb2.Event


def send(target: str, key: str, events: list[Event]) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        with contextlib.suppress(grpc.RpcError):
            stub.IngestEvents(
                ingest_pb2.IngestEventsRequest(project_key=key, events=events), timeout=5
            )


def test_list_show_replay_purge(database_url: str) -> None:
    created = run(database_url, "projects", "create", "Shop")
    key = created.stdout.strip()
    server = start_server(database_url)
    try:
        send(server.target, key, [Event(id="fine", type="a", url="/"), Event(id="x", url="/")])
        send(server.target, key, [Event(id="y", type="b", url="nope")])
        dead_letters(database_url, wait_for=3)
    finally:
        server.server.stop(0)
    listing = run(database_url, "dead-letters", "list", "--project", "Shop").stdout.splitlines()
    assert len(listing) == 3
    assert "events[0].url" in listing[0] and "invalid_argument" in listing[0]
    assert "valid: refused with its request" in listing[2]
    newest = listing[0].split("\t")[0]
    shown = json.loads(run(database_url, "dead-letters", "show", "--project", key, newest).stdout)
    assert shown["event"]["id"] == "y" and shown["violations"][0]["field"] == "events[0].url"

    replayed = run(database_url, "dead-letters", "replay", "--project", "Shop", "--all").stdout
    assert replayed.startswith("replayed 1; 2 refused again")
    assert count_events(database_url) == 1
    usage = run(database_url, "dead-letters", "replay", "--project", "Shop", check=False)
    assert usage.returncode == 2
    purged = run(database_url, "dead-letters", "purge", "--project", "Shop", newest).stdout
    assert purged.strip() == "purged 1"
    assert len(dead_letters(database_url)) == 1
    missing = run(database_url, "dead-letters", "list", "--project", "nope", check=False)
    assert missing.returncode == 1 and "no project" in missing.stderr


def test_events_tail_follows_the_live_feed(sqlite_url: str) -> None:
    created = run(sqlite_url, "projects", "create", "Shop")
    key, secret = created.stdout.strip(), created.stderr.split()[-1]
    server = start_server(sqlite_url)
    env = {**os.environ, "APEX_DATABASE_URL": sqlite_url}
    tail = subprocess.Popen(
        [*COMMAND, "events", "tail", "--secret-key", secret, "--target", server.target],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)  # the command starts
        send(server.target, key, [Event(id="e1", type="signup", url="/welcome")])
        send(server.target, key, [Event(id="e2", type="click", url="nope")])
        # What a client sent stays in its column: control characters are escaped.
        send(server.target, key, [Event(id="e3", type="a\tb\u2028c", url="/", visitor_id="v\tx")])
        assert tail.stdout is not None
        lines = [tail.stdout.readline() for _ in range(3)]
        assert "\tevent\tsignup\t" in lines[0]
        assert "\trejected\tclick\t" in lines[1] and "events[0].url" in lines[1]
        columns = lines[2].rstrip("\n").split("\t")
        assert columns[1:5] == ["rejected", "a\\x09b\\x2028c", "v\\x09x", "-"], lines[2]
    finally:
        tail.kill()
        tail.wait()
        server.server.stop(0)


def test_events_tail_refuses_a_public_key(sqlite_url: str) -> None:
    key = run(sqlite_url, "projects", "create", "Shop").stdout.strip()
    server = start_server(sqlite_url)
    try:
        refused = run(
            sqlite_url,
            "events",
            "tail",
            "--secret-key",
            key,
            "--target",
            server.target,
            check=False,
        )
    finally:
        server.server.stop(0)
    assert refused.returncode == 1 and "public key" in refused.stderr


@pytest.mark.parametrize("command", ["list", "tail"])
def test_rejected_with_a_filter_is_refused_not_ignored(sqlite_url: str, command: str) -> None:
    """The feed cannot filter dead letters by type or person: asking for both is an error."""
    refused = run(
        sqlite_url,
        "events",
        command,
        "--secret-key",
        "sk_live_x",
        "--visitor",
        "v_123",
        "--rejected",
        check=False,
    )
    assert refused.returncode == 2 and "--rejected shows" in refused.stderr


@pytest.fixture(autouse=True)
def _no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APEX_GRPC_TARGET", raising=False)


def test_replay_and_purge_refuse_ids_that_are_no_dead_letter_of_the_project(
    sqlite_url: str,
) -> None:
    """A mistyped id is said, and nothing is done (not `replayed 0` and exit 0)."""
    key = run(sqlite_url, "projects", "create", "Shop").stdout.strip()
    run(sqlite_url, "projects", "create", "Other")
    server = start_server(sqlite_url)
    try:
        send(server.target, key, [Event(id="y", type="b", url="nope")])
        (letter,) = dead_letters(sqlite_url, wait_for=1)
        stored = str(letter["id"])
    finally:
        server.server.stop(0)
    for command, done in (("replay", "replayed"), ("purge", "purged")):
        for project in ("Shop", "Other"):
            ids = [stored, "999"] if project == "Shop" else [stored]
            refused = run(
                sqlite_url, "dead-letters", command, "--project", project, *ids, check=False
            )
            missing = "999" if project == "Shop" else stored
            assert refused.returncode == 1, refused.stderr
            assert refused.stderr.strip().splitlines() == [
                f"Error: no dead letter {missing} in this project; nothing {done}"
            ]
    assert [row["id"] for row in dead_letters(sqlite_url)] == [letter["id"]]  # left as it was
