"""Python SDK for Apex Ingest.

- ``Apex``: the batching HTTP client for customers' backends (standard library only).
- ``IngestClient``: the gRPC client for internal services; raises ``IngestError``. Needs the
  ``grpc`` extra, and is imported on first use: ``from apex_ingest_sdk import Apex`` does not
  load grpcio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apex_ingest_sdk.client import DEFAULT_HOST, Apex
from apex_ingest_sdk.errors import ApexError, ErrorCallback
from apex_ingest_sdk.transport import Response, Transport, UrllibTransport

if TYPE_CHECKING:
    from apex_ingest_sdk.grpc_client import IngestClient, IngestError, PartialResult

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HOST",
    "Apex",
    "ApexError",
    "ErrorCallback",
    "IngestClient",
    "IngestError",
    "PartialResult",
    "Response",
    "Transport",
    "UrllibTransport",
    "__version__",
]

_LAZY = ("IngestClient", "IngestError", "PartialResult")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            from apex_ingest_sdk import grpc_client
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] not in ("grpc", "google"):
                raise
            raise ImportError(
                f"apex_ingest_sdk.{name} needs the grpc extra: "
                "pip install 'apex-ingest-sdk[grpc]' (from a checkout of Apex Ingest: "
                f"pip install './sdk/python[grpc]') ({exc})"
            ) from exc
        return getattr(grpc_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
