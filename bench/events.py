"""Realistic events for the batch loads and the COPY denominator (one generator for all three).

The snippet loads send such events one at a time, in apex.js's shape (`snippet_body`).

Each event has an RFC 3339 timestamp near now, a `data` object with strings, an integer, a
decimal price written as a shop writes it (49.90, 1299.99: the exact-number path), a small array
and a nested object; visitor ids, URLs with paths and query strings, referrers. Each batch goes
with one of several current browser User-Agent strings (the HTTP load sends it as the header, the
gRPC load in the request context, the COPY rows store it).

Ids: every event of a pre-generated HTTP body carries an id whose first ID_PREFIX_CHARS
characters are ID_MARKER; bench/counts.lua puts a prefix unique to the request there, so every
request's events are new (nothing dedups, however often a body is cycled). The gRPC load and
COPY make their ids the same way in Python: 32 hex digits, like the SDK's.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

#: Current desktop and mobile browsers (Chrome, Safari, Firefox, Edge), as they send them.
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
)

#: Where a request's unique prefix goes in an event id (the event's index follows, 8 hex).
ID_PREFIX_CHARS = 24
ID_MARKER = "@" * ID_PREFIX_CHARS
#: Where bench/counts.lua writes the time of sending (apex.js's `sentAt`), per request.
SENT_AT_MARKER = "%SENT_AT%"

_PRODUCTS = (
    ("SKU-48213", "Trail Running Shoe", "footwear/running", "129.99"),
    ("SKU-10077", "Merino Wool Socks (3 pack)", "apparel/socks", "24.90"),
    ("SKU-77310", "Ultralight Tent 2P", "outdoor/tents", "449.00"),
    ("SKU-55102", "Espresso Machine Pro", "kitchen/coffee", "1299.99"),
    ("SKU-20931", "Noise-cancelling Headphones", "electronics/audio", "349.50"),
    ("SKU-31415", "Yoga Mat, natural rubber", "fitness/yoga", "49.90"),
    ("SKU-90210", "Leather Weekender Bag", "bags/travel", "289.00"),
    ("SKU-66001", "Stainless Water Bottle 750 ml", "outdoor/hydration", "19.95"),
)
_TYPES = ("pageview", "pageview", "pageview", "click", "add_to_cart", "form_submit", "purchase")
_PATHS = ("/", "/products/{slug}", "/category/{cat}", "/cart", "/checkout", "/search")
_QUERIES = (
    "?utm_source=newsletter&utm_medium=email&utm_campaign=winter_sale",
    "?q={q}&page=2&sort=price_asc",
    "?color=blue&size=42",
    "",
    "?ref=homepage_banner",
    "?gclid=Cj0KCQiA7OqrBhD9ARIsAK3UXh0&utm_source=google&utm_medium=cpc",
)
_REFERRERS = (
    "https://www.google.com/",
    "https://www.google.com/search?q={q}",
    "https://duckduckgo.com/",
    "https://t.co/8fKq2LmZxA",
    "https://www.facebook.com/",
    "https://shop.example.com/category/{cat}?page=1",
    "",
)
_TAGS = ("sale", "new", "bestseller", "eco", "limited", "bundle", "gift")
_PRICE = re.compile(r'"@PRICE:([0-9.]+)@"')


@dataclass(frozen=True)
class Event:
    """One event, in the fields every load needs (data already as JSON text)."""

    index: int
    type: str
    visitor_id: str
    url: str
    referrer: str
    timestamp: datetime
    data: str


@dataclass(frozen=True)
class Batch:
    user_id: str
    user_agent: str
    ip: str
    events: tuple[Event, ...]


def _data(rng: random.Random, product: tuple[str, str, str, str], event_type: str) -> str:
    sku, name, category, price = product
    document: dict[str, Any] = {
        "product": {"sku": sku, "name": name, "category": category, "variant": {"size": "M"}},
        "price": f"@PRICE:{price}@",  # written as the decimal text, see _PRICE
        "currency": rng.choice(("EUR", "USD", "GBP")),
        "quantity": rng.randint(1, 4),
        "tags": rng.sample(_TAGS, 2),
        "page": {"title": f"{name} | Example Shop", "section": category.split("/")[0]},
    }
    if event_type == "purchase":
        document["orderId"] = f"ORD-{rng.randint(100000, 999999)}"
    return _PRICE.sub(r"\1", json.dumps(document, separators=(",", ":")))


def make_batch(rng: random.Random, size: int = 100, now: datetime | None = None) -> Batch:
    """`size` events of ~8 visitors of one user session, timestamps in the last 2 minutes."""
    now = now or datetime.now(UTC)
    visitors = [f"{rng.getrandbits(128):032x}" for _ in range(8)]
    events = []
    for index in range(size):
        product = rng.choice(_PRODUCTS)
        slug = product[1].lower().replace(" ", "-").replace(",", "").replace("(", "")
        slug = slug.replace(")", "")
        cat = product[2]
        q = slug.replace("-", "+")
        path = rng.choice(_PATHS).format(slug=slug, cat=cat)
        event_type = rng.choice(_TYPES)
        moment = now - timedelta(milliseconds=rng.randint(0, 120_000))
        events.append(
            Event(
                index=index,
                type=event_type,
                visitor_id=rng.choice(visitors),
                url="https://shop.example.com" + path + rng.choice(_QUERIES).format(q=q),
                referrer=rng.choice(_REFERRERS).format(q=q, cat=cat),
                timestamp=moment.replace(microsecond=moment.microsecond // 1000 * 1000),
                data=_data(rng, product, event_type),
            )
        )
    return Batch(
        user_id=f"user_{rng.randint(10000, 99999)}",
        user_agent=rng.choice(USER_AGENTS),
        ip=f"203.0.113.{rng.randint(1, 254)}",
        events=tuple(events),
    )


def rfc3339(moment: datetime) -> str:
    """2026-12-02T10:01:02.345Z: what browsers' Date.toISOString() writes."""
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _event_json(event: Event) -> str:
    # json.dumps would rewrite 49.90 as 49.9: the data object is spliced in as written.
    dumps = json.dumps
    return (
        f'{{"id":"{ID_MARKER}{event.index:08x}","type":{dumps(event.type)},'
        f'"visitorId":{dumps(event.visitor_id)},"url":{dumps(event.url)},'
        f'"referrer":{dumps(event.referrer)},"timestamp":"{rfc3339(event.timestamp)}",'
        f'"data":{event.data}}}'
    )


