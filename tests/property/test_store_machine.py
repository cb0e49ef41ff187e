"""A Hypothesis state machine driving :class:`phpsess.store.SessionStore`
against a plain dict, with a tiny heap slack and rebuild step so that the
expiry heap is rebuilt (a few sessions per operation, beside the old one)
over and over while sessions are created, rewritten, touched, destroyed and
expired.

The model: ``sid -> (data, expires_at)``.  After ``expire(now)`` exactly the
sessions whose expiry is at or before ``now`` are gone, in expiry order, and
``next_deadline`` is never later than the earliest expiry.  Time moves in
quarter seconds so all sums are exact.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from phpsess.store import SessionStore

SLACK = 2
STEP = 3

sid_st = st.sampled_from([f"s{i:02d}" for i in range(12)])
ttl_st = st.integers(1, 6)
data_st = st.sampled_from([b"", b"a", b"xyz" * 7])


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = SessionStore(heap_slack=SLACK, rebuild_step=STEP)
        self.model: dict[str, tuple[bytes, float]] = {}
        self.now = 0.0
        self.peak = 0

    def _live(self, sid: str) -> bool:
        return sid in self.model and self.model[sid][1] > self.now

    @rule(sid=sid_st, data=data_st, ttl=ttl_st)
    def put(self, sid: str, data: bytes, ttl: int) -> None:
        self.store.put(sid, data, ttl, self.now)
        self.model[sid] = (data, self.now + ttl)
        self.peak = max(self.peak, len(self.model))

    @rule(sid=sid_st, ttl=ttl_st)
    def touch(self, sid: str, ttl: int) -> None:
        live = self._live(sid)
        assert self.store.touch(sid, ttl, self.now) == live
        if live:
            self.model[sid] = (self.model[sid][0], self.now + ttl)

    @rule(sid=sid_st)
    def delete(self, sid: str) -> None:
        assert self.store.delete(sid) == (sid in self.model)
        self.model.pop(sid, None)

    @rule(quarters=st.integers(0, 12))
    def advance_and_expire(self, quarters: int) -> None:
        self.now += quarters / 4
        due = sorted(
            (expires_at, sid) for sid, (_, expires_at) in self.model.items()
            if expires_at <= self.now
        )
        expired = self.store.expire(self.now)
        # Expiry order; sessions due at the same instant in any order.
        assert sorted(expired) == sorted(sid for _, sid in due)
        assert [self.model[sid][1] for sid in expired] == [at for at, _ in due]
        for sid in expired:
            del self.model[sid]

    @invariant()
    def agrees_with_the_model(self) -> None:
        store = self.store
        assert len(store) == len(self.model)
        assert store.total_bytes == sum(len(d) for d, _ in self.model.values())
        for sid, (data, expires_at) in self.model.items():
            entry = store.get(sid, self.now)
            if expires_at > self.now:
                assert entry is not None and (entry.data, entry.expires_at) == (data, expires_at)
            else:
                assert entry is None
        if self.model:
            deadline = store.next_deadline()
            assert deadline is not None
            assert deadline <= min(at for _, at in self.model.values())

    @invariant()
    def heap_stays_bounded(self) -> None:
        store = self.store
        # A rebuild begins past 2 n + slack items and queues STEP sessions per
        # push or delete while each adds at most one item to the old heap.
        assert len(store._heap) <= 2 * self.peak + SLACK + self.peak // (STEP - 1) + 2

    def teardown(self) -> None:
        # Whatever the rebuilds left half done, every session still expires.
        expired = self.store.expire(self.now + 100)
        assert sorted(expired) == sorted(self.model)
        assert len(self.store) == 0 and self.store.total_bytes == 0


StoreMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
TestStoreMachine = StoreMachine.TestCase


def test_the_machine_exercises_rebuilds() -> None:
    # The rules above must reach the rebuild path, or the machine proves
    # nothing about it: churn like theirs, counted the same way.
    store = SessionStore(heap_slack=SLACK, rebuild_step=STEP)
    seen_rebuilding = 0
    for i in range(60):
        store.put(f"s{i % 12:02d}", b"a", 1 + i % 6, float(i // 12))
        if i % 2:
            store.delete(f"s{(i + 5) % 12:02d}")
        seen_rebuilding += store._next_heap is not None
    assert seen_rebuilding > 0
