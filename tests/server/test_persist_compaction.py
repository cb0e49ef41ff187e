"""A compaction in-process on a real data directory, with sessions rewritten
while it runs (left out of the snapshot: their records in the new journal
stand for them): those records are on disk before the snapshot replaces
the old generation, also with ``--fsync never``, and the log counts the
sessions the snapshot holds."""

from __future__ import annotations

import logging
import os
import threading
import time
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

SESSIONS = 20
REWRITTEN = 5


@pytest.mark.parametrize("policy", ["never", "interval"])
async def test_rewrites_during_a_compaction_are_on_disk_before_the_old_generation_goes(
    policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    persister = Persister(PersistConfig(str(tmp_path), policy, min_compact_bytes=1000))
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    old_fd = persister._fd
    # Journal 1's tail is written at the switch (no size given): held there
    # until the rewrites below are submitted, so that they land in the copy
    # being written as snapshot 2.
    entered, release = threading.Event(), threading.Event()
    real_append = persist._append_whole

    def held_tail(fd: int, data: bytes, size: int | None = None) -> None:
        if size is None and fd == old_fd and not entered.is_set():
            entered.set()
            release.wait(30)
        real_append(fd, data, size)

    monkeypatch.setattr(persist, "_append_whole", held_tail)
    # What reaches the disk, in order.
    events: list[tuple[str, str]] = []
    real_fdatasync, real_replace = os.fdatasync, os.replace

    def fdatasync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fdatasync(fd)
        events.append(("fdatasync", os.path.basename(path)))

    def replace(src: str, dst: str) -> None:
        real_replace(src, dst)
        events.append(("replace", os.path.basename(str(dst))))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "replace", replace)

    def source() -> SnapshotSource:
        now = trio.current_time()
        entries = {f"s{i}": (b"old", now + 600, 600) for i in range(SESSIONS)}
        entries["big"] = (b"b" * 2000, now + 600, 600)  # the store holds it
        return store_snapshot_source(entries, now, time.time())

    with caplog.at_level(logging.INFO, "phpsess"):
        async with trio.open_nursery() as nursery:
            # 0 until the switch: the first write starts the compaction;
            # then about the size of the snapshot it writes, so that it is
            # the only one (the rewrites journaled meanwhile would start
            # another, the estimate being far below the snapshot).
            await nursery.start(
                persister.run, source, lambda: 0 if persister.gen == 1 else 2000 + SESSIONS * 64
            )
            persister.submit([(j.Op.PUT, "big", 600, b"b" * 2000)], time.time())
            try:
                with trio.fail_after(30):
                    await trio.to_thread.run_sync(entered.wait)
                for i in range(REWRITTEN):
                    persister.submit([(j.Op.PUT, f"s{i}", 600, b"new")], time.time())
            finally:
                release.set()
            with trio.fail_after(30):
                while not persister.compactions_total:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    await persister.close()
    snapshot = snapshot_name(2)
    assert ("replace", snapshot) in events, events
    renamed = events.index(("replace", snapshot))
    # Journal 2 holds the rewrites: fdatasynced before the snapshot that
    # leaves those sessions out replaced generation 1 (then deleted).
    assert ("fdatasync", journal_name(2)) in events[:renamed], events
    [line] = [r.getMessage() for r in caplog.records if "event=compacted" in r.getMessage()]
    assert f"sessions={SESSIONS + 1 - REWRITTEN} superseded={REWRITTEN} " in line, line
    restored, gen = restore(str(tmp_path), time.time())
    assert gen == 2
    assert {sid: raw[0] for sid, raw in restored.sessions.items()} == {
        "big": b"b" * 2000,
        **{f"s{i}": b"new" if i < REWRITTEN else b"old" for i in range(SESSIONS)},
    }
