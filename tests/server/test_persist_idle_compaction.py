"""Disk use follows the live data down: once sessions are destroyed, or
expired while the daemon was down, compaction drops them from the data
directory, also on a server that gets no more writes (the writer checks
every ``IDLE_COMPACT_CHECK_S`` while idle).  In-process on a real data
directory, with Trio's autojump clock for the idle minutes."""

from __future__ import annotations

import time
from pathlib import Path

import trio
import trio.testing

from phpsess import journal as j
from phpsess import persist
from phpsess.persist import (
    PersistConfig,
    Persister,
    SnapshotSource,
    compaction_due,
    restore,
    store_snapshot_source,
)
from phpsess.store import Raw

SESSIONS = 20
MIN_COMPACT_BYTES = 64 * 1024
WALL = 1_700_000_000.0  # the wall clock at the test's start
TTL_S = 600


def _payload(i: int) -> bytes:
    """A session's data: about 8 KiB, ``DEAD`` at its start to grep for."""
    return f"DEAD{i:04d}".encode() * 1000


class Model:
    """The store the persister snapshots, and its size estimate (as the
    server's: the data plus the per-session overhead)."""

    def __init__(self) -> None:
        self.entries: dict[str, Raw] = {}

    def source(self) -> SnapshotSource:
        now = trio.current_time()
        # A copy: the snapshot empties what it is given.
        return store_snapshot_source(dict(self.entries), now, WALL + now)

    def live_bytes(self) -> int:
        overhead = j.SNAPSHOT_OVERHEAD_PER_SESSION
        return sum(len(raw[0]) + overhead for raw in self.entries.values())


async def _opened(tmp_path: Path, wall_now: float) -> Persister:
    config = PersistConfig(str(tmp_path), "interval", min_compact_bytes=MIN_COMPACT_BYTES)
    persister = Persister(config)
    await trio.to_thread.run_sync(persister.open, wall_now, trio.current_time())
    return persister


async def _settled(persister: Persister) -> None:
    """Wait until everything submitted is journaled and no compaction is
    under way (the writer decides on one right after a write round, and at
    each idle check).  Bounded in real time: the autojump clock runs ahead
    while the disk threads work, so a sleep alone may end before them."""
    stop = time.monotonic() + 30
    while persister._compacting or persister.written < persister.submitted:
        assert time.monotonic() < stop, "the writer did not settle"
        await trio.sleep(0.01)


async def _idle(persister: Persister, seconds: float) -> None:
    await trio.sleep(seconds)
    await _settled(persister)


async def _fill(persister: Persister, model: Model) -> None:
    """Write every session twice (the journal outgrows the live data) and
    wait for the compaction that follows: the snapshot holds them all."""
    for _ in range(2):
        for i in range(SESSIONS):
            sid = f"s{i}"
            model.entries[sid] = (_payload(i), trio.current_time() + TTL_S, TTL_S)
            persister.submit([(j.Op.PUT, sid, TTL_S, _payload(i))], WALL + trio.current_time())
    await _settled(persister)
    assert persister.compactions_total == 1


async def _compacts_once_then_rests(persister: Persister, compactions: int) -> None:
    """Idle: one compaction comes within two idle checks (``compactions``
    in all), then no other over ten more."""
    await _idle(persister, 2 * persist.IDLE_COMPACT_CHECK_S)
    assert persister.compactions_total == compactions
    await _idle(persister, 10 * persist.IDLE_COMPACT_CHECK_S)
    assert persister.compactions_total == compactions


async def _filled(tmp_path: Path, nursery: trio.Nursery) -> tuple[Persister, Model]:
    """A persister running in ``nursery`` with every session written and
    compacted once (:func:`_fill`)."""
    persister = await _opened(tmp_path, WALL)
    model = Model()
    await nursery.start(persister.run, model.source, model.live_bytes)
    await _fill(persister, model)
    return persister, model


def _assert_dead_sessions_gone(tmp_path: Path) -> None:
    files = [p for p in tmp_path.iterdir() if p.name != "lock"]
    total = sum(p.stat().st_size for p in files)
    assert total < 1024, {p.name: p.stat().st_size for p in files}
    for p in files:
        assert b"DEAD" not in p.read_bytes(), p.name
    restored, _ = restore(str(tmp_path), WALL + 7200)
    assert restored.sessions == {}


async def test_destroyed_sessions_leave_the_data_directory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        persister, model = await _filled(tmp_path, nursery)
        assert persister.older_bytes > SESSIONS * 8000  # the snapshot
        # Every user logs out; then nothing more comes.
        model.entries.clear()
        for i in range(SESSIONS):
            persister.submit([(j.Op.DELETE, f"s{i}", 0, b"")], WALL + trio.current_time())
        # Compacted to an empty snapshot, and then not again.
        await _compacts_once_then_rests(persister, 2)
        nursery.cancel_scope.cancel()
    await persister.close()
    _assert_dead_sessions_gone(tmp_path)


async def test_sessions_expired_while_down_leave_the_data_directory_of_an_idle_server(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        persister, _ = await _filled(tmp_path, nursery)
        nursery.cancel_scope.cancel()
    await persister.close()
    # Restarted after the TTL: every session expired meanwhile, none is
    # restored, and no write ever comes.
    later = WALL + trio.current_time() + 2 * TTL_S
    persister = await _opened(tmp_path, later)
    model = Model()
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, model.source, model.live_bytes)
        await _compacts_once_then_rests(persister, 1)
        nursery.cancel_scope.cancel()
    await persister.close()
    _assert_dead_sessions_gone(tmp_path)


def test_the_rule_is_false_right_after_a_compaction() -> None:
    # A compaction leaves a snapshot of about the live data and an empty
    # journal: no second one follows, whatever the live data (none too).
    empty_journal = j.header_size(j.JOURNAL)
    for live in (0, 100, 10 * MIN_COMPACT_BYTES):
        snapshot = live + 64
        for stale in (False, True):
            assert not compaction_due(empty_journal, snapshot, live, MIN_COMPACT_BYTES, stale)
    # The snapshot of sessions gone since: compacted once something is
    # journaled or expired; never for nothing new (the same snapshot again),
    # even with a live estimate that is too low.
    assert compaction_due(empty_journal, 12_000_000, 0, MIN_COMPACT_BYTES, True)
    assert not compaction_due(empty_journal, 12_000_000, 0, MIN_COMPACT_BYTES, False)
    # The journal alone outgrowing the live data, as before.
    assert compaction_due(MIN_COMPACT_BYTES + 1, 0, 0, MIN_COMPACT_BYTES, False)
    assert not compaction_due(MIN_COMPACT_BYTES, 0, 0, MIN_COMPACT_BYTES, True)
