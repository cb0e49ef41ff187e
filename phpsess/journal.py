"""On-disk record format of the journal and the snapshot.  Pure: bytes in,
records out; the files are opened, written and fsynced by ``phpsess.persist``.

Theory of operation.  Both file kinds are a header line followed by records:

    file    = HEADER record*
    HEADER  = "PHPSESS-JOURNAL 2 " salt "\n"  |  "PHPSESS-SNAPSHOT 2 " salt "\n"
    salt    = 8 lowercase hex digits (32 random bits, new for every file)
    record  = body_len:u32le  crc32(body, salt):u32le  body
    body    = op:u8  sid_len:u16le  sid  [expires_at:f64le  ttl_s:u32le  [data]]

``crc32(body, salt)`` is zlib's CRC-32 started from ``salt`` instead of 0.
Why a secret salt: a session's data is whatever the PHP application stores,
so a client can store data that is itself a complete record (a PUT of
another session's ID, a DELETE).  Scanning a good file never looks inside a
record, but the damage paths do: after a torn or bad record,
:func:`_untrusted_length` and :func:`resync` look for the next intact
record byte by byte, and an embedded record with a plain CRC-32 passes:
unsalted, a crash that tore such a record after the embedded one read as
damage in the middle (the daemon refused to start), and repair applied the
forged record to the other session.  The salt is in no reply and differs
per file, so embedded data fails its checksum but for a 1 in 2**32 guess
per embedded record.

Version 1 files (``PHPSESS-JOURNAL 1\n``, ``PHPSESS-SNAPSHOT 1\n``, written
by phpsess before the salt) are read with salt 0, i.e. plain
``crc32(body)``; nothing writes them any more.

``op`` is PUT (data and lifetime), TOUCH (lifetime only), DELETE (destroy or
expiry), END (snapshot trailer; its "sid" is the decimal record count) or
META (a session's cluster role and epoch, laid out as a PUT with no
lifetime; written only when they change).
``expires_at`` is **wall-clock** Unix time: a restarted daemon compares it
with the time it restarts at, so a session that expired while the daemon was
down is not restored, and the others keep their remaining lifetime.

Scanning (:func:`scan`) tells three situations apart:

- a clean end;
- a **torn tail**: the last record is incomplete or fails its checksum and
  nothing but zero bytes follows it (a crash in the middle of an append, or a
  file system that extended the file with zeros).  Safe to truncate there;
- **corruption**: a record fails its checksum or is malformed and real data
  follows it.  Never silently dropped: the caller stops and says where.

A record whose length field cannot be trusted (it runs past the end of the
file, or is too small) does not say where "after it" is.  It is a torn tail
only if no intact record starts anywhere after it and the header could be
one this module wrote, cut short or partly zeroed by a crash: zeroing bytes
of a length can only make it smaller, so a length above
``MAX_BODY_BYTES`` is damage, never a torn append.

Room for a snapshot (:func:`snapshot_fits`): compaction writes a new
snapshot while the previous generation's files are still on disk and the
journal goes on taking every write, so it starts only if the disk's free
space (which the caller reads) holds the snapshot and a margin.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Final

import attrs

JOURNAL: Final = "journal"
SNAPSHOT: Final = "snapshot"
_NAMES: Final = {JOURNAL: b"PHPSESS-JOURNAL", SNAPSHOT: b"PHPSESS-SNAPSHOT"}
VERSION: Final = 2  # what header() writes; version 1 is read as salt 0
_V2: Final = re.compile(rb"(PHPSESS-JOURNAL|PHPSESS-SNAPSHOT) 2 ([0-9a-f]{8})\n")
_HEX: Final = frozenset(b"0123456789abcdef")
MAX_HEADER_BYTES: Final = len(b"PHPSESS-SNAPSHOT 2 00000000\n")
MAX_BODY_BYTES: Final = 1 << 30  # far above any session; a bigger length is damage

_HEAD: Final = struct.Struct("<II")
_OP_SID: Final = struct.Struct("<BH")
_LIFE: Final = struct.Struct("<dI")
_NONZERO: Final = re.compile(rb"[^\x00]")
# The margin a snapshot needs on top of its estimated size, for what the
# journal takes while the snapshot is written and for the estimate falling
# short: the larger of these.  Measured with bench/loadgen.c (1 KiB WRITEs,
# 2 cores): at half the saturated rate a 140 MB snapshot took 1 s, the
# journal grew 13 MB meanwhile (~10 %); the estimate (below) may fall a few
# per cent short (IDs longer than the overhead allows for).  Saturated, the
# journal grew about 85 % of a 340 MB snapshot (12 s): a margin that large
# refuses compactions that fit at any normal load, and a refusal does not
# heal itself (the journal grows into the room the snapshot wanted).  The
# floor, 4 MiB, is for a small store: a larger one would never let a small
# data volume compact, when compacting is what frees the journal's space.
SNAPSHOT_MARGIN_MIN_BYTES: Final = 4 * 1024 * 1024
SNAPSHOT_MARGIN_FRACTION: Final = 0.25
# A snapshot's bytes beyond the sessions' data, per session, for its size
# estimate (kept O(1): the live bytes plus this times the count).  A record
# is 23 bytes and its ID; a cluster's IDs are longer (<random>-<master>-
# <backup>, up to 60 characters) and each session has a META record too
# (23 bytes, the ID and its role, epoch, version and holders).
SNAPSHOT_OVERHEAD_PER_SESSION: Final = 64
CLUSTER_SNAPSHOT_OVERHEAD_PER_SESSION: Final = 192


class Op(enum.IntEnum):
    PUT = 1
    TOUCH = 2
    DELETE = 3
    END = 4
    META = 5  # a session's cluster metadata (CLUSTER.md §7); data = its encoding


_OPS: Final = {op.value: op for op in Op}


def header(kind: str, salt: int) -> bytes:
    """The header line of a new ``kind`` file (:data:`JOURNAL` or
    :data:`SNAPSHOT`) whose records are checksummed with ``salt``."""
    return b"%s %d %08x\n" % (_NAMES[kind], VERSION, salt)


def header_size(kind: str) -> int:
    """The size of what :func:`header` writes for ``kind``."""
    return len(header(kind, 0))


@attrs.frozen
class Header:
    version: int
    salt: int
    size: int  # records start here


def parse_header(buf: bytes | memoryview, kind: str) -> Header | None:
    """The header ``buf`` starts with, for a ``kind`` file; None if it does
    not start with one (a file cut short in its header is :func:`cut_header`)."""
    head = bytes(buf[:MAX_HEADER_BYTES])
    name = _NAMES[kind]
    v1 = name + b" 1\n"
    if head.startswith(v1):
        return Header(1, 0, len(v1))
    match = _V2.match(head)
    if match is None or match.group(1) != name:
        return None
    return Header(2, int(match.group(2), 16), match.end())


def salvage_header(buf: bytes | memoryview, kind: str) -> Header | None:
    """For repair: the format-2 header of a ``kind`` file whose header line
    is damaged outside its salt (a byte of the name, say), read from where
    the salt and the line's end stand; None if they are not there.  Only the
    file's own header holds its salt, so a client's bytes cannot steer this."""
    size = header_size(kind)
    head = bytes(buf[:size])
    salt = head[size - 9 : size - 1]
    if len(head) < size or head[-1:] != b"\n" or len(salt) != 8 or not set(salt) <= _HEX:
        return None
    return Header(VERSION, int(salt, 16), size)


def cut_header(buf: bytes | memoryview, kind: str) -> bool:
    """Whether ``buf``, a whole file, is the beginning of a ``kind`` header
    and nothing else: what a crash while the file was created leaves."""
    if len(buf) >= MAX_HEADER_BYTES:
        return False
    head = bytes(buf)
    name = _NAMES[kind]
    if (name + b" 1\n").startswith(head):
        return True
    fixed = name + b" 2 "
    if len(head) <= len(fixed):
        return fixed.startswith(head)
    salt = head[len(fixed) :]
    return head.startswith(fixed) and len(salt) <= 8 and set(salt) <= _HEX


@attrs.frozen
class Record:
    op: Op
    sid: str
    expires_at: float = 0.0
    ttl_s: int = 0
    data: bytes = b""


def encode(
    op: Op, sid: str, expires_at: float = 0.0, ttl_s: int = 0, data: bytes = b"", *, salt: int
) -> bytes:
    """One record, checksummed with its file's ``salt``."""
    raw_sid = sid.encode("ascii")
    body = _OP_SID.pack(op, len(raw_sid)) + raw_sid
    if op is Op.PUT or op is Op.TOUCH or op is Op.META:
        body += _LIFE.pack(expires_at, ttl_s) + data
    return _HEAD.pack(len(body), zlib.crc32(body, salt)) + body


