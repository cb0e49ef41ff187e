"""The session store: session data with per-session TTLs.  Pure: time is an
argument, nothing here does I/O.

Theory of operation: ``_sessions`` maps an ID to its entry.  The expiry heap
holds ``(t, sid)`` items under one invariant: every live session has an item
with ``t`` at or before its expiry.  So a write or touch that moves a
session's expiry later (nearly all of them) pushes nothing; only a new
session, or an expiry moved earlier, pushes.  :meth:`expire` pops due items:
a session that expires by then goes; one whose expiry moved later is pushed
again at its real expiry; items of deleted sessions are dropped (lazy
deletion).  The heap stays about as large as the number of sessions: once
destroyed sessions' items outnumber the live ones, a fresh heap is built
beside it, a few hundred sessions per push or delete (a rebuild in one go
stopped the daemon for a quarter of a second at a million sessions), and
replaces it when complete.  While it is built, pushes go to both heaps, so
each keeps the invariant for every session it covers.

IDs are also kept in bytewise order (``_order``, a ``SortedList``) so that
``LIST`` pages through a million sessions at O(log n) a page instead of a
scan of every ID per page; it changes only when a session is created or
removed, never on a write to an existing one.

Sessions are held as plain tuples (:data:`Raw`), which CPython's cyclic
garbage collector stops tracking after its first pass over them; a
``NamedTuple`` stays tracked, and a million of them made every full
collection stop the daemon for 300 ms.  :meth:`SessionStore.get` hands out an
:class:`Entry` view.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Final, NamedTuple

from sortedcontainers import SortedList

# Rebuild the expiry heap when it holds this many more items than sessions.
HEAP_SLACK: Final = 1024
# Sessions queued into the heap being rebuilt per push or delete: about
# 0.1 ms of work each, so a million sessions take 4,000 operations.
REBUILD_STEP: Final = 256


class Entry(NamedTuple):
    """A session as :meth:`SessionStore.get` returns it."""

    data: bytes
    expires_at: float
    ttl_s: int


# What the store holds: (data, expires_at, ttl_s).  Never changed once made,
# so a snapshot may share them with the store.
Raw = tuple[bytes, float, int]
_make_entry = Entry._make


class SessionStore:
    """Session data by ID; ``now`` is any monotonic clock, in seconds."""

    def __init__(self, heap_slack: int = HEAP_SLACK, rebuild_step: int = REBUILD_STEP) -> None:
        self._sessions: dict[str, Raw] = {}
        self._order: SortedList[str] = SortedList()
        self._heap: list[tuple[float, str]] = []
        # While the heap is rebuilt: the new heap, and the last ID queued
        # into it (IDs are queued in order).  Then the old heap, freed a
        # slice at a time (freeing two million items at once takes 80 ms).
        self._next_heap: list[tuple[float, str]] | None = None
        self._queued_up_to: str | None = None
        self._retired: list[tuple[float, str]] = []
        self._heap_slack = heap_slack
        self._rebuild_step = rebuild_step
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    def __iter__(self) -> Iterator[str]:
        return iter(self._sessions)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def get(self, sid: str, now: float) -> Entry | None:
        raw = self._sessions.get(sid)
        if raw is None or raw[1] <= now:
            # An expired entry the timer has not removed yet reads as missing.
            return None
        return _make_entry(raw)

    def put(self, sid: str, data: bytes, ttl_s: int, now: float) -> None:
        self.put_until(sid, data, now + ttl_s, ttl_s)

    def put_until(self, sid: str, data: bytes, expires_at: float, ttl_s: int) -> None:
        """Store with an absolute expiry (restoring from disk)."""
        old = self._sessions.get(sid)
        self._sessions[sid] = (data, expires_at, ttl_s)
        self._bytes += len(data)
        if old is None:
            self._order.add(sid)
            self._push(expires_at, sid)
        else:
            self._bytes -= len(old[0])
            if expires_at < old[1]:
                self._push(expires_at, sid)

    def load(self, sessions: dict[str, Raw]) -> None:
        """Take over ``sessions`` (restored from disk) as the store's content."""
        assert not self._sessions
        self._sessions = sessions
        self._order = SortedList(sessions)
        self._bytes = sum(len(e[0]) for e in sessions.values())
        self._heap = [(e[1], sid) for sid, e in sessions.items()]
        heapq.heapify(self._heap)
        self._next_heap = None
        self._retired = []

    def touch(self, sid: str, ttl_s: int, now: float) -> bool:
        """Restart the session's TTL; False if it does not exist."""
        entry = self.get(sid, now)
        if entry is None:
            return False
        expires_at = now + ttl_s
        self._sessions[sid] = (entry.data, expires_at, ttl_s)
        if expires_at < entry.expires_at:
            self._push(expires_at, sid)
        return True

    def delete(self, sid: str) -> bool:
        entry = self._sessions.pop(sid, None)
        if entry is None:
            return False
        self._order.remove(sid)
        self._bytes -= len(entry[0])
        self._bound_heap()
        return True

    def expire(self, now: float) -> list[str]:
        """Remove every session whose TTL ran out at or before ``now``."""
        expired: list[str] = []
        heap = self._heap
        sessions = self._sessions
        while heap and heap[0][0] <= now:
            at, sid = heap[0]
            entry = sessions.get(sid)
            if entry is not None and entry[1] > at:
                # Kept alive meanwhile: queue it at its real expiry (which
                # keeps expiries in order, and may still be <= now).
                heapq.heapreplace(heap, (entry[1], sid))
                continue
            heapq.heappop(heap)
            if entry is not None and entry[1] == at:
                del sessions[sid]
                self._order.remove(sid)
                self._bytes -= len(entry[0])
                expired.append(sid)
            # else destroyed meanwhile, or a stale item: dropped
        return expired

    def page(self, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` IDs greater than ``after`` (all, for None), in
        bytewise order (str order is bytewise for ASCII IDs)."""
        order = self._order
        start = 0 if after is None else order.bisect_right(after)
        return list(order.islice(start, start + limit))

    def snapshot(self) -> dict[str, Raw]:
        """A consistent copy, cheap: entries are immutable and shared."""
        return self._sessions.copy()

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work, or None.  May be early, never late."""
        return self._heap[0][0] if self._heap else None

    def _push(self, expires_at: float, sid: str) -> None:
        heapq.heappush(self._heap, (expires_at, sid))
        if self._next_heap is not None:
            heapq.heappush(self._next_heap, (expires_at, sid))
        self._bound_heap()

    def _bound_heap(self) -> None:
        if self._retired:
            del self._retired[-16 * self._rebuild_step :]
        if self._next_heap is None:
            if len(self._heap) <= 2 * len(self._sessions) + self._heap_slack:
                return
            self._next_heap = []
            self._queued_up_to = None
        # The sessions after the last one queued, in ID order: one created
        # since the rebuild began was pushed to both heaps whatever its ID,
        # one removed is not there, and one whose expiry moved is queued at
        # the expiry it has now, as a rebuild in one go would.
        next_heap = self._next_heap
        sessions = self._sessions
        after = self._queued_up_to
        ids = self._order.irange(minimum=after, inclusive=(after is None, True))
        queued = 0
        for sid in itertools.islice(ids, self._rebuild_step):
            queued += 1
            heapq.heappush(next_heap, (sessions[sid][1], sid))
            after = sid
        self._queued_up_to = after
        if queued < self._rebuild_step:
            self._retired = self._heap
            self._heap = next_heap
            self._next_heap = None
