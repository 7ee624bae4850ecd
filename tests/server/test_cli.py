"""The `apex-ingest` command: projects, migrations, and the gRPC server's graceful stop."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from apex_ingest.ops.migrate import current_revision
from apex_ingest.server.projects import secret_digest
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc

COMMAND = [sys.executable, "-m", "apex_ingest"]


def run(database_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APEX_DATABASE_URL": database_url}
    return subprocess.run(
        [*COMMAND, *args], env=env, capture_output=True, text=True, check=check, timeout=60
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one `Error: ...` line of a command refused with exit status 2 (after click's usage
    lines for a bad option or argument), asserting there is no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    return errors[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert run(url, "db", "upgrade").stdout == "database migrated from revision none to 0010\n"
    assert current_revision(url) == "0010"  # the head: 0010 adds cookieless and visitor_salts
    assert "up to date (revision 0010)" in run(url, "db", "upgrade").stdout  # idempotent


def test_projects_create_list_revoke(database_url: str) -> None:
    created = run(database_url, "projects", "create", "Shop")
    key = created.stdout.strip()
    assert key.startswith("pk_live_") and len(key) >= len("pk_live_") + 24
    secret = created.stderr.split()[-1]
    assert secret.startswith("sk_live_") and len(secret) >= len("sk_live_") + 32
    assert "shown once" in created.stderr
    own = run(
        database_url,
        "projects",
        "create",
        "Blog",
        "--key",
        "pk_live_custom_key_1234567890",
        "--allowed-origin",
        "https://Blog.example/",
    ).stdout.strip()
    assert own == "pk_live_custom_key_1234567890"
    listing = run(database_url, "projects", "list").stdout
    assert f"{key}\tShop\tactive" in listing
    assert "origins=https://blog.example" in listing

    assert run(database_url, "projects", "revoke", key, "--force").returncode == 0  # its last
    assert "revoked" in run(database_url, "projects", "list").stdout.splitlines()[0]
    again = run(database_url, "projects", "revoke", key, check=False)
    assert again.returncode != 0 and "no active project" in again.stderr
    assert run(database_url, "projects", "revoke", secret, "--force").returncode == 0  # secret too

    clash = run(database_url, "projects", "create", "X", "--key", own, check=False)
    assert clash.returncode != 0 and "already exists" in clash.stderr
    bad = run(database_url, "projects", "create", "X", "--allowed-origin", "ftp://x", check=False)
    assert bad.returncode != 0 and "origin" in bad.stderr


def test_projects_revoke_keeps_the_last_key_of_a_kind_unless_forced(sqlite_url: str) -> None:
    """As `projects keys revoke` does: a project left without a public key receives nothing."""
    created = run(sqlite_url, "projects", "create", "Shop")
    key, secret = created.stdout.strip(), created.stderr.split()[-1]
    for last in (key, secret):
        refused = run(sqlite_url, "projects", "revoke", last, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        kind = "public" if last == key else "secret"
        assert refused.stderr.strip().splitlines() == [
            f"Error: this is the project's last active {kind} key: add a new one first "
            "(`projects keys add`), or pass --force"
        ]
    assert "\tShop\tactive" in run(sqlite_url, "projects", "list").stdout
    second = run(sqlite_url, "projects", "keys", "add", "--project", "Shop").stdout.strip()
    assert run(sqlite_url, "projects", "revoke", key).stdout == f"revoked {key}\n"
    assert run(sqlite_url, "projects", "list").stdout.startswith(f"{second}\tShop\tactive")
    assert run(sqlite_url, "projects", "revoke", secret, "--force").returncode == 0


@pytest.mark.parametrize("key", ["pk_live_\x01bad", "k" * 129, " pk_live_padded", ""])
def test_projects_create_refuses_a_key_no_request_could_use(database_url: str, key: str) -> None:
    refused = run(database_url, "projects", "create", "X", "--key", key, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "--key" in refused.stderr and "Traceback" not in refused.stderr
    assert run(database_url, "projects", "list").stdout == ""


def test_projects_cookieless_on_create_and_update(sqlite_url: str) -> None:
    """Issue #19, item 7: `create --cookieless`, `update --cookieless/--no-cookieless`."""
    key = run(sqlite_url, "projects", "create", "Site", "--cookieless").stdout.strip()
    other = run(sqlite_url, "projects", "create", "Shop").stdout.strip()
    listing = run(sqlite_url, "projects", "list").stdout.splitlines()
    assert listing[0].startswith(key) and listing[0].endswith("\tcookieless")
    assert listing[1].startswith(other) and "cookieless" not in listing[1]

    off = run(sqlite_url, "projects", "update", "--project", key, "--no-cookieless")
    assert off.stdout == "project 1: cookieless = off\n"
    assert "cookieless" not in run(sqlite_url, "projects", "list").stdout
    assert (
        run(sqlite_url, "projects", "update", "--project", "Shop", "--cookieless").returncode == 0
    )
    assert run(sqlite_url, "projects", "list").stdout.splitlines()[1].endswith("\tcookieless")

    nothing = run(sqlite_url, "projects", "update", "--project", key, check=False)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    unknown = run(
        sqlite_url, "projects", "update", "--project", "nobody", "--cookieless", check=False
    )
    assert unknown.returncode == 1 and "no project 'nobody'" in unknown.stderr


