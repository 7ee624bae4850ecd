"""Python SDK for Apex Ingest.

- ``Apex``: the batching HTTP client for customers' backends (standard library only).
- ``IngestClient``: the gRPC client for internal services; raises ``IngestError``.

The gRPC names are imported on first use, so ``from apex_ingest.client import Apex`` does not
load grpcio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apex_ingest.client.http import Apex, ApexError, ErrorCallback

if TYPE_CHECKING:
    from apex_ingest.client.grpc_client import IngestClient, IngestError

__all__ = ["Apex", "ApexError", "ErrorCallback", "IngestClient", "IngestError"]


def __getattr__(name: str) -> Any:
    if name in ("IngestClient", "IngestError"):
        from apex_ingest.client import grpc_client

        return getattr(grpc_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
