"""The daemon's request logic, pure: requests and ``now`` in, replies out.

Theory of operation: the I/O shell (``phpsess.server``) calls
:meth:`Engine.handle` for every request of a connection, identified by an
opaque ``owner``.  Most requests get their reply at once.  A locking READ or a
CREATE that must wait for a lock gets :data:`WAIT`; its reply is produced
later, when the lock is granted or the wait times out, and handed out as a
:class:`Completion` in :attr:`Engine.completions`, which the shell drains after
every call and delivers to the waiting connection.  :meth:`tick` runs the
deadlines (session expiry, lock waits, leases) and :meth:`next_deadline` says
when it must next be called.  Nothing here imports trio, socket, time or
logging; randomness comes in as ``token_bytes``.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Hashable
from typing import Final

import attrs

from phpsess import protocol as p
from phpsess.journal import Op
from phpsess.locks import Grant, LockTable, Revoked, Timeout
from phpsess.store import SessionStore

Owner = Hashable

VERSION: Final = "0.1.0"

_ALPHABETS: Final = {
    4: "0123456789abcdef",
    5: "0123456789abcdefghijklmnopqrstuv",
    6: "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,-",
}


@attrs.frozen
class Limits:
    """Settings of the request logic (PROTOCOL.md §10)."""

    max_session_bytes: int = p.DEFAULT_MAX_SESSION_BYTES
    lock_wait_s: float = 30.0
    lock_lease_s: float = 300.0
    # PHP holds one lock a request, two while session_regenerate_id() runs;
    # the bound keeps one connection from filling memory with locks.
    max_locks_per_connection: int = 64

    def __attrs_post_init__(self) -> None:
        if self.max_session_bytes < 1:
            raise ValueError("max_session_bytes must be at least 1")
        if self.lock_wait_s < 0:
            raise ValueError("lock_wait_s must not be negative")
        if self.lock_lease_s <= 0:
            raise ValueError("lock_lease_s must be positive")
        if self.max_locks_per_connection < 1:
            raise ValueError("max_locks_per_connection must be at least 1")


def too_many_locks(limits: Limits) -> p.Error:
    """The reply to a lock past ``max_locks_per_connection`` (§9)."""
    most = limits.max_locks_per_connection
    return p.Error(
        p.Code.TOO_MANY_LOCKS,
        f"this connection holds {most} session lock{'s' if most != 1 else ''} "
        "(max_locks_per_connection); release one (WRITE, TOUCH, DESTROY or CLOSE) "
        "before locking another; nothing was locked",
    )


def verb_breakdown(counts: dict[type, int]) -> dict[str, int]:
    """STATS' ``verbs``: requests per verb name, in a stable order.  Kinds
    that share a name (RequestError and FatalError are both INVALID) are
    added up, so the count never goes down."""
    verbs: dict[str, int] = {}
    for kind, count in sorted(counts.items(), key=lambda kv: kv[0].__name__):
        name = VERB_NAMES.get(kind, "INVALID")
        verbs[name] = verbs.get(name, 0) + count
    return verbs


def hello_refusal(request: p.Hello, shutting_down: bool) -> tuple[p.Code, str] | None:
    """Why a HELLO is refused (§3.2), or None; shared by every storage."""
    if shutting_down:
        return p.Code.SHUTTING_DOWN, "the daemon is stopping; connect again in a moment"
    if request.version != p.PROTOCOL_VERSION:
        return (
            p.Code.VERSION,
            f"protocol version {request.version} is not spoken here; this daemon "
            f"speaks {p.PROTOCOL_VERSION}",
        )
    return None


def hello_wait_and_lease(request: p.Hello, limits: Limits) -> tuple[float, float]:
    """The connection's lock wait and lease in seconds after ``request``
    (the client may shorten the lease, never lengthen it)."""
    wait_s = limits.lock_wait_s if request.wait_ms is None else request.wait_ms / 1000
    lease_s = limits.lock_lease_s
    if request.lease_ms is not None:
        lease_s = min(lease_s, request.lease_ms / 1000)
    return wait_s, lease_s


class _Wait(enum.Enum):
    WAIT = "WAIT"


WAIT: Final = _Wait.WAIT


@attrs.frozen
class Completion:
    """The late reply to ``owner``'s request that returned :data:`WAIT`."""

    owner: Owner
    reply: p.Reply
    # The session a lock was granted on, for a grant (the reply is what the
    # session held then); "" for other late replies.  In a cluster the shell
    # may have to check the session is still mastered here before delivering.
    sid: str = attrs.field(default="", eq=False)


