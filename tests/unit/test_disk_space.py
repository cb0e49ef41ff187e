"""Room for a snapshot: the pure decision (phpsess.journal.snapshot_fits)
and the journal writer deferring a compaction the disk has no room for,
in-process with the file system's free space faked (``os.statvfs``)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from phpsess import journal as j
from phpsess import persist
from phpsess.persist import (
    PersistConfig,
    Persister,
    SnapshotSource,
    journal_name,
    restore,
    snapshot_name,
    store_snapshot_source,
)

MIB = 1 << 20


@pytest.mark.parametrize(
    ("estimate", "needs"),
    [
        (0, 4 * MIB),  # an empty store: the floor
        (1000, 1000 + 4 * MIB),
        (16 * MIB - 4, 16 * MIB - 4 + 4 * MIB),  # a quarter is just below the floor
        (16 * MIB, 20 * MIB),  # ... and equal to it
        (1024 * MIB, 1280 * MIB),  # a quarter above it
        (4000 * MIB + 3, 4000 * MIB + 3 + 1000 * MIB),  # rounded down
    ],
)
def test_a_snapshot_needs_its_size_and_the_larger_of_4_mib_and_a_quarter(
    estimate: int, needs: int
) -> None:
    assert j.snapshot_needs(estimate) == needs
    assert j.snapshot_fits(estimate, needs)  # exactly enough
    assert j.snapshot_fits(estimate, needs + 1)
    assert not j.snapshot_fits(estimate, needs - 1)
    assert not j.snapshot_fits(estimate, 0)


def test_a_file_system_that_reports_no_size_refuses_nothing() -> None:
    assert j.snapshot_fits(10**12, None)


@pytest.mark.parametrize(
    ("sid_chars", "data_bytes", "cluster"),
    [(26, 1024, False), (32, 1024, False), (66, 1024, True), (32, 100, False),
     (60, 100, True)],
    ids=["php-26", "php-32", "cluster-1k", "small", "cluster-small"],
)
def test_the_margin_covers_the_estimate_falling_short(
    sid_chars: int, data_bytes: int, cluster: bool
) -> None:
    # The daemon estimates a snapshot as the live bytes plus a per-session
    # overhead (phpsess.server), larger in a cluster for its longer IDs
    # (<random>-<master>-<backup>) and META records: what falls short is
    # within the margin.  The floor alone would hide it: sizes are scaled up.
    count = 1000
    entries = [(f"{i:0{sid_chars}d}", (b"x" * data_bytes, 0.0, 1440)) for i in range(count)]
    metas = [(sid, b"master 12 345 web1 web2") for sid, _ in entries] if cluster else []
    actual = sum(len(c) for c in j.snapshot_chunks(entries, 0.0, metas, salt=1)) + len(
        j.header(j.SNAPSHOT, 1)
    )
    overhead = (
        j.CLUSTER_SNAPSHOT_OVERHEAD_PER_SESSION if cluster else j.SNAPSHOT_OVERHEAD_PER_SESSION
    )
    estimate = count * (data_bytes + overhead)
    assert actual <= estimate * (1 + j.SNAPSHOT_MARGIN_FRACTION)
    scale = 10**6  # a million times the sessions: the fraction counts, not the floor
    assert actual * scale <= j.snapshot_needs(estimate * scale)


# -- the journal writer (the I/O shell): statvfs of the data directory


class FakeDisk:
    """``os.statvfs`` of a disk with ``free`` bytes available (None: one that
    reports no size) for ``path``; other paths are asked of the real one."""

    def __init__(self, path: Path, free: int | None) -> None:
        self.path = str(path)
        self.free = free
        self.asked: list[str] = []
        self.real = os.statvfs

    def __call__(self, path: str) -> os.statvfs_result:
        if path != self.path:
            return self.real(path)
        self.asked.append(path)
        if self.free is None:
            return os.statvfs_result((4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255))
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, 1 << 30, blocks + 100, blocks, 0, 0, 0, 0, 255))


def _source(live: dict[str, bytes]) -> Callable[[], SnapshotSource]:
    def source() -> SnapshotSource:
        now = trio.current_time()
        entries = {sid: (data, now + 600, 600) for sid, data in live.items()}
        return store_snapshot_source(entries, now, time.time())

    return source


async def _opened(tmp_path: Path) -> Persister:
    persister = Persister(PersistConfig(str(tmp_path), "interval", min_compact_bytes=1000))
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    return persister


async def test_a_compaction_the_disk_has_no_room_for_is_deferred_until_there_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A snapshot that fills the disk makes the journal's appends fail (ENOSPC)
    # and the daemon stop.  Short of room it is not started: logged and
    # counted as a failed compaction, tried again later; writes go on.
    persister = await _opened(tmp_path)
    monkeypatch.setattr(persist, "COMPACT_RETRY_S", 1.0)
    disk = FakeDisk(tmp_path, free=2 * MIB)
    monkeypatch.setattr(os, "statvfs", disk)
    live = {"big": b"b" * 2000}
    estimate = 1000  # the store's estimate, below the journal's size: compaction is due

    with caplog.at_level(logging.ERROR, "phpsess"):
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run, _source(live), lambda: estimate)
            persister.submit([(j.Op.PUT, "big", 600, live["big"])], time.time())
            with trio.fail_after(30):
                while not persister.compaction_failures_total:
                    await trio.sleep(0.01)
            assert disk.asked == [str(tmp_path)]
            # Not started: no next journal, no snapshot begun; G takes the writes.
            assert sorted(f.name for f in tmp_path.iterdir()) == [journal_name(1), "lock"]
            live["during"] = b"d"
            during = persister.submit([(j.Op.PUT, "during", 600, b"d")], time.time())
            with trio.fail_after(30):
                await persister._journaled(during)
            await trio.sleep(0.1)  # within the retry delay: not asked again
            assert disk.asked == [str(tmp_path)] and persister.compaction_failures_total == 1
            # Space freed: past the retry delay, the next round compacts.
            disk.free = 100 * MIB
            await trio.sleep(1.0)
            live["after"] = b"a"
            persister.submit([(j.Op.PUT, "after", 600, b"a")], time.time())
            with trio.fail_after(30):
                while not persister.compactions_total:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    await persister.close()
    [line] = [r.getMessage() for r in caplog.records if "event=compaction_failed" in r.getMessage()]
    assert f"error=not enough free space in {tmp_path} for a snapshot retry_in_s=1 " in line
    needed = 4 * MIB + estimate
    assert f"needed_bytes={needed} free_bytes={2 * MIB} " in line
    assert re.search(r"need 4\.0 MiB free, 2\.0 MiB is free; .* free space on that disk", line)
    assert "event=journal_write_failed" not in caplog.text
    assert persister.compaction_failures_total == 1
    assert (tmp_path / snapshot_name(2)).exists()
    restored, gen = restore(str(tmp_path), time.time())
    assert gen == 2 and set(restored.sessions) == {"big", "during", "after"}


async def test_a_file_system_that_reports_no_size_is_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some FUSE and network file systems report zero blocks: their free
    # space cannot be told, and refusing would never compact again.
    persister = await _opened(tmp_path)
    disk = FakeDisk(tmp_path, free=None)
    monkeypatch.setattr(os, "statvfs", disk)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, _source({"big": b"b" * 2000}), lambda: 1000)
        persister.submit([(j.Op.PUT, "big", 600, b"b" * 2000)], time.time())
        with trio.fail_after(30):
            while not persister.compactions_total:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await persister.close()
    assert disk.asked == [str(tmp_path)] and persister.compaction_failures_total == 0
