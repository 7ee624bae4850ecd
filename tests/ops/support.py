"""Helpers for the operations tests: scraping Prometheus metrics, reading JSON log lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]


def scrape(url: str) -> list[tuple[str, Labels, float]]:
    """Every sample at a /metrics URL, as (name, labels, value)."""
    response = requests.get(url, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


Samples = list[tuple[str, Labels, float]]


def scrape_until(url: str, done: Callable[[Samples], bool], timeout: float = 10) -> Samples:
    """Scrape until done(samples) holds, or timeout; the last scrape either way.

    The process serving a scrape writes its own samples first; the others' reach the shared
    files within apex_ingest.common.metric_values.FLUSH_SECONDS.
    """
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def value(samples: list[tuple[str, Labels, float]], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
    return sum(
        sample_value
        for sample_name, sample_labels, sample_value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


def has_metric(samples: list[tuple[str, Labels, float]], name: str) -> bool:
    return any(sample_name == name for sample_name, _, _ in samples)


def json_lines(output: str) -> list[dict[str, Any]]:
    """Each line of `output` parsed as JSON; fails naming the first line that is not."""
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records
