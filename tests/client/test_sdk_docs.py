"""docs/sdk.md says what the SDK does: every error code it can hand to on_error, its backoff."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from apex_ingest_sdk import client, consumer
from apex_ingest_sdk.errors import CLIENT_CODES, SERVER_CODES

DOC = (Path(__file__).resolve().parents[2] / "docs" / "sdk.md").read_text()
ERRORS_SECTION = DOC.split("### Errors", 1)[1].split("\n### ", 1)[0]
#: The one code that comes with an answer but is not the gateway's: a partial batch's rejects.
PARTIAL_CODE = "rejected"


def test_client_codes_are_every_code_the_client_gives() -> None:
    source = inspect.getsource(consumer) + inspect.getsource(client)
    given = set(re.findall(r'code="([a-z_]+)"', source))
    assert given - {PARTIAL_CODE} == set(CLIENT_CODES)


def test_every_error_code_is_documented() -> None:
    codes = [*SERVER_CODES.values(), *CLIENT_CODES, PARTIAL_CODE]
    assert [c for c in codes if f"`{c}`" not in ERRORS_SECTION] == []


def test_the_backoff_formula_is_the_clients() -> None:
    # The first retry waits up to backoff_base * 2**0 (sdk/python/tests/test_consumer.py,
    # test_backoff_doubles_from_backoff_base).
    assert "`min(backoff_max, backoff_base * 2**(n - 1))`" in DOC


def test_the_pool_context_manager_is_warned_about() -> None:
    # `with Pool()` terminates its workers with SIGTERM: their queued events are lost.
    assert "`with Pool() as pool:` loses events" in DOC
    assert "pool.close()" in DOC and "pool.join()" in DOC
