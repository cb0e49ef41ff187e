"""A Hypothesis state machine driving :class:`phpsess.engine.Engine` with a few
connections while time moves, against a plain model (PROTOCOL.md §3-§7).

The model: sessions are a dict ``sid -> (data, expires_at)``; a lock is a
holder with a lease deadline plus a FIFO list of waiters with wait deadlines;
revoked leases are remembered per owner.  Deadlines run only when the engine
is ticked (its contract: the shell calls ``tick`` at ``next_deadline``), in
time order; deadlines that fall at the same instant run in the order they
were set.  Time advances in quarter seconds so all sums are exact.  A lease
that has run out revokes its lock only while someone waits for it (§6.3):
until then the lock stays held, and the first tick after a waiter queues
revokes it and grants it to that waiter.

``MISS DESTROYED`` (§4.1): a DESTROY marks the owners waiting for the
session's lock at that moment, unless its holder is marked itself (it
releases the dead ID); a marked waiter is granted the lock marked; one that
queues later is not marked, even behind a marked holder.  A locking READ
that carries the token gets ``MISS DESTROYED`` when the session is missing
and its holder is marked (a session written since reads as DATA while it
lives).  EXISTS says 0 while the lock's holder is marked and the session
is missing.
"""

from __future__ import annotations

import random

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from phpsess import protocol as p
from phpsess.engine import WAIT, Engine, Limits, Notice

Owner = str  # the engine takes any hashable; the model names connections

SIDS = ("s1", "s2")
LIMITS = Limits(max_session_bytes=1000, lock_wait_s=1.5, lock_lease_s=3.0)
MAX_CONNECTIONS = 4

sid_st = st.sampled_from(SIDS)
ttl_st = st.integers(1, 4)
data_st = st.sampled_from([b"", b"a", b"\x00\n\xff", b"x" * 100])
wait_ms_st = st.sampled_from([None, 0, 250, 1000, 2500])
lease_ms_st = st.sampled_from([None, 500, 1500, 4000])  # 4000 is clamped to 3 s


@attrs.define
class Client:
    hello: bool = False
    wait_s: float = LIMITS.lock_wait_s
    lease_s: float = LIMITS.lock_lease_s
    waiting: str | None = None


@attrs.define
class Held:
    owner: Owner
    deadline: float
    seq: int
    destroyed: bool = False  # granted after a destroy, unwritten since


