"""`apex-ingest people delete|unsuppress|suppressions|export` (issue #18), on both databases."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import grpc

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import start_server
from tests.server.test_cli import refusal, run
from tests.server.test_identity import query

Event = ingest_pb2.Event


def send(target: str, key: str, events: list[Event], user_id: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        request = ingest_pb2.IngestEventsRequest(project_key=key, user_id=user_id, events=events)
        return int(stub.IngestEvents(request, timeout=5).received)


def test_export_delete_suppress_unsuppress(database_url: str, tmp_path: Path) -> None:
    key = run(database_url, "projects", "create", "Shop").stdout.strip()
    server = start_server(database_url)
    try:
        send(server.target, key, [Event(id="a0", type="pageview", visitor_id="va", url="/")])
        send(server.target, key, [Event(id="a1", type="identify", visitor_id="va")], "ann")
        send(server.target, key, [Event(id="b0", type="pageview", visitor_id="vb", url="/")])
        send(server.target, key, [Event(id="c0", type="click", url="/")], "carl")

        exported = run(database_url, "people", "export", "--project", "Shop", "--user-id", "ann")
        records = [json.loads(line) for line in exported.stdout.splitlines()]
        # Events first (those carrying the user id, then the visitor's anonymous ones), links.
        assert [(r["record"], r.get("event_id") or r.get("visitor_id")) for r in records] == [
            ("event", "a1"),
            ("event", "a0"),
            ("identity_link", "va"),
        ]
        assert records[0]["user_id"] == "ann" and records[1]["user_id"] is None

        ids = tmp_path / "ids.txt"
        ids.write_text("# requested 2026-12-02\nann\n\nvisitor:vb\n", encoding="utf-8")
        deleted = run(
            database_url, "people", "delete", "--project", key, "--ids-file", str(ids), "--suppress"
        )
        assert deleted.stdout.startswith("deleted 3 events, 1 identity links, 0 dead letters")
        assert "3 ids newly suppressed" in deleted.stdout  # ann, vb, and ann's visitor va
        assert {r[0] for r in query(database_url, "SELECT event_id FROM events")} == {"c0"}

        # Suppressed: answered as accepted, not stored.
        assert send(server.target, key, [Event(id="a2", type="click", url="/")], "ann") == 1
        assert {r[0] for r in query(database_url, "SELECT event_id FROM events")} == {"c0"}
        listed = run(database_url, "people", "suppressions", "--project", "Shop").stdout
        assert sorted(line.split("\t")[1:3] for line in listed.splitlines()) == [
            ["user", "ann"],
            ["visitor", "va"],
            ["visitor", "vb"],
        ]

        lifted = run(
            database_url,
            "people",
            "unsuppress",
            "--project",
            "Shop",
            "--user-id",
            "ann",
            "--actor",
            "dpo",
        )
        assert lifted.stdout.strip() == "lifted 1 suppressions"
        assert send(server.target, key, [Event(id="a3", type="click", url="/")], "ann") == 1
        assert {r[0] for r in query(database_url, "SELECT event_id FROM events")} == {"c0", "a3"}
    finally:
        server.server.stop(0)

    audit = query(database_url, "SELECT action, actor, via, suppress, counts FROM privacy_audit")
    assert [(a, actor, via, bool(s)) for a, actor, via, s, _ in audit] == [
        ("export", getpass.getuser(), "cli", False),
        ("delete", getpass.getuser(), "cli", True),
        ("unsuppress", "dpo", "cli", False),
    ]
    assert json.loads(audit[1][4])["events"] == 3

    usage = run(database_url, "people", "delete", "--project", "Shop", check=False)
    assert usage.returncode == 2 and "--user-id" in usage.stderr


def test_an_ids_file_that_is_not_utf8_is_refused_in_one_line(
    sqlite_url: str, tmp_path: Path
) -> None:
    run(sqlite_url, "projects", "create", "Shop")
    not_utf8 = tmp_path / "ids.txt"
    not_utf8.write_bytes(b"ann\n\xff\xfe\n")
    for command in ("delete", "unsuppress", "export"):
        refused = run(
            sqlite_url, "people", command, "--project", "Shop", "--ids-file", str(not_utf8),
            check=False,
        )  # fmt: skip
        error = refusal(refused)
        assert error.startswith("Error: Invalid value for --ids-file: ")
        assert error.endswith(f"{not_utf8} is not UTF-8 text (byte 0xff at offset 4)")


def test_an_output_that_cannot_be_written_is_refused_before_exporting(
    sqlite_url: str, tmp_path: Path
) -> None:
    run(sqlite_url, "projects", "create", "Shop")
    nowhere = tmp_path / "no" / "such" / "dir" / "export.jsonl"
    refused = run(
        sqlite_url, "people", "export", "--project", "Shop", "--user-id", "ann", "-o", str(nowhere),
        check=False,
    )  # fmt: skip
    assert refusal(refused) == (
        f"Error: Invalid value for --output: cannot write {nowhere}: No such file or directory"
    )
    assert query(sqlite_url, "SELECT count(*) FROM privacy_audit") == [(0,)]  # nothing exported