Change = tuple[Op, str, int, bytes]


def encode_changes(batches: Iterable[tuple[float, Iterable[Change]]], salt: int) -> bytes:
    """The journal records of ``batches`` of changes ``(op, sid, ttl_s,
    data)``, for a journal whose header has ``salt``, each batch made at
    its wall-clock time: PUT and TOUCH expire ``ttl_s`` after it.  Byte for
    byte what :func:`encode` makes, in one tight loop: the journal encodes
    a batch every flush, not a record per request (a PUT of 1 KiB: 0.6 us
    instead of 1.0)."""
    pack_head = _HEAD.pack
    pack_op_sid = _OP_SID.pack
    pack_life = _LIFE.pack
    crc32 = zlib.crc32
    put, touch, meta = Op.PUT, Op.TOUCH, Op.META
    parts: list[bytes] = []
    for wall_now, changes in batches:
        for op, sid, ttl_s, data in changes:
            raw_sid = sid.encode("ascii")
            if op is put:
                fixed = pack_op_sid(op, len(raw_sid)) + raw_sid + pack_life(wall_now + ttl_s, ttl_s)
                crc = crc32(data, crc32(fixed, salt))
                parts += (pack_head(len(fixed) + len(data), crc), fixed, data)
            elif op is touch:
                fixed = pack_op_sid(op, len(raw_sid)) + raw_sid + pack_life(wall_now + ttl_s, ttl_s)
                parts += (pack_head(len(fixed), crc32(fixed, salt)), fixed)
            elif op is meta:
                parts.append(encode(op, sid, data=data, salt=salt))
            else:
                parts.append(encode(op, sid, salt=salt))
    return b"".join(parts)


