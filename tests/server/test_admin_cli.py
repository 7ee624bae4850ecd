"""`apex-ingest projects keys ...`, `projects update`, `events list` (issue #18 items 2, 3, 5)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from apex_ingest.ops.cli import main
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.models import Event as EventRow
from apex_ingest.server.models import Project
from apex_ingest.server.projects import NameTaken, ProjectDirectory, check_name, create_project
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import start_server
from tests.server.test_dead_letters import dead_letters
from tests.service import wait_for

Event = ingest_pb2.Event


@dataclass
class Ran:
    stdout: str
    stderr: str
    returncode: int


def run(database_url: str, *args: str, check: bool = True) -> Ran:
    """The command, in this process (a subprocess per call made this file take minutes)."""
    result = CliRunner().invoke(
        main, list(args), env={"APEX_DATABASE_URL": database_url, "APEX_GRPC_TARGET": None}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    ran = Ran(result.stdout, result.stderr, result.exit_code)
    if check and ran.returncode != 0:
        raise AssertionError(f"{args} exited {ran.returncode}: {ran.stderr}")
    return ran


def directory(database_url: str) -> ProjectDirectory:
    return ProjectDirectory(create_session_factory(create_db_engine(database_url)), ttl=0)


def project_row(database_url: str, name: str) -> Project:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine)() as session:
            return session.scalars(select(Project).where(Project.name == name)).one()
    finally:
        engine.dispose()


def test_keys_add_list_revoke(database_url: str) -> None:
    created = run(database_url, "projects", "create", "Shop")
    first, first_secret = created.stdout.strip(), created.stderr.split()[-1]
    added = run(database_url, "projects", "keys", "add", "--project", "Shop", "--label", "ci")
    second = added.stdout.strip()
    assert second.startswith("pk_live_") and second != first and not added.stderr
    secret_run = run(
        database_url, "projects", "keys", "add", "--project", first, "--kind", "secret"
    )
    second_secret = secret_run.stdout.strip()
    assert second_secret.startswith("sk_live_") and "shown once" in secret_run.stderr

    projects = directory(database_url)
    ids = {projects.lookup(first).id, projects.lookup(second).id}  # type: ignore[union-attr]
    assert len(ids) == 1  # one project, two public keys
    assert projects.lookup_secret(second_secret) is not None

    listing = run(database_url, "projects", "keys", "list", "--project", "Shop").stdout
    rows = [line.split("\t") for line in listing.splitlines()]
    assert [(r[1], r[3], r[5]) for r in rows] == [
        ("public", "default", "active"),
        ("secret", "default", "active"),
        ("public", "ci", "active"),
        ("secret", "default", "active"),
    ]
    assert rows[0][2] == first and rows[2][2] == second
    assert first_secret not in listing and second_secret not in listing  # never shown again
    assert rows[1][2].startswith("sk_live_... (sha256 ")

    revoked = run(database_url, "projects", "keys", "revoke", "--project", "Shop", first)
    assert revoked.returncode == 0 and "revoked public key" in revoked.stdout
    assert projects.lookup(first) is None and projects.lookup(second) is not None
    by_id = run(database_url, "projects", "keys", "revoke", "--project", "Shop", "--id", rows[1][0])
    assert by_id.returncode == 0
    assert projects.lookup_secret(first_secret) is None
    assert projects.lookup_secret(second_secret) is not None
    states = [
        line.split("\t")[5]
        for line in run(
            database_url, "projects", "keys", "list", "--project", "Shop"
        ).stdout.splitlines()
    ]
    assert [s.split()[0] for s in states] == ["revoked", "revoked", "active", "active"]

    # The last active key of a kind stays unless --force; a key revoked twice is an error.
    last = run(database_url, "projects", "keys", "revoke", "--project", "Shop", second, check=False)
    assert last.returncode == 1 and "last active public key" in last.stderr
    again = run(database_url, "projects", "keys", "revoke", "--project", "Shop", first, check=False)
    assert again.returncode == 1 and "revoked already" in again.stderr
    forced = run(database_url, "projects", "keys", "revoke", "--project", "Shop", second, "--force")
    assert forced.returncode == 0 and projects.lookup(second) is None

    # Another project's key is not this project's to revoke.
    other = run(database_url, "projects", "create", "Other").stdout.strip()
    foreign = run(
        database_url, "projects", "keys", "revoke", "--project", "Shop", other, check=False
    )
    assert foreign.returncode == 1 and "no such key" in foreign.stderr
    assert projects.lookup(other) is not None


def test_projects_update_each_setting(sqlite_url: str) -> None:
    key = run(
        sqlite_url, "projects", "create", "Shop", "--allowed-origin", "https://a.example"
    ).stdout.strip()
    update = ["projects", "update", "--project", key]
    out = run(sqlite_url, *update, "--add-allowed-origin", "https://B.example:443/").stdout
    assert "allowed origins = https://a.example,https://b.example" in out
    run(sqlite_url, *update, "--remove-allowed-origin", "https://a.example")
    assert project_row(sqlite_url, "Shop").allowed_origins == ["https://b.example"]
    # Removing the last one would allow any origin: only when said so.
    widen = run(sqlite_url, *update, "--remove-allowed-origin", "https://b.example", check=False)
    assert widen.returncode == 2 and "--any-origin" in widen.stderr
    run(sqlite_url, *update, "--any-origin")
    assert project_row(sqlite_url, "Shop").allowed_origins == []
    run(
        sqlite_url,
        *update,
        "--allowed-origin",
        "https://c.example",
        "--allowed-origin",
        "http://d.example:8080",
    )
    assert project_row(sqlite_url, "Shop").allowed_origins == [
        "http://d.example:8080",
        "https://c.example",
    ]
    bad = run(sqlite_url, *update, "--add-allowed-origin", "ftp://x", check=False)
    assert bad.returncode == 2 and "not an http(s) origin" in bad.stderr
    # What no browser sends as its Origin would never match: refused, not stored.
    for never, reason in (
        ("https://*.example.com", "wildcards are not supported"),
        ("https://shop.example/checkout", "nothing more"),
        ("https://user@shop.example", "nothing more"),
    ):
        refused = run(sqlite_url, *update, "--add-allowed-origin", never, check=False)
        assert refused.returncode == 2 and reason in refused.stderr, refused.stderr
        created = run(sqlite_url, "projects", "create", "x", "--allowed-origin", never, check=False)
        assert created.returncode == 2 and reason in created.stderr, created.stderr
    assert project_row(sqlite_url, "Shop").allowed_origins == [
        "http://d.example:8080",
        "https://c.example",
    ]
    # One stored before they were refused can still be removed by name.
    engine = create_db_engine(sqlite_url)
    try:
        with create_session_factory(engine).begin() as session:
            shop = session.scalars(select(Project).where(Project.name == "Shop")).one()
            shop.allowed_origins = [*shop.allowed_origins, "https://*.shop.example"]
    finally:
        engine.dispose()
    run(sqlite_url, *update, "--remove-allowed-origin", "https://*.shop.example")
    assert project_row(sqlite_url, "Shop").allowed_origins == [
        "http://d.example:8080",
        "https://c.example",
    ]

    run(sqlite_url, *update, "--redact-param", "Coupon", "--add-redact-param", "ref")
    assert project_row(sqlite_url, "Shop").redact_params == ["coupon", "ref"]
    run(sqlite_url, *update, "--remove-redact-param", "REF")
    assert project_row(sqlite_url, "Shop").redact_params == ["coupon"]
    run(sqlite_url, *update, "--no-redact-params")
    assert project_row(sqlite_url, "Shop").redact_params is None

    out = run(
        sqlite_url, *update, "--rate-limit", " 10/second;500/hour ", "--name", "Shop 2"
    ).stdout
    assert "rate limit = 10/second;500/hour" in out and "name = Shop 2" in out
    assert project_row(sqlite_url, "Shop 2").rate_limit == "10/second;500/hour"
    assert directory(sqlite_url).lookup(key).rate_limit == "10/second;500/hour"  # type: ignore[union-attr]
    assert "\trate_limit=10/second;500/hour" in run(sqlite_url, "projects", "list").stdout
    bad_limit = run(sqlite_url, *update, "--rate-limit", "lots", check=False)
    assert bad_limit.returncode == 2 and "100/second" in bad_limit.stderr
    run(sqlite_url, *update, "--default-rate-limit")
    assert project_row(sqlite_url, "Shop 2").rate_limit is None

    nothing = run(sqlite_url, *update, check=False)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    missing = run(sqlite_url, "projects", "update", "--project", "nope", "--name", "x", check=False)
    assert missing.returncode == 1 and "no project" in missing.stderr


def test_project_names_stay_unique_and_not_blank(sqlite_url: str) -> None:
    """`--project NAME` finds a project by its name: a second project of that name would make
    every such command fail ("2 projects are named ..."), `make run`'s printed one included."""
    run(sqlite_url, "projects", "create", "demo")
    again = run(sqlite_url, "projects", "create", "demo", check=False)
    assert again.returncode == 1 and "another project is named 'demo'" in again.stderr
    assert "pk_live_" not in again.stdout
    for blank in ("", "   "):
        refused = run(sqlite_url, "projects", "create", blank, check=False)
        assert refused.returncode == 2 and "1-200 characters" in refused.stderr
    assert run(sqlite_url, "projects", "list").stdout.count("\tdemo\t") == 1
    run(sqlite_url, "projects", "create", "shop")
    rename = ("projects", "update", "--project", "shop", "--name")
    taken = run(sqlite_url, *rename, "demo", check=False)
    assert taken.returncode == 2 and "another project is named 'demo'" in taken.stderr
    kept = run(sqlite_url, *rename, "shop")
    assert "name = shop" in kept.stdout  # its own name is no conflict
    run(sqlite_url, "projects", "keys", "add", "--project", "demo", "--kind", "secret")


