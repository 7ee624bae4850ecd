"""Issue #18 end to end, through `apex-ingest serve` (granian gateway + gRPC server) on PostgreSQL:
key rotation (two live keys and one revoked), `projects update` of origins seen by the running
servers without a restart, and rate limits per project, all its keys together."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import requests

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc, project_pb2, project_pb2_grpc
from tests.conftest import fresh_postgres_database
from tests.server.test_admin_cli import run
from tests.server.test_identity import query
from tests.service import Service, running_service, wait_for

pytestmark = pytest.mark.postgres

#: The servers' cache time in these tests; a change must show within it (plus slack for a
#: loaded machine: wait_for returns as soon as it shows).
CACHE_TTL = 1.0
SHOWS_WITHIN = CACHE_TTL + 15


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_postgres_database("apex_admin") as url:
        yield url


@pytest.fixture(scope="module")
def service(database: str) -> Iterator[Service]:
    env = {
        "APEX_PROJECT_CACHE_TTL": str(CACHE_TTL),
        "APEX_UNKNOWN_KEY_TTL": str(CACHE_TTL),
        # One gateway worker: the rate-limit test counts exactly (each worker learns a key's
        # project from its own first answer).
        "APEX_HTTP_WORKERS": "1",
        "APEX_GRPC_PROCESSES": "1",
    }
    with running_service(database, env) as running:
        yield running


def post(service: Service, key: str, origin: str | None = None, **fields: Any) -> requests.Response:
    body = {"type": "pageview", "visitorId": "v1", "projectKey": key, "url": "/", **fields}
    headers = {"Origin": origin} if origin else {}
    return requests.post(f"{service.base_url}/api/events", json=body, headers=headers, timeout=10)


def create(database: str, name: str, *options: str) -> tuple[str, str]:
    created = run(database, "projects", "create", name, *options)
    return created.stdout.strip(), created.stderr.split()[-1]


def test_rotation_two_live_keys_and_one_revoked(service: Service, database: str) -> None:
    old, old_secret = create(database, "rotating")
    ci = run(database, "projects", "keys", "add", "--project", old, "--label", "ci").stdout.strip()
    new = run(database, "projects", "keys", "add", "--project", old, "--label", "2027").stdout
    new = new.strip()
    new_secret = run(
        database, "projects", "keys", "add", "--project", old, "--kind", "secret"
    ).stdout.strip()
    for key in (old, ci, new):
        answer = post(service, key, id=f"before-{key[-6:]}")
        assert answer.status_code == 200, (answer.text, service.output())

    run(database, "projects", "keys", "revoke", "--project", "rotating", old)
    run(database, "projects", "keys", "revoke", "--project", "rotating", old_secret)
    assert wait_for(lambda: post(service, old).status_code == 401, SHOWS_WITHIN) is not None
    refused = post(service, old)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    for key in (ci, new):  # the two live keys go on
        assert post(service, key, id=f"after-{key[-6:]}").status_code == 200

    with grpc.insecure_channel(service.grpc_target) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as unknown:
            ingest.IngestEvents(
                ingest_pb2.IngestEventsRequest(
                    project_key=old, events=[ingest_pb2.Event(type="t", url="/")]
                ),
                timeout=5,
            )
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED  # like an unknown key
        admin = project_pb2_grpc.ProjectServiceStub(channel)  # type: ignore[no-untyped-call]

        def describe(secret: str) -> project_pb2.GetProjectResponse:
            answer: project_pb2.GetProjectResponse = admin.GetProject(
                project_pb2.GetProjectRequest(),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=5,
            )
            return answer

        with pytest.raises(grpc.RpcError) as revoked_secret:
            describe(old_secret)
        assert revoked_secret.value.code() == grpc.StatusCode.UNAUTHENTICATED
        project = describe(new_secret)
        assert project.name == "rotating" and list(project.public_keys) == [ci, new]

    # Events keep the project, not the key: the five sent with ids, one project id.
    stored = query(
        database,
        "SELECT project_id FROM events WHERE event_id LIKE 'before-%' OR event_id LIKE 'after-%'",
    )
    assert [row[0] for row in stored] == [project.id] * 5
    listing = run(database, "projects", "keys", "list", "--project", "rotating").stdout
    states = [line.split("\t")[5].split()[0] for line in listing.splitlines()]
    assert states == ["revoked", "revoked", "active", "active", "active"]


def test_projects_update_origins_reaches_running_servers(service: Service, database: str) -> None:
    key, _ = create(database, "origins", "--allowed-origin", "https://a.example")
    pid = service.process.pid
    assert post(service, key, "https://a.example").status_code == 200
    assert post(service, key, "https://b.example").status_code == 403

    run(
        database,
        "projects",
        "update",
        "--project",
        key,
        "--add-allowed-origin",
        "https://b.example",
    )
    assert wait_for(
        lambda: post(service, key, "https://b.example").status_code == 200, SHOWS_WITHIN
    )
    run(
        database,
        "projects",
        "update",
        "--project",
        key,
        "--remove-allowed-origin",
        "https://a.example",
    )
    assert wait_for(
        lambda: post(service, key, "https://a.example").status_code == 403, SHOWS_WITHIN
    )
    assert post(service, key, "https://b.example").status_code == 200
    run(database, "projects", "update", "--project", key, "--any-origin")
    assert wait_for(
        lambda: post(service, key, "https://c.example").status_code == 200, SHOWS_WITHIN
    )
    assert service.process.poll() is None and service.process.pid == pid  # no restart


def test_rate_limit_per_project_all_keys_together(service: Service, database: str) -> None:
    first, _ = create(database, "limited")
    second = run(database, "projects", "keys", "add", "--project", first).stdout.strip()
    other, _ = create(database, "neighbour")
    run(database, "projects", "update", "--project", first, "--rate-limit", "4/hour")
    # Each key's first request teaches the gateway the key's project (and its limit).
    assert post(service, first).status_code == 200
    assert post(service, second).status_code == 200

    answers = [post(service, key) for key in (first, second, first, second, first, second)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429, 429], service.output()
    assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"4"}
    assert answers[3].headers["X-RateLimit-Remaining"] == "0"
    assert int(answers[4].headers["Retry-After"]) >= 1
    # Another project's budget is its own (APEX_RATE_LIMIT, 100/second by default).
    neighbour = post(service, other)
    assert neighbour.status_code == 200 and neighbour.headers["X-RateLimit-Limit"] == "100"


def test_a_throttled_project_sees_its_limit_lifted(service: Service, database: str) -> None:
    """A refused project gets no answers to learn a new limit from: the gateway asks the
    server (validate_only: nothing stored) once its entry is REFRESH_SECONDS old."""
    key, _ = create(database, "throttled")
    run(database, "projects", "update", "--project", key, "--rate-limit", "0/second")
    assert post(service, key, id="taught").status_code == 200  # unknown yet: the default limit
    refused = [post(service, key, id=f"refused-{n}") for n in range(3)]
    assert [a.status_code for a in refused] == [429] * 3, service.output()
    run(database, "projects", "update", "--project", key, "--default-rate-limit")
    # A partial batch holding an invalid event (what the SDK's partial mode sends) asks too.
    batch = {
        "projectKey": key,
        "partial": True,
        "events": [{"type": "t", "url": "/", "id": "lifted"}, {"type": "t", "url": "nope"}],
    }
    url = f"{service.base_url}/api/events"
    lifted = wait_for(
        lambda: requests.post(url, json=batch, timeout=10).status_code == 200, SHOWS_WITHIN
    )
    assert lifted, service.output()
    stored = query(
        database,
        "SELECT e.event_id FROM events e JOIN project_keys k ON k.project_id = e.project_id"
        " WHERE k.key = :key ORDER BY e.event_id",
        key=key,
    )
    assert [row[0] for row in stored] == ["lifted", "taught"]  # no refused one, no probe