class Damage(enum.Enum):
    NONE = "none"
    TORN_TAIL = "torn tail"
    CORRUPT = "corrupt"


@attrs.frozen
class ScanResult:
    """Where scanning stopped and why.  ``good_end`` is the offset just past
    the last good record; ``damage_at`` the offset of the bad one."""

    damage: Damage
    good_end: int
    damage_at: int = -1
    reason: str = ""


class _Bad(Exception):
    pass


def _decode_body(body: bytes) -> Record:
    if len(body) < _OP_SID.size:
        raise _Bad("record too short")
    op_value, sid_len = _OP_SID.unpack_from(body)
    try:
        op = Op(op_value)
    except ValueError:
        raise _Bad(f"unknown record type {op_value}") from None
    pos = _OP_SID.size
    sid_raw = body[pos : pos + sid_len]
    if len(sid_raw) != sid_len:
        raise _Bad("record too short for its session id")
    sid = sid_raw.decode("ascii", "replace")
    pos += sid_len
    if op is Op.PUT or op is Op.TOUCH or op is Op.META:
        if len(body) < pos + _LIFE.size:
            raise _Bad("record too short for its lifetime")
        expires_at, ttl_s = _LIFE.unpack_from(body, pos)
        data = body[pos + _LIFE.size :] if op is not Op.TOUCH else b""
        return Record(op, sid, expires_at, ttl_s, data)
    if len(body) != pos:
        raise _Bad("trailing bytes in record")
    return Record(op, sid)


Emit = Callable[[Op, str, float, int, bytes], None]


