"""Restore and repair (phpsess.persist) on data directories built record by
record: what a restart keeps, what it truncates, what stops it."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from phpsess import journal as j
from phpsess.persist import (
    DataDirError,
    PersistConfig,
    Persister,
    journal_name,
    repair,
    restore,
    snapshot_name,
)

NOW = 1_800_000_000.0  # the wall-clock time of the restart

Rec = tuple[j.Op, str, float, int, bytes]
SALT = 0x0BADCAFE  # the files' checksum salt (any: no test depends on it)
HEADER = j.header(j.JOURNAL, SALT)


def _journal(path: Path, gen: int, records: list[Rec]) -> Path:
    file = path / journal_name(gen)
    file.write_bytes(HEADER + b"".join(j.encode(*r, salt=SALT) for r in records))
    return file


def _snapshot(
    path: Path, gen: int, entries: dict[str, tuple[bytes, float, int]], metas: dict[str, bytes]
) -> Path:
    file = path / snapshot_name(gen)
    file.write_bytes(
        j.header(j.SNAPSHOT, SALT)
        + b"".join(j.snapshot_chunks(entries.items(), 0.0, metas.items(), salt=SALT))
    )
    return file


# -- expiry across a restart


def test_a_session_kept_alive_by_touch_survives_after_its_write_would_have_expired(
    tmp_path: Path,
) -> None:
    # PHP's lazy_write: one WRITE, then only TOUCH while the data is the same.
    # The WRITE's own expiry has passed at the restart; the TOUCH's has not.
    _journal(tmp_path, 1, [
        (j.Op.PUT, "active", NOW - 20, 30, b"user|s:5:\"alice\";"),
        (j.Op.TOUCH, "active", NOW + 40, 60, b""),
    ])
    restored, _ = restore(str(tmp_path), NOW, mono_now=100.0)
    assert restored.sessions == {"active": (b"user|s:5:\"alice\";", 140.0, 60)}
    assert restored.expired == 0


def test_a_touch_in_the_journal_extends_a_snapshot_session_whose_expiry_passed(
    tmp_path: Path,
) -> None:
    _snapshot(tmp_path, 2, {"active": (b"data", NOW - 5, 30)}, {"active": b"master 1 1 a b"})
    _journal(tmp_path, 2, [(j.Op.TOUCH, "active", NOW + 25, 30, b"")])
    restored, _ = restore(str(tmp_path), NOW)
    assert restored.sessions == {"active": (b"data", 25.0, 30)}  # on a clock at 0 now
    assert restored.meta == {"active": b"master 1 1 a b"}


def test_only_sessions_whose_last_expiry_passed_count_as_expired_while_down(
    tmp_path: Path,
) -> None:
    _journal(tmp_path, 1, [
        (j.Op.PUT, "touched", NOW - 10, 30, b"t"),
        (j.Op.PUT, "expired", NOW - 10, 30, b"e"),
        (j.Op.PUT, "touched-too-early", NOW + 10, 30, b"x"),
        (j.Op.TOUCH, "touched-too-early", NOW - 1, 30, b""),
        (j.Op.PUT, "destroyed", NOW - 10, 30, b"d"),
        (j.Op.DELETE, "destroyed", 0.0, 0, b""),
        (j.Op.PUT, "rewritten", NOW - 10, 30, b"old"),
        (j.Op.PUT, "rewritten", NOW + 30, 30, b"new"),
        (j.Op.META, "expired", 0.0, 0, b"master 1 1 a b"),
        (j.Op.TOUCH, "touched", NOW + 30, 30, b""),
    ])
    restored, _ = restore(str(tmp_path), NOW)
    assert {sid: raw[0] for sid, raw in restored.sessions.items()} == {
        "touched": b"t", "rewritten": b"new"
    }
    assert restored.expired == 2  # "expired" and "touched-too-early"
    assert restored.meta == {}  # only restored sessions keep their metadata


# -- a damaged length field


def _hundred_sessions() -> tuple[list[Rec], list[int]]:
    records = [(j.Op.PUT, f"{i:032d}", NOW + 3600, 3600, b"x" * 100) for i in range(100)]
    offsets = []
    at = len(HEADER)
    for r in records:
        offsets.append(at)
        at += len(j.encode(*r, salt=SALT))
    return records, offsets


@pytest.mark.parametrize(
    "length",
    [0x00FFFFFF, 0x40000000 + 200, 2],  # past the end; above MAX_BODY_BYTES; too small
    ids=["runs-past-the-end", "impossible", "too-small"],
)
@pytest.mark.parametrize("index", [0, 50, 98])
def test_a_damaged_length_field_with_records_after_it_stops_the_restore(
    tmp_path: Path, length: int, index: int
) -> None:
    records, offsets = _hundred_sessions()
    journal = _journal(tmp_path, 1, records)
    raw = bytearray(journal.read_bytes())
    struct.pack_into("<I", raw, offsets[index], length)
    journal.write_bytes(bytes(raw))
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    message = str(info.value)
    assert str(journal) in message and f"damaged at offset {offsets[index]}" in message
    assert "phpsess repair" in message
    assert journal.read_bytes() == bytes(raw)  # nothing truncated


@pytest.mark.parametrize("length", [0x00FFFFFF, 1])
def test_a_damaged_length_in_the_last_record_with_zeros_after_it_is_a_torn_tail(
    tmp_path: Path, length: int
) -> None:
    # A length that runs past the end, or one partly zeroed by a crash, in
    # the last record: a torn append, whatever the zeros after it.
    records, offsets = _hundred_sessions()
    journal = _journal(tmp_path, 1, records)
    raw = bytearray(journal.read_bytes() + bytes(4096))
    struct.pack_into("<I", raw, offsets[99], length)
    journal.write_bytes(bytes(raw))
    restored, _ = restore(str(tmp_path), NOW)
    assert len(restored.sessions) == 99 and restored.torn
    assert journal.stat().st_size == offsets[99]


# -- the last record of a journal that is not the newest


def _flip_last_byte(journal: Path) -> bytes:
    raw = bytearray(journal.read_bytes())
    raw[-1] ^= 0xFF  # the last record fails its checksum; nothing follows it
    journal.write_bytes(bytes(raw))
    return bytes(raw)


@pytest.mark.parametrize("newest", ["holds changes", "holds a later journal"])
def test_a_bad_last_record_of_an_older_journal_stops_the_restore(
    tmp_path: Path, newest: str
) -> None:
    # Journal 1's tail was fsynced before journal 2 took a change: its bad
    # last record is damage, not a crash's torn append, and dropping it
    # would lose an acknowledged write without a word.
    records, offsets = _hundred_sessions()
    older = _journal(tmp_path, 1, records)
    raw = _flip_last_byte(older)
    if newest == "holds changes":
        _journal(tmp_path, 2, [(j.Op.PUT, "later", NOW + 60, 60, b"y")])
    else:
        _journal(tmp_path, 2, [])
        _journal(tmp_path, 3, [])
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    message = str(info.value)
    assert str(older) in message and f"damaged at offset {offsets[99]}" in message, message
    assert "phpsess repair" in message
    assert older.read_bytes() == raw  # nothing truncated


def test_a_torn_tail_of_the_journal_before_an_empty_newest_one_is_truncated(
    tmp_path: Path,
) -> None:
    # A crash while a switch wrote journal 1's tail: journal 2 has only its
    # header (nothing is appended to it before that tail is fsynced).
    records, offsets = _hundred_sessions()
    older = _journal(tmp_path, 1, records)
    _flip_last_byte(older)
    _journal(tmp_path, 2, [])
    restored, gen = restore(str(tmp_path), NOW)
    assert len(restored.sessions) == 99 and gen == 2
    assert restored.torn and str(older) in restored.torn[0]
    assert older.stat().st_size == offsets[99]


# -- repair


def test_repair_leaves_an_intact_snapshot_with_cluster_metadata_alone(tmp_path: Path) -> None:
    entries = {f"s{i}": (b"x" * 50, NOW + 3600, 3600) for i in range(3)}
    snapshot = _snapshot(tmp_path, 2, entries, {"s0": b"master 1 1 a b"})
    _journal(tmp_path, 2, [])
    before = snapshot.read_bytes()
    assert repair(str(tmp_path)) == []
    assert snapshot.read_bytes() == before
    restored, _ = restore(str(tmp_path), NOW)
    assert set(restored.sessions) == set(entries) and restored.meta == {"s0": b"master 1 1 a b"}


def test_repair_of_a_damaged_snapshot_with_cluster_metadata_restores(tmp_path: Path) -> None:
    entries = {f"s{i}": (b"%d" % i * 50, NOW + 3600, 3600) for i in range(5)}
    snapshot = _snapshot(tmp_path, 2, entries, {"s0": b"master 1 1 a b", "s4": b"backup 1 1 b a"})
    _journal(tmp_path, 2, [])
    raw = bytearray(snapshot.read_bytes())
    raw[raw.index(b"2" * 50)] ^= 0xFF  # damage the record of s2
    snapshot.write_bytes(bytes(raw))
    with pytest.raises(DataDirError):
        restore(str(tmp_path), NOW)
    done = repair(str(tmp_path))
    assert len(done) == 1 and snapshot_name(2) in done[0]
    restored, _ = restore(str(tmp_path), NOW)
    assert sorted(restored.sessions) == ["s0", "s1", "s3", "s4"]
    assert restored.meta == {"s0": b"master 1 1 a b", "s4": b"backup 1 1 b a"}
    assert repair(str(tmp_path)) == []  # what repair wrote, it calls intact


def test_repair_stopped_before_its_rename_leaves_the_damaged_journal_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash between keeping the original and installing the replacement
    # must not leave the directory without the generation (restore would
    # refuse it as missing).  The crash here: the replacement's fsync fails.
    journal = _journal(tmp_path, 1, [(j.Op.PUT, f"s{i}", NOW + 60, 60, b"v%d" % i)
                                     for i in range(3)])
    raw = bytearray(journal.read_bytes())
    raw[raw.index(b"v1")] ^= 0xFF
    journal.write_bytes(bytes(raw))

    def crash(fd: int) -> None:
        raise OSError(5, "Input/output error")

    def crash_replace(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", crash)
        with pytest.raises(OSError):
            repair(str(tmp_path))
    assert journal.read_bytes() == bytes(raw)
    with monkeypatch.context() as m:  # now the crash: after keeping, before the rename
        m.setattr(os, "replace", crash_replace)
        with pytest.raises(OSError):
            repair(str(tmp_path))
    assert journal.read_bytes() == bytes(raw)
    done = repair(str(tmp_path))  # run again, it completes
    assert len(done) == 1 and "kept 2 intact records" in done[0]
    # The original is kept in damaged-<second>/: once, or twice when the
    # runs fell in different seconds (the interrupted run had kept it too).
    kept = list(tmp_path.glob(f"damaged-*/{journal_name(1)}"))
    assert 1 <= len(kept) <= 2 and all(k.read_bytes() == bytes(raw) for k in kept)
    restored, _ = restore(str(tmp_path), NOW)
    assert sorted(restored.sessions) == ["s0", "s2"]


@pytest.mark.timeout(10)  # opening a FIFO for reading blocks until a writer comes
def test_repair_refuses_a_fifo_named_like_a_journal_instead_of_hanging(tmp_path: Path) -> None:
    _journal(tmp_path, 1, [])
    os.mkfifo(tmp_path / journal_name(2))
    with pytest.raises(DataDirError) as info:
        repair(str(tmp_path))
    assert str(tmp_path / journal_name(2)) in str(info.value)
    assert "not a regular file" in str(info.value)


# -- files that cannot be read


def test_a_directory_named_like_a_journal_is_a_clear_error(tmp_path: Path) -> None:
    _journal(tmp_path, 1, [(j.Op.PUT, "s", NOW + 60, 60, b"x")])
    (tmp_path / journal_name(2)).mkdir()
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    assert str(tmp_path / journal_name(2)) in str(info.value)
    assert "move it out" in str(info.value)


@pytest.mark.timeout(10)  # opening a FIFO for reading blocks until a writer comes
def test_a_fifo_named_like_a_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / snapshot_name(1))
    _journal(tmp_path, 1, [])
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    assert str(tmp_path / snapshot_name(1)) in str(info.value)


def test_a_disk_read_error_is_named_not_a_sigbus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files are memory-mapped; a page the disk cannot read would kill the
    # daemon with SIGBUS.  Each file is read once first, where the failing
    # disk's EIO (stood in for: no failing disk in CI) is an error to report.
    _journal(tmp_path, 1, [(j.Op.PUT, "s", NOW + 60, 60, b"x" * 5000)])
    real = os.readv
    calls: list[int] = []

    def eio_at_the_second_chunk(fd: int, buffers: list[bytearray]) -> int:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(fd, [memoryview(buffers[0])[:1000]])  # a short read first

    monkeypatch.setattr(os, "readv", eio_at_the_second_chunk)
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    message = str(info.value)
    assert str(tmp_path / journal_name(1)) in message and "Input/output error" in message
    monkeypatch.setattr(os, "readv", real)
    restored, _ = restore(str(tmp_path), NOW)  # a readable disk: restored as ever
    assert restored.sessions["s"][0] == b"x" * 5000


def test_a_file_that_cannot_be_opened_is_named_with_the_reason(tmp_path: Path) -> None:
    # A dangling symbolic link: open() fails as it would on EACCES or EIO.
    (tmp_path / journal_name(1)).symlink_to(tmp_path / "elsewhere" / journal_name(1))
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    message = str(info.value)
    assert str(tmp_path / journal_name(1)) in message
    assert "No such file or directory" in message and "dmesg" in message


# -- a missing generation is refused: no crash leaves one (compaction order)


@pytest.mark.parametrize("case", ["journal of the snapshot", "snapshot", "gap", "emptied"])
def test_a_removed_generation_is_refused_not_replayed_without_it(
    tmp_path: Path, case: str
) -> None:
    # Snapshot 6 holds "gone"; journal 6 destroys it and writes "late".
    # Replaying without journal 6 would bring "gone" back and lose "late".
    _snapshot(tmp_path, 6, {"gone": (b"x", NOW + 60, 60)}, {})
    _journal(tmp_path, 6, [
        (j.Op.DELETE, "gone", 0.0, 0, b""), (j.Op.PUT, "late", NOW + 60, 60, b"y"),
    ])
    _journal(tmp_path, 7, [(j.Op.PUT, "later", NOW + 60, 60, b"z")])
    if case == "journal of the snapshot":
        (tmp_path / journal_name(6)).unlink()
    elif case == "snapshot":
        (tmp_path / snapshot_name(6)).unlink()
    elif case == "gap":
        _journal(tmp_path, 9, [])
    else:
        (tmp_path / journal_name(6)).write_bytes(b"")
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    assert str(tmp_path) in str(info.value), info.value
    # Untouched, for the operator to put the file back.
    assert (tmp_path / journal_name(7)).stat().st_size > len(HEADER)


def test_the_newest_journal_cut_in_its_header_by_a_crash_is_emptied(tmp_path: Path) -> None:
    # Journal 7 was being created when the daemon died: legitimate.
    _snapshot(tmp_path, 6, {"kept": (b"x", NOW + 60, 60)}, {})
    _journal(tmp_path, 6, [])
    (tmp_path / journal_name(7)).write_bytes(HEADER[:5])
    restored, gen = restore(str(tmp_path), NOW)
    assert set(restored.sessions) == {"kept"} and gen == 7


def test_the_snapshots_own_journal_emptied_is_named_as_such_not_as_an_older_journal(
    tmp_path: Path,
) -> None:
    # The only journal: "it is not the newest journal" was wrong.
    _snapshot(tmp_path, 6, {"kept": (b"x", NOW + 60, 60)}, {})
    (tmp_path / journal_name(6)).write_bytes(b"")
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    message = str(info.value)
    assert f"{tmp_path / journal_name(6)} has an incomplete header" in message
    assert "not the newest journal" not in message
    assert f"{snapshot_name(6)} exists, which is written only once its journal's header" \
        in message


def test_repair_of_a_journal_without_its_header_says_so_not_missing_trailer(
    tmp_path: Path,
) -> None:
    # Journals have no trailer: the report said "(missing trailer)".
    (tmp_path / journal_name(1)).write_bytes(HEADER[:5])
    [done] = repair(str(tmp_path))
    assert "trailer" not in done
    assert f"{journal_name(1)}: kept 0 intact records, wrote its missing or damaged header " \
        "anew; original in" in done
    restored, _ = restore(str(tmp_path), NOW)
    assert restored.sessions == {}


@pytest.mark.parametrize(
    ("error", "advice"),
    [(28, "is full: free space on the file system of"),
     (30, "is mounted read-only"),
     (13, "(chown -R "),
     (1, "(chown -R "),
     (5, "keep the files of")],
    ids=["ENOSPC", "EROFS", "EACCES", "EPERM", "EIO"],
)
def test_a_file_that_cannot_be_used_gets_advice_that_fits_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, advice: str
) -> None:
    # A full or read-only disk, a file of another user's or a failing disk
    # is no stray file to move out of the directory.
    _journal(tmp_path, 1, [(j.Op.PUT, "s", NOW + 60, 60, b"x")])
    real = os.readv

    def failing(fd: int, buffers: list[bytearray]) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "readv", failing)
    with pytest.raises(DataDirError) as info:
        restore(str(tmp_path), NOW)
    monkeypatch.setattr(os, "readv", real)
    message = str(info.value)
    assert str(tmp_path / journal_name(1)) in message and os.strerror(error) in message
    assert advice in message
    # Moved out, a journal takes its sessions with it (a file root's repair
    # left root's gave "Permission denied ... move it out").
    assert "move it out" not in message


# -- format 1 (before the salt) and the salt of each file


V1_JOURNAL, V1_SNAPSHOT = b"PHPSESS-JOURNAL 1\n", b"PHPSESS-SNAPSHOT 1\n"


def _format_1(path: Path) -> None:
    """Snapshot and journal 4 as phpsess wrote them before the salt."""
    entries = {f"s{i}": (b"v%d" % i, NOW + 60, 60) for i in range(5)}
    (path / snapshot_name(4)).write_bytes(
        V1_SNAPSHOT + b"".join(j.snapshot_chunks(entries.items(), 0.0, salt=0))
    )
    (path / journal_name(4)).write_bytes(V1_JOURNAL + b"".join(
        j.encode(*r, salt=0) for r in [
            (j.Op.DELETE, "s0", 0.0, 0, b""), (j.Op.PUT, "s1", NOW + 60, 60, b"new"),
        ]
    ))


def test_format_1_files_restore_and_are_counted(tmp_path: Path) -> None:
    _format_1(tmp_path)
    restored, gen = restore(str(tmp_path), NOW)
    assert {sid: raw[0] for sid, raw in restored.sessions.items()} == {
        "s1": b"new", "s2": b"v2", "s3": b"v3", "s4": b"v4"
    }
    assert gen == 4 and restored.old_format == 2


def test_a_format_1_journal_is_not_appended_to_the_next_one_is_started(tmp_path: Path) -> None:
    _format_1(tmp_path)
    before = (tmp_path / journal_name(4)).read_bytes()
    persister = Persister(PersistConfig(str(tmp_path), "always"))
    persister.open(NOW, 0.0)

    async def write_and_close() -> None:
        persister.submit([(j.Op.PUT, "later", 60, b"l")], NOW)
        await persister.close()

    trio.run(write_and_close)
    assert persister.gen == 5 and (tmp_path / journal_name(4)).read_bytes() == before
    header = j.parse_header((tmp_path / journal_name(5)).read_bytes(), j.JOURNAL)
    assert header is not None and header.version == 2 and header.salt == persister.salt
    restored, gen = restore(str(tmp_path), NOW)
    assert gen == 5 and set(restored.sessions) == {"s1", "s2", "s3", "s4", "later"}


def test_appends_after_a_restart_use_the_journals_own_salt(tmp_path: Path) -> None:
    _journal(tmp_path, 1, [(j.Op.PUT, "first", NOW + 60, 60, b"f")])
    persister = Persister(PersistConfig(str(tmp_path), "always"))
    persister.open(NOW, 0.0)
    assert persister.gen == 1 and persister.salt == SALT

    async def write_and_close() -> None:
        persister.submit([(j.Op.PUT, "second", 60, b"s")], NOW)
        await persister.close()

    trio.run(write_and_close)
    restored, _ = restore(str(tmp_path), NOW)
    assert set(restored.sessions) == {"first", "second"} and not restored.torn


def test_repair_rewrites_a_damaged_format_1_journal_in_format_2(tmp_path: Path) -> None:
    _format_1(tmp_path)
    journal = tmp_path / journal_name(4)
    raw = bytearray(journal.read_bytes())
    raw[raw.index(b"new")] ^= 0xFF
    journal.write_bytes(bytes(raw))
    [done] = repair(str(tmp_path))
    assert "kept 1 intact records" in done
    header = j.parse_header(journal.read_bytes(), j.JOURNAL)
    assert header is not None and header.version == 2
    restored, _ = restore(str(tmp_path), NOW)
    assert {sid: raw[0] for sid, raw in restored.sessions.items()} == {
        "s1": b"v1", "s2": b"v2", "s3": b"v3", "s4": b"v4"
    }
    assert restored.old_format == 1  # the intact snapshot is left as it was
    assert repair(str(tmp_path)) == []
