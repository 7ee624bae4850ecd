"""The SDK's copies of the shared limits (``apex_ingest_sdk.limits``) equal the server's."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from apex_ingest_sdk import limits as sdk_limits

from gateway import config as gateway_config

NAMES = (
    "MAX_EVENTS",
    "MAX_BODY_BYTES",
    "MAX_ID_CHARS",
    "MAX_EVENT_ID_CHARS",
    "MAX_TYPE_CHARS",
    "MAX_URL_CHARS",
    "MAX_DATA_BYTES",
    "MAX_DATA_DEPTH",
)


def server_limits() -> ModuleType:
    """``apex_ingest.common.limits``; until it exists, the validation module's constants."""
    for name in ("apex_ingest.common.limits", "apex_ingest.server.validation"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise
    return importlib.import_module("apex_ingest.validation")


@pytest.mark.parametrize("name", NAMES)
def test_sdk_limit_equals_the_servers(name: str) -> None:
    server = server_limits()
    if name == "MAX_BODY_BYTES" and not hasattr(server, name):
        # Before apex_ingest.common.limits, the default body limit is the gateway's setting.
        assert sdk_limits.MAX_BODY_BYTES == gateway_config.DEFAULT_MAX_BODY_BYTES
        return
    assert getattr(sdk_limits, name) == getattr(server, name)


def test_sdk_copies_every_shared_limit() -> None:
    assert set(NAMES) <= set(sdk_limits.__all__)


def test_generated_ids_fit_the_event_id_limit() -> None:
    assert sdk_limits.EVENT_ID_HEX_CHARS <= sdk_limits.MAX_EVENT_ID_CHARS
