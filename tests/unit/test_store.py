"""The session store: TTLs with time as an argument (PROTOCOL.md §7)."""

from __future__ import annotations

from phpsess.store import SessionStore


def test_put_get() -> None:
    store = SessionStore()
    store.put("s1", b"a|i:1;", 10, now=100.0)
    entry = store.get("s1", now=100.0)
    assert entry is not None
    assert entry.data == b"a|i:1;"
    assert entry.ttl_s == 10
    assert entry.expires_at == 110.0
    assert "s1" in store
    assert len(store) == 1
    assert list(store) == ["s1"]
    assert store.get("s2", now=100.0) is None
    assert "s2" not in store


def test_expired_session_reads_missing_before_and_after_expire() -> None:
    store = SessionStore()
    store.put("s1", b"x", 10, now=0.0)
    assert store.get("s1", now=9.999) is not None
    # At the deadline it is gone, even before the timer removes it.
    assert store.get("s1", now=10.0) is None
    assert "s1" in store  # not removed yet: expire() has not run
    assert store.expire(9.999) == []
    assert store.expire(10.0) == ["s1"]
    assert "s1" not in store
    assert len(store) == 0
    assert store.expire(1000.0) == []


def test_expire_returns_every_due_session_in_deadline_order() -> None:
    store = SessionStore()
    for i, ttl in enumerate([5, 3, 9, 1, 7]):
        store.put(f"s{i}", b"", ttl, now=0.0)
    assert store.next_deadline() == 1.0
    assert store.expire(6.0) == ["s3", "s1", "s0"]
    assert sorted(store) == ["s2", "s4"]
    assert store.expire(100.0) == ["s4", "s2"]


def test_touch_restarts_ttl() -> None:
    store = SessionStore()
    store.put("s1", b"x", 10, now=0.0)
    assert store.touch("s1", 20, now=5.0)
    entry = store.get("s1", now=24.0)
    assert entry is not None and entry.expires_at == 25.0 and entry.ttl_s == 20
    # The old deadline at 10 must not remove the touched session.
    assert store.expire(10.0) == []
    assert store.get("s1", now=10.0) is not None
    assert store.expire(25.0) == ["s1"]


def test_touch_can_shorten_ttl() -> None:
    store = SessionStore()
    store.put("s1", b"x", 100, now=0.0)
    assert store.touch("s1", 1, now=0.0)
    assert store.expire(1.0) == ["s1"]


def test_touch_missing_or_expired_is_false() -> None:
    store = SessionStore()
    assert not store.touch("s1", 10, now=0.0)
    store.put("s1", b"x", 10, now=0.0)
    assert not store.touch("s1", 10, now=10.0)  # expired: cannot be revived
    assert store.get("s1", now=10.0) is None
    assert store.expire(10.0) == ["s1"]


def test_rewrite_restarts_ttl_and_old_deadline_is_ignored() -> None:
    store = SessionStore()
    store.put("s1", b"old", 10, now=0.0)
    store.put("s1", b"new", 10, now=8.0)
    assert store.expire(10.0) == []
    entry = store.get("s1", now=17.0)
    assert entry is not None and entry.data == b"new"
    assert store.expire(18.0) == ["s1"]


def test_delete() -> None:
    store = SessionStore()
    store.put("s1", b"x", 10, now=0.0)
    assert store.delete("s1")
    assert not store.delete("s1")
    assert store.get("s1", now=0.0) is None
    assert store.expire(10.0) == []  # a deleted session is not "expired"


def test_delete_then_rewrite_with_same_deadline_expires_once() -> None:
    store = SessionStore()
    store.put("s1", b"x", 10, now=0.0)
    store.delete("s1")
    store.put("s1", b"y", 10, now=0.0)
    assert store.expire(10.0) == ["s1"]
    assert store.total_bytes == 0


