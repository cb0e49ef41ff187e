"""The session store: session data with per-session TTLs.  Pure: time is an
argument, nothing here does I/O.

Theory of operation: ``_sessions`` maps an ID to its :class:`Entry`.  Every
write or touch pushes ``(expires_at, sid)`` on a heap; entries are not removed
from the heap when a session is touched again or deleted, so :meth:`expire`
skips heap items whose session no longer expires at that moment (lazy
deletion).  The heap is rebuilt when stale items outnumber live sessions, so
its size stays proportional to the number of sessions.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Final, NamedTuple

# Rebuild the expiry heap when it holds this many more items than sessions.
_HEAP_SLACK: Final = 1024


class Entry(NamedTuple):
    """Never changed once made, so a snapshot may share entries with the store.
    (A tuple: the cheapest immutable record to make a million of.)"""

    data: bytes
    expires_at: float
    ttl_s: int


class SessionStore:
    """Session data by ID; ``now`` is any monotonic clock, in seconds."""

    def __init__(self) -> None:
        self._sessions: dict[str, Entry] = {}
        self._heap: list[tuple[float, str]] = []
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
        entry = self._sessions.get(sid)
        if entry is None or entry.expires_at <= now:
            # An expired entry the timer has not removed yet reads as missing.
            return None
        return entry

    def put(self, sid: str, data: bytes, ttl_s: int, now: float) -> None:
        self.put_until(sid, data, now + ttl_s, ttl_s)

    def put_until(self, sid: str, data: bytes, expires_at: float, ttl_s: int) -> None:
        """Store with an absolute expiry (restoring from disk)."""
        old = self._sessions.get(sid)
        if old is not None:
            self._bytes -= len(old.data)
        self._sessions[sid] = Entry(data, expires_at, ttl_s)
        self._bytes += len(data)
        self._push(expires_at, sid)

    def load(self, sessions: dict[str, Entry]) -> None:
        """Take over ``sessions`` (restored from disk) as the store's content."""
        assert not self._sessions
        self._sessions = sessions
        self._bytes = sum(len(e.data) for e in sessions.values())
        self._heap = [(e.expires_at, sid) for sid, e in sessions.items()]
        heapq.heapify(self._heap)

    def touch(self, sid: str, ttl_s: int, now: float) -> bool:
        """Restart the session's TTL; False if it does not exist."""
        entry = self.get(sid, now)
        if entry is None:
            return False
        expires_at = now + ttl_s
        self._sessions[sid] = Entry(entry.data, expires_at, ttl_s)
        self._push(expires_at, sid)
        return True

    def delete(self, sid: str) -> bool:
        entry = self._sessions.pop(sid, None)
        if entry is None:
            return False
        self._bytes -= len(entry.data)
        return True

    def expire(self, now: float) -> list[str]:
        """Remove every session whose TTL ran out at or before ``now``."""
        expired: list[str] = []
        heap = self._heap
        sessions = self._sessions
        while heap and heap[0][0] <= now:
            expires_at, sid = heapq.heappop(heap)
            entry = sessions.get(sid)
            if entry is not None and entry.expires_at == expires_at:
                del sessions[sid]
                self._bytes -= len(entry.data)
                expired.append(sid)
        return expired

    def snapshot(self) -> dict[str, Entry]:
        """A consistent copy, cheap: entries are immutable and shared."""
        return self._sessions.copy()

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work, or None.  May be early, never late."""
        return self._heap[0][0] if self._heap else None

    def _push(self, expires_at: float, sid: str) -> None:
        heapq.heappush(self._heap, (expires_at, sid))
        if len(self._heap) > 2 * len(self._sessions) + _HEAP_SLACK:
            self._heap = [(e.expires_at, s) for s, e in self._sessions.items()]
            heapq.heapify(self._heap)
