"""The tests' TCP proxy behaves as the network it stands for."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.tcp_proxy import TcpProxy


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """A listening socket standing for PostgreSQL."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


@pytest.fixture
def proxy(upstream: socket.socket) -> Iterator[TcpProxy]:
    proxy = TcpProxy("127.0.0.1", upstream.getsockname()[1])
    yield proxy
    proxy.close()


def connect(proxy: TcpProxy, upstream: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(the client's end, the upstream's end) of one connection through the proxy."""
    client = socket.create_connection(("127.0.0.1", proxy.port))
    server_side, _ = upstream.accept()
    client.settimeout(5)
    server_side.settimeout(5)
    return client, server_side


def test_a_client_that_goes_away_ends_the_upstream_connection(
    proxy: TcpProxy, upstream: socket.socket
) -> None:
    # A client killed mid-transaction must look to PostgreSQL like a closed connection, as it
    # would without the proxy; otherwise its backend holds the transaction's locks for ever.
    client, server_side = connect(proxy, upstream)
    client.sendall(b"BEGIN")
    assert server_side.recv(5) == b"BEGIN"
    client.close()
    assert server_side.recv(1) == b""


def test_cut_ends_both_sides_and_restore_takes_new_connections(
    proxy: TcpProxy, upstream: socket.socket
) -> None:
    client, server_side = connect(proxy, upstream)
    proxy.cut()
    assert server_side.recv(1) == b""
    assert client.recv(1) == b""
    proxy.restore()
    again, accepted = connect(proxy, upstream)
    again.sendall(b"x")
    assert accepted.recv(1) == b"x"
