"""The SDK's copies of the shared limits (``apex_ingest_sdk.limits``) equal the server's."""

from __future__ import annotations

import pytest
from apex_ingest_sdk import limits as sdk_limits

from apex_ingest.common import limits as server_limits

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


@pytest.mark.parametrize("name", NAMES)
def test_sdk_limit_equals_the_servers(name: str) -> None:
    assert getattr(sdk_limits, name) == getattr(server_limits, name)


def test_sdk_copies_every_shared_limit() -> None:
    assert set(NAMES) <= set(sdk_limits.__all__)


def test_generated_ids_fit_the_event_id_limit() -> None:
    assert sdk_limits.EVENT_ID_HEX_CHARS <= sdk_limits.MAX_EVENT_ID_CHARS
