"""The reliability suite: fault injection under load (slow) and hostile input (fast).

Every test here carries the `reliability` marker, so `pytest -m reliability` (what
`make test-reliability` runs) runs them all. The slow ones are marked
`reliability(slow=True)`: a plain `pytest` run (`make test`) deselects them and keeps the fast
subset, unless a -m expression is given or APEX_RELIABILITY=full.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.reliability import support


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.option.markexpr or os.environ.get("APEX_RELIABILITY") == "full":
        return
    keep: list[pytest.Item] = []
    slow: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("reliability")
        (slow if marker is not None and marker.kwargs.get("slow") else keep).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not support.FIGURES:
        return
    terminalreporter.write_sep("=", "reliability figures")
    for figures in support.FIGURES:
        terminalreporter.write_line(json.dumps(figures))
    support.FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    support.FIGURES_FILE.write_text(json.dumps(support.FIGURES, indent=1) + "\n")
    terminalreporter.write_line(f"(also written to {support.FIGURES_FILE})")
