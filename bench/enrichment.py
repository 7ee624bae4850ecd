"""What enrichment costs per event in the server's hot path (`validation.build_rows`), in µs.

`python -m bench.enrichment`: builds the rows of realistic requests (bench/events.py: current
browser User-Agents, URLs with and without campaign parameters, search/social/internal/direct
referrers; client IPs drawn from 2,000 global addresses) with enrichment on and off, interleaved,
and prints the fastest run of each (the minimum: on a shared machine contention only ever adds
time) and the difference per event and per request; then the enrichment calls alone
(`request_columns` once per request, `event_columns` per event), timed the same way. A few
seconds, one core; no database, no network. Also the cold costs (a User-Agent never seen, an IP
never seen), which the caches pay once per distinct value.
"""

from __future__ import annotations

import argparse
import random
import timeit
from datetime import UTC, datetime

from apex_ingest.server import enrichment
from apex_ingest.server.errors import FieldViolation
from apex_ingest.server.validation import build_rows
from apex_ingest.v1 import ingest_pb2
from bench import events

#: Client IPs of the requests: global addresses of many countries (the country cache sees
#: each several times, as a real site's returning visitors).
_IPS = [
    f"{first}.{second}.{third}.{fourth}"
    for first, second, third, fourth in (
        (
            random.Random(seed).choice((81, 8, 31, 46, 62, 77, 91, 104, 151, 185, 190, 201)),
            random.Random(seed + 1).randint(1, 254),
            random.Random(seed + 2).randint(0, 255),
            random.Random(seed + 3).randint(1, 254),
        )
        for seed in range(0, 8000, 4)
    )
]


def requests(count: int, size: int, seed: int = 7) -> list[ingest_pb2.IngestEventsRequest]:
    rng = random.Random(seed)
    built = []
    for batch in events.batches(count, size, seed):
        request = ingest_pb2.IngestEventsRequest(
            project_key="pk_bench",
            user_id=batch.user_id,
            context=ingest_pb2.RequestContext(
                client_ip=rng.choice(_IPS), user_agent=batch.user_agent
            ),
        )
        for event in batch.events:
            message = request.events.add(
                id=f"{rng.getrandbits(128):032x}",
                type=event.type,
                visitor_id=event.visitor_id,
                url=event.url,
                referrer=event.referrer,
                data=event.data,
            )
            message.timestamp.FromDatetime(event.timestamp)
        request.sent_at.FromDatetime(datetime.now(UTC))
        built.append(request)
    return built


def per_event_us(pool: list[ingest_pb2.IngestEventsRequest], rounds: int) -> list[float]:
    """µs per event to build the rows of every request of `pool`, once per round."""
    received = datetime.now(UTC)
    total = sum(len(r.events) for r in pool)

    def run() -> None:
        for request in pool:
            violations: list[FieldViolation] = []
            build_rows(request, received, violations, ip_mode="truncated")
            assert not violations

    return [t / total * 1e6 for t in timeit.repeat(run, number=1, repeat=rounds)]


def compare(size: int, count: int, runs: int) -> tuple[float, float]:
    """Fastest µs per event with enrichment on and off (interleaved, `runs` each)."""
    pool = requests(count, size)
    on: list[float] = []
    off: list[float] = []
    for mode in ("on", "off"):  # warm both paths (caches, the parser's rules, the database)
        enrichment.configure(enabled=mode == "on")
        per_event_us(pool, 1)
    for index in range(runs):
        # Alternate which goes first: a drift of the machine favours neither.
        order = ("on", "off") if index % 2 == 0 else ("off", "on")
        for mode in order:
            enrichment.configure(enabled=mode == "on")
            (on if mode == "on" else off).extend(per_event_us(pool, 1))
    enrichment.configure(enabled=True)
    return min(on), min(off)


def calls_us(runs: int) -> tuple[float, float]:
    """Fastest µs of `request_columns` (per request) and `event_columns` (per event) over
    realistic values, caches warm."""
    rng = random.Random(3)
    pool = events.batches(20, 100, seed=5)
    contexts = [(rng.choice(_IPS), batch.user_agent) for batch in pool for _ in range(50)]
    pairs = [(event.url, event.referrer) for batch in pool for event in batch.events]
    request_columns, event_columns = enrichment.request_columns, enrichment.event_columns

    def per_request() -> None:
        for ip, agent in contexts:
            request_columns(ip, agent, "truncated")

    def per_event() -> None:
        for url, referrer in pairs:
            event_columns(url, referrer)

    per_request()  # warm the caches
    per_event()
    request_us = min(timeit.repeat(per_request, number=1, repeat=runs)) / len(contexts) * 1e6
    event_us = min(timeit.repeat(per_event, number=1, repeat=runs)) / len(pairs) * 1e6
    return request_us, event_us


def cold_costs() -> tuple[float, float]:
    """µs to parse a User-Agent never seen, and to look up an IP never seen."""
    agents = [f"{agent} Build/{n}" for n in range(200) for agent in events.USER_AGENTS[:1]]
    enrichment.parse_agent.cache_clear()
    started = timeit.default_timer()
    for agent in agents:
        enrichment.parse_agent(agent)
    agent_us = (timeit.default_timer() - started) / len(agents) * 1e6
    enrichment.country.cache_clear()
    addresses = [f"81.{n // 250}.{n % 250}.9" for n in range(1, 2001)]
    started = timeit.default_timer()
    for address in addresses:
        enrichment.country(address)
    return agent_us, (timeit.default_timer() - started) / len(addresses) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7, help="runs of each mode (fastest kept)")
    args = parser.parse_args()
    enrichment.warm_up()
    print(f"build_rows, fastest of {args.runs} interleaved runs per mode, µs per event:")
    for label, size, count in (("snippet (1 event)", 1, 2000), ("batch (100 events)", 100, 40)):
        on, off = compare(size, count, args.runs)
        print(
            f"  {label:20} on {on:7.2f}  off {off:7.2f}  enrichment {on - off:+6.2f} µs/event"
            f" ({(on - off) * size:+.1f} µs/request, {on / off - 1:+.0%})"
        )
    request_us, event_us = calls_us(args.runs)
    print(
        f"enrichment calls alone: {request_us:.2f} µs per request (User-Agent, country, IP mode)"
        f" + {event_us:.2f} µs per event (campaign, referrer)"
    )
    agent_us, ip_us = cold_costs()
    print(f"cold: a new User-Agent {agent_us:.0f} µs, a new IP's country {ip_us:.0f} µs (once)")


if __name__ == "__main__":
    main()