def test_bytes_accounting() -> None:
    store = SessionStore()
    assert store.total_bytes == 0
    store.put("a", b"12345", 10, now=0.0)
    store.put("b", b"123", 20, now=0.0)
    assert store.total_bytes == 8
    store.put("a", b"1", 10, now=0.0)  # overwrite
    assert store.total_bytes == 4
    store.touch("b", 30, now=1.0)
    assert store.total_bytes == 4
    assert store.expire(10.0) == ["a"]
    assert store.total_bytes == 3
    store.delete("b")
    assert store.total_bytes == 0
    store.put("c", b"xy", 1, now=50.0)
    store.put("c", b"xyz", 1, now=60.0)  # over an expired, unremoved entry
    assert store.total_bytes == 3
    store.expire(61.0)
    assert store.total_bytes == 0
    assert len(store) == 0


def test_next_deadline_is_never_late() -> None:
    store = SessionStore()
    assert store.next_deadline() is None
    store.put("s1", b"", 10, now=0.0)
    store.put("s2", b"", 5, now=0.0)
    assert store.next_deadline() == 5.0
    store.delete("s2")
    # May be early (a stale item), never later than the real deadline.
    deadline = store.next_deadline()
    assert deadline is not None and deadline <= 10.0
    store.expire(deadline)
    assert store.next_deadline() == 10.0
    store.expire(10.0)
    assert store.next_deadline() is None


def test_heap_stays_bounded_when_one_session_is_touched_forever() -> None:
    store = SessionStore()
    store.put("s1", b"x", 1000, now=0.0)
    for i in range(20_000):
        assert store.touch("s1", 1000, now=i * 0.01)
    assert len(store._heap) <= 2 * len(store) + 1024 + 1  # white box: compaction
    # Compaction kept the live deadline.
    entry = store.get("s1", now=0.0)
    assert entry is not None
    assert store.expire(entry.expires_at - 0.001) == []
    assert store.expire(entry.expires_at) == ["s1"]


def test_heap_stays_bounded_with_write_delete_churn() -> None:
    store = SessionStore()
    for i in range(10_000):
        store.put(f"s{i % 7}", b"x" * (i % 5), 100, now=float(i))
        if i % 3 == 0:
            store.delete(f"s{(i + 1) % 7}")
        assert len(store._heap) <= 2 * len(store) + 1024 + 1
    live = {sid: store.get(sid, now=0.0) for sid in store}
    assert store.total_bytes == sum(len(e.data) for e in live.values() if e is not None)
    # Every live session still expires exactly at its deadline after compaction.
    expected = sorted(store, key=lambda s: store._sessions[s][1])
    assert store.expire(1e9) == expected
    assert store.total_bytes == 0


def test_sessions_are_held_in_tuples_the_garbage_collector_stops_tracking() -> None:
    # A million tracked objects made every full collection pause the daemon.
    import gc

    store = SessionStore()
    for i in range(1000):
        store.put(f"s{i}", b"data", 100, now=0.0)
    gc.collect()
    assert not any(gc.is_tracked(raw) for raw in store.snapshot().values())
    entry = store.get("s1", now=0.0)
    assert entry is not None and entry.data == b"data" and entry.ttl_s == 100


def test_rewrites_that_extend_a_session_do_not_grow_the_heap() -> None:
    store = SessionStore()
    for i in range(100):
        store.put(f"s{i}", b"x", 100, now=0.0)
    for t in range(1, 1000):
        store.put(f"s{t % 100}", b"y", 100, now=float(t))  # later every time
        store.touch(f"s{(t + 1) % 100}", 100, now=float(t))
    assert len(store._heap) == 100  # one item per session, no rebuilds needed
    # Each is still expired exactly at its own deadline.
    deadlines = {sid: e.expires_at for sid in store if (e := store.get(sid, 0.0)) is not None}
    last = max(deadlines.values())
    assert store.expire(last - 0.5) == sorted(
        (s for s, d in deadlines.items() if d <= last - 0.5), key=lambda s: deadlines[s]
    )
    assert store.expire(last) == [s for s, d in deadlines.items() if d == last]
    assert len(store) == 0


def test_an_expiry_moved_earlier_is_honoured() -> None:
    store = SessionStore()
    store.put("s", b"x", 100, now=0.0)
    store.touch("s", 10, now=1.0)  # now expires at 11
    assert store.next_deadline() == 11.0
    assert store.expire(10.9) == []
    assert store.expire(11.0) == ["s"]
    assert store.expire(200.0) == []  # its old item is dropped quietly