@attrs.frozen
class Notice:
    """Something the shell should log (never session data)."""

    event: str
    sid: str
    owner: Owner


@attrs.define(slots=True)
class _Client:
    hello: bool = False
    wait_s: float = 30.0
    lease_s: float = 300.0
    # A cluster peer's connection (its requests for sessions we master, and
    # its probes): served while we shut down, for the drain hands sessions
    # over one by one and masters each until then (CLUSTER.md §8).
    peer: bool = False
    # The request waiting for a lock, if any: a READ or a CREATE.
    pending: p.Read | p.Create | None = None
    pending_sid: str = ""
    # Its last locking READ asked to be told ``MISS DESTROYED`` (§4.1).
    tell_destroyed: bool = False


class Engine:
    def __init__(self, limits: Limits, token_bytes: Callable[[int], bytes], now: float) -> None:
        self.limits = limits
        self.store = SessionStore()
        self.locks = LockTable()
        self.completions: list[Completion] = []
        # Changes to persist, when persistence is on (phpsess.persist): tuples
        # (Op, sid, ttl_s, data).  None means "not persisting".
        self.changes: list[tuple[Op, str, int, bytes]] | None = None
        # In a cluster: the suffix naming a new session's master and backup,
        # or the error refusing to create one (CLUSTER.md §2); None on a
        # single node.
        self.sid_suffix: Callable[[], str | p.Error] | None = None
        # In a cluster: the two fields a LIST ... ROLES line adds, how this
        # node holds the copy (§4.9); None on a single node.
        self.list_fields: Callable[[str], str] | None = None
        # The daemon's process ID, set by the shell, for STATS (phpsess drain
        # --wait watches that process exit); 0 if unknown.
        self.pid = 0
        # More for STATS from the shell (the cluster's members), or None.
        self.extra_stats: Callable[[], dict[str, object]] | None = None
        self.notices: list[Notice] = []
        self.shutting_down = False
        self.drain_requested = False  # a DRAIN request: the shell shuts down
        self._token_bytes = token_bytes
        self._clients: dict[Owner, _Client] = {}
        self._started = now
        self.expired_total = 0
        self._expired_at_last_gc = 0
        self.requests_total = 0
        self.errors_total = 0
        self._verb_counts: dict[type, int] = {}

    # -- connections

    def connect(self, owner: Owner, *, peer: bool = False) -> None:
        self._clients[owner] = _Client(
            wait_s=self.limits.lock_wait_s, lease_s=self.limits.lock_lease_s, peer=peer
        )

    def disconnect(self, owner: Owner, now: float) -> None:
        """The connection is gone: its waits and locks go with it (§6.1)."""
        self._clients.pop(owner, None)
        self._grants(self.locks.forget(owner, now), now)

    @property
    def connections(self) -> int:
        return len(self._clients)

    def holds_locks(self, owner: Owner) -> bool:
        return self.locks.holds_any(owner)

    # -- time

    def tick(self, now: float) -> None:
        """Run every deadline that has passed: expiry, lock waits, leases."""
        expired = self.store.expire(now)
        self.expired_total += len(expired)
        if expired and self.changes is not None:
            self.changes.extend((Op.DELETE, sid, 0, b"") for sid in expired)
        for event in self.locks.expire(now):
            if isinstance(event, Grant):
                self._grants([event], now)
            elif isinstance(event, Timeout):
                client = self._clients.get(event.owner)
                if client is not None and client.pending is not None:
                    client.pending = None
                    wait = client.wait_s
                    self.completions.append(
                        Completion(
                            event.owner,
                            p.Error(
                                p.Code.LOCK_TIMEOUT,
                                f"session is locked by another request; gave up after "
                                f"waiting {wait:g} s (wait_ms); the lock holder may be "
                                "slow or stuck",
                            ),
                        )
                    )
                    self.errors_total += 1
            else:
                assert isinstance(event, Revoked)
                self.notices.append(Notice("lock_revoked", event.sid, event.owner))

    def next_deadline(self) -> float | None:
        a = self.store.next_deadline()
        b = self.locks.next_deadline()
        if a is None:
            return b
        if b is None:
            return a
        return a if a < b else b

    @property
    def next_deadline_hint(self) -> float:
        """:meth:`next_deadline` as a number (infinity when there is none)."""
        deadline = self.next_deadline()
        return math.inf if deadline is None else deadline

    # -- requests

    def refresh_limits(self, owner: Owner, hello: p.Hello | None) -> None:
        """After :attr:`limits` changed (a reload): ``owner``'s lock wait and
        lease, from the new defaults or as its accepted ``hello`` asked."""
        client = self._clients.get(owner)
        if client is not None:
            limits = self.limits
            client.wait_s, client.lease_s = (
                (limits.lock_wait_s, limits.lock_lease_s) if hello is None
                else hello_wait_and_lease(hello, limits)
            )

    def count(self, request: p.Event) -> None:
        """Count a request answered without :meth:`handle` (by the cluster:
        a peer's, or one forwarded to a session's master)."""
        self.requests_total += 1
        kind = type(request)
        self._verb_counts[kind] = self._verb_counts.get(kind, 0) + 1

    def handle(self, owner: Owner, request: p.Event, now: float) -> p.Reply | _Wait:
        """The reply to one request of ``owner``, or WAIT (see module doc)."""
        self.requests_total += 1
        client = self._clients[owner]
        kind = type(request)
        counts = self._verb_counts
        counts[kind] = counts.get(kind, 0) + 1
        if kind is p.Hello:
            assert isinstance(request, p.Hello)
            return self._hello(owner, client, request, now)
        if not client.hello:
            if isinstance(request, (p.RequestError, p.FatalError)):
                return self._error(request.code, request.message)
            return self._error(
                p.Code.NEED_HELLO, "the first request on a connection must be HELLO 1"
            )
        handler = self._handlers.get(kind)
        if handler is not None:
            return handler(self, owner, client, request, now)
        assert isinstance(request, (p.RequestError, p.FatalError))
        return self._error(request.code, request.message)

    def _error(self, code: p.Code, message: str) -> p.Error:
        self.errors_total += 1
        return p.Error(code, message)

    def _hello(self, owner: Owner, client: _Client, request: p.Hello, now: float) -> p.Reply:
        refused = hello_refusal(request, self.shutting_down and not client.peer)
        if refused is not None:
            return self._error(*refused)
        # A HELLO starts the connection afresh (§3.2).
        self._grants(self.locks.reset(owner, now), now)
        client.hello = True
        client.wait_s, client.lease_s = hello_wait_and_lease(request, self.limits)
        return _OK_1

    def _read(self, owner: Owner, client: _Client, request: p.Read, now: float) -> p.Reply | _Wait:
        sid = request.sid
        if (
            request.lock
            and self.locks.count(owner) >= self.limits.max_locks_per_connection
            and not self.locks.holds(owner, sid)  # re-entrant: no new lock
        ):
            self.errors_total += 1
            return too_many_locks(self.limits)
        if not request.lock:
            return self._read_reply(sid, now)
        client.tell_destroyed = request.destroyed
        if not self.locks.acquire(sid, owner, now, client.lease_s, client.wait_s):
            client.pending = request
            client.pending_sid = sid
            return WAIT
        return self._read_reply(sid, now, request.destroyed)

    def _read_reply(self, sid: str, now: float, tell_destroyed: bool = False) -> p.Reply:
        """What a READ of ``sid`` answers; with ``tell_destroyed``, by a
        holder of its lock that asked (§4.1): ``MISS DESTROYED`` if the lock
        was granted after the session was destroyed while it waited."""
        entry = self.store.get(sid, now)
        if entry is None:
            if tell_destroyed and self.locks.destroyed(sid):
                return p.MISS_DESTROYED
            return p.MISS
        return p.Data(entry.data)

    def lease_lost(self, owner: Owner, sid: str) -> p.Error | None:
        """``LOCK_LOST`` (once) if ``owner``'s lock on ``sid`` ran past its
        lease and was revoked (PROTOCOL.md §6.3)."""
        if self.locks.take_revoked(owner, sid):
            return self._error(
                p.Code.LOCK_LOST,
                "this request held the session lock longer than its lease and lost it; "
                "nothing was changed",
            )
        return None

    def _lock_error(self, owner: Owner, sid: str) -> p.Error | None:
        lost = self.lease_lost(owner, sid)
        if lost is not None:
            return lost
        holder = self.locks.holder(sid)
        if holder is not None and holder != owner:
            return self._error(
                p.Code.LOCKED,
                "another request holds the session lock; nothing was changed",
            )
        return None

    def _write(self, owner: Owner, client: _Client, request: p.Write, now: float) -> p.Reply:
        sid = request.sid
        error = self._lock_error(owner, sid)
        if error is not None:
            return error
        self.store.put(sid, request.data, request.ttl_s, now)
        if self.changes is not None:
            self.changes.append((Op.PUT, sid, request.ttl_s, request.data))
        if not request.keep:
            self._grants(self.locks.release(sid, owner, now), now)
        return p.OK

    def _touch(self, owner: Owner, client: _Client, request: p.Touch, now: float) -> p.Reply:
        sid = request.sid
        error = self._lock_error(owner, sid)
        if error is not None:
            return error
        if not self.store.touch(sid, request.ttl_s, now):
            return p.MISS  # the lock is kept for the WRITE that follows (§4.3)
        if self.changes is not None:
            self.changes.append((Op.TOUCH, sid, request.ttl_s, b""))
        if not request.keep:
            self._grants(self.locks.release(sid, owner, now), now)
        return p.OK

    def _exists(self, owner: Owner, client: _Client, request: p.Exists, now: float) -> p.Reply:
        # A session being started exists, though it has no data yet: PHP's
        # files handler creates the file when it opens it, so with strict
        # mode a request that comes with a new ID before its first write
        # waits for the lock instead of being handed another, empty session.
        # Not one whose lock is held only to release it after it was
        # destroyed (§4.1): with strict mode a request that comes with it
        # then gets a new ID, as the files handler finds no file.
        sid = request.sid
        if self.store.get(sid, now) is not None or (
            self.locks.holder(sid) is not None and not self.locks.destroyed(sid)
        ):
            return _OK_1
        return _OK_0

    def _destroy(self, owner: Owner, client: _Client, request: p.Destroy, now: float) -> p.Reply:
        sid = request.sid
        error = self._lock_error(owner, sid)
        if error is not None:
            return error
        if self.store.delete(sid) and self.changes is not None:
            self.changes.append((Op.DELETE, sid, 0, b""))
        # Those waiting for its lock learn it was destroyed (§4.1), as a
        # file unlinked while they wait for its flock stays gone for them.
        # Not when the holder is one of those itself, releasing the dead ID
        # (the PHP handler's dropped write): who waits behind it came after
        # the destroy, and finds no session, as it would find no file.
        if not self.locks.destroyed(sid):
            self.locks.mark_destroyed(sid)
        self._grants(self.locks.release(sid, owner, now), now)
        return p.OK

    def _close(self, owner: Owner, client: _Client, request: p.Close, now: float) -> p.Reply:
        self._grants(self.locks.release_all(owner, now), now)
        return p.OK

    def _gc(self, owner: Owner, client: _Client, request: p.Gc, now: float) -> p.Reply:
        self.tick(now)
        count = self.expired_total - self._expired_at_last_gc
        self._expired_at_last_gc = self.expired_total
        return p.Ok((str(count),))

    def _create(self, owner: Owner, client: _Client, request: p.Create, now: float) -> p.Reply:
        if request.lock and self.locks.count(owner) >= self.limits.max_locks_per_connection:
            self.errors_total += 1
            return too_many_locks(self.limits)
        alphabet = _ALPHABETS[request.bits]
        mask = len(alphabet) - 1  # 16, 32 or 64 divide 256: every character is uniform
        suffix = "" if self.sid_suffix is None else self.sid_suffix()
        if isinstance(suffix, p.Error):
            self.errors_total += 1
            return suffix
        # In a cluster the node names follow; the whole ID stays within 256
        # characters, so PHP and the protocol accept it (CLUSTER.md §2).
        length = min(request.length, p.MAX_SID_LENGTH - len(suffix))
        while True:
            raw = self._token_bytes(length)
            sid = "".join([alphabet[b & mask] for b in raw]) + suffix
            if sid not in self.store and self.locks.holder(sid) is None:
                break
        if request.lock:
            self.locks.acquire(sid, owner, now, client.lease_s, client.wait_s)
        return p.Ok((sid,))

    def _ping(self, owner: Owner, client: _Client, request: p.Ping, now: float) -> p.Reply:
        return p.OK

    def _drain(self, owner: Owner, client: _Client, request: p.Drain, now: float) -> p.Reply:
        self.drain_requested = True
        return p.OK

    def _stats(self, owner: Owner, client: _Client, request: p.Stats, now: float) -> p.Reply:
        return p.Data(json.dumps(self.statistics(now), sort_keys=True).encode())

    def statistics(self, now: float) -> dict[str, object]:
        return {
            "version": VERSION,
            "pid": self.pid,
            "uptime_s": round(now - self._started, 3),
            "sessions": len(self.store),
            "bytes": self.store.total_bytes,
            "connections": len(self._clients),
            "locks_held": self.locks.held_count,
            "locks_waiting": self.locks.waiting_count,
            "lock_waits_total": self.locks.waits_total,
            "lock_timeouts_total": self.locks.timeouts_total,
            "lock_revoked_total": self.locks.revoked_total,
            "expired_total": self.expired_total,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "verbs": verb_breakdown(self._verb_counts),
        } | (self.extra_stats() if self.extra_stats is not None else {})

    def _get(self, owner: Owner, client: _Client, request: p.Get, now: float) -> p.Reply:
        entry = self.store.get(request.sid, now)
        if entry is None:
            return p.MISS
        ttl_ms = max(0, int((entry.expires_at - now) * 1000))
        locked = "1" if self.locks.holder(request.sid) is not None else "0"
        return p.Data(entry.data, (str(ttl_ms), locked))

    def _list(self, owner: Owner, client: _Client, request: p.List, now: float) -> p.Reply:
        store = self.store
        page = store.page(request.after, request.limit + 1)
        more = len(page) > request.limit
        page = page[: request.limit]
        lines = []
        roles = self.list_fields if request.roles else None
        for sid in page:
            entry = store.get(sid, now)
            if entry is None:
                continue
            ttl_ms = max(0, int((entry.expires_at - now) * 1000))
            locked = 1 if self.locks.holder(sid) is not None else 0
            extra = "" if roles is None else " " + roles(sid)
            lines.append(f"{sid} {len(entry.data)} {ttl_ms} {locked}{extra}\n")
        next_token = page[-1] if more and page else "*"
        return p.Data("".join(lines).encode("ascii"), (next_token,))

    # -- lock hand-over

    def _grants(self, grants: list[Grant], now: float) -> None:
        for grant in grants:
            client = self._clients.get(grant.owner)
            pending = None if client is None else client.pending
            if client is None or pending is None or client.pending_sid != grant.sid:
                # Cannot happen: waiters leave the queue when they go away.
                self._grants(self.locks.release(grant.sid, grant.owner, now), now)
                continue
            client.pending = None
            tell = isinstance(pending, p.Read) and pending.destroyed
            self.completions.append(
                Completion(grant.owner, self._read_reply(grant.sid, now, tell), grant.sid)
            )

    def read_reply(self, sid: str, now: float) -> p.Reply:
        """What a locking READ of ``sid`` by the holder of its lock answers
        now (the shell re-reads a grant's session once it has checked it,
        CLUSTER.md §3): ``MISS DESTROYED`` too if the holder asked (§4.1)."""
        holder = self.locks.holder(sid)
        client = None if holder is None else self._clients.get(holder)
        return self._read_reply(sid, now, client is not None and client.tell_destroyed)

    def unlock(self, owner: Owner, sid: str, now: float) -> None:
        """Release ``owner``'s lock on ``sid`` (a grant the shell could not
        deliver: the session moved); the next waiter gets it."""
        self._grants(self.locks.release(sid, owner, now), now)

    def revoke_session(
        self, sid: str, now: float, error: p.Error, peer_error: p.Error | None = None
    ) -> int:
        """The session moved to another node (CLUSTER.md §7): its holder
        loses the lock here (its next WRITE gets ``LOCK_LOST``) and its
        waiters get ``error`` (``peer_error`` on a peer's connection).  How
        many were affected."""
        holder, waiters = self.locks.revoke_session(sid)
        if holder is not None:
            self.notices.append(Notice("lock_revoked_session_moved", sid, holder))
        for owner in waiters:
            client = self._clients.get(owner)
            if client is None or client.pending is None:
                continue
            client.pending = None
            self.errors_total += 1
            reply = peer_error if client.peer and peer_error is not None else error
            self.completions.append(Completion(owner, reply))
        return len(waiters) + (holder is not None)

    _handlers: Final[dict[type, Callable[..., p.Reply | _Wait]]] = {
        p.Read: _read,
        p.Write: _write,
        p.Touch: _touch,
        p.Exists: _exists,
        p.Destroy: _destroy,
        p.Close: _close,
        p.Gc: _gc,
        p.Create: _create,
        p.Ping: _ping,
        p.Drain: _drain,
        p.Stats: _stats,
        p.Get: _get,
        p.List: _list,
    }


VERB_NAMES: Final[dict[type, str]] = {
    p.Hello: "HELLO", p.Read: "READ", p.Write: "WRITE", p.Touch: "TOUCH",
    p.Exists: "EXISTS", p.Destroy: "DESTROY", p.Close: "CLOSE", p.Gc: "GC",
    p.Create: "CREATE", p.Ping: "PING", p.Stats: "STATS", p.Get: "GET", p.List: "LIST",
    p.Drain: "DRAIN",
    # A cluster's peers (CLUSTER.md); requests that do not parse are INVALID.
    p.ReplPut: "REPL", p.ReplDelete: "REPLDEL", p.Where: "WHERE", p.Handoff: "HANDOFF",
}
_OK_1: Final = p.Ok(("1",))
_OK_0: Final = p.Ok(("0",))