def scan(buf: bytes | memoryview, start: int, emit: Emit, salt: int) -> ScanResult:
    """Decode records from ``buf[start:]`` (a file whose header has
    ``salt``), passing each to
    ``emit(op, sid, expires_at, ttl_s, data)``, until the end or the first
    bad record, and say which it was (see module doc).  The hot loop of a
    restart: it allocates nothing per record but the session ID and data."""
    view = memoryview(buf)
    end = len(view)
    pos = start
    head = _HEAD.size
    unpack_head = _HEAD.unpack_from
    unpack_op = _OP_SID.unpack_from
    unpack_life = _LIFE.unpack_from
    crc32 = zlib.crc32
    op_sid = _OP_SID.size
    life = _LIFE.size
    put, touch, end_op, meta = Op.PUT, Op.TOUCH, Op.END, Op.META
    while pos < end:
        if end - pos < head:
            # Nothing can follow a header the file ends in.
            return ScanResult(Damage.TORN_TAIL, pos, pos, "incomplete record header")
        length, crc = unpack_head(view, pos)
        if length > MAX_BODY_BYTES:
            reason = f"impossible record length {length}"
            return ScanResult(Damage.CORRUPT, pos, pos, reason)
        if length < op_sid:
            return _untrusted_length(view, pos, end, f"impossible record length {length}", salt)
        body_start = pos + head
        body_end = body_start + length
        if body_end > end:
            return _untrusted_length(view, pos, end, "record cut short", salt)
        if crc32(view[body_start:body_end], salt) != crc:
            return _tail_or_corrupt(view, pos, end, "checksum mismatch", body_end)
        op_value, sid_len = unpack_op(view, body_start)
        sid_end = body_start + op_sid + sid_len
        if op_value in (put, touch, meta):
            if sid_end + life > body_end:
                return ScanResult(Damage.CORRUPT, pos, pos, "record too short for its lifetime")
            expires_at, ttl_s = unpack_life(view, sid_end)
            data = bytes(view[sid_end + life : body_end]) if op_value != touch else b""
        elif op_value == Op.DELETE or op_value == end_op:
            if sid_end != body_end:
                return ScanResult(Damage.CORRUPT, pos, pos, "malformed record")
            expires_at, ttl_s, data = 0.0, 0, b""
        else:
            return ScanResult(Damage.CORRUPT, pos, pos, f"unknown record type {op_value}")
        sid = str(view[body_start + op_sid : sid_end], "ascii", "replace")
        emit(_OPS[op_value], sid, expires_at, ttl_s, data)
        pos = body_end
    return ScanResult(Damage.NONE, pos)


def _tail_or_corrupt(
    view: memoryview, pos: int, end: int, reason: str, record_end: int
) -> ScanResult:
    # A torn append leaves an incomplete or bad last record, perhaps followed
    # by zeros; anything else after it means damage in the middle.
    if not any(view[min(record_end, end) : end]):
        return ScanResult(Damage.TORN_TAIL, pos, pos, reason)
    return ScanResult(Damage.CORRUPT, pos, pos, reason)


def _untrusted_length(
    view: memoryview, pos: int, end: int, reason: str, salt: int
) -> ScanResult:
    # Where the record at pos ends is unknown, so "only zeros follow it"
    # cannot be checked: any intact record further on proves that the damage
    # is in the middle (a crash while appending leaves nothing intact after
    # the record it cut).  Only on this error path: one look per offset.
    # Records inside the cut one's data (a client's bytes) fail the salted
    # checksum: they cannot make a torn append look like damage.
    if _next_intact(view, pos + 1, end, salt) is None:
        return ScanResult(Damage.TORN_TAIL, pos, pos, reason)
    return ScanResult(Damage.CORRUPT, pos, pos, reason)


def resync(
    buf: bytes | memoryview, start: int, emit: Callable[[Record], None], salt: int
) -> tuple[int, list[int]]:
    """Recovery scan: keep every record whose checksum (with ``salt``, the
    file's) holds: records a client stored inside its session's data do
    not (module doc).  After a bad one
    (a wrong checksum, or a length field that is itself damaged) it looks for
    the next intact record byte by byte, so damage costs only the records it
    touches.  Returns (end offset, offsets where damage starts)."""
    view = memoryview(buf)
    end = len(view)
    pos = start
    bad: list[int] = []
    while pos + _HEAD.size <= end:
        found = _intact_at(view, pos, end, salt)
        if found is not None:
            record, pos = found
            emit(record)
            continue
        bad.append(pos)
        after = _next_intact(view, pos + 1, end, salt)
        pos = end if after is None else after
    return min(pos, end), bad


