"""The lock table (PROTOCOL.md §6): FIFO waiters, re-entrancy, wait deadlines,
leases, and owners that go away.  A lease is revoked only when someone waits
for the lock (§6.3): the tests of revocation queue a waiter."""

from __future__ import annotations

from collections.abc import Hashable

from phpsess.locks import Grant, LockTable, Revoked, Timeout

LEASE = 300.0
WAIT = 30.0


def test_acquire_free_lock() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", now=0.0, lease_s=LEASE, wait_s=WAIT)
    assert locks.holder("s1") == "a"
    assert locks.holds("a", "s1")
    assert not locks.holds("b", "s1")
    assert locks.owned_by("a") == {"s1"}
    assert locks.holds_any("a")
    assert not locks.holds_any("b")
    assert locks.held_count == 1
    assert locks.waiting_count == 0
    assert locks.holder("s2") is None


def test_one_owner_may_hold_several_locks() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    assert locks.acquire("s2", "a", 0.0, LEASE, WAIT)
    assert locks.owned_by("a") == {"s1", "s2"}
    assert locks.release_all("a", 1.0) == []
    assert locks.owned_by("a") == frozenset()
    assert locks.held_count == 0


def test_reentrant() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    assert locks.acquire("s1", "a", 1.0, LEASE, WAIT)
    assert locks.waiting_count == 0
    assert locks.waits_total == 0
    # One release frees it: the lock is not counted.
    assert locks.release("s1", "a", 2.0) == []
    assert locks.holder("s1") is None


def test_waiters_are_granted_in_fifo_order() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    for i, owner in enumerate(["d", "b", "e", "c"]):
        assert not locks.acquire("s1", owner, float(i), LEASE, WAIT)
    assert locks.waiting_count == 4
    assert locks.waits_total == 4
    order: list[Hashable] = []
    holder: Hashable = "a"
    for t in range(5, 9):
        [grant] = locks.release("s1", holder, float(t))
        order.append(grant.owner)
        assert grant == Grant("s1", grant.owner)
        holder = grant.owner
        assert locks.holder("s1") == holder
    assert order == ["d", "b", "e", "c"]
    assert locks.release("s1", holder, 10.0) == []
    assert locks.holder("s1") is None
    assert locks.waiting_count == 0


def test_release_by_non_holder_is_a_no_op() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    locks.acquire("s1", "b", 0.0, LEASE, WAIT)
    assert locks.release("s1", "b", 1.0) == []  # b is only waiting
    assert locks.release("s1", "c", 1.0) == []
    assert locks.release("s2", "a", 1.0) == []
    assert locks.holder("s1") == "a"
    assert locks.waiting_count == 1


def test_queues_are_per_session() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    locks.acquire("s2", "b", 0.0, LEASE, WAIT)
    assert not locks.acquire("s1", "c", 0.0, LEASE, WAIT)
    assert not locks.acquire("s2", "d", 0.0, LEASE, WAIT)
    assert locks.release("s2", "b", 1.0) == [Grant("s2", "d")]
    assert locks.release("s1", "a", 1.0) == [Grant("s1", "c")]


def test_wait_timeout() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    assert not locks.acquire("s1", "b", 1.0, LEASE, 2.0)
    assert not locks.acquire("s1", "c", 1.5, LEASE, 10.0)
    assert locks.expire(2.999) == []
    assert locks.expire(3.0) == [Timeout("s1", "b")]
    assert locks.timeouts_total == 1
    assert locks.waiting_count == 1
    # The timed-out waiter is no longer in line; c is next.
    assert locks.release("s1", "a", 4.0) == [Grant("s1", "c")]
    assert locks.expire(100.0) == []  # c's wait deadline is stale now


def test_zero_wait_times_out_at_once() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 5.0, LEASE, WAIT)
    assert not locks.acquire("s1", "b", 5.0, LEASE, 0.0)
    assert locks.next_deadline() == 5.0
    assert locks.expire(5.0) == [Timeout("s1", "b")]
    assert locks.waiting_count == 0


def test_timed_out_owner_may_wait_again() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    locks.acquire("s1", "b", 0.0, LEASE, 1.0)
    assert locks.expire(1.0) == [Timeout("s1", "b")]
    assert not locks.acquire("s1", "b", 2.0, LEASE, 1.0)
    assert locks.release("s1", "a", 2.5) == [Grant("s1", "b")]