@attrs.define
class Waiter:
    owner: Owner
    deadline: float
    lease_s: float
    seq: int
    tell: bool = False  # its READ carries the DESTROYED token
    destroyed: bool = False  # destroyed while it waited, unwritten since


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.engine = Engine(LIMITS, random.Random(0).randbytes, self.now)
        self.clients: dict[Owner, Client] = {}
        self.next_owner = 0
        self.data: dict[str, tuple[bytes, float]] = {}
        self.held: dict[str, Held] = {}
        self.queues: dict[str, list[Waiter]] = {}
        self.revoked: dict[Owner, set[str]] = {}
        self.seq = 0
        self.expired_total = 0
        self.expired_at_gc = 0
        self.created: list[str] = []
        # Owners whose request returned WAIT and has not completed yet.
        self.outstanding: set[Owner] = set()
        self.expected: dict[Owner, p.Reply] = {}
        self.expected_notices: list[Notice] = []

    # -------------------------------------------------------------- model

    def live(self, sid: str) -> bytes | None:
        entry = self.data.get(sid)
        if entry is None or entry[1] <= self.now:
            return None
        return entry[0]

    def read_reply(self, sid: str, tell: bool = False) -> p.Reply:
        """A READ's reply; ``tell``: a locking one with the DESTROYED token
        by the holder of the lock."""
        value = self.live(sid)
        if value is not None:
            return p.Data(value)
        held = self.held.get(sid)
        return p.MISS_DESTROYED if tell and held is not None and held.destroyed else p.MISS

    def grant(self, sid: str, owner: Owner, lease_s: float, destroyed: bool = False) -> None:
        self.seq += 1
        self.held[sid] = Held(owner, self.now + lease_s, self.seq, destroyed)

    def acquire(self, owner: Owner, sid: str, tell: bool = False) -> bool:
        client = self.clients[owner]
        self.revoked.get(owner, set()).discard(sid)
        held = self.held.get(sid)
        if held is None:
            self.grant(sid, owner, client.lease_s)
            return True
        if held.owner == owner:
            return True
        self.seq += 1
        self.queues.setdefault(sid, []).append(
            Waiter(owner, self.now + client.wait_s, client.lease_s, self.seq, tell)
        )
        client.waiting = sid
        return False

    def hand_on(self, sid: str) -> None:
        queue = self.queues.get(sid)
        if not queue:
            return
        waiter = queue.pop(0)
        if not queue:
            del self.queues[sid]
        self.clients[waiter.owner].waiting = None
        self.grant(sid, waiter.owner, waiter.lease_s, waiter.destroyed)
        self.complete(waiter.owner, self.read_reply(sid, waiter.tell))

    def complete(self, owner: Owner, reply: p.Reply) -> None:
        assert owner not in self.expected, "two completions for one wait"
        self.expected[owner] = reply

    def release(self, owner: Owner, sid: str) -> None:
        held = self.held.get(sid)
        if held is not None and held.owner == owner:
            del self.held[sid]
            self.hand_on(sid)

    def release_all(self, owner: Owner) -> None:
        # CLOSE: a lost lease stays visible to the late write (PROTOCOL.md §6.3).
        for sid in sorted(s for s, h in self.held.items() if h.owner == owner):
            self.release(owner, sid)

    def lock_error(self, owner: Owner, sid: str) -> p.Code | None:
        revoked = self.revoked.get(owner, set())
        if sid in revoked:
            revoked.discard(sid)
            return p.Code.LOCK_LOST
        held = self.held.get(sid)
        if held is not None and held.owner != owner:
            return p.Code.LOCKED
        return None

    def model_tick(self) -> None:
        for sid, (_, expires_at) in list(self.data.items()):
            if expires_at <= self.now:
                del self.data[sid]
                self.expired_total += 1
        while True:
            # A lease past its deadline is due only while someone waits.
            due: list[tuple[float, int, str, Waiter | None]] = [
                (h.deadline, h.seq, sid, None) for sid, h in self.held.items()
                if self.queues.get(sid)
            ]
            due += [(w.deadline, w.seq, sid, w) for sid, q in self.queues.items() for w in q]
            due = [d for d in due if d[0] <= self.now]
            if not due:
                return
            _, _, sid, waiter = min(due, key=lambda d: (d[0], d[1]))
            if waiter is None:
                held = self.held.pop(sid)
                self.revoked.setdefault(held.owner, set()).add(sid)
                self.expected_notices.append(Notice("lock_revoked", sid, held.owner))
                self.hand_on(sid)
            else:
                queue = self.queues[sid]
                queue.remove(waiter)
                if not queue:
                    del self.queues[sid]
                self.clients[waiter.owner].waiting = None
                self.complete(waiter.owner, p.Error(p.Code.LOCK_TIMEOUT, ""))

    # -------------------------------------------------------------- checks

    def check_completions(self) -> None:
        """The engine's late replies are exactly those the model expects."""
        got: dict[Owner, p.Reply] = {}
        for completion in self.engine.completions:
            assert completion.owner not in got, "two completions for one owner at once"
            assert completion.owner in self.outstanding, "a completion nobody waits for"
            got[completion.owner] = completion.reply
            self.outstanding.discard(completion.owner)
        self.engine.completions = []
        assert set(got) == set(self.expected)
        for owner, reply in got.items():
            assert same_reply(reply, self.expected[owner]), (owner, reply, self.expected[owner])
        self.expected = {}
        assert sorted(map(repr, self.engine.notices)) == sorted(map(repr, self.expected_notices))
        self.engine.notices = []
        self.expected_notices = []

    def call(self, owner: Owner, request: p.Request) -> p.Reply | None:
        """Send ``request`` as ``owner``; None if it must wait.  Returns the
        reply, or checks NEED_HELLO and returns None for a client without
        HELLO (the model's own handlers then do nothing)."""
        reply = self.engine.handle(owner, request, self.now)
        if not self.clients[owner].hello and not isinstance(request, p.Hello):
            assert isinstance(reply, p.Error) and reply.code is p.Code.NEED_HELLO
            self.check_completions()
            return None
        if reply is WAIT:
            assert owner not in self.outstanding
            self.outstanding.add(owner)
            return None
        assert not isinstance(reply, type(WAIT))
        return reply

    def idle_owners(self) -> list[Owner]:
        return [o for o, c in self.clients.items() if c.waiting is None]

    def _connect(self) -> Owner:
        self.next_owner += 1
        owner = f"c{self.next_owner}"
        self.engine.connect(owner)
        self.clients[owner] = Client()
        return owner

    # -------------------------------------------------------------- rules

    @initialize(options=st.lists(st.tuples(wait_ms_st, lease_ms_st), min_size=2, max_size=2))
    def start(self, options: list[tuple[int | None, int | None]]) -> None:
        for wait_ms, lease_ms in options:
            self._hello(self._connect(), wait_ms, lease_ms)

    @precondition(lambda self: len(self.clients) < MAX_CONNECTIONS)
    @rule(say_hello=st.booleans(), wait_ms=wait_ms_st, lease_ms=lease_ms_st)
    def connect(self, say_hello: bool, wait_ms: int | None, lease_ms: int | None) -> None:
        owner = self._connect()
        if say_hello:
            self._hello(owner, wait_ms, lease_ms)

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.clients)))
        self.engine.disconnect(owner, self.now)
        client = self.clients[owner]
        if client.waiting is not None:
            queue = self.queues[client.waiting]
            queue[:] = [w for w in queue if w.owner != owner]
            if not queue:
                del self.queues[client.waiting]
            self.outstanding.discard(owner)
        del self.clients[owner]
        # release_all needs the departed client gone from the waiters only.
        for sid in sorted(s for s, h in self.held.items() if h.owner == owner):
            del self.held[sid]
            self.hand_on(sid)
        self.revoked.pop(owner, None)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), wait_ms=wait_ms_st, lease_ms=lease_ms_st)
    def hello(self, data: st.DataObject, wait_ms: int | None, lease_ms: int | None) -> None:
        self._hello(data.draw(st.sampled_from(sorted(self.idle_owners()))), wait_ms, lease_ms)

    def _hello(self, owner: Owner, wait_ms: int | None, lease_ms: int | None) -> None:
        reply = self.call(owner, p.Hello(1, wait_ms=wait_ms, lease_ms=lease_ms))
        assert reply == p.Ok(("1",))
        client = self.clients[owner]
        self.release_all(owner)
        self.revoked.pop(owner, None)  # HELLO starts afresh (§3.2)
        client.hello = True
        client.wait_s = LIMITS.lock_wait_s if wait_ms is None else wait_ms / 1000
        client.lease_s = LIMITS.lock_lease_s
        if lease_ms is not None:
            client.lease_s = min(client.lease_s, lease_ms / 1000)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), sid=sid_st, tell=st.booleans())
    def read_lock(self, data: st.DataObject, sid: str, tell: bool) -> None:
        """READ LOCK again: locks are taken by one rule but released by many."""
        self.read(data, sid, True, tell)

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), sid=sid_st, lock=st.booleans(), tell=st.booleans())
    def read(self, data: st.DataObject, sid: str, lock: bool, tell: bool) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Read(sid, lock, tell))
        if self.clients[owner].hello:
            if lock and not self.acquire(owner, sid, tell):
                assert reply is None, "should have waited"
            else:
                assert reply == self.read_reply(sid, lock and tell)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), sid=sid_st, ttl=ttl_st, value=data_st, keep=st.booleans())
    def write(self, data: st.DataObject, sid: str, ttl: int, value: bytes, keep: bool) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Write(sid, ttl, value, keep))
        if self.clients[owner].hello:
            code = self.lock_error(owner, sid)
            if code is not None:
                assert isinstance(reply, p.Error) and reply.code is code, reply
            else:
                assert reply == p.OK
                self.data[sid] = (value, self.now + ttl)
                if not keep:
                    self.release(owner, sid)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), sid=sid_st, ttl=ttl_st, keep=st.booleans())
    def touch(self, data: st.DataObject, sid: str, ttl: int, keep: bool) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Touch(sid, ttl, keep))
        if self.clients[owner].hello:
            code = self.lock_error(owner, sid)
            value = self.live(sid)
            if code is not None:
                assert isinstance(reply, p.Error) and reply.code is code, reply
            elif value is None:
                assert reply == p.MISS  # and the lock is kept
            else:
                assert reply == p.OK
                self.data[sid] = (value, self.now + ttl)
                if not keep:
                    self.release(owner, sid)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), sid=sid_st)
    def destroy(self, data: st.DataObject, sid: str) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Destroy(sid))
        if self.clients[owner].hello:
            code = self.lock_error(owner, sid)
            if code is not None:
                assert isinstance(reply, p.Error) and reply.code is code, reply
            else:
                assert reply == p.OK
                self.data.pop(sid, None)
                held = self.held.get(sid)
                if held is None or not held.destroyed:
                    for waiter in self.queues.get(sid, ()):
                        waiter.destroyed = True  # destroyed while they wait (§4.1)
                self.release(owner, sid)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Close())
        if self.clients[owner].hello:
            assert reply == p.OK
            self.release_all(owner)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), sid=sid_st)
    def exists_and_get(self, data: st.DataObject, sid: str) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        exists = self.call(owner, p.Exists(sid))
        get = self.call(owner, p.Get(sid))
        if self.clients[owner].hello:
            value = self.live(sid)
            # A session being started exists before its first write (§4.4),
            # not one whose lock is held only to release it (§4.1).
            held = self.held.get(sid)
            found = value is not None or (held is not None and not held.destroyed)
            assert exists == p.Ok(("1" if found else "0",))
            if value is None:
                assert get == p.MISS
            else:
                ttl_ms = int((self.data[sid][1] - self.now) * 1000)
                locked = "1" if sid in self.held else "0"
                assert get == p.Data(value, (str(ttl_ms), locked))
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), lock=st.booleans())
    def create(self, data: st.DataObject, lock: bool) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Create(22, 6, lock))
        if self.clients[owner].hello:
            assert isinstance(reply, p.Ok)
            [sid] = reply.tokens
            assert p.is_valid_sid(sid) and len(sid) == 22
            assert sid not in self.data and sid not in self.held
            self.created.append(sid)
            if lock:
                assert self.acquire(owner, sid)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data(), limit=st.integers(1, 4))
    def list_pages(self, data: st.DataObject, limit: int) -> None:
        """LIST, page after page, names exactly the live sessions in order."""
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        after = "*"
        names: list[str] = []
        while True:
            reply = self.call(owner, p.List(None if after == "*" else after, limit))
            if reply is None:
                return  # no HELLO: checked by call()
            assert isinstance(reply, p.Data)
            lines = reply.data.decode("ascii").splitlines()
            assert len(lines) <= limit
            names += [line.split(" ")[0] for line in lines]
            after = reply.tokens[0]
            if after == "*":
                break
        assert names == sorted(s for s in self.data if self.live(s) is not None)
        self.check_completions()

    @precondition(lambda self: self.idle_owners())
    @rule(data=st.data())
    def gc(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.idle_owners())))
        reply = self.call(owner, p.Gc(1440))
        if self.clients[owner].hello:
            self.model_tick()
            assert reply == p.Ok((str(self.expired_total - self.expired_at_gc),))
            self.expired_at_gc = self.expired_total
        self.check_completions()

    @rule(quarters=st.integers(0, 14))
    def advance(self, quarters: int) -> None:
        self.now += quarters / 4

    @rule()
    def tick(self) -> None:
        self.engine.tick(self.now)
        self.model_tick()
        self.check_completions()

    # -------------------------------------------------------------- invariants

    @invariant()
    def locks_match_model(self) -> None:
        locks = self.engine.locks
        for sid in {*SIDS, *self.created}:
            held = self.held.get(sid)
            assert locks.holder(sid) == (None if held is None else held.owner), sid
        # A lock is held by at most one owner: the owners' sets are disjoint.
        owned = [locks.owned_by(owner) for owner in self.clients]
        assert sum(map(len, owned)) == len(frozenset().union(*owned)) == locks.held_count
        for owner in self.clients:
            expected = {s for s, h in self.held.items() if h.owner == owner}
            assert locks.owned_by(owner) == expected
        assert locks.waiting_count == sum(map(len, self.queues.values()))
        assert self.outstanding == {o for o, c in self.clients.items() if c.waiting}

    @invariant()
    def store_matches_model(self) -> None:
        for sid in SIDS:
            entry = self.engine.store.get(sid, self.now)
            value = self.live(sid)
            assert (None if entry is None else entry.data) == value, sid
        # The store's ID order holds exactly its IDs (created and removed
        # with the sessions: writes, destroys, expiries, regenerations).
        store = self.engine.store
        assert store.page(None, len(store) + 1) == sorted(store)
        stats = self.engine.statistics(self.now)
        assert stats["sessions"] == len(self.data)
        assert stats["bytes"] == sum(len(v) for v, _ in self.data.values())
        assert stats["connections"] == len(self.clients)
        assert stats["expired_total"] == self.expired_total

    def teardown(self) -> None:
        # Every wait ends: far in the future all wait deadlines have passed.
        # (A revocation in that tick may grant a waiter a fresh lease, which
        # runs out in the second.)  The locks nobody waits for stay held,
        # past their leases.
        locks = self.engine.locks
        for _ in range(2):
            self.now += 1000.0
            self.engine.tick(self.now)
            self.model_tick()
            self.check_completions()
            assert not self.outstanding, self.outstanding
            assert locks.waiting_count == 0
        assert locks.held_count == len(self.held)
        assert all(locks.preemptible(sid, self.now) for sid in self.held)
        assert locks.next_deadline() is None


def same_reply(got: p.Reply, expected: p.Reply) -> bool:
    if isinstance(expected, p.Error):
        return isinstance(got, p.Error) and got.code is expected.code
    return got == expected


EngineMachine.TestCase.settings = settings(max_examples=500, stateful_step_count=50, deadline=None)
TestEngineMachine = EngineMachine.TestCase
