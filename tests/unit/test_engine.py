"""The request logic (PROTOCOL.md §3-§7), driven with plain numbers for time."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Hashable, Iterator

import pytest

from phpsess import protocol as p
from phpsess.engine import WAIT, Completion, Engine, Limits, Notice

OK_1 = p.Ok(("1",))
OK_0 = p.Ok(("0",))


def make_engine(now: float = 0.0, **limits: float) -> Engine:
    return Engine(Limits(**limits), random.Random(1234).randbytes, now)  # type: ignore[arg-type]


def hello(engine: Engine, owner: Hashable, now: float = 0.0, **options: int) -> None:
    engine.connect(owner)
    assert engine.handle(owner, p.Hello(1, **options), now) == OK_1  # type: ignore[arg-type]


def take(engine: Engine) -> list[Completion]:
    completions = engine.completions
    engine.completions = []
    return completions


def code_of(reply: object) -> p.Code:
    assert isinstance(reply, p.Error), reply
    return reply.code


@pytest.fixture
def engine() -> Engine:
    e = make_engine()
    for owner in ("a", "b", "c"):
        hello(e, owner)
    return e


# ---------------------------------------------------------------- handshake (§3.2)


def test_need_hello() -> None:
    e = make_engine()
    e.connect("a")
    requests: list[p.Request] = [
        p.Ping(),
        p.Read("s1"),
        p.Write("s1", 10, b"x"),
        p.Create(),
        p.Stats(),
    ]
    for request in requests:
        assert code_of(e.handle("a", request, 0.0)) is p.Code.NEED_HELLO
    # Nothing was executed.
    assert e.locks.held_count == 0
    assert len(e.store) == 0
    assert e.handle("a", p.Hello(1), 0.0) == OK_1
    assert e.handle("a", p.Ping(), 0.0) == p.OK


def test_wrong_version() -> None:
    e = make_engine()
    e.connect("a")
    reply = e.handle("a", p.Hello(2), 0.0)
    assert code_of(reply) is p.Code.VERSION
    assert isinstance(reply, p.Error) and "1" in reply.message
    assert code_of(e.handle("a", p.Ping(), 0.0)) is p.Code.NEED_HELLO


def test_malformed_hello_gets_its_own_error() -> None:
    e = make_engine()
    e.connect("a")
    error = p.RequestError(p.Code.BAD_REQUEST, "unknown HELLO option 'x'")
    assert e.handle("a", error, 0.0) == p.Error(p.Code.BAD_REQUEST, "unknown HELLO option 'x'")


def test_parser_errors_become_error_replies(engine: Engine) -> None:
    events: list[p.RequestError | p.FatalError] = [
        p.RequestError(p.Code.BAD_ID, "bad id"),
        p.RequestError(p.Code.TOO_LARGE, "too large"),
        p.FatalError(p.Code.BAD_FRAME, "closing"),
        p.FatalError(p.Code.HEADER_TOO_LONG, "closing"),
    ]
    for event in events:
        reply = engine.handle("a", event, 0.0)
        assert reply == p.Error(event.code, event.message)
        assert isinstance(reply, p.Error) and reply.fatal is isinstance(event, p.FatalError)


def test_hello_releases_locks_and_grants_waiters(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 100, b"one", keep=False), 0.0)
    assert engine.handle("a", p.Read("s1"), 0.0) == p.Data(b"one")
    assert engine.handle("a", p.Read("s2"), 0.0) == p.MISS
    assert engine.handle("b", p.Read("s1"), 1.0) is WAIT
    assert take(engine) == []
    assert engine.handle("a", p.Hello(1), 2.0) == OK_1
    assert take(engine) == [Completion("b", p.Data(b"one"))]
    assert not engine.locks.holds("a", "s1")
    assert engine.locks.holder("s2") is None
    assert engine.locks.holder("s1") == "b"


def test_hello_options_set_wait_and_lease() -> None:
    e = make_engine(lock_wait_s=30.0, lock_lease_s=5.0)
    hello(e, "a", lease_ms=60_000)  # clamped to the daemon's 5 s
    hello(e, "b", wait_ms=1500)
    hello(e, "c")
    assert e.handle("a", p.Read("s1"), 0.0) == p.MISS
    assert e.handle("b", p.Read("s1"), 0.0) is WAIT
    e.tick(1.499)
    assert take(e) == []
    e.tick(1.5)
    [completion] = take(e)
    assert completion.owner == "b" and code_of(completion.reply) is p.Code.LOCK_TIMEOUT
    assert e.handle("c", p.Read("s1"), 2.0) is WAIT  # the lease is revoked for c
    e.tick(4.999)
    assert e.locks.holder("s1") == "a"
    e.tick(5.0)
    assert e.locks.holder("s1") == "c"
    assert e.notices == [Notice("lock_revoked", "s1", "a")]


def test_shutting_down_refuses_hello(engine: Engine) -> None:
    engine.shutting_down = True
    engine.connect("z")
    reply = engine.handle("z", p.Hello(1), 0.0)
    assert code_of(reply) is p.Code.SHUTTING_DOWN
    assert isinstance(reply, p.Error) and reply.fatal


# ---------------------------------------------------------------- read/write/touch/exists


def test_read_write_exists(engine: Engine) -> None:
    assert engine.handle("a", p.Read("s1", lock=False), 0.0) == p.MISS
    assert engine.handle("a", p.Exists("s1"), 0.0) == OK_0
    data = b'\x00\n\xffa|s:1:"x";'
    assert engine.handle("a", p.Write("s1", 10, data), 0.0) == p.OK
    assert engine.handle("b", p.Read("s1", lock=False), 1.0) == p.Data(data)
    assert engine.handle("b", p.Exists("s1"), 1.0) == OK_1


def test_expired_session_reads_miss_with_or_without_tick(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 10, b"x"), 0.0)
    assert engine.handle("a", p.Read("s1", lock=False), 9.999) == p.Data(b"x")
    assert engine.handle("a", p.Read("s1", lock=False), 10.0) == p.MISS
    assert engine.handle("a", p.Exists("s1"), 10.0) == OK_0
    assert engine.handle("a", p.Get("s1"), 10.0) == p.MISS
    engine.tick(10.0)
    assert engine.handle("a", p.Read("s1"), 10.0) == p.MISS
    assert engine.expired_total == 1


def test_expiry_does_not_affect_locks(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 1, b"x"), 0.0)
    assert engine.handle("a", p.Read("s1"), 0.5) == p.Data(b"x")
    engine.tick(2.0)
    assert engine.locks.holder("s1") == "a"
    assert code_of(engine.handle("b", p.Write("s1", 10, b"y"), 2.0)) is p.Code.LOCKED


def test_touch(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 10, b"x"), 0.0)
    assert engine.handle("a", p.Touch("s1", 20), 5.0) == p.OK
    engine.tick(10.0)
    assert engine.handle("a", p.Read("s1", lock=False), 24.9) == p.Data(b"x")
    assert engine.handle("a", p.Read("s1", lock=False), 25.0) == p.MISS
    assert engine.handle("a", p.Touch("s1", 20), 25.0) == p.MISS


def test_read_nolock_ignores_the_lock(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 100, b"x"), 0.0)
    assert engine.handle("a", p.Read("s1"), 0.0) == p.Data(b"x")
    assert engine.handle("b", p.Read("s1", lock=False), 0.0) == p.Data(b"x")
    assert engine.locks.holder("s1") == "a"
    assert engine.locks.waiting_count == 0


def test_locks_are_reentrant(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 100, b"x"), 0.0)
    assert engine.handle("a", p.Read("s1"), 0.0) == p.Data(b"x")
    assert engine.handle("a", p.Read("s1"), 1.0) == p.Data(b"x")
    assert engine.locks.waiting_count == 0


def test_a_connection_holds_at_most_max_locks_per_connection() -> None:
    e = make_engine(max_locks_per_connection=2)
    hello(e, "a")
    hello(e, "b")
    assert e.handle("a", p.Read("s1"), 0.0) == p.MISS
    created = e.handle("a", p.Create(), 0.0)
    assert isinstance(created, p.Ok)
    # A third lock, by READ or CREATE, is refused and takes nothing.
    refused = e.handle("a", p.Read("s3"), 0.0)
    assert code_of(refused) is p.Code.TOO_MANY_LOCKS
    assert isinstance(refused, p.Error) and "max_locks_per_connection" in refused.message
    assert code_of(e.handle("a", p.Create(), 0.0)) is p.Code.TOO_MANY_LOCKS
    assert e.locks.holder("s3") is None and e.locks.count("a") == 2
    # What takes no new lock still works: re-entry, NOLOCK, another connection.
    assert e.handle("a", p.Read("s1"), 1.0) == p.MISS
    assert e.handle("a", p.Read("s3", lock=False), 1.0) == p.MISS
    assert isinstance(e.handle("a", p.Create(lock=False), 1.0), p.Ok)
    assert e.handle("b", p.Read("s3"), 1.0) == p.MISS
    # Releasing one makes room again.
    assert e.handle("a", p.Write("s1", 100, b"x"), 2.0) == p.OK
    assert e.handle("a", p.Read("s4"), 2.0) == p.MISS
    assert e.locks.count("a") == 2


# ---------------------------------------------------------------- waiting and hand-over (§6)


def lock_with_waiter(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 100, b"old"), 0.0)
    assert engine.handle("a", p.Read("s1"), 0.0) == p.Data(b"old")
    assert engine.handle("b", p.Read("s1"), 1.0) is WAIT
    assert take(engine) == []


def test_grant_on_write(engine: Engine) -> None:
    lock_with_waiter(engine)
    assert engine.handle("a", p.Write("s1", 100, b"new"), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.Data(b"new"))]
    assert engine.locks.holder("s1") == "b"


def test_no_grant_on_write_keep(engine: Engine) -> None:
    lock_with_waiter(engine)
    assert engine.handle("a", p.Write("s1", 100, b"new", keep=True), 2.0) == p.OK
    assert take(engine) == []
    assert engine.handle("a", p.Close(), 3.0) == p.OK
    assert take(engine) == [Completion("b", p.Data(b"new"))]


def test_grant_on_close(engine: Engine) -> None:
    lock_with_waiter(engine)
    assert engine.handle("a", p.Close(), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.Data(b"old"))]


def test_grant_on_disconnect(engine: Engine) -> None:
    lock_with_waiter(engine)
    engine.disconnect("a", 2.0)
    assert take(engine) == [Completion("b", p.Data(b"old"))]
    assert engine.connections == 2


def test_grant_on_destroy(engine: Engine) -> None:
    lock_with_waiter(engine)
    assert engine.handle("a", p.Destroy("s1"), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.MISS)]


def test_grant_on_touch(engine: Engine) -> None:
    lock_with_waiter(engine)
    assert engine.handle("a", p.Touch("s1", 50, keep=True), 2.0) == p.OK
    assert take(engine) == []
    assert engine.handle("a", p.Touch("s1", 50), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.Data(b"old"))]


def test_grant_reads_data_at_grant_time_and_respects_expiry(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 5, b"x"), 0.0)
    engine.handle("a", p.Read("s1"), 0.0)
    assert engine.handle("b", p.Read("s1"), 0.0) is WAIT
    engine.handle("a", p.Close(), 6.0)  # s1 expired at 5; no tick ran
    assert take(engine) == [Completion("b", p.MISS)]


def test_waiters_granted_fifo(engine: Engine) -> None:
    hello(engine, "d")
    engine.handle("a", p.Read("s1"), 0.0)
    assert engine.handle("c", p.Read("s1"), 1.0) is WAIT
    assert engine.handle("b", p.Read("s1"), 2.0) is WAIT
    assert engine.handle("d", p.Read("s1"), 3.0) is WAIT
    order = []
    holder = "a"
    for t in (4.0, 5.0, 6.0):
        engine.handle(holder, p.Write("s1", 100, holder.encode()), t)
        [completion] = take(engine)
        assert completion.reply == p.Data(holder.encode())
        holder = str(completion.owner)
        order.append(holder)
    assert order == ["c", "b", "d"]


def test_waiter_that_disconnects_leaves_the_queue() -> None:
    engine = make_engine(lock_wait_s=30.0)
    hello(engine, "a")
    hello(engine, "b", wait_ms=1000)
    hello(engine, "c")
    engine.handle("a", p.Read("s1"), 0.0)
    assert engine.handle("b", p.Read("s1"), 0.0) is WAIT
    assert engine.handle("c", p.Read("s1"), 0.0) is WAIT
    engine.disconnect("b", 0.5)
    assert take(engine) == []
    assert engine.locks.waiting_count == 1
    engine.tick(10.0)  # b's wait deadline passes: nothing for b
    assert take(engine) == []
    engine.handle("a", p.Close(), 10.0)
    assert take(engine) == [Completion("c", p.MISS)]


def test_lock_timeout() -> None:
    e = make_engine(lock_wait_s=30.0)
    hello(e, "a")
    hello(e, "b", wait_ms=2000)
    hello(e, "c")
    e.handle("a", p.Read("s1"), 0.0)
    assert e.handle("b", p.Read("s1"), 1.0) is WAIT
    assert e.handle("c", p.Read("s1"), 1.0) is WAIT
    assert e.next_deadline() == 3.0
    e.tick(2.999)
    assert take(e) == []
    e.tick(3.0)
    [completion] = take(e)
    assert completion.owner == "b"
    assert code_of(completion.reply) is p.Code.LOCK_TIMEOUT
    assert isinstance(completion.reply, p.Error) and not completion.reply.fatal
    e.tick(30.999)
    assert take(e) == []
    e.tick(31.0)  # the daemon default for c
    assert [(c.owner, code_of(c.reply)) for c in take(e)] == [("c", p.Code.LOCK_TIMEOUT)]
    e.handle("a", p.Close(), 40.0)
    assert take(e) == []  # nobody is left in line
    assert e.locks.holder("s1") is None
    assert json.loads(stats(e, 40.0))["lock_timeouts_total"] == 2


def test_zero_wait_fails_at_the_next_tick() -> None:
    e = make_engine()
    hello(e, "a")
    hello(e, "b", wait_ms=0)
    e.handle("a", p.Read("s1"), 5.0)
    assert e.handle("b", p.Read("s1"), 5.0) is WAIT
    assert e.next_deadline() == 5.0
    e.tick(5.0)
    [completion] = take(e)
    assert completion.owner == "b" and code_of(completion.reply) is p.Code.LOCK_TIMEOUT


def test_timed_out_client_can_use_its_connection_again() -> None:
    e = make_engine()
    hello(e, "a")
    hello(e, "b", wait_ms=1000)
    e.handle("a", p.Read("s1"), 0.0)
    e.handle("b", p.Read("s1"), 0.0)
    e.tick(1.0)
    take(e)
    assert e.handle("b", p.Read("s1", lock=False), 1.0) == p.MISS
    assert e.handle("b", p.Read("s1"), 1.0) is WAIT
    e.handle("a", p.Close(), 1.5)
    assert take(e) == [Completion("b", p.MISS)]


# ---------------------------------------------------------------- leases (§6.3)


def revoked_engine(b_keeps: bool) -> Engine:
    """a's 1 s lease runs out while b waits: revoked, b granted; b keeps
    the lock or (``b_keeps=False``) releases it at once."""
    e = make_engine(lock_lease_s=300.0)
    hello(e, "a", lease_ms=1000)
    hello(e, "b")
    e.handle("a", p.Write("s1", 100, b"old"), 0.0)
    assert e.handle("a", p.Read("s1"), 0.0) == p.Data(b"old")
    assert e.handle("b", p.Read("s1"), 0.5) is WAIT
    e.tick(0.999)
    assert e.locks.holder("s1") == "a"
    e.tick(1.0)
    assert e.notices == [Notice("lock_revoked", "s1", "a")]
    assert take(e) == [Completion("b", p.Data(b"old"))]
    if not b_keeps:
        assert e.handle("b", p.Close(), 1.0) == p.OK
    return e


def test_lock_lost_then_forgotten() -> None:
    e = revoked_engine(b_keeps=False)
    assert e.locks.holder("s1") is None
    assert code_of(e.handle("a", p.Write("s1", 100, b"late"), 2.0)) is p.Code.LOCK_LOST
    assert e.handle("a", p.Read("s1", lock=False), 2.0) == p.Data(b"old")  # not executed
    # After that one error the revocation is forgotten; nobody holds the lock.
    assert e.handle("a", p.Write("s1", 100, b"late"), 2.0) == p.OK


@pytest.mark.parametrize(
    "request_",
    [p.Write("s1", 100, b"late"), p.Touch("s1", 100), p.Destroy("s1")],
    ids=["WRITE", "TOUCH", "DESTROY"],
)
def test_lock_lost_then_locked_when_lock_was_handed_on(request_: p.Request) -> None:
    e = revoked_engine(b_keeps=True)
    assert e.locks.holder("s1") == "b"
    assert code_of(e.handle("a", request_, 2.0)) is p.Code.LOCK_LOST
    assert code_of(e.handle("a", request_, 2.0)) is p.Code.LOCKED
    assert e.handle("b", p.Read("s1", lock=False), 2.0) == p.Data(b"old")
    assert e.locks.holder("s1") == "b"


def test_hello_forgets_revocations() -> None:
    e = revoked_engine(b_keeps=False)
    assert e.handle("a", p.Hello(1), 2.0) == OK_1
    assert e.handle("a", p.Write("s1", 100, b"new"), 2.0) == p.OK


def test_lease_of_granted_waiter_counts_from_grant() -> None:
    e = make_engine(lock_lease_s=10.0)
    hello(e, "a")
    hello(e, "b", lease_ms=4000)
    hello(e, "c")
    e.handle("a", p.Read("s1"), 0.0)
    e.handle("b", p.Read("s1"), 0.0)
    e.handle("a", p.Close(), 3.0)
    assert take(e) == [Completion("b", p.MISS)]
    assert e.handle("c", p.Read("s1"), 5.0) is WAIT
    e.tick(6.999)
    assert e.locks.holder("s1") == "b"
    e.tick(7.0)
    assert e.locks.holder("s1") == "c"


def lease_over_engine() -> Engine:
    """a holds s1 (data "old") 4 s past its 1 s lease; nobody asked for it."""
    e = make_engine(lock_lease_s=300.0)
    hello(e, "a", lease_ms=1000)
    hello(e, "b")
    hello(e, "z", wait_ms=0)
    assert e.handle("a", p.Write("s1", 100, b"old"), 0.0) == p.OK
    assert e.handle("a", p.Read("s1"), 0.0) == p.Data(b"old")
    assert e.next_deadline() == 1.0
    e.tick(1.0)
    e.tick(5.0)
    assert e.notices == [] and take(e) == []
    assert e.locks.holder("s1") == "a"
    return e


@pytest.mark.parametrize(
    ("request_", "stored"),
    [
        (p.Write("s1", 100, b"new"), b"new"),
        (p.Touch("s1", 100), b"old"),
        (p.Destroy("s1"), None),
    ],
    ids=["WRITE", "TOUCH", "DESTROY"],
)
def test_a_lease_that_runs_out_while_nobody_waits_leaves_the_change_to_its_holder(
    request_: p.Request, stored: bytes | None
) -> None:
    # PHP's files handler has no lease: a long request nobody competes with
    # (a report, an import) keeps its write (§6.3).
    e = lease_over_engine()
    assert e.next_deadline() == 100.0  # the session's lifetime; no lease left
    assert e.handle("a", p.Read("s1"), 5.0) == p.Data(b"old")  # re-entrant
    # A change without the lock does not ask for it: still LOCKED.
    assert code_of(e.handle("b", p.Write("s1", 100, b"evil"), 5.0)) is p.Code.LOCKED
    assert e.handle("a", request_, 5.0) == p.OK
    entry = e.store.get("s1", 5.0)
    assert (None if entry is None else entry.data) == stored
    assert e.locks.holder("s1") is None
    assert e.statistics(5.0)["lock_revoked_total"] == 0
    assert e.notices == []


@pytest.mark.parametrize("owner", ["b", "z"], ids=["wait", "wait_ms=0"])
def test_a_lock_past_its_lease_goes_at_once_to_the_first_request_that_asks(owner: str) -> None:
    e = lease_over_engine()
    assert e.handle(owner, p.Read("s1"), 6.0) is WAIT
    assert e.next_deadline() == 6.0  # the shell's timer runs at once
    e.tick(6.0)
    assert take(e) == [Completion(owner, p.Data(b"old"))]  # not LOCK_TIMEOUT
    assert e.notices == [Notice("lock_revoked", "s1", "a")]
    assert e.locks.holder("s1") == owner
    assert e.statistics(6.0)["lock_revoked_total"] == 1
    # The holder's change is refused and changes nothing.
    assert code_of(e.handle("a", p.Write("s1", 100, b"late"), 7.0)) is p.Code.LOCK_LOST
    assert code_of(e.handle("a", p.Write("s1", 100, b"late"), 7.0)) is p.Code.LOCKED
    assert e.handle(owner, p.Write("s1", 100, b"next"), 7.0) == p.OK
    entry = e.store.get("s1", 7.0)
    assert entry is not None and entry.data == b"next"


# ---------------------------------------------------------------- LOCKED (§4.2, §4.3, §4.5)


@pytest.mark.parametrize(
    "request_",
    [
        p.Write("s1", 100, b"evil"),
        p.Write("s1", 100, b"evil", keep=True),
        p.Touch("s1", 1),
        p.Touch("s1", 1, keep=True),
        p.Destroy("s1"),
    ],
)
def test_locked_for_non_holder(engine: Engine, request_: p.Request) -> None:
    engine.handle("a", p.Write("s1", 100, b"good"), 0.0)
    engine.handle("a", p.Read("s1"), 0.0)
    reply = engine.handle("b", request_, 1.0)
    assert code_of(reply) is p.Code.LOCKED
    # Unchanged: data, lifetime, lock.
    assert engine.handle("b", p.Get("s1"), 1.0) == p.Data(b"good", ("99000", "1"))
    assert engine.locks.holder("s1") == "a"


def test_writing_an_unlocked_session_is_allowed(engine: Engine) -> None:
    assert engine.handle("a", p.Write("s1", 100, b"x"), 0.0) == p.OK
    assert engine.handle("b", p.Write("s1", 100, b"y"), 0.0) == p.OK
    assert engine.handle("c", p.Destroy("s1"), 0.0) == p.OK
    assert engine.handle("c", p.Destroy("s1"), 0.0) == p.OK  # also when missing


def test_touch_miss_keeps_the_lock(engine: Engine) -> None:
    assert engine.handle("a", p.Read("s1"), 0.0) == p.MISS
    assert engine.handle("a", p.Touch("s1", 100), 0.0) == p.MISS
    assert engine.locks.holder("s1") == "a"
    assert engine.handle("b", p.Read("s1"), 0.0) is WAIT
    assert take(engine) == []
    assert engine.handle("a", p.Write("s1", 100, b"data"), 1.0) == p.OK
    assert take(engine) == [Completion("b", p.Data(b"data"))]


# ---------------------------------------------------------------- CREATE (§4.8)

ALPHABET_RE = {4: r"[0-9a-f]+", 5: r"[0-9a-v]+", 6: r"[0-9a-zA-Z,-]+"}


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("length", [22, 32, 256])
def test_create_ids(engine: Engine, bits: int, length: int) -> None:
    seen: set[str] = set()
    used: set[str] = set()
    for _ in range(40):
        reply = engine.handle("a", p.Create(length, bits), 0.0)
        assert isinstance(reply, p.Ok)
        [sid] = reply.tokens
        assert len(sid) == length
        assert re.fullmatch(ALPHABET_RE[bits], sid), sid
        assert p.is_valid_sid(sid)
        assert engine.locks.holder(sid) == "a"
        assert engine.handle("a", p.Exists(sid), 0.0) == OK_1  # being started: see below
        seen.add(sid)
        used.update(sid)
    assert len(seen) == 40
    # 40 ids of >= 22 random characters use (nearly) the whole alphabet.
    assert len(used) >= {4: 16, 5: 30, 6: 58}[bits]


def test_create_defaults_and_nolock(engine: Engine) -> None:
    reply = engine.handle("a", p.Create(), 0.0)
    assert isinstance(reply, p.Ok)
    [sid] = reply.tokens
    assert len(sid) == 32 and re.fullmatch(ALPHABET_RE[5], sid)
    assert engine.handle("a", p.Read(sid), 0.0) == p.MISS  # re-entrant, no data yet
    assert engine.handle("b", p.Read(sid), 0.0) is WAIT
    reply = engine.handle("c", p.Create(lock=False), 0.0)
    assert isinstance(reply, p.Ok)
    [other] = reply.tokens
    assert engine.locks.holder(other) is None


def test_a_new_session_exists_while_its_lock_is_held(engine: Engine) -> None:
    # PHP's files handler creates the file when it opens it: with strict mode
    # a second request bringing the new ID before the first write must find
    # it valid and wait for the lock, not be handed another, empty session.
    reply = engine.handle("a", p.Create(), 0.0)
    assert isinstance(reply, p.Ok)
    [sid] = reply.tokens
    assert engine.handle("b", p.Exists(sid), 0.0) == OK_1
    assert engine.handle("b", p.Read(sid), 0.0) is WAIT
    assert engine.handle("a", p.Write(sid, 100, b"n|i:1;"), 1.0) == p.OK
    assert engine.completions == [Completion("b", p.Data(b"n|i:1;"))]
    # Unwritten and released (PHP's handler stores a new session before it
    # lets go; a bare client need not): no data, no lock, no session.
    engine.completions.clear()
    engine.handle("b", p.Close(), 2.0)
    reply = engine.handle("a", p.Create(), 2.0)
    assert isinstance(reply, p.Ok)
    [unwritten] = reply.tokens
    assert engine.handle("b", p.Exists(unwritten), 2.0) == OK_1
    engine.handle("a", p.Close(), 3.0)
    assert engine.handle("b", p.Exists(unwritten), 3.0) == OK_0
    # Nor does an ID made with NOLOCK exist before its write.
    reply = engine.handle("a", p.Create(lock=False), 3.0)
    assert isinstance(reply, p.Ok)
    assert engine.handle("b", p.Exists(reply.tokens[0]), 3.0) == OK_0


@pytest.mark.parametrize("length", [22, 200, 256])
def test_create_in_a_cluster_fits_the_node_names_within_256(engine: Engine, length: int) -> None:
    suffix = "-" + "m" * 16 + "-" + "b" * 16  # the longest node names
    engine.sid_suffix = lambda: suffix
    reply = engine.handle("a", p.Create(length, 6), 0.0)
    assert isinstance(reply, p.Ok)
    [sid] = reply.tokens
    assert sid.endswith(suffix)
    assert len(sid) == min(length + len(suffix), p.MAX_SID_LENGTH)
    assert p.is_valid_sid(sid)
    assert engine.handle("a", p.Write(sid, 100, b"x"), 0.0) == p.OK


class ScriptedTokens:
    """A token_bytes source that returns the given byte strings, in turn."""

    def __init__(self, script: list[bytes]) -> None:
        self._script: Iterator[bytes] = iter(script)
        self.calls: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        raw = next(self._script)
        assert len(raw) == n
        return raw


def test_create_retries_on_collision() -> None:
    tokens = ScriptedTokens([bytes([0]) * 22, bytes([1]) * 22, bytes([0x12]) * 22])
    e = Engine(Limits(), tokens, 0.0)
    hello(e, "a")
    hello(e, "b")
    e.handle("a", p.Write("0" * 22, 100, b"taken"), 0.0)  # stored
    e.handle("b", p.Read("1" * 22), 0.0)  # locked, no data
    reply = e.handle("a", p.Create(22, 4), 0.0)
    assert reply == p.Ok(("2" * 22,))  # 0x12 & 0xF -> "2"
    assert tokens.calls == [22, 22, 22]
    assert e.locks.holder("2" * 22) == "a"
    assert e.handle("a", p.Read("0" * 22, lock=False), 0.0) == p.Data(b"taken")
    assert e.locks.holder("1" * 22) == "b"


def test_create_maps_bytes_onto_alphabet() -> None:
    tokens = ScriptedTokens([bytes(range(64)) + bytes(range(192, 256))])
    e = Engine(Limits(), tokens, 0.0)
    hello(e, "a")
    reply = e.handle("a", p.Create(128, 6, lock=False), 0.0)
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,-"
    assert reply == p.Ok((alphabet * 2,))


# ---------------------------------------------------------------- GC (§4.7)


def test_gc_counts_expirations_since_last_gc(engine: Engine) -> None:
    for i in range(3):
        engine.handle("a", p.Write(f"s{i}", 10, b"x"), 0.0)
    engine.handle("a", p.Write("long", 1000, b"x"), 0.0)
    engine.handle("a", p.Write("gone", 10, b"x"), 0.0)
    engine.handle("a", p.Destroy("gone"), 1.0)  # destroyed, not expired
    engine.tick(10.0)
    assert engine.handle("b", p.Gc(1440), 11.0) == p.Ok(("3",))
    assert engine.handle("a", p.Gc(1440), 11.0) == p.Ok(("0",))
    # GC runs the deadlines itself.
    engine.handle("a", p.Write("t1", 1, b"x"), 20.0)
    engine.handle("a", p.Write("t2", 1, b"x"), 20.0)
    assert engine.handle("c", p.Gc(1), 21.0) == p.Ok(("2",))
    assert engine.expired_total == 5
    assert engine.handle("a", p.Exists("long"), 21.0) == OK_1


# ---------------------------------------------------------------- admin verbs (§4.9)


def stats(engine: Engine, now: float) -> bytes:
    reply = engine.handle("a", p.Stats(), now)
    assert isinstance(reply, p.Data) and reply.tokens == ()
    return reply.data


def test_stats(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 10, b"12345"), 0.0)
    engine.handle("a", p.Write("s2", 10, b"123"), 0.0)
    engine.handle("a", p.Read("s1"), 0.0)
    engine.handle("b", p.Read("s1"), 0.0)
    stats_ = json.loads(stats(engine, 12.5).decode("utf-8"))
    assert isinstance(stats_, dict)
    for key in [
        "version",
        "uptime_s",
        "sessions",
        "bytes",
        "connections",
        "locks_held",
        "locks_waiting",
        "expired_total",
        "requests_total",
        "verbs",
    ]:
        assert key in stats_, key
    assert stats_["uptime_s"] == 12.5
    assert stats_["sessions"] == 2
    assert stats_["bytes"] == 8
    assert stats_["connections"] == 3
    assert stats_["locks_held"] == 1
    assert stats_["locks_waiting"] == 1
    assert stats_["expired_total"] == 0
    assert stats_["requests_total"] == 3 + 5  # 3 HELLOs, then 5 requests
    assert isinstance(stats_["version"], str)
    assert stats_["verbs"] == {"HELLO": 3, "WRITE": 2, "READ": 2, "STATS": 1}


def test_get(engine: Engine) -> None:
    assert engine.handle("a", p.Get("s1"), 0.0) == p.MISS
    engine.handle("a", p.Write("s1", 10, b"\x00x"), 0.0)
    assert engine.handle("b", p.Get("s1"), 2.5) == p.Data(b"\x00x", ("7500", "0"))
    engine.handle("a", p.Read("s1"), 3.0)
    assert engine.handle("b", p.Get("s1"), 3.0) == p.Data(b"\x00x", ("7000", "1"))
    assert engine.locks.waiting_count == 0  # GET never waits


def list_all(engine: Engine, limit: int, now: float) -> list[str]:
    lines: list[str] = []
    after: str | None = None
    for _ in range(10_000):
        reply = engine.handle("c", p.List(after, limit), now)
        assert isinstance(reply, p.Data)
        [next_token] = reply.tokens
        page = reply.data.decode("ascii").splitlines()
        assert len(page) <= limit
        lines += page
        if next_token == "*":
            return lines
        after = next_token
    raise AssertionError("LIST never reached the last page")


@pytest.mark.parametrize("limit", [1, 7, 100, 10_000])
def test_list_pages_over_many_sessions(engine: Engine, limit: int) -> None:
    rng = random.Random(7)
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,-"
    sids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)}
    sids.update(["-", ",", "-,"])  # "-" is an id too, not a page marker
    for i, sid in enumerate(sorted(sids)):
        engine.handle("a", p.Write(sid, 100 + i % 5, b"x" * (i % 3)), 0.0)
    locked = sorted(sids)[5]
    engine.handle("b", p.Read(locked), 0.0)
    lines = list_all(engine, limit, 1.0)
    listed = [line.split(" ") for line in lines]
    assert [f[0] for f in listed] == sorted(sids, key=lambda s: s.encode())
    for i, (sid, size, ttl_ms, is_locked) in enumerate(listed):
        assert int(size) == i % 3
        assert int(ttl_ms) == (100 + i % 5 - 1) * 1000
        assert is_locked == ("1" if sid == locked else "0")


def test_list_empty_store(engine: Engine) -> None:
    assert engine.handle("a", p.List(None, 10), 0.0) == p.Data(b"", ("*",))


def test_list_exact_page_then_last(engine: Engine) -> None:
    for sid in ["a", "b", "c", "d"]:
        engine.handle("a", p.Write(sid, 100, b""), 0.0)
    first = engine.handle("a", p.List(None, 2), 0.0)
    assert first == p.Data(b"a 0 100000 0\nb 0 100000 0\n", ("b",))
    second = engine.handle("a", p.List("b", 2), 0.0)
    assert isinstance(second, p.Data)
    assert second.data == b"c 0 100000 0\nd 0 100000 0\n"
    assert second.tokens == ("*",)


def test_list_session_named_dash(engine: Engine) -> None:
    """§5 allows the session ID "-"; a page that ends at it must still let the
    client reach the sessions after it (the page marker is "*", §4.9)."""
    for sid in [",", "-", "a", "b"]:
        engine.handle("a", p.Write(sid, 100, b""), 0.0)
    for limit in (1, 2):
        lines = list_all(engine, limit, 0.0)
        assert [line.split(" ")[0] for line in lines] == [",", "-", "a", "b"]
    assert engine.handle("a", p.List("-", 1), 0.0) == p.Data(b"a 0 100000 0\n", ("a",))


def test_next_deadline(engine: Engine) -> None:
    assert engine.next_deadline() is None
    engine.handle("a", p.Write("s1", 50, b""), 0.0)
    assert engine.next_deadline() == 50.0
    engine.handle("a", p.Read("s1"), 0.0)
    assert engine.next_deadline() == 50.0
    engine.handle("b", p.Read("s1"), 0.0)  # waits until 30
    assert engine.next_deadline() == 30.0


def test_close_does_not_hide_a_lost_lease_from_the_late_write() -> None:
    engine = Engine(Limits(lock_lease_s=1.0), lambda n: bytes(n), 0.0)
    for owner in ("a", "b"):
        engine.connect(owner)
        assert engine.handle(owner, p.Hello(1), 0.0) == p.Ok(("1",))
    assert engine.handle("a", p.Read("s1"), 0.0) == p.MISS
    assert engine.handle("b", p.Read("s1"), 0.5) is WAIT
    engine.tick(2.0)  # the lease ran out while b waited: revoked, b granted
    assert engine.completions == [Completion("b", p.MISS)]
    assert engine.handle("b", p.Close(), 2.0) == p.OK
    assert engine.handle("a", p.Close(), 2.0) == p.OK
    reply = engine.handle("a", p.Write("s1", 60, b"late"), 2.0)
    assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_LOST
    assert engine.handle("a", p.Write("s1", 60, b"now"), 2.0) == p.OK


def test_invalid_requests_of_both_kinds_add_up_in_verbs(engine: Engine) -> None:
    """RequestError and FatalError are both counted as INVALID: their counts
    add up, so the INVALID count never goes down when the other kind comes."""
    before = engine.statistics(0.0)["verbs"]
    for _ in range(3):
        engine.handle("a", p.FatalError(p.Code.HEADER_TOO_LONG, "closing"), 0.0)
    verbs = engine.statistics(0.0)["verbs"]
    assert isinstance(verbs, dict) and isinstance(before, dict)
    assert verbs["INVALID"] == 3
    engine.handle("a", p.RequestError(p.Code.UNKNOWN_VERB, "FOO"), 0.0)
    verbs = engine.statistics(0.0)["verbs"]
    assert isinstance(verbs, dict)
    assert verbs["INVALID"] == 4
    assert verbs["HELLO"] == before["HELLO"]


# ---------------------------------------------------------------- destroyed while waiting (§4.1)

ASK = p.Read("s1", destroyed=True)


def _destroyed_under_two_waiters(engine: Engine) -> None:
    """a holds s1 (with data) and destroys it while b and c wait, asking:
    b is granted the lock and told MISS DESTROYED; c still waits."""
    engine.handle("a", p.Write("s1", 100, b"old"), 0.0)
    engine.handle("a", p.Read("s1"), 0.0)
    assert engine.handle("b", ASK, 1.0) is WAIT
    assert engine.handle("c", ASK, 1.0) is WAIT
    assert engine.handle("a", p.Destroy("s1"), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.MISS_DESTROYED)]


def test_a_waiter_that_asked_learns_the_session_was_destroyed_while_it_waited(
    engine: Engine,
) -> None:
    hello(engine, "d")
    engine.handle("a", p.Write("s1", 100, b"old"), 0.0)
    assert engine.handle("a", p.Read("s1"), 0.0) == p.Data(b"old")
    assert engine.handle("b", ASK, 1.0) is WAIT
    assert engine.handle("c", p.Read("s1"), 1.0) is WAIT  # did not ask
    assert engine.handle("a", p.Destroy("s1"), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.MISS_DESTROYED)]
    # b holds the lock of a destroyed session: asking again, it is told again.
    assert engine.handle("b", ASK, 3.0) == p.MISS_DESTROYED
    assert engine.read_reply("s1", 3.0) == p.MISS_DESTROYED  # the shell's re-read of a grant
    assert engine.handle("b", p.Read("s1"), 3.0) == p.MISS  # without the token: as before
    assert engine.read_reply("s1", 3.0) == p.MISS
    # Its lock is held only to be released: with strict mode a new request
    # gets a new ID (files: no file).
    assert engine.handle("d", p.Exists("s1"), 3.0) == OK_0
    assert engine.handle("d", p.Read("s1", lock=False, destroyed=True), 3.0) == p.MISS
    assert engine.handle("b", p.Close(), 4.0) == p.OK
    assert take(engine) == [Completion("c", p.MISS)]  # c did not ask: the reply of old


def test_who_comes_after_the_destroy_finds_no_session_not_a_destroyed_one(
    engine: Engine,
) -> None:
    # A request that arrives after the destroy (the page a logout redirects
    # to) opens no unlinked file with files: its session is new, and what
    # it writes is kept.  Neither the marked holder nor that holder's
    # release of the dead ID (the PHP handler's dropped write) marks it.
    hello(engine, "d")
    hello(engine, "e")
    _destroyed_under_two_waiters(engine)
    assert engine.handle("d", p.Exists("s1"), 3.0) == OK_0  # strict mode: a new ID
    assert engine.handle("e", ASK, 3.0) is WAIT  # not strict: it keeps the ID
    assert engine.handle("b", p.Destroy("s1"), 4.0) == p.OK  # the PHP handler's "write"
    assert take(engine) == [Completion("c", p.MISS_DESTROYED)]  # waited through the destroy
    assert engine.handle("c", p.Destroy("s1"), 5.0) == p.OK
    assert take(engine) == [Completion("e", p.MISS)]  # a new session
    assert engine.handle("e", p.Write("s1", 100, b"new"), 6.0) == p.OK
    assert engine.handle("d", p.Read("s1"), 7.0) == p.Data(b"new")
    assert engine.handle("d", p.Close(), 8.0) == p.OK
    assert take(engine) == []


def test_a_session_that_never_existed_is_a_plain_miss_for_waiters_that_ask(
    engine: Engine,
) -> None:
    assert engine.handle("a", ASK, 0.0) == p.MISS
    assert engine.handle("b", ASK, 1.0) is WAIT
    assert engine.handle("a", p.Close(), 2.0) == p.OK
    assert take(engine) == [Completion("b", p.MISS)]
    # A new ID CREATE made and its waiter: the same.
    created = engine.handle("a", p.Create(), 3.0)
    assert isinstance(created, p.Ok)
    assert engine.handle("c", p.Read(created.tokens[0], destroyed=True), 3.0) is WAIT
    assert engine.handle("a", p.Close(), 4.0) == p.OK
    assert take(engine) == [Completion("c", p.MISS)]


def test_a_destroyed_session_written_again_reads_its_new_data(engine: Engine) -> None:
    _destroyed_under_two_waiters(engine)
    # A client that writes it anyway (one that did not ask, or without locks)
    # brings it back: who comes next reads that.
    assert engine.handle("b", p.Write("s1", 100, b"new"), 3.0) == p.OK
    assert take(engine) == [Completion("c", p.Data(b"new"))]


def test_a_destroy_with_nobody_waiting_leaves_no_mark(engine: Engine) -> None:
    engine.handle("a", p.Write("s1", 100, b"old"), 0.0)
    engine.handle("a", p.Read("s1"), 0.0)
    assert engine.handle("a", p.Destroy("s1"), 1.0) == p.OK
    assert engine.handle("b", ASK, 2.0) == p.MISS
    assert engine.handle("c", ASK, 3.0) is WAIT
    assert engine.handle("b", p.Close(), 4.0) == p.OK
    assert take(engine) == [Completion("c", p.MISS)]