def test_two_admins_naming_at_once_cannot_both_succeed(database_url: str) -> None:
    """The name check and the new row are one transaction, but two such transactions could
    each check before the other's row is committed: the second check waits for the first."""
    engine = create_db_engine(database_url)
    factory = create_session_factory(engine)
    outcome: list[str] = []

    def second_admin() -> None:
        try:
            with factory.begin() as session:
                check_name(session, "twin")
                create_project(session, "twin")
            outcome.append("created")
        except NameTaken:
            outcome.append("taken")

    try:
        with factory.begin() as first:
            check_name(first, "twin")
            create_project(first, "twin")
            other = threading.Thread(target=second_admin)
            other.start()
            other.join(0.5)
            assert other.is_alive(), f"the second check did not wait: {outcome}"
        other.join(10)
        assert outcome == ["taken"]
        with factory() as session:
            assert session.scalars(select(Project.id).where(Project.name == "twin")).all()[1:] == []
    finally:
        engine.dispose()


def test_events_list_filters(sqlite_url: str) -> None:
    created = run(sqlite_url, "projects", "create", "Shop")
    key, secret = created.stdout.strip(), created.stderr.split()[-1]
    other = run(sqlite_url, "projects", "create", "Other").stdout.strip()
    server = start_server(sqlite_url)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]

            def send(project_key: str, user: str, *events: Event) -> None:
                stub.IngestEvents(
                    ingest_pb2.IngestEventsRequest(
                        project_key=project_key, user_id=user, events=events
                    ),
                    timeout=5,
                )

            send(key, "u1", Event(id="a", type="signup", url="/s", visitor_id="v1"))
            send(key, "", Event(id="b", type="click", url="/c", visitor_id="v2"))
            send(key, "u2", Event(id="c", type="click", url="/d", visitor_id="v1"))
            send(other, "u1", Event(id="z", type="signup", url="/other", visitor_id="v1"))
            with pytest.raises(grpc.RpcError):
                send(key, "", Event(id="bad", type="click", url="nope"))
        # Dead letters are written by a thread of their own, after the answer.
        assert wait_for(lambda: len(dead_letters(sqlite_url)) == 1, 15) is not None

        def listed(*args: str) -> list[list[str]]:
            out = run(
                sqlite_url,
                "events",
                "list",
                "--secret-key",
                secret,
                "--target",
                server.target,
                *args,
            ).stdout
            return [line.split("\t") for line in out.splitlines()]

        every = listed()
        assert [(r[1], r[2], r[5]) for r in every] == [
            ("event", "signup", "/s"),
            ("event", "click", "/c"),
            ("event", "click", "/d"),
        ]  # oldest first, only this project's, no dead letter unless asked
        assert [r[5] for r in listed("--type", "click")] == ["/c", "/d"]
        assert [r[5] for r in listed("--visitor", "v1")] == ["/s", "/d"]
        assert [r[5] for r in listed("--user", "u1")] == ["/s"]
        assert [r[5] for r in listed("--type", "click", "--visitor", "v1")] == ["/d"]
        assert [r[5] for r in listed("--limit", "2")] == ["/c", "/d"]  # the newest two
        assert [r[5] for r in listed("--since", "1h")] == ["/s", "/c", "/d"]
        assert listed("--since", "2999-01-01T00:00:00Z") == []
        with_rejected = listed("--rejected")
        assert [r[1] for r in with_rejected].count("rejected") == 1
        # --limit counts events and rejections together: the newest two of all, not two of each.
        assert listed("--rejected", "--limit", "2") == with_rejected[-2:]
        assert [r[5] for r in with_rejected[-2:]] == ["/d", "nope"]
        assert listed("--project", "Shop") == every
        wrong = run(
            sqlite_url,
            "events",
            "list",
            "--secret-key",
            secret,
            "--target",
            server.target,
            "--project",
            "Other",
            check=False,
        )
        assert wrong.returncode == 1 and "not 'Other'" in wrong.stderr
        public = run(
            sqlite_url,
            "events",
            "list",
            "--secret-key",
            key,
            "--target",
            server.target,
            check=False,
        )
        assert public.returncode == 1 and "public key" in public.stderr
        bad_since = run(
            sqlite_url,
            "events",
            "list",
            "--secret-key",
            secret,
            "--target",
            server.target,
            "--since",
            "yesterday",
            check=False,
        )
        assert bad_since.returncode == 2 and "--since" in bad_since.stderr
    finally:
        server.server.stop(0)
    engine = create_db_engine(sqlite_url)
    with create_session_factory(engine)() as session:
        assert len(session.scalars(select(EventRow)).all()) == 4
    engine.dispose()


