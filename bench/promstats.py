"""Histograms from the gateway's /metrics, per load phase (a scrape before and after, subtracted).

Used for the gateway's `apex_gateway_coalesced_requests` (HTTP requests carried by one gRPC
call, when the gateway coalesces) and the server's `apex_group_commit_requests` /
`apex_group_commit_rows` (one observation per group-commit transaction). Label sets are summed.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Histogram:
    buckets: dict[float, float]  # upper bound -> cumulative count
    total: float = 0.0  # the sum of the observations


Scrape = dict[str, Histogram]


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return parse(answer.read().decode())


def parse(text: str) -> Scrape:
    """The histograms of a Prometheus text exposition, label sets summed."""
    found: Scrape = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        histogram = found.setdefault(family.name, Histogram({}))
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                histogram.buckets[le] = histogram.buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                histogram.total += sample.value
    return found


@dataclass
class Distribution:
    count: float
    mean: float
    p50: float
    p90: float
    p99: float = 0.0

    def __str__(self) -> str:
        if not self.count:
            return "no observations"
        return (
            f"count {self.count:.0f}, mean {self.mean:.1f},"
            f" p50 <= {self.p50:g}, p90 <= {self.p90:g} (bucket bounds)"
        )


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The upper bound of the bucket holding the q-quantile (the observations are counts, so no
    interpolation inside a bucket: "p50 <= 4" rather than a made-up 2.7)."""
    rank = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= rank:
            return bound
    return math.inf


def between(before: Scrape, after: Scrape, name: str) -> Distribution | None:
    """The observations of histogram `name` made between two scrapes; None if it is absent."""
    if name not in after:
        return None
    old, new = before.get(name, Histogram({})), after[name]
    total_sum = new.total - old.total
    buckets = sorted((le, value - old.buckets.get(le, 0.0)) for le, value in new.buckets.items())
    count = buckets[-1][1] if buckets else 0.0
    if not count:
        return Distribution(0, 0, 0, 0)
    return Distribution(
        count,
        total_sum / count,
        _quantile(0.5, buckets),
        _quantile(0.9, buckets),
        _quantile(0.99, buckets),
    )