def test_lease_revocation_hands_lock_on() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    locks.acquire("s1", "b", 1.0, lease_s=5.0, wait_s=WAIT)
    assert locks.expire(9.9) == []
    events = locks.expire(10.0)
    assert events == [Revoked("s1", "a"), Grant("s1", "b")]
    assert locks.revoked_total == 1
    assert locks.holder("s1") == "b"
    assert not locks.holds_any("a")
    # b's lease runs from the grant (10), with b's own lease_s.
    assert not locks.acquire("s1", "c", 11.0, LEASE, WAIT)
    assert locks.expire(14.9) == []
    assert locks.expire(15.0) == [Revoked("s1", "b"), Grant("s1", "c")]
    assert locks.holder("s1") == "c"


def test_revocation_is_remembered_once() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    locks.acquire("s2", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    locks.acquire("s1", "b", 0.5, LEASE, WAIT)
    locks.acquire("s2", "c", 0.5, LEASE, WAIT)
    assert set(locks.expire(1.0)) == {
        Revoked("s1", "a"), Grant("s1", "b"), Revoked("s2", "a"), Grant("s2", "c")
    }
    assert not locks.take_revoked("b", "s1")
    assert locks.take_revoked("a", "s1")
    assert not locks.take_revoked("a", "s1")  # forgotten after the one error
    assert locks.take_revoked("a", "s2")
    assert not locks.take_revoked("a", "s2")


def test_acquiring_again_forgets_revocation() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    locks.acquire("s1", "b", 0.5, LEASE, WAIT)
    assert locks.expire(1.0) == [Revoked("s1", "a"), Grant("s1", "b")]
    locks.release("s1", "b", 1.5)
    assert locks.acquire("s1", "a", 2.0, LEASE, WAIT)
    assert not locks.take_revoked("a", "s1")


def test_release_all_keeps_revocations_and_reset_forgets_them() -> None:
    # CLOSE (release_all) must not hide a lost lease from the late WRITE;
    # HELLO (reset) starts the connection afresh (PROTOCOL.md §6.3, §3.2).
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    locks.acquire("s1", "b", 0.5, LEASE, WAIT)
    assert locks.expire(1.0) == [Revoked("s1", "a"), Grant("s1", "b")]
    locks.release_all("a", 2.0)
    assert locks.take_revoked("a", "s1")
    locks.acquire("s2", "a", 3.0, lease_s=1.0, wait_s=WAIT)
    locks.acquire("s2", "b", 3.5, LEASE, WAIT)
    assert locks.expire(4.0) == [Revoked("s2", "a"), Grant("s2", "b")]
    locks.reset("a", 5.0)
    assert not locks.take_revoked("a", "s2")


def test_release_before_lease_means_no_revocation() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    locks.release("s1", "a", 5.0)
    locks.acquire("s1", "b", 6.0, lease_s=100.0, wait_s=WAIT)
    # a's old lease deadline (10) must not revoke b's lock.
    assert locks.expire(10.0) == []
    assert locks.holder("s1") == "b"
    assert not locks.take_revoked("a", "s1")
    assert not locks.take_revoked("b", "s1")


def test_reacquire_same_owner_after_release_gets_fresh_lease() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    locks.release("s1", "a", 5.0)
    locks.acquire("s1", "a", 6.0, lease_s=10.0, wait_s=WAIT)
    locks.acquire("s1", "b", 7.0, LEASE, wait_s=100.0)
    assert locks.expire(10.0) == []  # the first lease is over, not the second
    assert locks.expire(16.0) == [Revoked("s1", "a"), Grant("s1", "b")]


def test_forget_hands_lock_on_and_drops_waits() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    locks.acquire("s2", "a", 0.0, LEASE, WAIT)
    locks.acquire("s1", "b", 0.0, LEASE, WAIT)
    locks.acquire("s2", "c", 0.0, LEASE, WAIT)
    locks.acquire("s3", "d", 0.0, LEASE, WAIT)
    locks.acquire("s3", "a2", 0.0, LEASE, WAIT)
    grants = locks.forget("a", 1.0)
    assert sorted(grants, key=lambda g: g.sid) == [Grant("s1", "b"), Grant("s2", "c")]
    assert locks.holder("s1") == "b"
    assert locks.holder("s2") == "c"
    assert not locks.holds_any("a")
    # A waiter that goes away leaves the queue; nobody is granted on its behalf.
    assert locks.forget("a2", 1.0) == []
    assert locks.waiting_count == 0
    assert locks.release("s3", "d", 2.0) == []
    assert locks.holder("s3") is None
    # Nobody waits for s1 or s2: their leases run out, the locks stay held.
    assert locks.expire(1000.0) == []
    assert (locks.holder("s1"), locks.holder("s2")) == ("b", "c")


def test_forget_middle_waiter_keeps_fifo_order_of_the_rest() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    for owner in ["b", "c", "d"]:
        locks.acquire("s1", owner, 0.0, LEASE, WAIT)
    assert locks.forget("c", 1.0) == []
    assert locks.release("s1", "a", 2.0) == [Grant("s1", "b")]
    assert locks.release("s1", "b", 3.0) == [Grant("s1", "d")]
    assert locks.expire(WAIT + 10) == []  # c's wait deadline is stale


def test_forget_forgets_revocations() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    locks.acquire("s1", "b", 0.5, LEASE, WAIT)
    assert locks.expire(1.0) == [Revoked("s1", "a"), Grant("s1", "b")]
    locks.forget("a", 2.0)
    assert not locks.take_revoked("a", "s1")


def test_forget_unknown_owner() -> None:
    locks = LockTable()
    assert locks.forget("nobody", 0.0) == []
    locks.cancel_wait("nobody")


def test_waiter_timeout_and_revocation_in_one_expire_call() -> None:
    locks = LockTable()
    locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    locks.acquire("s1", "b", 0.0, LEASE, 5.0)  # gives up at 5
    locks.acquire("s1", "c", 0.0, lease_s=3.0, wait_s=50.0)
    # A late timer at 20: b's wait (5) ran out before a's lease (10).
    assert locks.expire(20.0) == [Timeout("s1", "b"), Revoked("s1", "a"), Grant("s1", "c")]
    assert locks.holder("s1") == "c"
    assert not locks.acquire("s1", "d", 21.0, LEASE, WAIT)
    assert locks.expire(22.9) == []
    assert locks.expire(23.0) == [Revoked("s1", "c"), Grant("s1", "d")]


def test_next_deadline() -> None:
    locks = LockTable()
    assert locks.next_deadline() is None
    locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    assert locks.next_deadline() == 10.0
    locks.acquire("s1", "b", 0.0, LEASE, wait_s=3.0)
    assert locks.next_deadline() == 3.0


def test_heap_stays_bounded_after_many_cycles() -> None:
    locks = LockTable()
    for i in range(20_000):
        now = float(i)
        assert locks.acquire("s1", "a", now, LEASE, WAIT)
        assert not locks.acquire("s1", "b", now, LEASE, WAIT)
        [grant] = locks.release("s1", "a", now)
        assert grant == Grant("s1", "b")
        assert locks.release("s1", "b", now) == []
        # White box: at most 2 locks/waiters are live at once, so compaction
        # keeps the heap at 2 * 2 + slack items, not one per cycle.
        assert len(locks._heap) <= 2 * 2 + 1024 + 1
    assert locks.held_count == 0
    # Stale items are skipped: nothing is revoked or timed out.
    assert locks.expire(1e9) == []
    assert locks.next_deadline() is None


def test_compaction_keeps_live_deadlines() -> None:
    locks = LockTable()
    locks.acquire("keep", "x", 0.0, lease_s=50_000.0, wait_s=WAIT)
    locks.acquire("keep", "y", 0.0, LEASE, wait_s=40_000.0)
    locks.acquire("keep", "w", 0.0, LEASE, wait_s=60_000.0)
    for i in range(5_000):
        locks.acquire(f"t{i}", "z", float(i), LEASE, WAIT)
        locks.release(f"t{i}", "z", float(i))
    assert len(locks._heap) < 2000
    assert locks.expire(39_999.0) == []
    assert locks.expire(40_000.0) == [Timeout("keep", "y")]
    assert locks.expire(50_000.0) == [Revoked("keep", "x"), Grant("keep", "w")]


def test_waiters_of_a_destroyed_session_are_granted_marked_locks() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, LEASE, WAIT)
    assert not locks.destroyed("s1")
    assert not locks.acquire("s1", "b", 1.0, LEASE, WAIT)
    locks.mark_destroyed("s1")
    locks.mark_destroyed("s2")  # nobody waits: nothing to mark
    assert not locks.destroyed("s1")  # the holder's own lock is not marked
    assert locks.release("s1", "a", 2.0) == [Grant("s1", "b")]
    assert locks.destroyed("s1")
    # Whoever queues later, behind a marked lock, came after the destroy:
    # its lock is not marked.
    assert not locks.acquire("s1", "c", 3.0, LEASE, WAIT)
    assert locks.release("s1", "b", 4.0) == [Grant("s1", "c")]
    assert not locks.destroyed("s1")
    # Free again: no mark is left.
    assert locks.release("s1", "c", 5.0) == []
    assert locks.acquire("s1", "d", 6.0, LEASE, WAIT)
    assert not locks.destroyed("s1")
    assert not locks.destroyed("s2")


