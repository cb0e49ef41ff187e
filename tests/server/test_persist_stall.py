"""The journal writer in-process on a real data directory: with ``interval``,
replies do not wait for the disk, until the disk falls behind by more than
the interval; then they wait for the fsync (the loss window stays bounded)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import trio

from phpsess import journal as j
from phpsess.persist import PersistConfig, Persister


async def test_interval_waits_for_a_stalled_disk_only_beyond_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled = threading.Event()
    release = threading.Event()
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        # A disk that hangs in fsync until the test lets it go.
        stalled.set()
        release.wait(30)
        real_fdatasync(fd)

    persister = Persister(PersistConfig(str(tmp_path), "interval", fsync_interval_s=0.05))
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    change = [(j.Op.PUT, "s1", 60, b"x" * 100)]
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run, lambda: lambda: iter(()), lambda: 0)
        first = persister.submit(change, time.time())
        await persister.wait_durable(first)  # within the window: no wait
        assert persister.synced < first
        await trio.to_thread.run_sync(stalled.wait, 30)  # the fsync hangs
        await trio.sleep(0.1)  # ... for longer than the interval
        second = persister.submit(change, time.time())
        waited = False

        async def wait() -> None:
            nonlocal waited
            await persister.wait_durable(second)
            waited = True

        nursery.start_soon(wait)
        await trio.sleep(0.2)
        assert not waited  # the reply waits for the disk now
        release.set()
        with trio.fail_after(30):
            while not waited:
                await trio.sleep(0.01)
        assert persister.synced >= second
        nursery.cancel_scope.cancel()
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    await persister.close()
    journal = next(tmp_path.glob("journal-*.pjnl")).read_bytes()
    assert journal.count(b"x" * 100) == 2
