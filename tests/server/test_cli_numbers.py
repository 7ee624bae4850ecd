"""Numbers the commands turn into dates or row ids: out of range is a bad option (exit 2), never
an OverflowError from datetime or the database driver."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from apex_ingest.common.settings import ConfigError, ServerSettings, load
from apex_ingest.ops import partitions
from tests.server.test_cli import refusal, run

TOO_BIG = "99999999999999999999"  # past a BIGINT


def test_retention_days_are_capped_like_the_setting(sqlite_url: str) -> None:
    refused = run(sqlite_url, "db", "retention", "--days", "1000000", check=False)
    assert refusal(refused) == (
        "Error: Invalid value for '--days': 1000000 is not in the range 1<=x<=36500."
    )
    engine = create_engine(sqlite_url)
    try:
        with pytest.raises(ValueError, match="1 to 36500 days"):
            partitions.apply_retention(engine, 1_000_000)
    finally:
        engine.dispose()


def test_dead_letter_max_age_is_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead-letter writer subtracts it from now: past year 1 it would fail at every prune."""
    monkeypatch.setenv("APEX_DEAD_LETTER_MAX_AGE_DAYS", "1000000")
    with pytest.raises(ConfigError, match="APEX_DEAD_LETTER_MAX_AGE_DAYS: must be at most 36500"):
        load(ServerSettings)


@pytest.mark.parametrize("since", ["999999999d", "0001-01-01T00:00:00+01:00"])
def test_a_since_before_year_1_is_a_bad_option(sqlite_url: str, since: str) -> None:
    refused = run(
        sqlite_url, "events", "list", "--secret-key", "sk_live_x", "--since", since, check=False
    )
    assert refusal(refused) == f"Error: Invalid value for --since: {since!r} is before year 1"


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters", "show", "--project", "Shop", TOO_BIG],
        ["dead-letters", "replay", "--project", "Shop", TOO_BIG],
        ["dead-letters", "purge", "--project", "Shop", "1", TOO_BIG],
        ["projects", "keys", "revoke", "--project", "Shop", "--id", TOO_BIG],
        ["dead-letters", "show", "--project", "Shop", "0"],
    ],
    ids=" ".join,
)
def test_row_ids_out_of_range_are_bad_arguments(sqlite_url: str, args: list[str]) -> None:
    run(sqlite_url, "projects", "create", "Shop")
    error = refusal(run(sqlite_url, *args, check=False))
    assert "is not in the range 1<=x<=9223372036854775807" in error
