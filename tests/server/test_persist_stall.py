"""The journal writer in-process on a real data directory: with ``interval``,
replies do not wait for the disk, until the disk falls behind by more than
two intervals; then they wait for the fsync (the loss window stays bounded)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from phpsess import journal as j
from phpsess.persist import (
    PersistConfig,
    Persister,
    SnapshotSource,
    journal_name,
    restore,
    snapshot_name,
    store_snapshot_source,
)
from phpsess.store import Raw
from tests.conftest import HangingFdatasync


async def test_interval_waits_for_a_stalled_disk_only_beyond_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = HangingFdatasync()  # hangs in fsync until the test lets it go
    persister = Persister(PersistConfig(str(tmp_path), "interval", fsync_interval_s=0.05))
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    monkeypatch.setattr(os, "fdatasync", disk)
    change = [(j.Op.PUT, "s1", 60, b"x" * 100)]
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, lambda: lambda: iter(()), lambda: 0)
        first = persister.submit(change, time.time())
        await persister.wait_durable(first)  # within the window: no wait
        assert persister.synced < first
        await trio.to_thread.run_sync(disk.hung.wait, 30)  # the fsync hangs
        await trio.sleep(0.15)  # ... for longer than two intervals
        second = persister.submit(change, time.time())
        waited = False

        async def wait() -> None:
            nonlocal waited
            await persister.wait_durable(second)
            waited = True

        nursery.start_soon(wait)
        await trio.sleep(0.2)
        assert not waited  # the reply waits for the disk now
        disk.release.set()
        with trio.fail_after(30):
            while not waited:
                await trio.sleep(0.01)
        assert persister.synced >= second
        nursery.cancel_scope.cancel()
    monkeypatch.setattr(os, "fdatasync", disk.real)
    await persister.close()
    journal = next(tmp_path.glob("journal-*.pjnl")).read_bytes()
    assert journal.count(b"x" * 100) == 2


async def test_interval_replies_never_wait_for_a_disk_that_keeps_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steady writes for several intervals: the oldest unsynced change is at
    # most about one interval old, so no reply waits (it used to, for a
    # whole interval, just before every fsync).
    slowest = 0.0
    real_fdatasync = os.fdatasync

    def timed_fdatasync(fd: int) -> None:
        nonlocal slowest
        started = time.monotonic()
        real_fdatasync(fd)
        slowest = max(slowest, time.monotonic() - started)

    monkeypatch.setattr(os, "fdatasync", timed_fdatasync)
    interval = 0.1
    persister = Persister(PersistConfig(str(tmp_path), "interval", fsync_interval_s=interval))
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    waited = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, lambda: lambda: iter(()), lambda: 0)
        end = trio.current_time() + 6 * interval
        while trio.current_time() < end:
            seq = persister.submit([(j.Op.PUT, "s", 60, b"x" * 1000)], time.time())
            await persister.wait_durable(seq)
            if persister.synced >= seq:
                waited += 1  # it returned only once fsynced: it waited
            await trio.sleep(0.002)
        nursery.cancel_scope.cancel()
    await persister.close()
    assert persister.fsyncs_total >= 3
    # A disk slower than the interval is allowed to make replies wait.
    assert waited == 0 or slowest > interval, (waited, slowest)


def _store(now: float) -> dict[str, Raw]:
    """5,000 sessions of about 1 KB (5 MB), as the store holds them."""
    return {f"s{i}": (b"%04d" % i + b"x" * 1000, now + 600, 600) for i in range(5000)}


def _copier(store: dict[str, Raw], taken: list[SnapshotSource]) -> Callable[[], SnapshotSource]:
    """Compaction's copy of ``store``; each copy is kept in ``taken`` too."""

    def source() -> SnapshotSource:
        taken.append(store_snapshot_source(dict(store), trio.current_time(), time.time()))
        return taken[-1]

    return source


async def _opened(config: PersistConfig) -> Persister:
    persister = Persister(config)
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    return persister


def _assert_restores(path: Path, store: dict[str, Raw]) -> None:
    restored, _ = restore(str(path), time.time())
    assert {sid: raw[0] for sid, raw in restored.sessions.items()} == {
        sid: raw[0] for sid, raw in store.items()
    }


async def test_a_compaction_cut_short_leaves_no_trace_and_loses_nothing(tmp_path: Path) -> None:
    # Compaction encodes in the event loop between requests; a daemon that
    # stops half way through one removes the partial snapshot, and the
    # journals still restore every session.
    persister = await _opened(PersistConfig(str(tmp_path), "never", min_compact_bytes=1))
    sessions = _store(trio.current_time())
    taken: list[SnapshotSource] = []
    source = _copier(sessions, taken)
    tmp = tmp_path / f"{snapshot_name(2)}.tmp"
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, source, lambda: 0)
        changes = [(j.Op.PUT, sid, 600, raw[0]) for sid, raw in sessions.items()]
        persister.submit(changes, time.time())
        # 5 MB to encode, written 1 MiB at a time: stop after the first MiB.
        with trio.fail_after(30):
            while not (tmp.exists() and tmp.stat().st_size > 0):
                await trio.sleep(0)
        assert taken and 0 < len(taken[0].entries) < len(sessions)  # emptied as written
        nursery.cancel_scope.cancel()
    await persister.close()
    # Generation 2's snapshot was never finished: both journals remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        journal_name(1), journal_name(2), "lock"
    ]
    _assert_restores(tmp_path, sessions)


