"""docs/deploy.md's metrics table names every metric the code defines."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFINED = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(apex_\w+)\"")


def exposed_names() -> set[str]:
    """Every metric as a scrape shows it (prometheus-client appends _total to counters)."""
    names = set()
    for source in [
        *ROOT.joinpath("apex_ingest").rglob("*.py"),
        *ROOT.joinpath("gateway").rglob("*.py"),
    ]:
        for kind, name in DEFINED.findall(source.read_text(encoding="utf-8")):
            names.add(f"{name}_total" if kind == "Counter" else name)
    return names


def test_the_metrics_table_lists_every_metric() -> None:
    table = re.findall(r"^\| `(apex_\w+)` \|", (ROOT / "docs" / "deploy.md").read_text(), re.M)
    defined = exposed_names()
    assert len(defined) > 20  # the pattern still finds the definitions
    assert defined - set(table) == set()
    assert set(table) - defined == set()