def http_body(batch: Batch, project_key: str) -> bytes:
    """The public batch JSON; each event id is ID_MARKER + its index in 8 hex digits."""
    events = ",".join(_event_json(event) for event in batch.events)
    body = (
        f'{{"projectKey":{json.dumps(project_key)},"userId":{json.dumps(batch.user_id)},'
        f'"events":[{events}]}}'
    )
    json.loads(body)  # well-formed
    return body.encode()


def snippet_body(event: Event, project_key: str) -> bytes:
    """One event as apex.js sends it: its fields at the top, an id, its timestamp and the time
    of sending (bench/counts.lua writes that one when it sends the request)."""
    body = (
        _event_json(event)[:-1]
        + f',"projectKey":{json.dumps(project_key)},"sentAt":"{SENT_AT_MARKER}"}}'
    )
    json.loads(body)  # well-formed
    return body.encode()


def snippet_pool(count: int = 64, seed: int = 7) -> list[tuple[str, Event]]:
    """`count` browser events (pages, campaigns, referrers, data with decimals), each with the
    User-Agent of the browser sending it."""
    rng = random.Random(seed)
    batch = make_batch(rng, count)
    return [(USER_AGENTS[event.index % len(USER_AGENTS)], event) for event in batch.events]


def batches(count: int, size: int = 100, seed: int = 21) -> list[Batch]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    return [make_batch(rng, size, now) for _ in range(count)]
