"""The contract's limits are written in apex_ingest.common.limits; the documents must agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from apex_ingest.common import limits

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = json.loads((ROOT / "gateway" / "openapi.json").read_text())["components"]["schemas"]

#: property -> (JSON Schema keyword, the limit it must state)
EXPECTED = {
    "visitorId": ("maxLength", limits.MAX_ID_CHARS),
    "userId": ("maxLength", limits.MAX_ID_CHARS),
    "type": ("maxLength", limits.MAX_TYPE_CHARS),
    "url": ("maxLength", limits.MAX_URL_CHARS),
    "referrer": ("maxLength", limits.MAX_URL_CHARS),
    "id": ("maxLength", limits.MAX_EVENT_ID_CHARS),
    "events": ("maxItems", limits.MAX_EVENTS),
}


@pytest.mark.parametrize(
    ("schema", "prop"),
    [
        (name, prop)
        for name, schema in SCHEMAS.items()
        for prop in schema.get("properties", {})
        if prop in EXPECTED
    ],
)
def test_openapi_states_the_limits(schema: str, prop: str) -> None:
    keyword, limit = EXPECTED[prop]
    assert SCHEMAS[schema]["properties"][prop].get(keyword) == limit, f"{schema}.{prop}"


def test_the_proto_comments_state_the_limits() -> None:
    proto = (ROOT / "proto" / "apex_ingest" / "v1" / "ingest.proto").read_text()
    for phrase in (
        f"1-{limits.MAX_EVENTS} of them",
        f"1-{limits.MAX_EVENT_ID_CHARS} characters",
        f"1-{limits.MAX_TYPE_CHARS} characters",
        f"1-{limits.MAX_ID_CHARS} characters",
        f"at most {limits.MAX_URL_CHARS}",
        f"at most {limits.MAX_DATA_BYTES // 1024} KiB",
        f"nesting depth at most {limits.MAX_DATA_DEPTH}",
        f"Truncated to {limits.MAX_USER_AGENT_CHARS} characters",
    ):
        assert re.search(re.escape(phrase), proto), phrase
