"""How the gateway learns each key's project for per-project rate limits (issue #18 item 2)."""

from __future__ import annotations

import grpc
import pytest

from apex_ingest.common import key_projects
from apex_ingest.common.key_projects import KeyProject
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.models import Project
from apex_ingest.server.projects import PUBLIC, add_key, create_project, revoke_key
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from gateway import known_keys
from gateway.known_keys import KnownKeys
from tests.conftest import RunningServer
from tests.gateway.conftest import Api


def test_ingest_answers_name_each_accepted_keys_project(grpc_server: RunningServer) -> None:
    engine = create_db_engine(grpc_server.database_url)
    with create_session_factory(engine).begin() as session:
        shop = create_project(session, "shop")
        rotated = add_key(session, shop.id, PUBLIC, label="rotated")
        blog = create_project(session, "blog")
        blog.rate_limit = "5/second"
        shop_id, shop_key, blog_id, blog_key = shop.id, shop.key, blog.id, blog.key
    engine.dispose()

    def request(key: str, url: str = "/") -> ingest_pb2.IngestEventsRequest:
        return ingest_pb2.IngestEventsRequest(
            project_key=key, events=[ingest_pb2.Event(type="t", url=url)]
        )

    with grpc.insecure_channel(grpc_server.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        _, call = stub.IngestMany.with_call(
            ingest_pb2.IngestManyRequest(
                requests=[
                    request(shop_key),
                    request("pk_live_nobody"),
                    request(rotated),
                    request(blog_key),
                    request(blog_key, url="not a url"),  # refused: no entry
                ]
            ),
            timeout=5,
        )
        entries = key_projects.decode(call.trailing_metadata())
        _, single = stub.IngestEvents.with_call(request(rotated), timeout=5)
    shop_entry = KeyProject(shop_id, "", shop_key)  # the uid is the first key, for every key
    assert entries == [
        shop_entry,
        None,
        shop_entry,
        KeyProject(blog_id, "5/second", blog_key),
        None,
    ]
    assert key_projects.decode(single.trailing_metadata()) == [shop_entry]


def test_decode_ignores_what_it_cannot_read() -> None:
    name = key_projects.PROJECTS_METADATA
    assert key_projects.decode(None) == []
    assert key_projects.decode([(name, "not json")]) == []
    assert key_projects.decode([(name, '{"a": 1}')]) == []
    assert key_projects.decode([(name, '[[1, "", "u"], [2, 3], "x", null]')]) == [
        KeyProject(1, "", "u"),
        None,
        None,
        None,
    ]
    encoded = key_projects.encode([KeyProject(7, "1/second", "pk"), None])
    assert key_projects.decode([("other", "x"), (name, encoded)]) == [
        KeyProject(7, "1/second", "pk"),
        None,
    ]


def test_known_keys_learn_and_forget() -> None:
    known = KnownKeys()
    known.learn(["a", "b"], [KeyProject(1, "", "pa"), None])
    assert known.project_of("a") == KeyProject(1, "", "pa") and known.project_of("b") is None
    known.learn(["a"], [])  # an older server: nothing learnt, nothing forgotten
    assert known.project_of("a") is not None
    known.learn(["a"], [KeyProject(1, "3/second", "pa")])  # a new limit replaces the old
    assert known.project_of("a") == KeyProject(1, "3/second", "pa")
    known.forget("a")  # refused (revoked): its requests count under the key again
    assert known.project_of("a") is None


@pytest.mark.parametrize("app_config", [{"APEX_RATE_LIMIT": "3/minute"}])
def test_a_revoked_key_stops_using_its_projects_budget(
    api: Api, grpc_server: RunningServer
) -> None:
    engine = create_db_engine(grpc_server.database_url)
    with create_session_factory(engine).begin() as session:
        project = create_project(session, "shop")
        leaked, kept = project.key, add_key(session, project.id, PUBLIC, label="new")

    def post(key: str) -> int:
        body = {"projectKey": key, "events": [{"type": "t", "url": "/"}]}
        return api.post(body).status_code

    assert [post(leaked), post(kept)] == [200, 200]  # both keys now known as the project's
    with create_session_factory(engine).begin() as session:
        assert revoke_key(session, PUBLIC, leaked)
    engine.dispose()
    # The server refuses the revoked key (the test server caches nothing); the gateway forgets
    # it, so its flood is counted under the key alone, not under the project.
    assert [post(leaked) for _ in range(4)] == [401, 401, 429, 429]
    assert [post(kept), post(kept), post(kept)] == [200, 200, 429]  # the project's 3 per minute


@pytest.mark.parametrize("app_config", [{"APEX_RATE_LIMIT": "2/minute"}])
def test_a_throttled_key_revoked_meanwhile_is_answered_401_not_429(
    api: Api, grpc_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused key's project is asked again (ratelimit._limit_changed); if the server now
    refuses the key itself, that is the answer: the request would never be accepted, waiting
    out a rate limit cannot help."""
    monkeypatch.setattr(known_keys, "REFRESH_SECONDS", 0.0)  # ask on every refusal
    engine = create_db_engine(grpc_server.database_url)
    with create_session_factory(engine).begin() as session:
        project = create_project(session, "shop")
        leaked = project.key
        add_key(session, project.id, PUBLIC, label="new")  # revoking its last key is refused

    def post(key: str) -> int:
        body = {"projectKey": key, "events": [{"type": "t", "url": "/"}]}
        return api.post(body).status_code

    answers = [post(leaked) for _ in range(4)]
    assert answers[0] == 200 and answers[-1] == 429, answers  # 2 per minute, then refused
    with create_session_factory(engine).begin() as session:
        assert revoke_key(session, PUBLIC, leaked)
    engine.dispose()
    assert post(leaked) == 401


@pytest.mark.parametrize("app_config", [{"APEX_RATE_LIMIT": "2/minute"}])
def test_a_throttled_origin_removed_meanwhile_is_answered_403_not_429(
    api: Api, grpc_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known_keys, "REFRESH_SECONDS", 0.0)
    engine = create_db_engine(grpc_server.database_url)
    with create_session_factory(engine).begin() as session:
        project = create_project(session, "shop")
        project.allowed_origins = ["https://shop.example"]
        key, project_id = project.key, project.id

    def post() -> int:
        body = {"projectKey": key, "events": [{"type": "t", "url": "/"}]}
        return api.post(body, headers={"Origin": "https://shop.example"}).status_code

    answers = [post() for _ in range(4)]
    assert answers[0] == 200 and answers[-1] == 429, answers
    with create_session_factory(engine).begin() as session:
        session.get(Project, project_id).allowed_origins = ["https://other.example"]  # type: ignore[union-attr]
    engine.dispose()
    assert post() == 403
