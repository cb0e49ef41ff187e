"""The journal writer switching to generation G+1 (compaction's first step)
in-process on a real data directory: a stop in the middle of it loses no
acknowledged change and leaks no descriptor; a disk error writing journal
G's tail fails the journal as a failed append does, one making G+1 defers
the compaction."""

from __future__ import annotations

import contextlib
import errno
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
    store_snapshot_source,
)


class SlowDirFsync:
    """``persist._fsync_dir`` of a slow disk: the switch's fsync of the
    directory (creating G+1) waits, at most 30 s, until ``release``;
    ``entered`` says it is waiting.  With ``error``, it then raises that."""

    def __init__(self, error: OSError | None = None) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.real = persist._fsync_dir
        self.error = error

    def __call__(self, path: str) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(30)
            if self.error is not None:
                raise self.error
        self.real(path)


def _empty_source() -> SnapshotSource:
    return store_snapshot_source({}, trio.current_time(), time.time())


def _open_descriptors(path: Path) -> int:
    """How many of this process's descriptors have ``path`` open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


async def _opened(tmp_path: Path) -> Persister:
    # interval: a reply does not wait for the disk, so the change submitted
    # during the switch is acknowledged at once.
    config = PersistConfig(str(tmp_path), "interval", min_compact_bytes=1000)
    persister = Persister(config)
    await trio.to_thread.run_sync(persister.open, time.time(), trio.current_time())
    return persister


async def _switch_under_way(persister: Persister, disk: SlowDirFsync) -> int:
    """Journal enough to start a compaction, wait until it is creating G+1,
    then submit one more change: acknowledged, in the pending tail of G."""
    persister.submit([(j.Op.PUT, "big", 600, b"b" * 2000)], time.time())
    with trio.fail_after(30):
        await trio.to_thread.run_sync(disk.entered.wait)
    seq = persister.submit([(j.Op.PUT, "acked", 600, b"important")], time.time())
    assert persister.durable(seq)  # PHP has its reply
    return seq


async def test_a_stop_while_the_next_journal_is_created_loses_no_acknowledged_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    persister = await _opened(tmp_path)
    disk = SlowDirFsync()
    monkeypatch.setattr(persist, "_fsync_dir", disk)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run, _empty_source, lambda: 0)
            await _switch_under_way(persister, disk)
            # SIGTERM: the daemon cancels the writer, then closes the journal.
            nursery.cancel_scope.cancel()
            disk.release.set()
    finally:
        disk.release.set()
    await persister.close()
    assert _open_descriptors(tmp_path / journal_name(1)) == 0
    assert _open_descriptors(tmp_path / journal_name(2)) == 0
    restored, _ = restore(str(tmp_path), time.time())
    assert {sid: raw[0] for sid, raw in restored.sessions.items()} == {
        "big": b"b" * 2000, "acked": b"important"
    }


async def test_a_disk_error_creating_the_next_journal_defers_the_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Journal G still works when G+1 cannot be made (EMFILE, EACCES, a disk
    # full for a moment): the daemon goes on serving, counts the failure and
    # tries again later; it does not stop.
    persister = await _opened(tmp_path)
    monkeypatch.setattr(persist, "COMPACT_RETRY_S", 0.3)
    disk = SlowDirFsync(OSError(errno.EMFILE, "Too many open files"))
    monkeypatch.setattr(persist, "_fsync_dir", disk)
    live = {"big", "acked", "during", "after"}  # what the store holds at the retry

    def source() -> SnapshotSource:
        now = trio.current_time()
        return store_snapshot_source({sid: (b"s", now + 600, 600) for sid in live}, now,
                                     time.time())

    with caplog.at_level(logging.ERROR, "phpsess"):
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run, source, lambda: 0)
            await _switch_under_way(persister, disk)
            disk.release.set()
            with trio.fail_after(30):
                while not persister.compaction_failures_total:
                    await trio.sleep(0.01)
            # G+1 was never used: gone; G takes the changes that follow.
            assert not (tmp_path / journal_name(2)).exists()
            assert persister.gen == 1
            during = persister.submit([(j.Op.PUT, "during", 600, b"d")], time.time())
            with trio.fail_after(30):
                await persister._journaled(during)
            assert persister.gen == 1 and persister.compactions_total == 0
            # Past the retry delay, the next round compacts.
            await trio.sleep(0.4)
            persister.submit([(j.Op.PUT, "after", 600, b"a")], time.time())
            with trio.fail_after(30):
                while not persister.compactions_total:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert "event=compaction_failed" in caplog.text
    assert "Too many open files" in caplog.text
    assert "event=journal_write_failed" not in caplog.text
    assert persister.compaction_failures_total == 1
    await persister.close()
    assert _open_descriptors(tmp_path / journal_name(1)) == 0
    restored, gen = restore(str(tmp_path), time.time())
    assert gen == 2 and set(restored.sessions) == {"big", "acked", "during", "after"}


async def test_a_disk_error_writing_the_old_journals_tail_fails_the_journal_and_keeps_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    persister = await _opened(tmp_path)
    disk = SlowDirFsync()
    monkeypatch.setattr(persist, "_fsync_dir", disk)
    old_fd = persister._fd
    real_write_all = persist._write_all

    def full_after_the_switch(fd: int, data: bytes | memoryview) -> None:
        if fd == old_fd and disk.entered.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(persist, "_write_all", full_after_the_switch)
    with pytest.raises(BaseExceptionGroup) as info, caplog.at_level(logging.CRITICAL, "phpsess"):
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run, _empty_source, lambda: 0)
            await _switch_under_way(persister, disk)
            disk.release.set()
            with trio.fail_after(30):
                await persister._progress.wait()
    assert info.group_contains(OSError, match="No space left")
    assert "event=journal_write_failed" in caplog.text
    assert _open_descriptors(tmp_path / journal_name(1)) == 0
    # The daemon stops; the tail G could not take goes to G+1.
    await persister.close()
    assert _open_descriptors(tmp_path / journal_name(2)) == 0
    restored, gen = restore(str(tmp_path), time.time())
    assert gen == 2 and set(restored.sessions) == {"big", "acked"}


async def test_a_failed_append_leaves_no_half_record_for_later_appends_to_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A disk full half-way through an append left half a record; the
    # shutdown then appended what was still queued after it (space had come
    # back: the cancelled snapshot's file was deleted), and restore took the
    # half record for damage with data after it: the daemon would not start.
    persister = await _opened(tmp_path)
    real_write_all = persist._write_all
    armed = threading.Event()

    def half_then_full(fd: int, data: bytes | memoryview) -> None:
        if armed.is_set() and fd == persister._fd:
            armed.clear()
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(persist, "_write_all", half_then_full)
    with pytest.raises(BaseExceptionGroup) as info, caplog.at_level(logging.CRITICAL, "phpsess"):
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run, _empty_source, lambda: 0)
            seq = persister.submit([(j.Op.PUT, "before", 600, b"b" * 100)], time.time())
            with trio.fail_after(30):
                while persister.written < seq:
                    await trio.sleep(0.01)
            armed.set()
            persister.submit([(j.Op.PUT, "failed", 600, b"f" * 1000)], time.time())
            with trio.fail_after(30):
                await trio.sleep_forever()
    assert info.group_contains(OSError, match="No space left")
    assert "event=journal_write_failed" in caplog.text
    persister.submit([(j.Op.PUT, "at-stop", 600, b"s")], time.time())
    await persister.close()
    restored, _ = restore(str(tmp_path), time.time())
    # And what the failed append held, once space came back.
    assert set(restored.sessions) == {"before", "failed", "at-stop"}


@pytest.mark.parametrize("removed", ["journal", "lock", "directory"])
async def test_files_deleted_from_the_data_directory_fail_the_journal(
    removed: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Appends went on into the deleted journal, acknowledged (also with
    # --fsync always), and the restart found nothing; with the lock file
    # gone a second daemon could start on the directory.
    data = tmp_path / "data"
    data.mkdir()
    persister = await _opened(data)
    with pytest.raises(BaseExceptionGroup) as info, caplog.at_level(logging.CRITICAL, "phpsess"):
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run, _empty_source, lambda: 0)
            seq = persister.submit([(j.Op.PUT, "before", 600, b"b")], time.time())
            with trio.fail_after(30):
                while persister.written < seq:
                    await trio.sleep(0.01)
            if removed == "directory":
                for child in data.iterdir():
                    child.unlink()
                data.rmdir()
            else:
                (data / (journal_name(1) if removed == "journal" else "lock")).unlink()
            seq = persister.submit([(j.Op.PUT, "after", 600, b"a")], time.time())
            with trio.fail_after(30):
                await trio.sleep_forever()
    assert info.group_contains(OSError, match="was deleted")
    assert "event=journal_write_failed" in caplog.text
    with pytest.raises(OSError, match="was deleted"):
        await persister.wait_durable(seq)
    with contextlib.suppress(OSError):
        await persister.close()