def test_an_internationalized_origin_is_kept_as_browsers_send_it(sqlite_url: str) -> None:
    run(sqlite_url, "projects", "create", "Books", "--allowed-origin", "https://Bücher.example")
    assert "origins=https://xn--bcher-kva.example" in run(sqlite_url, "projects", "list").stdout


def test_demo_prints_a_stable_key_and_curl(sqlite_url: str) -> None:
    first = run(sqlite_url, "demo").stdout
    second = run(sqlite_url, "demo").stdout
    assert "curl" in first and "/api/events" in first
    key = next(word for word in first.split() if word.startswith("pk_live_"))
    assert key in second
    # A secret key once, for the debugger and `events list`: it works, and is never shown again.
    secret = next(word for word in first.split() if word.startswith("sk_live_"))
    assert "sk_live_" not in second.replace("sk_live_...", "")
    assert "projects keys add --project demo --kind secret" in second
    database = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        stored = database.execute(
            "SELECT k.key FROM project_keys k JOIN projects p ON p.id = k.project_id"
            " WHERE p.name = 'demo' AND k.kind = 'secret' AND k.revoked_at IS NULL"
        ).fetchall()
    finally:
        database.close()
    assert stored == [(secret_digest(secret),)]  # the demo project's one secret key


def test_demo_after_its_key_was_revoked_keeps_one_demo_project(sqlite_url: str) -> None:
    first = run(sqlite_url, "demo").stdout
    old = next(word for word in first.split() if word.startswith("pk_live_"))
    run(sqlite_url, "projects", "keys", "revoke", "--project", "demo", old, "--force")
    second = run(sqlite_url, "demo").stdout
    new = next(word for word in second.split() if word.startswith("pk_live_"))
    assert new != old and "sk_live_" in second  # a new public key, and a secret one with it
    listing = run(sqlite_url, "projects", "list").stdout
    assert listing.count("\tdemo\t") == 1, listing
    run(sqlite_url, "projects", "keys", "add", "--project", "demo", "--kind", "secret")


def test_demo_prints_the_exact_snippet_tag_for_its_own_address(sqlite_url: str) -> None:
    """http, not https, for a local gateway: the tag works as printed (tests/browser loads it)."""
    env = {"APEX_HOST": "0.0.0.0", "APEX_HTTP_PORT": "8123"}
    out = run_env(sqlite_url, env, "demo").stdout
    key = next(word for word in out.split() if word.startswith("pk_live_"))
    tag = f'<script async src="http://127.0.0.1:8123/apex.js" data-project-key="{key}"></script>'
    assert f"  {tag}\n" in out


