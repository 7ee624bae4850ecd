"""Key rotation over gRPC: ProjectService.ListKeys, CreateKey, RevokeKey (issue #18 item 2)."""

from __future__ import annotations

import grpc
import pytest

from apex_ingest.v1 import ingest_pb2, project_pb2
from tests.conftest import RunningServer
from tests.server.test_project_service import admin, bearer, ingest, new_project


def test_rotate_keys_over_grpc(server: RunningServer, channel: grpc.Channel) -> None:
    public, secret = new_project(server.database_url)
    _, other_secret = new_project(server.database_url)
    stub = admin(channel)
    created = stub.CreateKey(
        project_pb2.CreateKeyRequest(kind="public", label="2027"),
        metadata=bearer(secret),
        timeout=5,
    )
    assert created.key.startswith("pk_live_") and created.info.label == "2027"
    new_secret = stub.CreateKey(
        project_pb2.CreateKeyRequest(kind="secret"), metadata=bearer(secret), timeout=5
    )
    assert new_secret.key.startswith("sk_live_") and new_secret.info.label == "default"
    assert new_secret.key not in new_secret.info.key  # listed only by its digest

    keys = stub.ListKeys(project_pb2.ListKeysRequest(), metadata=bearer(new_secret.key)).keys
    assert [(k.kind, k.label) for k in keys] == [
        ("public", "default"),
        ("secret", "default"),
        ("public", "2027"),
        ("secret", "default"),
    ]
    assert keys[0].key == public and not keys[0].HasField("revoked_at")

    revoked = stub.RevokeKey(
        project_pb2.RevokeKeyRequest(id=keys[0].id), metadata=bearer(secret), timeout=5
    )
    assert revoked.info.HasField("revoked_at")
    send = ingest(channel).IngestEvents
    event = [ingest_pb2.Event(type="t", url="/")]
    with pytest.raises(grpc.RpcError) as refused:  # the test server caches nothing (TTL 0)
        send(ingest_pb2.IngestEventsRequest(project_key=public, events=event), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        send(
            ingest_pb2.IngestEventsRequest(project_key=created.key, events=event), timeout=5
        ).received
        == 1
    )

    def revoke_code(key_id: int, who: str, allow_last: bool = False) -> grpc.StatusCode:
        try:
            stub.RevokeKey(
                project_pb2.RevokeKeyRequest(id=key_id, allow_last=allow_last),
                metadata=bearer(who),
                timeout=5,
            )
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    assert revoke_code(keys[2].id, secret) == grpc.StatusCode.FAILED_PRECONDITION  # last public
    assert revoke_code(keys[2].id, other_secret) == grpc.StatusCode.NOT_FOUND  # not theirs
    assert revoke_code(0, secret) == grpc.StatusCode.NOT_FOUND
    assert revoke_code(keys[1].id, secret) == grpc.StatusCode.OK  # the caller's own secret key
    assert revoke_code(keys[3].id, secret) == grpc.StatusCode.UNAUTHENTICATED  # it is revoked
    assert revoke_code(keys[2].id, new_secret.key, allow_last=True) == grpc.StatusCode.OK
    with pytest.raises(grpc.RpcError) as bad_kind:
        stub.CreateKey(
            project_pb2.CreateKeyRequest(kind="admin"), metadata=bearer(new_secret.key), timeout=5
        )
    assert bad_kind.value.code() == grpc.StatusCode.INVALID_ARGUMENT
