"""The tests' TCP proxy behaves as the network it stands for."""

from __future__ import annotations

import socket

from tests.tcp_proxy import TcpProxy


def test_a_client_that_goes_away_ends_the_upstream_connection() -> None:
    # A client killed mid-transaction must look to PostgreSQL like a closed connection, as it
    # would without the proxy; otherwise its backend holds the transaction's locks for ever.
    upstream = socket.create_server(("127.0.0.1", 0))
    proxy = TcpProxy("127.0.0.1", upstream.getsockname()[1])
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        server_side, _ = upstream.accept()
        client.sendall(b"BEGIN")
        server_side.settimeout(5)
        assert server_side.recv(5) == b"BEGIN"
        client.close()
        assert server_side.recv(1) == b""
    finally:
        proxy.close()
        upstream.close()


def test_cut_ends_both_sides_and_restore_takes_new_connections() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    proxy = TcpProxy("127.0.0.1", upstream.getsockname()[1])
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        server_side, _ = upstream.accept()
        client.settimeout(5)
        server_side.settimeout(5)
        proxy.cut()
        assert server_side.recv(1) == b""
        assert client.recv(1) == b""
        proxy.restore()
        again = socket.create_connection(("127.0.0.1", proxy.port))
        accepted, _ = upstream.accept()
        again.sendall(b"x")
        accepted.settimeout(5)
        assert accepted.recv(1) == b"x"
    finally:
        proxy.close()
        upstream.close()