def test_a_lock_handed_on_by_its_lease_keeps_the_waiters_mark() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, 10.0, WAIT)
    assert not locks.acquire("s1", "b", 1.0, LEASE, WAIT)
    locks.mark_destroyed("s1")
    events = locks.expire(10.0)
    assert events == [Revoked("s1", "a"), Grant("s1", "b")]
    assert locks.destroyed("s1")


# -- a lease that runs out while nobody waits (PROTOCOL.md §6.3)


def test_a_lease_that_runs_out_while_nobody_waits_keeps_the_lock() -> None:
    # A long request nobody competes with keeps its lock past the lease, as
    # PHP's files handler keeps its flock: its write is not lost.
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    assert not locks.preemptible("s1", 9.9)
    assert locks.expire(10.0) == []
    assert locks.holder("s1") == "a"
    assert locks.preemptible("s1", 10.0)
    assert locks.revoked_total == 0
    assert locks.next_deadline() is None  # nothing left for the timer
    # Re-entrant: still a no-op, the lease is not renewed.
    assert locks.acquire("s1", "a", 11.0, LEASE, WAIT)
    assert locks.waits_total == 0
    assert locks.next_deadline() is None
    assert locks.preemptible("s1", 11.0)
    # Its release (the WRITE that ends the request) is an ordinary one.
    assert locks.release("s1", "a", 12.0) == []
    assert not locks.take_revoked("a", "s1")
    assert locks.holder("s1") is None
    assert not locks.preemptible("s1", 12.0)
    assert locks.revoked_total == 0


