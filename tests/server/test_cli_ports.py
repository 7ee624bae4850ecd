"""The server commands' ports: each one taken, or given twice, stops them in one line (exit 2)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from apex_ingest.common.settings import ConfigError, ServerSettings
from apex_ingest.ops import grpc_process
from tests.server.test_cli import free_port, run_env


@contextmanager
def taken_port() -> Iterator[int]:
    """A port something listens on (with SO_REUSEPORT, as another apex-ingest would)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "panicked" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: {expected}"], result.stderr[-2000:]


def server_ports() -> dict[str, str]:
    return {"APEX_HTTP_PORT": str(free_port()), "APEX_GRPC_PORT": str(free_port())}


@pytest.mark.parametrize(
    "command",
    [["serve"], ["grpc"], ["grpc", "--processes", "1"], ["demo", "--ports-free"]],
    ids=" ".join,
)
def test_a_taken_metrics_port_is_refused_like_the_others(
    sqlite_url: str, command: list[str]
) -> None:
    with taken_port() as taken:
        env = {**server_ports(), "APEX_METRICS_PORT": str(taken)}
        result = run_env(sqlite_url, env, *command, check=False)
    assert_one_line_exit_2(
        result,
        f"127.0.0.1:{taken} (APEX_METRICS_PORT) is already in use: "
        "is another apex-ingest running there?",
    )


@pytest.mark.parametrize(
    ("command", "second", "first"),
    [
        ("serve", "APEX_METRICS_PORT", "APEX_HTTP_PORT"),
        ("serve", "APEX_HTTP_PORT", "APEX_GRPC_PORT"),
        ("grpc", "APEX_METRICS_PORT", "APEX_GRPC_PORT"),
    ],
)
def test_one_port_given_to_two_servers_is_refused(
    sqlite_url: str, command: str, second: str, first: str
) -> None:
    port = str(free_port())
    env = {**server_ports(), first: port, second: port}
    result = run_env(sqlite_url, env, command, check=False)
    assert_one_line_exit_2(result, f"{second} and {first} are both {port}: give each its own port")


def test_a_taken_loader_port_is_refused(sqlite_url: str) -> None:
    with taken_port() as taken:
        env = {"APEX_STREAM_URL": "nats://127.0.0.1:1", "APEX_LOADER_PORT": str(taken)}
        result = run_env(sqlite_url, env, "loader", check=False)
    assert_one_line_exit_2(
        result,
        f"127.0.0.1:{taken} (APEX_LOADER_PORT) is already in use: "
        "is another apex-ingest running there?",
    )


def test_a_grpc_process_whose_metrics_port_was_taken_since_starts_nothing(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken between the command's check and the bind: the process stops with the same one-line
    error before its gRPC server exists, not with a traceback once it listens."""

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the gRPC server was created before the metrics port was had")

    monkeypatch.setattr(grpc_process, "create_server", never)
    monkeypatch.delenv("_APEX_METRICS_SERVED_BY_PARENT", raising=False)
    with taken_port() as taken:
        settings = ServerSettings(
            database_url=sqlite_url, migrate_on_start=False, metrics_port=taken
        )
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{taken} \(APEX_METRICS_PORT\)"):
            grpc_process.serve(settings)
