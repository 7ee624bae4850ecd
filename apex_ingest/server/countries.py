"""The country of an IP address from geoip2fast's bundled database, held compactly.

geoip2fast (GeoLite2 Country data by MaxMind, CC BY-SA 4.0) keeps its ~790,000 networks as
Python lists of ints: ~47 MB in every process that loads it, and `serve` may run several
gRPC processes. The same table as `array`s takes ~10 MB, and a lookup is a few bisections.

This module is the only one that reads geoip2fast's data file itself. Its layout (a gzipped
pickle: format version, source info, network count, then the chunked lists) is the package's
private business: tests/server/test_countries.py fails loudly when a new geoip2fast changes
it, and checks this module's answers against geoip2fast's own lookups.
"""

from __future__ import annotations

import ctypes
import gzip
import pickle
import socket
from array import array
from bisect import bisect_left, bisect_right
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: geoip2fast's data-file format this module reads (its `__DAT_VERSION__`).
FORMAT_VERSIONS = (120,)
#: The country database of geoip2fast 1.2 with IPv6 networks.
DATA_FILE = "geoip2fast-ipv6.dat.gz"
#: geoip2fast's first names are private and reserved ranges and "not found" (its `is_private`).
_RESERVED_IDS = 16
_MAX_V4 = 2**32 - 1
_LOW_64 = 2**64 - 1
#: The upper 96 bits of an IPv4 address written as IPv6: mapped (::ffff:a.b.c.d, what a
#: dual-stack socket reports for an IPv4 client) and the old compatible form (::a.b.c.d).
_IPV4_IN_IPV6 = (0xFFFF, 0)


class LayoutChanged(RuntimeError):
    """geoip2fast's data file is not laid out as this module expects (a new geoip2fast)."""


@dataclass(frozen=True, slots=True)
class _Networks:
    """Networks sorted by first address; a network's last address is first + 2**(bits - len) - 1."""

    bits: int
    high: array[int]  # the first address (IPv4), or its upper 64 bits (IPv6)
    low: array[int] | None  # IPv6: the first address's lower 64 bits
    prefix: array[int]
    country: array[int]  # an index into CountryTable.codes

    def find(self, address: int) -> int | None:
        """The index of the network holding `address`, if any."""
        if self.low is None:
            index = bisect_right(self.high, address) - 1
        else:
            index = self._find_128(address >> 64, address & _LOW_64)
        if index < 0:
            return None
        first = self.high[index] if self.low is None else self.high[index] << 64 | self.low[index]
        return index if address - first < 1 << (self.bits - self.prefix[index]) else None

    def _find_128(self, high: int, low: int) -> int:
        assert self.low is not None
        last = bisect_right(self.high, high) - 1
        if last < 0 or self.high[last] != high:
            return last
        # Among the networks whose upper halves equal the address's, by the lower halves
        # (start - 1 if all are above it: the network before them).
        start = bisect_left(self.high, high, 0, last)
        return bisect_right(self.low, low, start, last + 1) - 1

    def nbytes(self) -> int:
        parts = (self.high, self.low, self.prefix, self.country)
        return sum(len(part) * part.itemsize for part in parts if part is not None)


@dataclass(frozen=True, slots=True)
class CountryTable:
    v4: _Networks
    v6: _Networks
    #: ISO 3166-1 alpha-2 codes by geoip2fast's name index; None for reserved ranges.
    codes: tuple[str | None, ...]
    source: str

    @classmethod
    def load(cls, path: Path | None = None) -> CountryTable:
        """Read geoip2fast's bundled file (or `path`, in its format) into arrays."""
        if path is None:
            import geoip2fast

            path = Path(geoip2fast.__file__).with_name(DATA_FILE)
        with gzip.open(path, "rb") as data:
            # The package's own file, as trusted as its code (which unpickles it the same way).
            layout = pickle.load(data)
        table = _from_layout(layout)
        del layout
        _return_freed_memory()
        return table

    def country(self, ip: str) -> str | None:
        """The country code of an IPv4 or IPv6 address (text); None if unknown or reserved."""
        try:
            address = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
            networks = self.v4
        except OSError:
            try:  # a zone ("fe80::1%eth0") says which interface, not which address
                packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
            except OSError:
                return None
            address, networks = int.from_bytes(packed, "big"), self.v6
            if address >> 32 in _IPV4_IN_IPV6:
                address, networks = address & _MAX_V4, self.v4
        index = networks.find(address)
        return None if index is None else self.codes[networks.country[index]]

    def nbytes(self) -> int:
        return self.v4.nbytes() + self.v6.nbytes()


def _from_layout(layout: Any) -> CountryTable:
    """The arrays, built chunk by chunk, each chunk's lists dropped once read: at most the
    pickle's ~47 MB and the arrays' ~10 are held at once, not flattened copies besides."""
    v4 = array("I")
    high, low = array("Q"), array("Q")
    prefixes, countries = array("B"), array("H")
    try:
        version, info, total, database = layout
        if version not in FORMAT_VERSIONS:
            raise LayoutChanged(f"format {version!r}, this module reads {FORMAT_VERSIONS}")
        if not (info["country"] and info["ipv6"]) or info["city"] or info["asn"]:
            raise LayoutChanged(f"not an IPv4+IPv6 country-only database: {info!r}")
        index, names, firsts, ids, lengths = database
        if not len(index) == len(firsts) == len(ids) == len(lengths):
            raise LayoutChanged("the index and the chunk lists differ in length")
        codes = tuple(_code(number, str(name)) for number, name in enumerate(names))
        previous = -1
        for number, chunk in enumerate(firsts):
            if not (len(chunk) == len(ids[number]) == len(lengths[number])) or (
                chunk[0] != index[number]
            ):
                raise LayoutChanged(f"chunk {number} does not match the index or its lists")
            for address in chunk:
                if address <= previous:
                    raise LayoutChanged("networks are not sorted by first address")
                previous = address
                if address <= _MAX_V4:
                    v4.append(address)
                else:
                    high.append(address >> 64)
                    low.append(address & _LOW_64)
            prefixes.extend(lengths[number])
            countries.extend(ids[number])
            firsts[number] = ids[number] = lengths[number] = None
        if len(prefixes) != total:
            raise LayoutChanged(f"{total} networks announced, {len(prefixes)} found")
    except LayoutChanged:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as error:
        raise LayoutChanged(f"geoip2fast's data file: {error!r}") from error
    v4_count = len(v4)
    return CountryTable(
        v4=_Networks(32, v4, None, prefixes[:v4_count], countries[:v4_count]),
        v6=_Networks(128, high, low, prefixes[v4_count:], countries[v4_count:]),
        codes=codes,
        source=str(info.get("info", "")),
    )


def _code(number: int, name: str) -> str | None:
    code = name.split(":", 1)[0]
    if number < _RESERVED_IDS or not (len(code) == 2 and code.isascii() and code.isalpha()):
        return None
    return code


def _return_freed_memory() -> None:
    """The pickle's ~40 MB of lists are free now, but glibc keeps most of the pages in its
    heap (the arrays were allocated among them); malloc_trim hands them back to the system.
    Elsewhere than glibc the memory stays with the process, to be reused."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