def test_a_lock_past_its_lease_is_revoked_as_soon_as_someone_waits() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, lease_s=10.0, wait_s=WAIT)
    assert locks.expire(50.0) == []  # nobody waits: kept
    assert not locks.acquire("s1", "b", 60.0, lease_s=5.0, wait_s=WAIT)
    assert locks.next_deadline() == 60.0  # the timer runs at once
    assert locks.expire(60.0) == [Revoked("s1", "a"), Grant("s1", "b")]
    assert locks.revoked_total == 1
    assert locks.timeouts_total == 0
    assert locks.holder("s1") == "b"
    assert not locks.preemptible("s1", 60.0)
    # The holder's late change is refused (LOCK_LOST), once.
    assert locks.take_revoked("a", "s1")
    assert not locks.take_revoked("a", "s1")
    assert locks.release("s1", "a", 61.0) == []  # not its lock any more
    assert locks.holder("s1") == "b"
    # b's lease runs from its grant; nobody waits when it ends: kept too.
    assert locks.expire(65.0) == []
    assert locks.holder("s1") == "b"


def test_a_zero_wait_behind_a_lock_past_its_lease_gets_the_lock() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    assert locks.expire(1.0) == []
    assert not locks.acquire("s1", "b", 2.0, LEASE, 0.0)
    # Both items are due at 2: the lease's comes first (older token).
    assert locks.expire(2.0) == [Revoked("s1", "a"), Grant("s1", "b")]
    assert locks.timeouts_total == 0
    assert locks.holder("s1") == "b"
    assert locks.waiting_count == 0
    assert locks.expire(3.0) == []  # the wait item is stale


def test_a_waiter_that_leaves_before_the_timer_runs_revokes_nothing() -> None:
    locks = LockTable()
    assert locks.acquire("s1", "a", 0.0, lease_s=1.0, wait_s=WAIT)
    assert locks.expire(1.0) == []
    assert not locks.acquire("s1", "b", 2.0, LEASE, WAIT)
    assert locks.forget("b", 2.0) == []  # its connection closed
    assert locks.expire(2.0) == []
    assert locks.holder("s1") == "a"
    assert locks.revoked_total == 0
    # The next one that asks takes it.
    assert not locks.acquire("s1", "c", 3.0, LEASE, WAIT)
    assert locks.expire(3.0) == [Revoked("s1", "a"), Grant("s1", "c")]


def test_compaction_keeps_a_lock_past_its_lease_preemptible() -> None:
    locks = LockTable()
    assert locks.acquire("keep", "x", 0.0, lease_s=1.0, wait_s=WAIT)
    assert locks.expire(1.0) == []
    for i in range(5_000):
        locks.acquire(f"t{i}", "z", float(i), LEASE, WAIT)
        locks.release(f"t{i}", "z", float(i))
    assert len(locks._heap) < 2000
    assert locks.expire(10_000.0) == []  # rebuilt with its old deadline: still kept
    assert locks.holder("keep") == "x"
    assert not locks.acquire("keep", "y", 10_001.0, LEASE, 0.0)
    for i in range(5_000):  # and rebuilt again while y waits
        locks.acquire(f"u{i}", "z", 10_001.0, LEASE, WAIT)
        locks.release(f"u{i}", "z", 10_001.0)
    assert locks.expire(10_001.0) == [Revoked("keep", "x"), Grant("keep", "y")]
    assert locks.timeouts_total == 0
