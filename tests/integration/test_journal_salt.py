"""Salted record checksums (phpsess.journal, module doc) with real daemons:
session data that is itself a record cannot be taken for one after a crash
or by repair, and a data directory of the unsalted format 1 still restores.

Records are composed here by hand from the documented layout, as a client
who stores them (or an older phpsess) would write them, not with the
module's encoder."""

from __future__ import annotations

import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import Daemon
from tests.integration.test_durability import _damage_journal, _repair, _start_fails

PUT, TOUCH, DELETE, END, META = 1, 2, 3, 4, 5
V2_HEADER = re.compile(rb"PHPSESS-(JOURNAL|SNAPSHOT) 2 [0-9a-f]{8}\n")


def _record(
    op: int, sid: str, expires_at: float = 0.0, ttl_s: int = 0, data: bytes = b"",
    salt: int = 0,
) -> bytes:
    body = struct.pack("<BH", op, len(sid)) + sid.encode()
    if op in (PUT, TOUCH, META):
        body += struct.pack("<dI", expires_at, ttl_s) + data
    return struct.pack("<II", len(body), zlib.crc32(body, salt)) + body


VICTIM, VICTIM2 = "victim0123456789abcdef", "victim20123456789abcd"
ATTACKER = "attacker0123456789ab"
ORIGINAL = b'user_id|i:42;'
FORGED_DATA = b'user_id|i:1;'  # the admin
PADDING = b"\xaa" * 200


def _attack(daemon: Daemon, before: tuple[tuple[str, bytes], ...] = ()) -> tuple[Path, bytes]:
    """Write ``before``, two victims and the attacker's session, whose data
    holds a forged PUT for one victim and a forged DELETE for the other;
    kill -9.  Returns the journal and the forged records."""
    forged = (
        _record(PUT, VICTIM, time.time() + 3600, 3600, FORGED_DATA)
        + _record(DELETE, VICTIM2)
    )
    with Client(daemon.address) as c:
        for sid, data in before:
            assert c.request(p.Write(sid, 600, data)) == p.OK
        assert c.request(p.Write(VICTIM, 600, ORIGINAL)) == p.OK
        assert c.request(p.Write(VICTIM2, 600, ORIGINAL)) == p.OK
        assert c.request(p.Write(ATTACKER, 600, b"x|s:1:\"" + forged + PADDING)) == p.OK
    daemon.kill9()  # --fsync always: every acknowledged write is in the file
    (journal,) = sorted(daemon.data_dir.glob("journal-*.pjnl"))
    assert journal.read_bytes().endswith(PADDING)  # the attacker's record is the last
    return journal, forged


def _tear_after(journal: Path, forged: bytes) -> None:
    """Cut the attacker's record after the forged records in its data: a
    crash in the middle of its append (a short write at a page boundary)."""
    raw = journal.read_bytes()
    cut = raw.index(forged) + len(forged) + 50  # inside PADDING
    with open(journal, "r+b") as f:
        f.truncate(cut)


def _assert_victims_untouched(daemon: Daemon) -> None:
    with Client(daemon.address) as c:
        assert c.request(p.Read(VICTIM, lock=False)) == p.Data(ORIGINAL)
        assert c.request(p.Read(VICTIM2, lock=False)) == p.Data(ORIGINAL)
        assert c.request(p.Read(ATTACKER, lock=False)) == p.MISS  # its write was torn


def test_a_torn_record_holding_forged_records_is_a_torn_tail(start_daemon: Any) -> None:
    # Unsalted, the forged PUT after the tear was "an intact record after
    # the damage": the daemon refused to start after the crash.
    daemon: Daemon = start_daemon("--fsync", "always")
    journal, forged = _attack(daemon)
    _tear_after(journal, forged)
    daemon.start()
    log = daemon.log()
    assert "event=journal_torn_tail" in log and "record cut short" in log, log
    _assert_victims_untouched(daemon)