def test_migration_0009_adds_and_drops_rate_limit(database_url: str) -> None:
    from alembic import command

    from apex_ingest.ops.migrate import alembic_config, upgrade

    run(database_url, "projects", "create", "Kept")
    run(database_url, "projects", "update", "--project", "Kept", "--rate-limit", "7/second")
    command.downgrade(alembic_config(database_url), "0006")
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            columns = {
                row[0]
                for row in connection.exec_driver_sql(
                    "SELECT * FROM projects WHERE 1 = 0"
                ).cursor.description
            }
        assert "rate_limit" not in columns
        upgrade(database_url)  # back to the head: the project is there, with the default limit
        assert project_row(database_url, "Kept").rate_limit is None
    finally:
        engine.dispose()


def test_removing_an_origin_or_a_parameter_the_project_lacks_is_refused(sqlite_url: str) -> None:
    """A typo in a removal changed nothing and still printed the list as if it had."""
    run(sqlite_url, "projects", "create", "Shop", "--allowed-origin", "https://a.example")
    update = ["projects", "update", "--project", "Shop"]
    run(sqlite_url, *update, "--add-redact-param", "coupon")
    for option, absent, what in (
        ("--remove-allowed-origin", "https://typo.example", "an allowed origin"),
        ("--remove-redact-param", "coupn", "a redacted parameter"),
    ):
        refused = run(sqlite_url, *update, option, absent, check=False)
        assert refused.returncode == 2, refused.stderr
        assert f"Invalid value for {option}: not {what} of this project: {absent}" in (
            refused.stderr
        )
    row = project_row(sqlite_url, "Shop")
    assert (row.allowed_origins, row.redact_params) == (["https://a.example"], ["coupon"])
    # A removal of what the project has, beside a new list that replaces it, is no typo.
    replaced = run(
        sqlite_url,
        *update,
        "--allowed-origin",
        "https://b.example",
        "--remove-allowed-origin",
        "https://a.example",
        "--redact-param",
        "promo",
        "--remove-redact-param",
        "coupon",
    )
    assert replaced.returncode == 0, replaced.stderr
    row = project_row(sqlite_url, "Shop")
    assert (row.allowed_origins, row.redact_params) == (["https://b.example"], ["promo"])
    run(sqlite_url, *update, "--allowed-origin", "https://a.example")
    # The last origin goes with --any-origin, named or not.
    widened = run(
        sqlite_url, *update, "--remove-allowed-origin", "https://a.example", "--any-origin"
    )
    assert "allowed origins = * (any origin)" in widened.stdout
