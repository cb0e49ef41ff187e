"""The journal and snapshot record format (phpsess.journal), and the cluster
metadata encoding it carries (phpsess.replica.encode_meta)."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phpsess import journal as j
from phpsess.replica import BACKUP, MASTER, Meta, decode_meta, encode_meta

Rec = tuple[j.Op, str, float, int, bytes]


# The salt of the file in most tests (any 32 bits: no test depends on it).
SALT = 0x5A17C0DE


def scan_all(buf: bytes, start: int = 0, salt: int = SALT) -> tuple[list[Rec], j.ScanResult]:
    out: list[Rec] = []
    result = j.scan(buf, start, lambda *r: out.append(r), salt)
    return out, result


RECORDS: list[Rec] = [
    (j.Op.PUT, "s1", 1700000000.5, 1440, b"a|i:1;\x00\xff\n"),
    (j.Op.TOUCH, "s1", 1700000100.0, 1440, b""),
    (j.Op.DELETE, "s1", 0.0, 0, b""),
    (j.Op.META, "s2", 0.0, 0, b"master 3 7 a b"),
    (j.Op.PUT, "s" * 256, 1.0, 1, b""),
]


def encoded(records: list[Rec]) -> bytes:
    return b"".join(j.encode(*r, salt=SALT) for r in records)


def test_every_record_type_round_trips() -> None:
    got, result = scan_all(encoded(RECORDS))
    assert result.damage is j.Damage.NONE
    assert got == RECORDS


def test_the_journal_batch_encoder_writes_what_encode_writes() -> None:
    # Two batches made at different wall-clock times: PUT and TOUCH expire
    # ttl_s after their batch's time; every record type, byte for byte.
    batches: list[tuple[float, list[j.Change]]] = [
        (1000.0, [(j.Op.PUT, "s1", 60, b"a|i:1;\x00\xff\n"),
                  (j.Op.META, "s1", 0, b"master 3 7 a b")]),
        (1001.5, [(j.Op.TOUCH, "s1", 90, b""), (j.Op.DELETE, "s2", 0, b""),
                  (j.Op.PUT, "s" * 256, 1, b"")]),
        (1002.0, []),
    ]
    assert j.encode_changes(batches, SALT) == encoded([
        (j.Op.PUT, "s1", 1060.0, 60, b"a|i:1;\x00\xff\n"),
        (j.Op.META, "s1", 0.0, 0, b"master 3 7 a b"),
        (j.Op.TOUCH, "s1", 1091.5, 90, b""),
        (j.Op.DELETE, "s2", 0.0, 0, b""),
        (j.Op.PUT, "s" * 256, 1002.5, 1, b""),
    ])
    assert j.encode_changes([], SALT) == b""


@pytest.mark.parametrize("cut", [1, 3, 8, 9, 12])
def test_a_cut_last_record_is_a_torn_tail(cut: int) -> None:
    buf = encoded(RECORDS)
    last = j.encode(*RECORDS[0], salt=SALT)
    got, result = scan_all(buf + last[:cut])
    assert got == RECORDS
    assert result.damage is j.Damage.TORN_TAIL and result.good_end == len(buf)


def test_zeros_after_the_last_record_are_a_torn_tail() -> None:
    buf = encoded(RECORDS)
    _, result = scan_all(buf + bytes(100))
    assert result.damage is j.Damage.TORN_TAIL and result.good_end == len(buf)


def test_a_bad_record_followed_by_data_is_corruption() -> None:
    first = j.encode(*RECORDS[0], salt=SALT)
    damaged = bytearray(first)
    damaged[-1] ^= 0xFF
    rest = encoded(RECORDS[1:])
    got, result = scan_all(bytes(damaged) + rest)
    assert got == []
    assert result.damage is j.Damage.CORRUPT and result.damage_at == 0
    # Recovery keeps every intact record after it.
    kept: list[j.Record] = []
    _, bad = j.resync(bytes(damaged) + rest, 0, kept.append, SALT)
    assert bad == [0] and [r.sid for r in kept] == [r[1] for r in RECORDS[1:]]


@pytest.mark.parametrize("cut", [8, 9, 12, 30])
def test_a_cut_last_record_followed_by_zeros_is_a_torn_tail(cut: int) -> None:
    # The file system extended the file past what the crash let be written.
    buf = encoded(RECORDS)
    got, result = scan_all(buf + j.encode(*RECORDS[0], salt=SALT)[:cut] + bytes(5000))
    assert got == RECORDS
    assert result.damage is j.Damage.TORN_TAIL and result.good_end == len(buf)


@pytest.mark.parametrize(
    "length",
    [len(RECORDS) * 10_000, j.MAX_BODY_BYTES, j.MAX_BODY_BYTES + 1, 0xFFFFFFFF, 0, 1, 2],
)
@pytest.mark.parametrize("index", [0, 2, 3])
def test_a_damaged_length_field_followed_by_intact_records_is_corruption(
    length: int, index: int
) -> None:
    # The length cannot say where the record ends, so "only zeros follow"
    # cannot be checked there: the intact records after it tell.
    parts = [j.encode(*r, salt=SALT) for r in RECORDS]
    damaged = bytearray(parts[index])
    damaged[:4] = length.to_bytes(4, "little")
    at = len(b"".join(parts[:index]))
    buf = b"".join(parts[:index]) + bytes(damaged) + b"".join(parts[index + 1 :])
    got, result = scan_all(buf)
    assert got == RECORDS[:index]
    assert result.damage is j.Damage.CORRUPT and result.damage_at == at == result.good_end


@pytest.mark.parametrize("length", [0, 1, 2, 1 << 24])
def test_a_damaged_length_in_the_last_record_is_a_torn_tail(length: int) -> None:
    # Nothing intact after it, and a length that a crash can leave (zeroed
    # bytes make it smaller; one past the end of the file).
    buf = encoded(RECORDS)
    last = bytearray(j.encode(*RECORDS[0], salt=SALT))
    last[:4] = length.to_bytes(4, "little")
    for tail in (bytes(last), bytes(last) + bytes(100)):
        _, result = scan_all(buf + tail)
        assert result.damage is j.Damage.TORN_TAIL and result.good_end == len(buf)


def test_a_length_no_crash_can_write_is_corruption_even_last() -> None:
    # Zeroing bytes of a length makes it smaller: one above the limit is
    # damage, not a torn append.
    buf = encoded(RECORDS)
    last = bytearray(j.encode(*RECORDS[0], salt=SALT))
    last[:4] = (j.MAX_BODY_BYTES + 1).to_bytes(4, "little")
    _, result = scan_all(buf + bytes(last))
    assert result.damage is j.Damage.CORRUPT and result.damage_at == len(buf)


@pytest.mark.parametrize("zeros", [0, 1, 3, 4, 5, 8 << 20])
def test_a_record_after_a_run_of_zeros_is_found(zeros: int) -> None:
    # Runs of zeros are skipped at once, not offset by offset; a record
    # whose length starts with a zero byte (256 = 00 01 00 00) right after
    # them is still found.
    after = (j.Op.PUT, "s", 5.0, 60, b"z" * 240)
    assert j.encode(*after, salt=SALT)[:4] == b"\x00\x01\x00\x00"
    buf = encoded(RECORDS)
    hidden = buf + b"\x00\x00\x00\x00junk" + bytes(zeros) + j.encode(*after, salt=SALT)
    _, result = scan_all(hidden)
    assert result.damage is j.Damage.CORRUPT and result.damage_at == len(buf)
    kept: list[j.Record] = []
    _, bad = j.resync(hidden, 0, kept.append, SALT)
    assert bad == [len(buf)]
    assert [r.sid for r in kept] == [r[1] for r in RECORDS] + ["s"]
    _, result = scan_all(buf + b"\x00\x00\x00\x00junk" + bytes(zeros))
    assert result.damage is j.Damage.TORN_TAIL and result.good_end == len(buf)


@pytest.mark.parametrize("flip", [0, 1, 3, 4, 9])  # length field, checksum, type, id
def test_recovery_keeps_the_records_after_a_damaged_header(flip: int) -> None:
    records = [(j.Op.PUT, f"s{i}", 5.0, 60, bytes([i]) * 100) for i in range(20)]
    parts = [j.encode(*r, salt=SALT) for r in records]
    damaged = bytearray(parts[7])
    damaged[flip] ^= 0x40  # a length of 16 MiB and more, or a wrong checksum
    buf = b"".join(parts[:7]) + bytes(damaged) + b"".join(parts[8:])
    kept: list[j.Record] = []
    _, bad = j.resync(buf, 0, kept.append, SALT)
    assert bad == [len(b"".join(parts[:7]))]
    assert [r.sid for r in kept] == [f"s{i}" for i in range(20) if i != 7]


def test_snapshot_records_end_with_a_count_and_carry_metadata() -> None:
    entries = {"s1": (b"x", 5.0, 60), "s2": (b"y" * 3000, 6.0, 70)}
    chunks = list(
        j.snapshot_chunks(entries.items(), 100.0, [("s1", b"master 1 1 a b")], chunk_bytes=1000,
                          salt=SALT)
    )
    assert len(chunks) == 2  # s2 filled the first chunk
    buf = b"".join(chunks)
    got, result = scan_all(buf)
    assert result.damage is j.Damage.NONE
    assert [(op, sid) for op, sid, *_ in got] == [
        (j.Op.PUT, "s1"), (j.Op.PUT, "s2"), (j.Op.META, "s1"), (j.Op.END, "2"),
    ]
    # The PUT records are byte for byte what the journal writes.
    puts = j.encode(j.Op.PUT, "s1", 105.0, 60, b"x", salt=SALT) + j.encode(
        j.Op.PUT, "s2", 106.0, 70, b"y" * 3000, salt=SALT
    )
    assert buf.startswith(puts)


# -- the salt (module doc): session data holding records is not taken for them


def test_a_record_checksummed_with_one_salt_fails_with_another() -> None:
    other = SALT ^ 0x00010000
    for buf in (
        encoded(RECORDS),
        j.encode_changes([(1000.0, [(j.Op.PUT, "s1", 60, b"x"), (j.Op.TOUCH, "s1", 60, b"")])],
                         SALT),
        b"".join(j.snapshot_chunks([("s1", (b"x", 5.0, 60))], salt=SALT)),
    ):
        got, result = scan_all(buf, salt=other)
        assert got == [] and result.damage is not j.Damage.NONE
        kept: list[j.Record] = []
        _, bad = j.resync(buf, 0, kept.append, other)
        assert kept == [] and bad == [0]
        # With the file's own salt: every record, as written.
        got, result = scan_all(buf)
        assert result.damage is j.Damage.NONE and got
        _, bad = j.resync(buf, 0, kept.append, SALT)
        assert bad == [] and [r.sid for r in kept] == [r[1] for r in got]


def test_salt_0_is_the_unsalted_checksum_of_format_1() -> None:
    record = j.encode(*RECORDS[0], salt=0)
    assert record[4:8] == zlib.crc32(record[8:]).to_bytes(4, "little")
    assert j.encode(*RECORDS[0], salt=SALT)[4:8] != record[4:8]


def _forging_session(victim: str) -> tuple[bytes, bytes]:
    """A PUT whose data (a client's) holds a forged PUT for ``victim`` and a
    forged DELETE, checksummed as the client can (salt 0, or any guess);
    and those forged records."""
    forged = j.encode(j.Op.PUT, victim, 9e9, 60, b"user_id|i:1;", salt=0) + j.encode(
        j.Op.DELETE, "other", salt=0
    )
    return j.encode(j.Op.PUT, "attacker", 9e9, 60, b"x" + forged + bytes(range(1, 200)),
                    salt=SALT), forged


def test_a_torn_record_holding_forged_records_is_a_torn_tail_not_corruption() -> None:
    buf = encoded(RECORDS)
    attacker, forged = _forging_session("s1")
    for cut in (attacker.index(forged) + len(forged), len(attacker) - 1):
        got, result = scan_all(buf + attacker[:cut])
        assert got == RECORDS
        assert result.damage is j.Damage.TORN_TAIL and result.good_end == len(buf)
        kept: list[j.Record] = []
        _, bad = j.resync(buf + attacker[:cut], 0, kept.append, SALT)
        assert bad == [len(buf)] and [r.sid for r in kept] == [r[1] for r in RECORDS]


def test_recovery_after_damage_applies_no_forged_record() -> None:
    # The attacker's record damaged (a flipped byte) and more records after
    # it: the records inside it are not "intact records".
    attacker, _ = _forging_session("s1")
    damaged = bytearray(attacker)
    damaged[-1] ^= 0xFF
    buf = encoded(RECORDS[:1]) + bytes(damaged) + encoded(RECORDS[1:])
    kept: list[j.Record] = []
    _, bad = j.resync(buf, 0, kept.append, SALT)
    assert [r.sid for r in kept] == [r[1] for r in RECORDS]
    assert all(r.data != b"user_id|i:1;" for r in kept)
    assert bad == [len(encoded(RECORDS[:1]))]


@pytest.mark.parametrize("kind", [j.JOURNAL, j.SNAPSHOT])
def test_headers_carry_the_salt_and_format_1_reads_as_salt_0(kind: str) -> None:
    head = j.header(kind, 0x00C0FFEE)
    assert len(head) == j.header_size(kind) <= j.MAX_HEADER_BYTES
    assert j.parse_header(head + b"\x01\x02", kind) == j.Header(2, 0x00C0FFEE, len(head))
    old = b"PHPSESS-JOURNAL 1\n" if kind == j.JOURNAL else b"PHPSESS-SNAPSHOT 1\n"
    assert j.parse_header(old + b"\x01", kind) == j.Header(1, 0, len(old))
    other = j.SNAPSHOT if kind == j.JOURNAL else j.JOURNAL
    for bad in (j.header(other, 1), head[:-1] + b"x", head.upper(), b"", head[:-1]):
        assert j.parse_header(bad, kind) is None, bad
    # A crash while the file was created leaves a piece of a header.
    for size in range(len(head)):
        assert j.cut_header(head[:size], kind)
    for size in range(len(old)):
        assert j.cut_header(old[:size], kind)
    for bad in (head, head[:-2] + b"g", j.header(other, 1)[:-3], head + b"x"):
        assert not j.cut_header(bad, kind), bad


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_scan_to_a_result(data: bytes) -> None:
    _, result = scan_all(data)
    assert result.damage in (j.Damage.NONE, j.Damage.TORN_TAIL, j.Damage.CORRUPT)
    assert 0 <= result.good_end <= len(data)


@pytest.mark.parametrize(
    "meta",
    [Meta(MASTER, "a", "b", 3, 7), Meta(BACKUP, "b", "a", 1, 0), Meta(MASTER, "a", None, 9, 2)],
)
def test_meta_round_trips(meta: Meta) -> None:
    assert decode_meta(encode_meta(meta)) == meta


@pytest.mark.parametrize(
    "raw",
    [b"", b"boss 1 1 a b", b"master x 1 a b", b"master 1 1 a", b"\xff\xfe", b"master -1 1 a b"],
)
def test_malformed_meta_is_refused(raw: bytes) -> None:
    assert decode_meta(raw) is None