def test_repair_does_not_apply_records_forged_in_session_data(start_daemon: Any) -> None:
    # Damage earlier in the journal stops the start; repair keeps "every
    # intact record": unsalted, the forged ones in the torn record too,
    # which overwrote one victim's session and destroyed the other's.
    daemon: Daemon = start_daemon("--fsync", "always")
    journal, forged = _attack(daemon, (("early0123456789abcdef", b"early-value"),))
    _tear_after(journal, forged)
    raw = bytearray(journal.read_bytes())
    raw[raw.index(b"early-value")] ^= 0xFF
    journal.write_bytes(bytes(raw))
    try:
        daemon.start()
    except RuntimeError as exc:
        assert "damaged at offset" in str(exc)
    else:
        raise AssertionError("started on a journal damaged in the middle")
    report = _repair(daemon)
    assert "kept 2 intact records" in report, report  # the victims'
    daemon.start()
    _assert_victims_untouched(daemon)
    with Client(daemon.address) as c:
        assert c.request(p.Read("early0123456789abcdef", lock=False)) == p.MISS
        assert c.request(p.Write("after", 600, b"ok")) == p.OK  # appended with its salt
    daemon.stop()
    daemon.start()
    with Client(daemon.address) as c:
        assert c.request(p.Read("after", lock=False)) == p.Data(b"ok")
        assert c.request(p.Read(VICTIM, lock=False)) == p.Data(ORIGINAL)


def test_a_format_1_data_directory_restores_and_is_rewritten_in_format_2(
    workdir: Path, start_daemon: Any
) -> None:
    # What phpsess wrote before the salt: plain crc32(body), version 1 headers.
    data = workdir / "old"
    data.mkdir()
    now = time.time()
    snapshot = b"PHPSESS-SNAPSHOT 1\n" + b"".join(
        _record(PUT, f"snap{i}", now + 3600, 3600, b"s-%d" % i) for i in range(50)
    ) + _record(META, "snap0", data=b"master 1 1 a b") + _record(END, "50")
    (data / "snapshot-000003.psnap").write_bytes(snapshot)
    (data / "journal-000003.pjnl").write_bytes(b"PHPSESS-JOURNAL 1\n" + b"".join([
        _record(PUT, "snap1", now + 3600, 3600, b"rewritten"),
        _record(DELETE, "snap2"),
        _record(TOUCH, "snap3", now + 7200, 7200),
        _record(PUT, "journaled", now + 3600, 3600, b"j"),
    ]))
    daemon: Daemon = start_daemon("--data-dir", str(data), "--fsync", "always")
    expected = {f"snap{i}": b"s-%d" % i for i in range(50) if i != 2}
    expected |= {"snap1": b"rewritten", "journaled": b"j"}

    def check(extra: dict[str, bytes]) -> None:
        with Client(daemon.address) as c:
            for sid, value in (expected | extra).items():
                assert c.request(p.Read(sid, lock=False)) == p.Data(value), sid
            assert c.request(p.Read("snap2", lock=False)) == p.MISS
            got = c.request(p.Get("snap3"))
            assert isinstance(got, p.Data) and int(got.tokens[0]) > 3_600_000

    check({})
    assert "event=old_format_files files=2" in daemon.log()
    with Client(daemon.address) as c:
        assert c.request(p.Write("new", 600, b"n")) == p.OK
    # The old files are compacted away at once; every file is format 2.
    deadline = time.monotonic() + 15
    while "event=compacted" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    files = sorted(data.glob("*.p*"))
    assert [f.name for f in files] == ["journal-000005.pjnl", "snapshot-000005.psnap"]
    for f in files:
        assert V2_HEADER.match(f.read_bytes()), f
    daemon.kill9()
    daemon.start()
    check({"new": b"n"})


def test_repair_reads_the_salt_of_a_header_damaged_elsewhere(daemon: Daemon) -> None:
    # One damaged byte in the header line's name: the salt is still where a
    # format-2 header keeps it, and repair keeps every record (it kept none).
    def rename(raw: bytearray) -> None:
        raw[0] = ord("X")

    _damage_journal(daemon, "h", 5, rename)
    assert "bad header at offset 0" in _start_fails(daemon)
    assert "kept 5 intact records" in _repair(daemon)
    daemon.start()
    with Client(daemon.address) as c:
        for i in range(5):
            assert c.request(p.Read(f"h{i}", lock=False)) == p.Data(b"value-%d" % i)
