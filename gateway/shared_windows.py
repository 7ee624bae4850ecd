"""Fixed-window hit counters shared by the gateway's worker processes on one machine.

With `APEX_RATE_LIMIT_STORAGE=memory://` each granian worker used to count on its own, so N
workers let N times the limit through. `apex-ingest gateway`/`serve` now create one small file
(a table of counters, mapped into every worker's memory) and point the workers at it through
the internal variable _APEX_RATE_LIMIT_TABLE (apex_ingest.common.settings.Internal). A hit
takes an fcntl lock on the file: the kernel serializes the workers, and drops the lock of a
worker that dies holding it.

The table has a fixed number of slots, found by hashing the window's name (open addressing,
a few probes). A slot whose window has ended is free for another key. When every probed slot
holds a live window of another key (tens of thousands of keys active within one window), the
hit is not counted here and the caller counts it per process: a looser limit, never a refusal
for want of room.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading

SLOTS = 16_384
_PROBES = 8
_SLOT = struct.Struct("<Qdq")  # name hash (0: never used), window end (epoch seconds), hits
TABLE_BYTES = SLOTS * _SLOT.size


def create_table(path: str) -> None:
    """Make the (zeroed) table file; workers open it with SharedWindows."""
    with open(path, "wb") as table:
        table.truncate(TABLE_BYTES)


class SharedWindows:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR)
        if os.fstat(self._fd).st_size != TABLE_BYTES:
            os.close(self._fd)
            raise ValueError(f"{path} is not a rate-limit table of {TABLE_BYTES} bytes")
        self._table = mmap.mmap(self._fd, TABLE_BYTES)
        # fcntl locks belong to the process: its threads also need to exclude each other.
        self._thread_lock = threading.Lock()

    def hit(self, name: str, seconds: float, now: float) -> tuple[float, int] | None:
        """Count a hit in window `name` (`seconds` long): (window end, hits); None if full."""
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        name_hash = int.from_bytes(digest, "little") or 1
        first = name_hash % SLOTS
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                free = None
                for probe in range(_PROBES):
                    offset = (first + probe) % SLOTS * _SLOT.size
                    slot_hash, end, hits = _SLOT.unpack_from(self._table, offset)
                    if slot_hash == name_hash:
                        if end <= now:
                            end, hits = now + seconds, 0
                        _SLOT.pack_into(self._table, offset, name_hash, end, hits + 1)
                        return end, hits + 1
                    if free is None and end <= now:
                        free = offset
                if free is None:
                    return None
                _SLOT.pack_into(self._table, free, name_hash, now + seconds, 1)
                return now + seconds, 1
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
