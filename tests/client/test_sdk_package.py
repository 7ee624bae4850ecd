"""The SDK as its own distribution: it does not need the server, and its generated messages can
share a process with the server's."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SDK_PROTO = ROOT / "sdk" / "python" / "apex_ingest_sdk" / "_proto"
#: What `make proto` does to the generated module for the SDK's copy: the module name the
#: message classes report (and pickle by), which protoc derives from the .proto's path.
MODULE_RENAME = (
    "'apex_ingest.v1.ingest_pb2'",
    "'apex_ingest_sdk._proto.ingest_pb2'",
)


def run(code: str, **env: str) -> None:
    subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT, env={**os.environ, **env}
    )


def test_importing_apex_loads_neither_grpc_nor_the_server() -> None:
    run(
        "import sys\n"
        "from apex_ingest_sdk import Apex\n"
        "heavy = [m for m in ('grpc', 'google.protobuf', 'apex_ingest', 'sqlalchemy', 'flask') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )


def test_the_grpc_client_does_not_import_the_server_package() -> None:
    run(
        "import sys\n"
        "from apex_ingest_sdk import IngestClient\n"
        "server = sorted(m for m in sys.modules if m.split('.')[0] == 'apex_ingest')\n"
        "assert not server, server\n"
    )


BOTH = """
import pickle, sys
first, second = sys.argv[1:]
import importlib
a = importlib.import_module(first)
b = importlib.import_module(second)
assert a.DESCRIPTOR.serialized_pb == b.DESCRIPTOR.serialized_pb
assert a.DESCRIPTOR.name == b.DESCRIPTOR.name == "apex_ingest/v1/ingest.proto"
event = b.Event(id="x", type="t", url="/")
assert a.Event.FromString(event.SerializeToString()) == a.Event(id="x", type="t", url="/")
request = a.IngestEventsRequest(project_key="pk", events=[a.Event(id="y")])
assert b.IngestEventsRequest.FromString(request.SerializeToString()).events[0].id == "y"
assert pickle.loads(pickle.dumps(event)) == event
"""


@pytest.mark.parametrize("implementation", ["upb", "python"])
@pytest.mark.parametrize(
    "order",
    [
        ("apex_ingest.v1.ingest_pb2", "apex_ingest_sdk._proto.ingest_pb2"),
        ("apex_ingest_sdk._proto.ingest_pb2", "apex_ingest.v1.ingest_pb2"),
    ],
    ids=["server-first", "sdk-first"],
)
def test_server_and_sdk_stubs_share_one_process(
    order: tuple[str, str], implementation: str
) -> None:
    subprocess.run(
        [sys.executable, "-c", BOTH, *order],
        check=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation},
    )


def test_sdk_stubs_are_the_server_stubs_but_for_the_module_name() -> None:
    server = (ROOT / "apex_ingest" / "v1" / "ingest_pb2.py").read_text()
    sdk = (SDK_PROTO / "ingest_pb2.py").read_text()
    assert sdk == server.replace(*MODULE_RENAME)
    server_pyi = (ROOT / "apex_ingest" / "v1" / "ingest_pb2.pyi").read_text()
    assert (SDK_PROTO / "ingest_pb2.pyi").read_text() == server_pyi


def test_sdk_stubs_are_what_protoc_generates() -> None:
    pytest.importorskip("grpc_tools")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-Iproto",
                f"--python_out={out}",
                f"--pyi_out={out}",
                "proto/apex_ingest/v1/ingest.proto",
            ],
            check=True,
            timeout=60,
            cwd=ROOT,
        )
        generated = Path(out) / "apex_ingest" / "v1"
        expected = (generated / "ingest_pb2.py").read_text().replace(*MODULE_RENAME)
        assert (SDK_PROTO / "ingest_pb2.py").read_text() == expected, "run `make proto`"
        assert (SDK_PROTO / "ingest_pb2.pyi").read_text() == (
            generated / "ingest_pb2.pyi"
        ).read_text(), "run `make proto`"