async def test_sessions_rewritten_during_a_compaction_are_left_to_the_new_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sessions written or destroyed while a snapshot is being encoded are
    # left out of it: their records in the new journal supersede them.  So
    # the snapshot must not replace the old generation until the new journal
    # is fsynced past those records.  Here its fsync hangs meanwhile.
    persister = await _opened(
        PersistConfig(str(tmp_path), "interval", fsync_interval_s=0.02, min_compact_bytes=1)
    )
    store = _store(trio.current_time())
    taken: list[SnapshotSource] = []
    source = _copier(store, taken)
    disk = HangingFdatasync()
    tmp = tmp_path / f"{snapshot_name(2)}.tmp"
    async with trio.open_nursery() as nursery:
        # 0 until the switch: the first write starts the compaction; then
        # more than the files hold, so that it is the only one (a second,
        # finished before the cancel, replaced generation 2: a clean clone's
        # CI run once).
        await nursery.start(persister.run, source, lambda: 0 if persister.gen == 1 else 1 << 30)
        try:
            first = [(j.Op.PUT, sid, 600, raw[0]) for sid, raw in store.items()]
            persister.submit(first, time.time())
            with trio.fail_after(30):
                while not (tmp.exists() and tmp.stat().st_size > 0):
                    await trio.sleep(0)
            # Encoding is under way: rewrite every session, destroy 100.
            monkeypatch.setattr(os, "fdatasync", disk)
            assert len(taken) == 1
            encoded = len(store) - len(taken[0].entries)
            changes: list[j.Change] = []
            for i, sid in enumerate(list(store)):
                if i % 50 == 0:
                    del store[sid]
                    changes.append((j.Op.DELETE, sid, 0, b""))
                else:
                    store[sid] = (b"new" + store[sid][0], store[sid][1], 600)
                    changes.append((j.Op.PUT, sid, 600, store[sid][0]))
            rewritten = persister.submit(changes, time.time())
            assert not taken[0].entries  # all superseded: nothing left to encode
            with trio.fail_after(30):
                await trio.to_thread.run_sync(disk.hung.wait)
            await trio.sleep(0.3)
            # The journal is not fsynced past the rewrite: the snapshot waits.
            assert persister.synced < rewritten
            assert not (tmp_path / snapshot_name(2)).exists()
            assert persister.compactions_total == 0
            disk.release.set()
            with trio.fail_after(30):
                while persister.compactions_total == 0:
                    await trio.sleep(0.01)
            assert persister.synced >= rewritten
            nursery.cancel_scope.cancel()
        finally:
            disk.release.set()  # a failed assertion must not leave the writer hanging
    await persister.close()
    # Generation 1 is gone (a next compaction, started since, may have left
    # journal 3 when it was stopped).
    assert {journal_name(2), "lock", snapshot_name(2)} <= {p.name for p in tmp_path.iterdir()}
    assert not {journal_name(1), snapshot_name(1)} & {p.name for p in tmp_path.iterdir()}
    puts: list[str] = []
    raw = (tmp_path / snapshot_name(2)).read_bytes()
    header = j.parse_header(raw, j.SNAPSHOT)
    assert header is not None
    j.scan(raw, header.size, lambda op, sid, *_: puts.append(sid) if op is j.Op.PUT else None,
           header.salt)
    assert len(puts) == encoded  # what was encoded before the rewrite, no more
    _assert_restores(tmp_path, store)


async def test_a_journal_that_outgrew_the_live_data_during_a_compaction_is_compacted_at_rest(
    tmp_path: Path,
) -> None:
    # A burst of writes while a snapshot is being written fills the new
    # journal past the live data; the writes then stop.  The writer checks
    # again when the compaction ends, so disk use comes back to about the
    # live data without waiting for another write.
    persister = await _opened(PersistConfig(str(tmp_path), "never", min_compact_bytes=100_000))
    now = trio.current_time()
    store = _store(now)
    source = _copier(store, [])
    tmp = tmp_path / f"{snapshot_name(2)}.tmp"
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, source, lambda: len(store) * 1004)
        persister.submit([(j.Op.PUT, s, 600, raw[0]) for s, raw in store.items()], time.time())
        with trio.fail_after(30):
            while not tmp.exists():
                await trio.sleep(0)
        burst: list[j.Change] = []
        for i in range(6000):  # 6 MB: more than the live data
            sid = f"s{i % 5000}"
            store[sid] = (b"%05d" % i + store[sid][0][5:], now + 600, 600)
            burst.append((j.Op.PUT, sid, 600, store[sid][0]))
        persister.submit(burst, time.time())
        with trio.fail_after(30):
            while persister.compactions_total < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await persister.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        journal_name(3), "lock", snapshot_name(3)
    ]
    _assert_restores(tmp_path, store)


@pytest.mark.parametrize(("policy", "journal_nice"), [("interval", 10), ("always", 0)])
async def test_disk_threads_run_below_the_event_loop_unless_replies_wait_for_them(
    tmp_path: Path, policy: str, journal_nice: int
) -> None:
    persister = Persister(PersistConfig(str(tmp_path), policy))
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def niceness(name: str) -> Callable[[], None]:
        def job() -> None:
            seen[name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        return job

    await persister._disk.run(niceness("journal"))
    await persister._snapshot_disk.run(niceness("snapshot"))
    persister._disk.stop()
    persister._snapshot_disk.stop()
    assert seen == {
        "journal": min(19, base + journal_nice), "snapshot": min(19, base + 10)
    }