def _next_intact(view: memoryview, pos: int, end: int, salt: int) -> int | None:
    """The offset of the first intact record at or after ``pos``, or None."""
    last = end - _HEAD.size
    while pos <= last:
        if not view[pos]:
            # A record's length is at least 3, so one of its four bytes is
            # not zero: skip a run of zeros (a file extended by the file
            # system) at once instead of offset by offset.
            found = _NONZERO.search(view, pos, end)
            if found is None:
                return None
            pos = max(pos, found.start() - 3)
            if pos > last:
                return None
        if _intact_at(view, pos, end, salt) is not None:
            return pos
        pos += 1
    return None


def _intact_at(
    view: memoryview, pos: int, end: int, salt: int
) -> tuple[Record, int] | None:
    """The intact record at ``pos`` and the offset after it, or None."""
    length, crc = _HEAD.unpack_from(view, pos)
    body_start = pos + _HEAD.size
    body_end = body_start + length
    if length < _OP_SID.size or length > MAX_BODY_BYTES or body_end > end:
        return None
    # Cheap checks before the checksum: a known type and a session id that fits.
    op_value, sid_len = _OP_SID.unpack_from(view, body_start)
    if op_value not in _OPS or _OP_SID.size + sid_len > length:
        return None
    if zlib.crc32(view[body_start:body_end], salt) != crc:
        return None
    body = bytes(view[body_start:body_end])
    try:
        return _decode_body(body), body_end
    except _Bad:
        return None


def snapshot_chunks(
    entries: Iterable[tuple[str, tuple[bytes, float, int]]],
    offset: float = 0.0,
    metas: Iterable[tuple[str, bytes]] = (),
    chunk_bytes: int = 1 << 20,
    *,
    salt: int,
) -> Iterator[bytes]:
    """The records of a snapshot whose header has ``salt``, joined into
    chunks of about ``chunk_bytes``.

    ``entries`` are ``(sid, (data, expires_at, ttl_s))`` as the store holds
    them; ``expires_at + offset`` is written as the wall-clock expiry.  Then
    the cluster metadata ``(sid, encoded)`` of those sessions, then END with
    the count.  A PUT record exactly as :func:`encode` makes it, written
    out here because compaction encodes every live session once per journal's
    worth of writes: 1.8 us a session instead of 2.8."""
    pack_head = _HEAD.pack
    pack_op_sid = _OP_SID.pack
    pack_life = _LIFE.pack
    crc32 = zlib.crc32
    put = int(Op.PUT)
    parts: list[bytes] = []
    size = 0
    count = 0
    for sid, (data, expires_at, ttl_s) in entries:
        raw_sid = sid.encode("ascii")
        fixed = pack_op_sid(put, len(raw_sid)) + raw_sid + pack_life(expires_at + offset, ttl_s)
        parts += (pack_head(len(fixed) + len(data), crc32(data, crc32(fixed, salt))), fixed, data)
        size += len(data) + 64
        count += 1
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts = []
            size = 0
    for sid, encoded in metas:
        parts.append(encode(Op.META, sid, data=encoded, salt=salt))
    parts.append(encode(Op.END, str(count), salt=salt))
    yield b"".join(parts)


def snapshot_needs(estimate_bytes: int) -> int:
    """The free bytes a snapshot of about ``estimate_bytes`` needs before it
    starts: itself and a margin (``SNAPSHOT_MARGIN_*``)."""
    margin = max(SNAPSHOT_MARGIN_MIN_BYTES, int(estimate_bytes * SNAPSHOT_MARGIN_FRACTION))
    return max(0, estimate_bytes) + margin


def snapshot_fits(estimate_bytes: int, free_bytes: int | None) -> bool:
    """Whether a snapshot of about ``estimate_bytes`` may start on a disk
    with ``free_bytes`` free for the daemon; ``None``: the file system does
    not say (it reports no size), so nothing is refused for want of room."""
    return free_bytes is None or free_bytes >= snapshot_needs(estimate_bytes)
