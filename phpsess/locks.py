"""The lock table: one exclusive, re-entrant lock per session ID, owned by a
connection, with a first-come first-served wait queue, wait deadlines and
leases (PROTOCOL.md §6).  Pure: time is an argument.

Theory of operation: a lock is *held* by one owner until it is released, or
until its lease deadline has passed *and* another owner asks for it.  Owners
that ask for a held lock queue behind it with a wait deadline.  Every release
hands the lock to the first waiter still in the queue and returns that
:class:`Grant` so the caller can wake it.  Deadlines (wait and lease) live on
one heap with lazy deletion; :meth:`expire` turns those that have passed into
:class:`Timeout` and :class:`Revoked` events (and the grants that revocations
cause).  An owner whose lease was revoked is remembered until it asks about
that session again (:meth:`take_revoked`), so its late write can be refused
with ``LOCK_LOST``.

A lease bounds how long a holder keeps *others* waiting, nothing more: when
it runs out while nobody waits, the lock stays held (a long request nobody
competes with keeps its write, as under PHP's files handler, whose ``flock``
has no lease) and becomes :meth:`preemptible`.  The first owner to queue for
it then puts its lease back on the heap, due at once, so the next
:meth:`expire` revokes it and grants it to that owner (a wait of 0 included:
the lease item sorts before the wait item of the same instant, its token
being older).

A session destroyed while owners wait for its lock stays dead for them, as a
file unlinked under a waiting ``flock`` does: :meth:`mark_destroyed` marks
the owners waiting at that moment, and a marked waiter's lock is granted
marked (:meth:`destroyed`).  An owner that queues later is not marked: for
it the session is simply missing, as if it had never existed (a request
that opens the file after its unlink gets a new file).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Final

import attrs

Owner = Hashable

_HEAP_SLACK: Final = 1024
_WAIT: Final = 0
_LEASE: Final = 1


@attrs.define(slots=True)
class _Held:
    owner: Owner
    lease_deadline: float  # in the past: preemptible (nobody waited then)
    token: int
    destroyed: bool = False  # granted after the session was destroyed


@attrs.define(slots=True)
class _Waiter:
    owner: Owner
    deadline: float
    lease_s: float
    token: int
    destroyed: bool = False  # the session was destroyed while it waited


@attrs.frozen
class Grant:
    """``owner``, which was waiting, now holds the lock on ``sid``."""

    sid: str
    owner: Owner


@attrs.frozen
class Timeout:
    """``owner`` waited for ``sid`` until its deadline and left the queue."""

    sid: str
    owner: Owner


@attrs.frozen
class Revoked:
    """``owner`` held ``sid`` past its lease while another owner waited for
    it; the lock was taken away (and granted to that owner)."""

    sid: str
    owner: Owner


LockEvent = Grant | Timeout | Revoked


class LockTable:
    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._queues: dict[str, deque[_Waiter]] = {}
        self._owned: dict[Owner, set[str]] = {}
        self._waiting: dict[Owner, str] = {}  # an owner waits for one lock at most
        self._revoked: dict[Owner, set[str]] = {}
        self._heap: list[tuple[float, int, int, str]] = []
        self._tokens = itertools.count(1)
        self.waits_total = 0
        self.timeouts_total = 0
        self.revoked_total = 0

    # -- queries

    def holder(self, sid: str) -> Owner | None:
        held = self._held.get(sid)
        return None if held is None else held.owner

    def holds(self, owner: Owner, sid: str) -> bool:
        held = self._held.get(sid)
        return held is not None and held.owner == owner

    def owned_by(self, owner: Owner) -> frozenset[str]:
        return frozenset(self._owned.get(owner, ()))

    def count(self, owner: Owner) -> int:
        """How many locks ``owner`` holds."""
        owned = self._owned.get(owner)
        return 0 if owned is None else len(owned)

    def holds_any(self, owner: Owner) -> bool:
        return bool(self._owned.get(owner))

    @property
    def held_count(self) -> int:
        return len(self._held)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def destroyed(self, sid: str) -> bool:
        """True if ``sid``'s lock was granted after the session was
        destroyed while its holder waited (or queued behind such a holder)."""
        held = self._held.get(sid)
        return held is not None and held.destroyed

    def preemptible(self, sid: str, now: float) -> bool:
        """True if ``sid`` is held past its lease: nobody asked for it when the
        lease ran out, and the next owner to ask for it takes it."""
        held = self._held.get(sid)
        return held is not None and held.lease_deadline <= now

    def take_revoked(self, owner: Owner, sid: str) -> bool:
        """True (once) if ``owner`` lost its lock on ``sid`` to the lease."""
        revoked = self._revoked.get(owner)
        if revoked is None or sid not in revoked:
            return False
        revoked.discard(sid)
        if not revoked:
            del self._revoked[owner]
        return True

    # -- changes

    def acquire(self, sid: str, owner: Owner, now: float, lease_s: float, wait_s: float) -> bool:
        """Take the lock (True), or queue for it (False) until ``now + wait_s``.

        With ``wait_s == 0`` a held lock yields a :class:`Timeout` from the
        next :meth:`expire` call at ``now``, unless its lease has passed
        (:meth:`preemptible`): that call revokes it and grants it to
        ``owner`` instead.
        """
        self._forget_revoked(owner, sid)
        held = self._held.get(sid)
        if held is None:
            self._grant(sid, owner, now, lease_s)
            return True
        if held.owner == owner:
            return True  # re-entrant (§6.1)
        assert owner not in self._waiting, "an owner waits for one lock at a time"
        token = next(self._tokens)
        deadline = now + wait_s
        # Not marked, even behind a marked holder: it came after the
        # destroy, as a request that opens a file after its unlink finds no
        # file (a new session), not the unlinked one.
        self._queues.setdefault(sid, deque()).append(_Waiter(owner, deadline, lease_s, token))
        self._waiting[owner] = sid
        if held.lease_deadline <= now:
            # Its lease ran out while nobody waited (expire kept it): due
            # now.  Before the wait item even with a wait of 0: the holder's
            # token is older than the waiter's.
            self._push((now, held.token, _LEASE, sid))
        self._push((deadline, token, _WAIT, sid))
        self.waits_total += 1
        return False

    def release(self, sid: str, owner: Owner, now: float) -> list[Grant]:
        """Release ``owner``'s lock on ``sid`` (no-op if it does not hold it)."""
        held = self._held.get(sid)
        if held is None or held.owner != owner:
            return []
        self._drop(sid, held)
        return self._hand_on(sid, now)

    def mark_destroyed(self, sid: str) -> None:
        """The session ``sid`` was destroyed: its waiters will be granted a
        marked lock (:meth:`destroyed`)."""
        for waiter in self._queues.get(sid, ()):
            waiter.destroyed = True

    def release_all(self, owner: Owner, now: float) -> list[Grant]:
        grants: list[Grant] = []
        for sid in list(self._owned.get(owner, ())):
            grants.extend(self.release(sid, owner, now))
        return grants

    def reset(self, owner: Owner, now: float) -> list[Grant]:
        """Release everything and forget revocations (a HELLO, §3.2)."""
        grants = self.release_all(owner, now)
        self._revoked.pop(owner, None)
        return grants

    def cancel_wait(self, owner: Owner) -> None:
        sid = self._waiting.pop(owner, None)
        if sid is None:
            return
        queue = self._queues[sid]
        for waiter in queue:
            if waiter.owner == owner:
                queue.remove(waiter)
                break
        if not queue:
            del self._queues[sid]

    def forget(self, owner: Owner, now: float) -> list[Grant]:
        """The owner is gone (connection closed): drop its waits and locks."""
        self.cancel_wait(owner)
        grants = self.release_all(owner, now)
        self._revoked.pop(owner, None)
        return grants

    def revoke_session(self, sid: str) -> tuple[Owner | None, list[Owner]]:
        """Take ``sid``'s lock away from its holder and empty its queue (the
        session moved to another node, CLUSTER.md §7): the holder, remembered
        as revoked (:meth:`take_revoked`), and the waiters, in queue order."""
        holder: Owner | None = None
        held = self._held.get(sid)
        if held is not None:
            self._drop(sid, held)
            self._revoked.setdefault(held.owner, set()).add(sid)
            self.revoked_total += 1
            holder = held.owner
        waiters: list[Owner] = []
        for waiter in self._queues.pop(sid, ()):
            del self._waiting[waiter.owner]
            waiters.append(waiter.owner)
        return holder, waiters

    def expire(self, now: float) -> list[LockEvent]:
        events: list[LockEvent] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, token, kind, sid = heapq.heappop(heap)
            if kind == _LEASE:
                held = self._held.get(sid)
                if held is None or held.token != token:
                    continue  # released before its lease ran out
                if not self._queues.get(sid):
                    # Nobody waits: revoking would gain nothing.  It stays
                    # held, preemptible; acquire puts it back on the heap.
                    continue
                self._drop(sid, held)
                self._revoked.setdefault(held.owner, set()).add(sid)
                self.revoked_total += 1
                events.append(Revoked(sid, held.owner))
                events.extend(self._hand_on(sid, now))
            else:
                queue = self._queues.get(sid)
                if not queue:
                    continue
                for waiter in queue:
                    if waiter.token == token:
                        queue.remove(waiter)
                        del self._waiting[waiter.owner]
                        self.timeouts_total += 1
                        events.append(Timeout(sid, waiter.owner))
                        break
                if not queue:
                    del self._queues[sid]
        return events

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    # -- internals

    def _grant(
        self, sid: str, owner: Owner, now: float, lease_s: float, destroyed: bool = False
    ) -> None:
        token = next(self._tokens)
        deadline = now + lease_s
        self._held[sid] = _Held(owner, deadline, token, destroyed)
        self._owned.setdefault(owner, set()).add(sid)
        self._push((deadline, token, _LEASE, sid))

    def _push(self, item: tuple[float, int, int, str]) -> None:
        heapq.heappush(self._heap, item)
        # Released locks leave their lease deadline behind; rebuild from the
        # live locks and waiters before those pile up.  A held lock whose
        # lease has passed comes back with its deadline in the past: the
        # next expire revokes it if someone waits for it, else drops the
        # item again (kept held, as when its lease first ran out).
        if len(self._heap) > 2 * (len(self._held) + len(self._waiting)) + _HEAP_SLACK:
            live = [(h.lease_deadline, h.token, _LEASE, sid) for sid, h in self._held.items()]
            live += [
                (w.deadline, w.token, _WAIT, sid)
                for sid, queue in self._queues.items()
                for w in queue
            ]
            heapq.heapify(live)
            self._heap = live

    def _drop(self, sid: str, held: _Held) -> None:
        del self._held[sid]
        owned = self._owned[held.owner]
        owned.discard(sid)
        if not owned:
            del self._owned[held.owner]

    def _hand_on(self, sid: str, now: float) -> list[Grant]:
        queue = self._queues.get(sid)
        if not queue:
            return []
        waiter = queue.popleft()
        if not queue:
            del self._queues[sid]
        del self._waiting[waiter.owner]
        self._grant(sid, waiter.owner, now, waiter.lease_s, waiter.destroyed)
        return [Grant(sid, waiter.owner)]

    def _forget_revoked(self, owner: Owner, sid: str) -> None:
        revoked = self._revoked.get(owner)
        if revoked is not None:
            revoked.discard(sid)
            if not revoked:
                del self._revoked[owner]