def run_env(
    database_url: str, env: dict[str, str], *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **env}
    if database_url:
        environment["APEX_DATABASE_URL"] = database_url
    else:
        environment.pop("APEX_DATABASE_URL", None)
    return subprocess.run(
        [*COMMAND, *args],
        env=environment,
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["projects", "list"],
        ["projects", "revoke", "pk_live_x"],
        ["projects", "create", "Shop"],
        ["db", "retention", "--days", "30"],
        ["db", "partitions"],
    ],
)
def test_admin_commands_never_create_a_database(tmp_path: Path, args: list[str]) -> None:
    """Run from another directory, they used to leave an empty apex-ingest.db behind and fail
    with "no such table"; now they say which database they looked for and how to fix it."""
    result = run_env("", {}, *args, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    assert list(tmp_path.iterdir()) == []
    message = result.stderr
    assert str(tmp_path / "apex-ingest.db") in message and "sqlite:///apex-ingest.db" in message
    assert "APEX_DATABASE_URL" in message and "apex-ingest db upgrade" in message
    assert "no such table" not in message and "Traceback" not in message


def test_admin_commands_refuse_a_database_without_the_schema(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = run(f"sqlite:///{empty}", "projects", "list", check=False)
    assert result.returncode == 1
    assert "has no Apex Ingest tables" in result.stderr and str(empty) in result.stderr
    assert "apex-ingest db upgrade" in result.stderr


@pytest.mark.parametrize("args", [["db", "upgrade"], ["projects", "list"]])
def test_commands_give_up_on_a_database_that_never_answers(
    silent_database: str, args: list[str]
) -> None:
    """They used to wait forever (no connect timeout before the schema check or migrations)."""
    result = run_env(silent_database, {"APEX_DB_CONNECT_TIMEOUT": "1"}, *args, check=False)
    assert result.returncode == 1
    assert "timeout" in result.stderr and "Traceback" not in result.stderr


def test_db_upgrade_leaves_a_newer_releases_schema_alone(sqlite_url: str) -> None:
    """During a rolling upgrade an older server's migration at start met a revision it does not
    know: `db upgrade` failed, and the server retried it for as long as it ran."""
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    result = run(sqlite_url, "db", "upgrade")
    assert result.stdout == "database is at revision 9999, newer than this release's migrations\n"
    assert current_revision(sqlite_url) == "9999"


def test_db_upgrade_and_demo_create_the_database_with_its_schema(tmp_path: Path) -> None:
    """`demo` (what `make run` runs) migrates as `db upgrade` does: never an empty file."""
    out = run_env("", {}, "demo", cwd=tmp_path).stdout
    assert str(tmp_path / "apex-ingest.db") in out
    url = f"sqlite:///{tmp_path / 'apex-ingest.db'}"
    assert current_revision(url) is not None
    assert "demo\tactive" in run(url, "projects", "list").stdout


def test_sigterm_drains_in_flight_calls(sqlite_url: str, tmp_path: Path) -> None:
    key = run(sqlite_url, "projects", "create", "drain").stdout.strip()
    port = free_port()
    env = {
        **os.environ,
        "APEX_DATABASE_URL": sqlite_url,
        "APEX_GRPC_PORT": str(port),
        "APEX_SHUTDOWN_GRACE": "20",
    }
    process = subprocess.Popen([*COMMAND, "grpc"], env=env)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        request = ingest_pb2.IngestEventsRequest(
            project_key=key, events=[ingest_pb2.Event(type="a", url="/", id="in-flight")]
        )
        stub.IngestEvents(request, timeout=10)  # warm: project cached, pool open

        # Hold SQLite's write lock so the next call is in flight when SIGTERM arrives.
        blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        blocker.execute("BEGIN IMMEDIATE")
        result: dict[str, object] = {}

        def call() -> None:
            try:
                result["received"] = stub.IngestEvents(request, timeout=15).received
            except grpc.RpcError as error:
                result["error"] = error.code()

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError):  # new calls are refused while draining
            stub.IngestEvents(request, timeout=2)
        blocker.rollback()
        blocker.close()
        caller.join(15)
        assert result == {"received": 1}
        assert process.wait(20) == 0
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APEX_HTTP_PORT", "abc"),
        ("APEX_GRPC_PORT", "99999"),
        ("APEX_DATABASE_URL", "garbage"),
        ("APEX_DATABASE_URL", "postgres://postgres@127.0.0.1/x"),
        ("APEX_DATABASE_URL", "sqlite:////no/such/directory/apex.db"),
        ("APEX_DATABASE_URL", "postgresql://u@h:notaport/db"),
        ("APEX_GRPC_PROCESSES", "0"),
        ("APEX_HTTP_WORKERS", "-3"),
        ("APEX_RATE_LIMIT", "garbage"),
        ("APEX_RATE_LIMIT_STORAGE", "bogus://"),
        ("APEX_GRPC_TIMEOUT", "abc"),
        ("APEX_SHUTDOWN_DRAIN", "500"),
        ("APEX_GRPC_CHANNELS", "abc"),
        ("APEX_METRICS_PORT", "abc"),
        ("APEX_DB_POOL_SIZE", "0"),
    ],
)
def test_a_bad_setting_stops_serve_at_once_naming_it(
    sqlite_url: str, variable: str, value: str
) -> None:
    """One line naming the variable, before any process starts: not a crash loop of tracebacks."""
    env = {
        **os.environ,
        "APEX_DATABASE_URL": sqlite_url,
        "APEX_HTTP_PORT": str(free_port()),
        "APEX_GRPC_PORT": str(free_port()),
        variable: value,
    }
    result = subprocess.run(
        [*COMMAND, "serve"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert variable in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_admin_commands_name_a_bad_setting_too() -> None:
    result = run("mysql://x/y", "projects", "create", "demo", check=False)
    assert result.returncode == 2
    assert "APEX_DATABASE_URL" in result.stderr and "--allowed-origin" not in result.stderr


def test_postgresql_urls_without_a_driver_use_psycopg() -> None:
    from apex_ingest.common.settings import check_database_url

    url = check_database_url("postgresql://postgres@127.0.0.1:5432/x")
    assert url == "postgresql+psycopg://postgres@127.0.0.1:5432/x"


@pytest.mark.parametrize("command", ["serve", "grpc", "gateway"])
def test_a_port_already_listened_on_is_refused(sqlite_url: str, command: str) -> None:
    """The servers share ports through SO_REUSEPORT: a second instance would silently take half
    the traffic (into its own database) instead of failing."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        variable = "APEX_HTTP_PORT" if command == "gateway" else "APEX_GRPC_PORT"
        env = {
            **os.environ,
            "APEX_DATABASE_URL": sqlite_url,
            "APEX_HTTP_PORT": str(free_port()),
            "APEX_GRPC_PORT": str(free_port()),
            variable: str(taken),
        }
        result = subprocess.run(
            [*COMMAND, command], env=env, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"127.0.0.1:{taken} ({variable}) is already in use" in result.stderr


def test_make_runs_demo_fails_before_printing_a_key_for_a_taken_port(sqlite_url: str) -> None:
    """`make run` runs `demo --ports-free`, then `serve`: a key and curl lines for a port that
    `serve` cannot take would send the first hour's requests elsewhere. Without the flag (a
    second shell while the service runs) demo still prints them."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        env = {"APEX_HTTP_PORT": str(taken), "APEX_GRPC_PORT": str(free_port())}
        refused = run_env(sqlite_url, env, "demo", "--ports-free", check=False)
        beside = run_env(sqlite_url, env, "demo")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"127.0.0.1:{taken} (APEX_HTTP_PORT) is already in use" in refused.stderr
    assert "pk_live_" not in refused.stdout and "curl" not in refused.stdout
    assert "pk_live_" in beside.stdout and f"127.0.0.1:{taken}/api/events" in beside.stdout


def test_admin_commands_report_an_unreachable_database_in_one_line() -> None:
    result = run(
        "postgresql+psycopg://postgres@127.0.0.1:1/nothing", "projects", "list", check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: database error:") and "Traceback" not in result.stderr
