"""The compact country table against geoip2fast's own lookups (apex_ingest/server/countries.py
reads geoip2fast's private data-file layout: these fail when a new geoip2fast changes it)."""

from __future__ import annotations

import gzip
import ipaddress
import pickle
import random
from collections.abc import Iterator
from pathlib import Path

import geoip2fast
import pytest
from geoip2fast import GeoIP2Fast

from apex_ingest.server.countries import (
    DATA_FILE,
    FORMAT_VERSIONS,
    CountryTable,
    LayoutChanged,
    _from_layout,
)

DATA = Path(geoip2fast.__file__).with_name(DATA_FILE)


@pytest.fixture(scope="module")
def table() -> CountryTable:
    return CountryTable.load()


@pytest.fixture(scope="module")
def reference() -> GeoIP2Fast:
    return GeoIP2Fast(geoip2fast_data_file=DATA_FILE, verbose=False)


def _theirs(reference: GeoIP2Fast, ip: str) -> str | None:
    code = getattr(reference.lookup(ip), "country_code", None)
    return code if isinstance(code, str) and len(code) == 2 and code.isalpha() else None


def test_the_installed_geoip2fast_writes_the_layout_this_module_reads() -> None:
    with gzip.open(DATA, "rb") as data:
        version, info, total, database = pickle.load(data)
    assert version in FORMAT_VERSIONS, f"geoip2fast's data format is now {version}"
    assert (info["country"], info["ipv6"], info["city"], info["asn"]) == (True, True, False, False)
    _index, names, firsts, ids, prefixes = database
    assert sum(map(len, firsts)) == sum(map(len, ids)) == sum(map(len, prefixes)) == total
    assert names[16].startswith("AD:"), "the first 16 names are no longer the reserved ranges"


def _samples(table: CountryTable, count: int) -> Iterator[str]:
    """Every 50th network's first and last address and those either side, plus random ones."""
    rng = random.Random(19)
    for networks, version in ((table.v4, 4), (table.v6, 6)):
        for index in range(0, len(networks.high), 50):
            first = networks.high[index]
            if networks.low is not None:
                first = first << 64 | networks.low[index]
            last = first + (1 << (networks.bits - networks.prefix[index])) - 1
            for address in (first - 1, first, last, last + 1):
                if 0 <= address < 1 << networks.bits:
                    yield str(ipaddress.ip_address(address) if version == 4 else _v6(address))
    for _ in range(count):
        yield str(ipaddress.IPv4Address(rng.getrandbits(32)))
        block = rng.choice((0x2001, 0x2400, 0x2600, 0x2A00, 0x2C0F))
        yield str(_v6(block << 112 | rng.getrandbits(112)))


def _v6(address: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(address)


def test_answers_as_geoip2fast_does(table: CountryTable, reference: GeoIP2Fast) -> None:
    ips = list(_samples(table, 20_000))
    differ = [
        (ip, table.country(ip), _theirs(reference, ip))
        for ip in ips
        if table.country(ip) != _theirs(reference, ip)
    ]
    assert len(ips) > 60_000
    assert differ[:10] == [], f"{len(differ)} of {len(ips)} differ (ip, ours, geoip2fast's)"


@pytest.mark.parametrize(
    ("ip", "code"),
    [
        ("8.8.8.8", "US"),
        ("81.2.69.142", "GB"),
        ("2001:4860:4860::8888", "US"),
        ("::ffff:81.2.69.142", "GB"),  # an IPv4 client as a dual-stack socket reports it
        ("::81.2.69.142", "GB"),  # the old IPv4-compatible form (geoip2fast answers it too)
        ("2001:4860:4860::8888%eth0", "US"),  # a zone names an interface, not the address
        ("fe80::1%eth0", None),
        ("10.1.2.3", None),
        ("0.0.0.0", None),
        ("255.255.255.255", None),
        ("::", None),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
        ("not an ip", None),
        ("", None),
    ],
)
def test_known_and_unknown_addresses(table: CountryTable, ip: str, code: str | None) -> None:
    assert table.country(ip) == code


def test_the_table_is_a_fraction_of_geoip2fasts_lists(table: CountryTable) -> None:
    assert len(table.v4.high) > 400_000 and len(table.v6.high) > 200_000
    assert table.nbytes() < 16 * 2**20  # ~9 MB today; geoip2fast's lists ~47 MB


COUNTRY_ONLY = {"country": True, "ipv6": True, "city": False, "asn": False}
NO_LISTS: tuple[list[int], ...] = ([], [], [], [], [])


@pytest.mark.parametrize(
    "layout",
    [
        (121, COUNTRY_ONLY, 0, NO_LISTS),
        (120, {**COUNTRY_ONLY, "country": False, "city": True}, 0, NO_LISTS),
        (120, COUNTRY_ONLY, 3, NO_LISTS),
        (120, COUNTRY_ONLY, 0, ([], [])),
        (120, {"country": True, "ipv6": True}, 0, NO_LISTS),
        "something else",
    ],
)
def test_another_layout_is_refused_by_name(layout: object) -> None:
    with pytest.raises(LayoutChanged):
        _from_layout(layout)
