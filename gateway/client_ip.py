"""The client's IP address: the socket peer, or X-Forwarded-For when a trusted proxy sent it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from apex_ingest.common.ip import truncated_ip
from gateway.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_ip(environ: Mapping[str, Any], trusted: Iterable[IPNetwork]) -> str:
    """The address of the client, as text; "" when even the peer's address is unknown.

    X-Forwarded-For is a list that every proxy appends its peer to, so only the entries added by
    proxies we trust are true. Walk it from the right (nearest hop first) while the hop is a
    trusted proxy; the first untrusted address is the client. Anything left of it could have
    been written by the client itself, so it is never used.
    """
    trusted = tuple(trusted)
    peer = _parse_ip(str(environ.get("REMOTE_ADDR", "")))
    if peer is None:
        return ""
    if not trusted or not _is_trusted(peer, trusted):
        return str(peer)
    forwarded = str(environ.get("HTTP_X_FORWARDED_FOR", ""))
    current = peer
    for hop in reversed(forwarded.split(",")):
        address = _parse_ip(hop)
        if address is None:
            # A malformed entry: nothing at or left of it can be trusted.
            break
        current = address
        if not _is_trusted(address, trusted):
            break
    return str(current)


def _is_trusted(address: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in trusted)


def _parse_ip(text: str) -> IPAddress | None:
    """Parse an address as proxies write it: plain, "[v6]:port", or "v4:port"."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def logged_ip(ip: str | None, mode: str) -> str | None:
    """What the gateway's own logs keep of a client IP (APEX_LOG_CLIENT_IP): `truncated` (the
    default: IPv4 /24, IPv6 /48, as a project's `truncated` IP mode keeps it), `full` or `none`.

    The gateway does not know the projects' IP modes, so by default it never writes a whole IP.
    """
    if not ip or mode == "none":
        return None
    if mode == "full":
        return ip
    address = _parse_ip(ip)
    return None if address is None else truncated_ip(str(address))
