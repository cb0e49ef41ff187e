"""Durability: the data directory, restore on start, the journal writer with
its fsync policy, and background compaction into snapshots.

Files in the data directory (``G`` is a generation number, six digits):

- ``lock``: ``flock``ed by the daemon using the directory (holds its pid);
- ``snapshot-G.psnap``: every live session at the moment generation G began;
- ``journal-G.pjnl``: every change (write, touch, destroy, expiry) since then;
- ``*.tmp``: a snapshot being written; ignored and removed on start.

Each journal and snapshot checksums its records with a salt of its own,
kept in its header (``phpsess.journal``): records are appended to a
journal only with its salt.  Files of format 1 (unsalted, from an older
phpsess) are restored but never appended to: the start opens the next
journal instead, and a compaction at once replaces them.

Restore = the newest snapshot S, then journals S, S+1, ... in order.
Compaction starts only if the disk has room for the snapshot and a margin
(``journal.snapshot_fits``: a snapshot that filled the disk would fail the
journal's appends); else it is deferred as a failed one.  It starts
journal G+1 and, at the same instant in the event loop, takes a copy of
the store (cheap: entries are immutable and shared); the
pending tail of journal G is written and fsynced; then the copy is encoded
as snapshot G+1, a slice at a time between requests, and written by worker
threads (tmp, fsync, rename, fsync directory) while requests go on being
journaled into G+1; last, generation G's files are deleted.  A session
written or destroyed while the copy is being encoded is taken out of the
copy: its record in G+1 supersedes it, and the snapshot is renamed into
place only once G+1 is fsynced that far (under heavy rewriting half of
the snapshot's encoding is saved).  A crash
at any point leaves a directory that restores to the same sessions.

Fsync policies (what an acknowledged write survives; README has the table):

- ``always``: the reply is sent after the change is fsynced (group commit:
  one fsync covers every change that arrived meanwhile);
- ``interval``: the reply is not delayed; changes are handed to the kernel
  in batches every ``FLUSH_S`` (10 ms) and fsynced every
  ``fsync_interval_s``; replies wait only if the disk falls behind by two
  intervals, so any crash (the daemon's or the OS's) loses at most the
  changes acknowledged in the last two intervals (a daemon crash in practice
  the last 10 ms, an OS crash the last interval);
- ``never``: as ``interval`` without the fsync: the OS flushes when it likes
  (but a compaction fdatasyncs the new journal once before the snapshot
  replaces the old generation: the records that stand for the sessions the
  snapshot leaves out must not be lost with the files that held them).

An append that fails (a full disk, EIO, EFBIG) is whole or nothing: the
batch is kept in memory.  On a single node (``retry_failed_appends``) the
daemon stays up: :attr:`Persister.failure` is set, the shell refuses every
change before making it, reads go on, and the batch is tried again every
``JOURNAL_RETRY_S`` until it is written.  In a cluster, or when no retry
can tell what is on disk (the journal or lock file deleted, a failed fsync:
Linux may have dropped the pages it could not write and report the next
fsync as a success), the writer raises :class:`JournalFailed` and the
daemon stops.

Batching is what makes persistence cheap: per 10 ms the event loop pays one
hand-over to the journal thread instead of one per request.  Disk I/O runs in
worker threads; the event loop never waits on the disk except where the
policy says a reply must (``always``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import pwd
import queue
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

import attrs
import trio

from phpsess import journal as j
from phpsess.store import Raw

log = logging.getLogger("phpsess")

FSYNC_POLICIES: Final = ("always", "interval", "never")
DEFAULT_DATA_DIR: Final = "/var/lib/phpsess"
# Compact when the journal is larger than the live data, but not for less;
# or when the snapshot and journals together are larger than twice the live
# data plus this (sessions destroyed or expired since the snapshot): see
# compaction_due.
MIN_COMPACT_BYTES: Final = 8 * 1024 * 1024
# While no change comes, how often the writer checks whether to compact: an
# idle server (or one restarted after its sessions expired) journals nothing,
# and without this kept its dead sessions on disk for ever.
IDLE_COMPACT_CHECK_S: Final = 60.0
_WRITE_CHUNK: Final = 1 << 20
# Compaction encodes about this much between two checkpoints of the event
# loop (some 50 us of work for 1 KiB sessions).
_SLICE_BYTES: Final = 32 * 1024
# CPU priority (nice) of the threads that write the journal and snapshots:
# below the event loop's, so on a busy core the kernel runs their system
# calls when the loop does not need it (p99.9 at half load: 2 ms instead of
# up to 7).  Not the journal's with --fsync always: every reply waits for it
# (nice 10 there cost 17 % of WRITE throughput).
BACKGROUND_NICE: Final = 10
# With ``interval`` and ``never``, how long changes gather before one append.
FLUSH_S: Final = 0.010
# After the journal failed (and the daemon stops for it), how long the
# requests waiting on it have to answer with the error before the stop.
FAILED_GRACE_S: Final = 0.1
# While appends fail (a full disk) on a single node, how often the batch
# that failed is tried again, and how often a line says it still fails.
JOURNAL_RETRY_S: Final = 1.0
FAILING_LOG_S: Final = 60.0
# After a compaction that could not start (the next journal could not be
# made: EMFILE, EACCES, ENOSPC; or no room for the snapshot), how long
# before the writer tries again.
COMPACT_RETRY_S: Final = 30.0
_NAME_RE: Final = re.compile(r"(snapshot|journal)-(\d{6,})\.(psnap|pjnl)\Z")


def compaction_due(
    journal_bytes: int, older_bytes: int, live_bytes: int, min_bytes: int, stale: bool
) -> bool:
    """Whether to compact, by the data directory's sizes: the journal being
    appended, the other files (the snapshot; the journals of an unfinished
    compaction) and the estimate of a new snapshot (``live_bytes``).

    The journal outgrew the live data; or the files hold more than twice
    the live data plus ``min_bytes``, which happens when sessions go (the
    snapshot still holds them) and keeps disk use following the live data
    down.  That needs ``stale``: something journaled or expired since the
    snapshot was taken, else a compaction would write the same snapshot
    again (a live estimate too low can then not make it loop).  Right after
    a compaction the snapshot is about the live data and the journal empty:
    false."""
    if journal_bytes > max(min_bytes, live_bytes):
        return True
    return stale and journal_bytes + older_bytes > 2 * live_bytes + min_bytes


@attrs.frozen
class PersistConfig:
    data_dir: str = DEFAULT_DATA_DIR
    fsync: str = "interval"
    fsync_interval_s: float = 0.2
    min_compact_bytes: int = MIN_COMPACT_BYTES

    def __attrs_post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        if not self.fsync_interval_s > 0:
            raise ValueError("fsync interval must be positive")


class DataDirError(Exception):
    """The data directory cannot be used; the message says why and what to do."""


@attrs.define
class Restored:
    # sid -> entry, its expiry on the clock restore() was given
    sessions: dict[str, Raw]
    # sid -> the cluster metadata last journaled for it (phpsess.replica)
    meta: dict[str, bytes] = attrs.Factory(dict)
    expired: int = 0
    files: int = 0
    torn: list[str] = attrs.Factory(list)
    seconds: float = 0.0
    # Files restored that an older phpsess wrote (format version 1, unsalted).
    old_format: int = 0


def snapshot_name(gen: int) -> str:
    return f"snapshot-{gen:06d}.psnap"


def journal_name(gen: int) -> str:
    return f"journal-{gen:06d}.pjnl"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _append_whole(fd: int, data: bytes, size: int | None = None) -> None:
    """Append ``data`` to the journal (``size`` bytes long, if known), or
    nothing: a write that fails (disk full) is cut off again, so that no
    half record is left for later appends (the shutdown's) to follow, which
    restore would take for damage, not a torn tail."""
    if size is None:
        size = os.fstat(fd).st_size
    try:
        _write_all(fd, data)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def _generations(path: str) -> tuple[list[int], list[int]]:
    snapshots: list[int] = []
    journals: list[int] = []
    for name in os.listdir(path):
        match = _NAME_RE.match(name)
        if match is None:
            continue
        gen = int(match.group(2))
        (snapshots if match.group(1) == "snapshot" else journals).append(gen)
    return sorted(snapshots), sorted(journals)


def _recovery_hint(path: str) -> str:
    command = f"phpsess repair --data-dir {path}"
    uid = os.geteuid()
    if uid != 0:  # as the daemon's user, as DEPLOYMENT.md §7 says
        try:
            command = f"runuser -u {pwd.getpwuid(uid).pw_name} -- {command}"
        except KeyError:
            command = f"setpriv --reuid={uid} --regid={os.getegid()} --clear-groups {command}"
    return (
        f"phpsess will not drop sessions silently. Keep a copy of {path}, then either "
        f"restore the file from a backup, or run `{command}` to keep every intact "
        "record (sessions in the damaged part are lost)"
    )


class _Apply:
    """Replays records into store entries; expiries are moved to the store's
    clock by ``offset``.  Every record is applied whatever its expiry: a PUT
    whose own expiry has passed may have been kept alive by a later TOUCH
    (PHP's lazy_write sends only TOUCH while the data is unchanged).  What
    is still expired at ``wall_now`` once everything is replayed is dropped
    by :meth:`drop_expired`."""

    def __init__(self, wall_now: float, offset: float) -> None:
        self.sessions: dict[str, Raw] = {}
        self.meta: dict[str, bytes] = {}
        self.wall_now = wall_now
        self.offset = offset
        self.expired = 0
        self.end_count: int | None = None
        self.puts = 0

    def __call__(self, op: j.Op, sid: str, expires_at: float, ttl_s: int, data: bytes) -> None:
        if op is j.Op.PUT:
            self.puts += 1
            self.sessions[sid] = (data, expires_at + self.offset, ttl_s)
        elif op is j.Op.TOUCH:
            old = self.sessions.get(sid)
            if old is not None:
                self.sessions[sid] = (old[0], expires_at + self.offset, ttl_s)
        elif op is j.Op.DELETE:
            self.sessions.pop(sid, None)
            self.meta.pop(sid, None)
        elif op is j.Op.META:
            self.meta[sid] = data
        else:
            self.end_count = int(sid) if sid.isdigit() else -1

    def drop_expired(self) -> None:
        """Drop the sessions whose final expiry is not after ``wall_now``
        (they expired while the daemon was down); count them in ``expired``.
        Once per restore: one pass over the sessions, not a test per record."""
        limit = self.wall_now + self.offset  # wall_now on the store's clock
        sessions = self.sessions
        gone = [sid for sid, raw in sessions.items() if raw[1] <= limit]
        for sid in gone:
            del sessions[sid]
        self.expired += len(gone)


@contextlib.contextmanager
def _mapped(path: str) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes without reading it all into memory at once."""
    # O_NONBLOCK: a FIFO with a journal's name must not hang the start.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataDirError(
                f"{path} is not a regular file, so it cannot be a phpsess "
                f"{'snapshot' if path.endswith('.psnap') else 'journal'}; move it out of "
                f"{os.path.dirname(path) or '.'} (phpsess keeps only its own files there) "
                "and start again"
            )
        if info.st_size == 0:
            yield b""
            return
        _read_through(fd, info.st_size, path)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped
    finally:
        os.close(fd)


def _read_through(fd: int, size: int, path: str) -> None:
    """Read the file once with read(2) before it is mapped: a disk that
    cannot read it then gives an OSError (EIO) naming the file, where a
    mapped page that cannot be read kills the process with SIGBUS, with no
    word of why.  The pages stay in the page cache for the mapping."""
    chunk = bytearray(1 << 20)
    done = 0
    try:
        while done < size:
            got = os.readv(fd, [chunk])
            if got == 0:
                break
            done += got
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from exc


def _user_name() -> str:
    """This process's user, by name when it has one."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _unusable(data_dir: str, exc: OSError, path: str | None = None) -> DataDirError:
    """What to tell the operator when a file of ``data_dir`` (``path``, if
    the error does not name it) cannot be used."""
    what = exc.filename if exc.filename is not None else (path or data_dir)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = (
            f"The disk (or phpsess's user's quota) is full: free space on the file "
            f"system of {data_dir} (df -h {data_dir}), then start again"
        )
    elif exc.errno == errno.EROFS:
        advice = (
            f"The file system of {data_dir} is mounted read-only (after disk errors, "
            "dmesg says so): make it writable again, or choose another --data-dir, "
            "then start again"
        )
    elif exc.errno in (errno.EACCES, errno.EPERM):
        # Never "move it out": a journal or snapshot holds the sessions
        # (one left owned by root by a repair run as root, say).
        user = _user_name()
        advice = (
            f"phpsess runs as user {user}, which cannot use it: make {data_dir} and "
            f"every file in it that user's (chown -R {user}: {data_dir}), keeping the "
            "files where they are (the journals and snapshots hold the sessions), "
            "then start again"
        )
    elif exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENXIO):
        advice = (
            f"It is not a file phpsess wrote (not a regular file): move it out of "
            f"{data_dir}, then start again"
        )
    else:
        advice = (
            "Check that the disk is healthy (dmesg) and that phpsess's user can read "
            f"and write it; keep the files of {data_dir} where they are (the journals "
            "and snapshots hold the sessions), then start again"
        )
    return DataDirError(f"cannot restore from {data_dir}: {what}: {exc.strerror or exc}. {advice}")


def restore(data_dir: str, wall_now: float, mono_now: float = 0.0) -> tuple[Restored, int]:
    """Read the data directory; return the sessions alive at ``wall_now``
    (their expiry moved to the clock that reads ``mono_now`` at that moment)
    and the generation to append to.  Truncates a torn journal tail (and says
    so in ``Restored.torn``); raises :class:`DataDirError` on real damage,
    and on a file it cannot read or write (naming it)."""
    try:
        return _restore(data_dir, wall_now, mono_now)
    except OSError as exc:
        raise _unusable(data_dir, exc) from exc


def _restore(data_dir: str, wall_now: float, mono_now: float) -> tuple[Restored, int]:
    started = time.monotonic()
    snapshots, journals = _generations(data_dir)
    for name in os.listdir(data_dir):
        if name.endswith(".tmp"):
            os.unlink(os.path.join(data_dir, name))  # an unfinished snapshot
    apply = _Apply(wall_now, mono_now - wall_now)
    result = Restored({})
    base = snapshots[-1] if snapshots else (journals[0] if journals else 1)
    _check_generations(data_dir, snapshots, journals, base)
    if snapshots:
        path = os.path.join(data_dir, snapshot_name(base))
        with _mapped(path) as buf:
            header = j.parse_header(memoryview(buf), j.SNAPSHOT)
            if header is None:
                raise DataDirError(
                    f"{path} is not a phpsess snapshot (bad header at offset 0). "
                    + _recovery_hint(data_dir)
                )
            scanned = j.scan(memoryview(buf), header.size, apply, header.salt)
        result.old_format += header.version == 1
        if scanned.damage is not j.Damage.NONE:
            raise DataDirError(
                f"snapshot {path} is damaged at offset {scanned.damage_at} "
                f"({scanned.reason}). " + _recovery_hint(data_dir)
            )
        if apply.end_count is None or apply.end_count != apply.puts:
            raise DataDirError(
                f"snapshot {path} is incomplete (no valid trailer at offset "
                f"{scanned.good_end}). " + _recovery_hint(data_dir)
            )
        result.files += 1
    for gen in journals:
        if gen < base:
            continue
        path = os.path.join(data_dir, journal_name(gen))
        with _mapped(path) as buf:
            size = len(buf)
            header = j.parse_header(memoryview(buf), j.JOURNAL)
            if header is None and j.cut_header(memoryview(buf), j.JOURNAL):
                found = None  # crashed while creating it: nothing journaled
            elif header is None:
                raise DataDirError(
                    f"{path} is not a phpsess journal (bad header at offset 0). "
                    + _recovery_hint(data_dir)
                )
            else:
                found = j.scan(memoryview(buf), header.size, apply, header.salt)
                result.old_format += header.version == 1
        if found is None:
            if gen != journals[-1] or (snapshots and gen <= base):
                # Journal G+1 gets its header (fsynced) before anything is
                # written to it or snapshot G+1 exists: a crash cannot cut the
                # header of any journal but the newest, past the snapshot.
                why = (
                    "it is not the newest journal" if gen != journals[-1]
                    else f"{snapshot_name(base)} exists, which is written only once "
                    "its journal's header is on disk"
                )
                raise DataDirError(
                    f"{path} has an incomplete header, but {why}: it was cut short or "
                    "emptied after it was written, and the changes it held are missing. "
                    + _recovery_hint(data_dir)
                )
            _truncate(path, 0)
            result.torn.append(f"{path}: incomplete header, emptied")
            continue
        scanned = found
        if scanned.damage is j.Damage.CORRUPT:
            raise DataDirError(
                f"journal {path} is damaged at offset {scanned.damage_at} "
                f"({scanned.reason}) and data follows it. " + _recovery_hint(data_dir)
            )
        if scanned.damage is j.Damage.TORN_TAIL:
            if not _may_be_torn(data_dir, gen, journals):
                raise DataDirError(
                    f"journal {path} is damaged at offset {scanned.damage_at} "
                    f"({scanned.reason}) in its last record, and newer journals follow "
                    "it: no crash leaves that (a journal's tail is fsynced before the "
                    "next one takes a change). " + _recovery_hint(data_dir)
                )
            dropped = size - scanned.good_end
            _truncate(path, scanned.good_end)
            result.torn.append(
                f"{path}: torn last record at offset {scanned.damage_at} "
                f"({scanned.reason}); truncated {dropped} bytes"
            )
        result.files += 1
    # Files of older generations are leftovers of an interrupted compaction.
    for gen in snapshots:
        if gen < base:
            os.unlink(os.path.join(data_dir, snapshot_name(gen)))
    for gen in journals:
        if gen < base:
            os.unlink(os.path.join(data_dir, journal_name(gen)))
    current = max([base, *[g for g in journals if g >= base]])
    apply.drop_expired()
    result.sessions = apply.sessions
    result.meta = {sid: m for sid, m in apply.meta.items() if sid in apply.sessions}
    result.expired = apply.expired
    result.seconds = time.monotonic() - started
    return result, current


def _may_be_torn(data_dir: str, gen: int, journals: list[int]) -> bool:
    """Whether a crash can have torn the last record of journal ``gen``.
    The newest journal's, yes.  An older one's only while its tail was being
    written at a switch (``_switch_generation``): the next journal is then
    the newest and holds nothing but its header, because the writer appends
    to it only after the old tail is fsynced.  Anywhere else the last record
    was on disk before later changes were: damage, not a torn append."""
    if gen == journals[-1]:
        return True
    if gen != journals[-2]:
        return False
    # O_NONBLOCK: a FIFO with a journal's name must not hang the start
    # (restore names it when it gets to it).
    fd = os.open(os.path.join(data_dir, journal_name(journals[-1])), os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return info.st_size <= j.header_size(j.JOURNAL)
        head = os.pread(fd, j.MAX_HEADER_BYTES + 1, 0)
    finally:
        os.close(fd)
    header = j.parse_header(head, j.JOURNAL)
    return j.cut_header(head, j.JOURNAL) or (header is not None and len(head) == header.size)


def _check_generations(
    data_dir: str, snapshots: list[int], journals: list[int], base: int
) -> None:
    """Refuse a set of files no crash can leave (module doc, compaction):
    journal G+1 is created and fsynced before snapshot G+1 appears, so the
    newest snapshot always has its journal, and journals from there on are
    consecutive.  A missing one was removed by hand or lost with the disk:
    replaying the rest would bring destroyed sessions back and lose writes."""
    wanted = [gen for gen in journals if gen >= base]
    problem = None
    if snapshots and base not in wanted:
        problem = f"{snapshot_name(base)} has no {journal_name(base)}"
    elif not snapshots and journals and base != 1:
        problem = f"there is no snapshot, and the first journal is {journal_name(base)}, not 1"
    elif wanted and wanted != list(range(wanted[0], wanted[0] + len(wanted))):
        missing = sorted(set(range(wanted[0], wanted[-1] + 1)) - set(wanted))
        problem = f"{journal_name(missing[0])} is missing between the journals"
    if problem is not None:
        raise DataDirError(
            f"{data_dir}: {problem}: a file was removed (no crash leaves this), and "
            "replaying the others would bring destroyed sessions back and lose writes. "
            "Put the file back if you have it; else start with an empty data directory "
            "(in a cluster the other copies fill it in), keeping this one aside"
        )


def _truncate(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(data_dir: str) -> list[str]:
    """Rewrite damaged files keeping every intact record; the originals are
    kept in ``damaged-<time>/``.  Returns what was done, for the operator.

    Crash-safe: the replacement is written and fsynced beside the original,
    the original is hard-linked into the keep directory, then the replacement
    is renamed over it, so the directory never lacks the file.

    Run as root on the daemon's directory, it leaves nothing the daemon's
    user could not use: a replacement gets the owner, group and mode of the
    file it replaces, ``damaged-<time>/`` (and a ``lock`` file the repair
    command made) those of the data directory."""
    done: list[str] = []
    directory = os.stat(data_dir)
    snapshots, journals = _generations(data_dir)
    keep = os.path.join(data_dir, f"damaged-{int(time.time())}")
    for kind, gens in ((j.SNAPSHOT, snapshots), (j.JOURNAL, journals)):
        for gen in gens:
            name = snapshot_name(gen) if kind == j.SNAPSHOT else journal_name(gen)
            path = os.path.join(data_dir, name)
            with _mapped(path) as mapped:  # a FIFO or directory: a clear error
                original = os.stat(path)
                buf = bytes(mapped)
            header = j.parse_header(buf, kind)
            # A damaged header: records are looked for from offset 0 with
            # salt 0 (a version 1 file's), and with the salt where a
            # version 2 header keeps it, if it is still readable there (a
            # damaged byte elsewhere in the line); the reading that finds
            # more records is kept.  A version 2 file whose salt itself is
            # damaged keeps no record (the original stays in damaged-*/).
            start, salt = (0, 0) if header is None else (header.size, header.salt)
            records: list[j.Record] = []
            _, bad = j.resync(buf, start, records.append, salt)
            salvaged = j.salvage_header(buf, kind) if header is None else None
            if salvaged is not None:
                found: list[j.Record] = []
                _, found_bad = j.resync(buf, salvaged.size, found.append, salvaged.salt)
                if len(found) > len(records):
                    records, bad = found, [0, *found_bad]
            kept = [r for r in records if r.op is not j.Op.END]
            ends = [r for r in records if r.op is j.Op.END]
            # A snapshot's END counts its PUT records only (restore checks
            # it so): its META records are kept but not counted.
            puts = sum(1 for r in kept if r.op is j.Op.PUT)
            complete = kind == j.JOURNAL or (
                len(ends) == 1 and ends[0].sid.isdigit() and int(ends[0].sid) == puts
            )
            if not bad and start and complete:
                continue
            tmp = path + ".repair.tmp"  # restore removes what a crash left
            # Rewritten in the current format, with a new salt.
            new_salt = _new_salt()
            with os.fdopen(_create_like(tmp, original), "wb") as out:
                out.write(j.header(kind, new_salt))
                for r in kept:
                    out.write(j.encode(r.op, r.sid, r.expires_at, r.ttl_s, r.data, salt=new_salt))
                if kind == j.SNAPSHOT:
                    out.write(j.encode(j.Op.END, str(puts), salt=new_salt))
                out.flush()
                os.fsync(out.fileno())
            _make_keep(keep, directory)
            _keep_original(path, os.path.join(keep, name), original)
            _fsync_dir(keep)
            os.replace(tmp, path)
            fixed = []
            if not start:
                fixed.append("wrote its missing or damaged header anew")
            if bad:
                fixed.append(f"dropped damaged records at offsets {bad}")
            if not complete:
                fixed.append("wrote its missing or wrong trailer anew")
            done.append(
                f"{name}: kept {len(kept)} intact records, {', '.join(fixed)}; "
                f"original in {keep}"
                + (
                    "; a dropped journal record may have been a destroy or a "
                    "newer write: those sessions may come back as they were before it"
                    if kind == j.JOURNAL and bad else ""
                )
            )
    _return_lock(data_dir, directory)
    if done:
        _fsync_dir(data_dir)
    return done


def _new_salt() -> int:
    """The checksum salt of a new journal or snapshot (journal module doc):
    32 bits no client can know."""
    return secrets.randbits(32)


def _give(fd: int, path: str, uid: int, gid: int, mode: int) -> None:
    """Give the file open as ``fd`` (``path``) that owner, group and mode
    (chown first: it clears set-id bits)."""
    mine = os.fstat(fd)
    try:
        if (mine.st_uid, mine.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(mine.st_mode) != mode:
            os.fchmod(fd, mode)
    except PermissionError as exc:
        raise DataDirError(
            f"cannot give {path} the owner (uid {uid}, gid {gid}) of the file it stands "
            f"for: {exc.strerror}; run repair as root or as the daemon's user "
            "(runuser -u phpsess -- phpsess repair --data-dir DIR)"
        ) from exc


def _create_like(path: str, like: os.stat_result) -> int:
    """A new file ``path`` for writing, owned as ``like`` with its mode.
    What a crashed repair left there is removed first; a symlink planted
    in the directory is never followed."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        _give(fd, path, like.st_uid, like.st_gid, stat.S_IMODE(like.st_mode))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _make_keep(keep: str, directory: os.stat_result) -> None:
    """Make ``keep`` (the originals' directory) with the data directory's
    owner, group and mode; one made earlier within the second is reused."""
    try:
        os.mkdir(keep, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(keep).st_mode):
            raise DataDirError(f"{keep} is in the way (not a directory): move it out, "
                               "then run repair again") from None
    fd = os.open(keep, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _give(fd, keep, directory.st_uid, directory.st_gid, stat.S_IMODE(directory.st_mode))
    finally:
        os.close(fd)


def _return_lock(data_dir: str, directory: os.stat_result) -> None:
    """The repair command locks ``DIR/lock``, creating it if it was missing:
    made by root, the daemon's user could not open it.  Run as root, give a
    lock file of root's the data directory's owner and group."""
    if os.geteuid() != 0 or directory.st_uid == 0:
        return
    path = os.path.join(data_dir, "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # none (repair() called alone): nothing to give
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == 0:
            _give(fd, path, directory.st_uid, directory.st_gid, 0o600)
    finally:
        os.close(fd)


def _keep_original(path: str, target: str, like: os.stat_result) -> None:
    """Keep ``path`` as ``target`` too: a hard link, or a copy (owned and
    with the mode of ``like``, the original) where the filesystem has none.
    Already kept (a repair that stopped before its rename, run again within
    the second): nothing to do."""
    if os.path.exists(target):
        if os.path.samefile(path, target):
            return
        target += f".{time.monotonic_ns()}"
    try:
        os.link(path, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        with open(path, "rb") as source, os.fdopen(_create_like(target, like), "wb") as copy:
            shutil.copyfileobj(source, copy)
            copy.flush()
            os.fsync(copy.fileno())


class DataDirLock:
    """An exclusive ``flock`` on ``DIR/lock`` so two daemons never share a directory."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, "lock")
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirError(
                f"{os.path.dirname(self.path)} is in use by another phpsess daemon "
                f"(pid {holder}); stop it, or give this one its own --data-dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:  # a full disk
            os.close(fd)
            raise
        self._fd = fd

    def check(self) -> None:
        """Raise OSError if ``DIR/lock`` is no longer the file we lock (it
        was deleted or replaced: a second daemon could lock it)."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise OSError(
                errno.ENOENT,
                f"{self.path} was deleted or replaced while this daemon held it "
                "(files removed from the data directory?)",
            )

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@attrs.frozen
class SnapshotSource:
    """A copy of the store's entries (their expiries on the monotonic clock)
    and what to add to those expiries to make them wall-clock times."""

    entries: dict[str, Raw]
    offset: float


def _emptied(entries: dict[str, Raw]) -> Iterator[tuple[str, Raw]]:
    """The items of ``entries``, each removed as it is taken.  The copy being
    written is often the last holder of the data of sessions rewritten since
    it was taken; freeing it all at once at the end took milliseconds
    (30 MB of sessions: 8 ms) in one step of the event loop."""
    pop = entries.popitem
    while entries:
        yield pop()


class _DiskThread:
    """One long-lived thread for journal appends (a second one writes
    snapshots, so appends never queue behind them).  Cheaper per batch than
    ``trio.to_thread.run_sync`` (no task, limiter or thread-cache round), which
    matters because every acknowledged write waits for one of these."""

    def __init__(self, name: str, nice: int = 0) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], _Done] | None] = (
            queue.SimpleQueue()
        )
        self._name = name
        self._nice = nice
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        done = _Done()
        self._jobs.put((job, done))
        # Not cancellable: the write is under way; its outcome must be known.
        with trio.CancelScope(shield=True):
            await done.event.wait()
        if done.error is not None:
            raise done.error

    def _loop(self) -> None:
        assert self._token is not None
        if self._nice:
            # Linux: nice is per thread.  The kernel then runs this thread's
            # system calls when the event loop does not need the core.
            # Relative to the daemon's own (a unit's Nice= still applies).
            with contextlib.suppress(OSError):
                tid = threading.get_native_id()
                base = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, base + self._nice))
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            try:
                job()
            except BaseException as exc:  # reported to the waiting task
                done.error = exc
            try:
                self._token.run_sync_soon(done.event.set)
            except trio.RunFinishedError:
                return

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)


class _Done:
    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None


class JournalFailed(OSError):
    """The journal could not be written (its file named): no change is
    acknowledged, or taken, until it can be (module doc).  ``lost``: no
    retry can mend it (the file deleted, a failed fsync): the daemon stops."""

    lost = False


class _Lost(OSError):
    """A journal failure that a retry cannot mend (see :class:`JournalFailed`)."""


def _journal_error(exc: OSError, path: str) -> JournalFailed:
    if isinstance(exc, JournalFailed):
        return exc
    failed = JournalFailed(exc.errno, exc.strerror or str(exc), exc.filename or path)
    failed.lost = isinstance(exc, _Lost)
    failed.__cause__ = exc
    return failed


def _sync(fd: int) -> None:
    """fsync the journal open as ``fd``; a failure is :class:`_Lost`."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _Lost(exc.errno, exc.strerror or str(exc), exc.filename) from exc


class _NotCreated(Exception):
    """The compaction could not start: the next journal could not be made
    (``error`` is its OSError, the cause too), or the disk has no room for
    the snapshot (``detail`` says how much it needs and how much is free)."""

    def __init__(self, error: object, detail: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail


def _free_bytes(path: str) -> int | None:
    """Bytes free for an unprivileged user (root's reserve left out) on the
    file system of ``path``; None if it reports no size at all (some FUSE
    and network file systems), so free space cannot be told."""
    info = os.statvfs(path)
    if info.f_blocks == 0:
        return None
    return info.f_bavail * info.f_frsize


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class Persister:
    """The journal writer (see module doc).  Event-loop side: :meth:`submit`
    and :meth:`wait_durable`; :meth:`run` is the writer task.

    ``retry_failed_appends``: when an append fails, stay up (changes
    refused while :attr:`failure` is set) and try it again until it is
    written, instead of stopping the daemon (a cluster's node stops: its
    backups hold every acknowledged write and take over)."""

    def __init__(self, config: PersistConfig, *, retry_failed_appends: bool = False) -> None:
        self.config = config
        self.retry_failed_appends = retry_failed_appends
        self.always = config.fsync == "always"  # every reply waits for its fsync
        self.dir = config.data_dir
        self._lock = DataDirLock(self.dir)
        self._pending: list[tuple[float, list[j.Change]]] = []
        self.submitted = 0  # sequence number of the last submitted batch
        self.written = 0  # ... handed to the kernel
        self.synced = 0  # ... fsynced
        self._work = trio.Event()
        self._progress = trio.Event()
        self._fd = -1
        self.gen = 0
        self.salt = 0  # of the journal being appended to (journal module doc)
        # Restored from files an older phpsess wrote (format 1): compact
        # once at the start, so that none is left (phpsess.journal).
        self._old_format = False
        self.journal_bytes = 0
        # The data directory's other files (the snapshot; after an
        # unfinished compaction older journals too), for compaction_due.
        self.older_bytes = 0
        # Something was journaled, or expired while the daemon was down,
        # since the snapshot was taken (compaction_due).
        self._stale = False
        self._last_sync = 0.0
        self._last_flush = -math.inf
        # When the oldest change not yet fsynced was submitted (or None).
        self._unsynced_since: float | None = None
        self._compacting = False
        # The copy of the store that compaction is encoding (or None).
        self._superseded_from: dict[str, Raw] | None = None
        self._superseded = 0
        # A compaction waits for the journal's next fsync: do it now.
        self._sync_soon = False
        # Why the journal cannot be written, while it cannot (else None):
        # the shell refuses changes meanwhile (nothing is stored).
        self.failure: JournalFailed | None = None
        # ... and the daemon stops for it (no retry).
        self._stopping = False
        # The last change batch submitted before the failure: replies that
        # wait for one up to it get the error (the change may or may not
        # be stored); later ones are expiries only (changes are refused).
        self._failed_upto = 0
        self._failed_since = 0.0  # trio time
        self._retry_at = 0.0  # trio time of the next retry
        self._failing_logged_at = 0.0
        # The batch of an append that failed (not in the file: whole or
        # nothing), for the retries and close() to try again.
        self._unwritten = b""
        self.fsyncs_total = 0
        self.fsync_seconds_total = 0.0
        self.compactions_total = 0
        # Compactions that failed: the next journal could not be made, or
        # the snapshot could not be written (the journal goes on growing).
        self.compaction_failures_total = 0
        self._compact_after = -math.inf  # no compaction before (trio time)
        # The cluster's metadata of every session, for snapshots (or None).
        self.meta_source: Callable[[], dict[str, bytes]] | None = None
        self._snapshot_metas: dict[str, bytes] = {}
        self._snapshot_sessions = 0  # in the copy when it was taken
        self._disk = _DiskThread("phpsess-journal", 0 if self.always else BACKGROUND_NICE)
        self._snapshot_disk = _DiskThread("phpsess-snapshot", BACKGROUND_NICE)

    # -- start

    def open(self, wall_now: float, mono_now: float) -> Restored:
        """Lock the directory, restore, open the journal.  Blocking: run it
        in a thread before serving."""
        try:
            os.makedirs(self.dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise DataDirError(
                f"cannot create data directory {self.dir}: {exc.strerror}; choose "
                "another with --data-dir"
            ) from exc
        try:
            self._lock.acquire()
        except OSError as exc:  # an unwritable or read-only directory, a full disk
            raise _unusable(self.dir, exc, self._lock.path) from exc
        try:
            self._check_writable()
            restored, self.gen = restore(self.dir, wall_now, mono_now)
            try:
                self._open_journal(self.gen)
            except OSError as exc:
                raise _unusable(self.dir, exc, self._journal_path()) from exc
            try:
                self._measure(restored)
            except OSError as exc:
                raise _unusable(self.dir, exc) from exc
        except BaseException:
            self._lock.release()
            raise
        if restored.old_format:
            log.info(
                "event=old_format_files files=%d detail=written by an older phpsess "
                "(format 1, unsalted checksums): new files are in format 2, which older "
                "versions cannot read, and a compaction now rewrites the sessions into "
                "them", restored.old_format,
            )
        return restored

    def _check_writable(self) -> None:
        """Fail the start, not the first compaction an hour later: the lock
        file and the newest journal may still be writable in a directory
        where no new file can be made (mode, owner, a read-only mount)."""
        probe = os.path.join(self.dir, "write-probe.tmp")  # restore removes *.tmp
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # no inode left
                raise _unusable(self.dir, exc, probe) from exc
            raise DataDirError(
                f"cannot create files in data directory {self.dir}: "
                f"{exc.strerror or exc}; phpsess makes a new journal and snapshot "
                "there at every compaction, so it must be writable by phpsess's "
                "user (check its owner and mode, and that it is not mounted "
                "read-only), or choose another with --data-dir"
            ) from exc

    def _measure(self, restored: Restored) -> None:
        """Size the files restore() kept besides the journal to append to
        (it deleted older generations'), for compaction_due."""
        snapshots, journals = _generations(self.dir)
        older = [snapshot_name(g) for g in snapshots]
        older += [journal_name(g) for g in journals if g != self.gen]
        self.older_bytes = sum(os.stat(os.path.join(self.dir, name)).st_size for name in older)
        journaled = self.journal_bytes > j.header_size(j.JOURNAL)
        # A snapshot alone holds exactly the sessions restored, unless some
        # expired while the daemon was down.
        self._stale = (
            restored.expired > 0 or journaled or any(g != self.gen for g in journals)
        )
        if restored.old_format:
            # Compacted at once (run()): no file of the old format is left.
            self._old_format = self._stale = True

    def _open_journal(self, gen: int) -> None:
        """Open journal ``gen`` (restore() checked it) to append to it with
        its own salt; a new one if it is empty.  One an older phpsess wrote
        (format 1) takes no more records: journal ``gen + 1`` is started,
        as a compaction would (restore reads both)."""
        path = os.path.join(self.dir, journal_name(gen))
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        old = False
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                salt = _new_salt()
                head = j.header(j.JOURNAL, salt)
                _write_all(fd, head)
                os.fsync(fd)
                _fsync_dir(self.dir)
                size = len(head)
            else:
                header = j.parse_header(os.pread(fd, j.MAX_HEADER_BYTES, 0), j.JOURNAL)
                if header is None:  # changed since restore() read it
                    raise OSError(errno.EINVAL, "not a phpsess journal (bad header)", path)
                salt = header.salt
                old = header.version != j.VERSION
        except BaseException:
            os.close(fd)
            raise
        if old:
            os.close(fd)
            self._open_journal(gen + 1)
            return
        self._fd = fd
        self.gen = gen
        self.salt = salt
        self.journal_bytes = size

    # -- event loop side

    def submit(self, changes: list[tuple[j.Op, str, int, bytes]], wall_now: float) -> int:
        """Queue changes for the journal (encoded by the writer, a batch per
        flush); returns their sequence number.  ``changes`` is kept: the
        caller hands it over."""
        self._pending.append((wall_now, changes))
        self._stale = True
        copy = self._superseded_from
        if copy is not None:
            # A compaction is encoding the store as it was at its switch:
            # a session written or removed since is superseded by its record
            # in the new journal, so the snapshot leaves it out (that
            # record is made durable before the snapshot counts: see
            # _write_snapshot).  A TOUCH changes no data: kept.
            for op, sid, _, _ in changes:
                if (op is j.Op.PUT or op is j.Op.DELETE) and copy.pop(sid, None) is not None:
                    self._superseded += 1
        self.submitted += 1
        if self._unsynced_since is None:
            self._unsynced_since = trio.current_time()
        self._work.set()
        return self.submitted

    def durable(self, seq: int) -> bool:
        """Whether change batch ``seq`` is already as durable as the policy
        wants (no wait): the reply's fast path, no coroutine.

        ``interval`` does not wait, unless the oldest change not yet fsynced
        is older than twice the interval (a slow or stalled disk; in steady
        state it is at most one interval and a flush old): then replies wait
        for the fsync, which keeps the loss window at two intervals and the
        memory held for the journal bounded.

        While the journal fails, raises :attr:`failure` for a batch that is
        not in it yet and was submitted before the failure (its change is
        made in memory and will be written if the disk comes back: it may
        or may not be stored), or for any such batch once the daemon stops
        for it."""
        if self.failure is not None:
            done = self.written if self.config.fsync == "never" else self.synced
            if seq > done:
                if self._stopping or seq <= self._failed_upto:
                    raise self.failure
                # Submitted since the failure: expiries (the shell refuses
                # changes), which no reply stands for.
                return True
        policy = self.config.fsync
        if policy == "never" or self.synced >= seq:
            return True
        if policy == "interval":
            since = self._unsynced_since
            return since is None or trio.current_time() - since <= 2 * self.config.fsync_interval_s
        return False

    async def wait_durable(self, seq: int) -> None:
        """Return once change batch ``seq`` is as durable as the policy wants
        (:meth:`durable`)."""
        if self.durable(seq):
            return
        while self.synced < seq:
            if self.failure is not None and self.durable(seq):  # raises, or expiries only
                return
            await self._progress.wait()

    def refusal(self) -> str | None:
        """While the journal fails: why a change is refused (nothing is
        stored), for the reply; else None."""
        failure = self.failure
        if failure is None:
            return None
        if self._stopping:
            return (
                f"the journal could not be written ({failure}); not stored; the daemon is "
                "stopping"
            )
        return (
            f"the journal cannot be written ({failure}); not stored: no change is taken "
            f"until it can be (retried every {JOURNAL_RETRY_S:g} s), reads go on"
        )

    def in_doubt(self, failure: JournalFailed) -> str:
        """The reply to a change made in memory whose journal write failed."""
        then = (
            "the daemon is stopping" if self._stopping
            else "it is written if the disk recovers; no change is taken until then"
        )
        return f"the journal write failed ({failure}): this change may or may not be stored; {then}"

    def statistics(self) -> dict[str, object]:
        """STATS fields of the journal: ``journal_failed`` 0 or 1, and while
        1, ``journal_error`` (why) and ``journal_unwritten_bytes``."""
        if self.failure is None:
            return {"journal_failed": 0}
        return {
            "journal_failed": 1,
            "journal_error": str(self.failure),
            "journal_unwritten_bytes": len(self._unwritten),
        }

    # -- writer task

    async def run(
        self,
        snapshot_source: Callable[[], SnapshotSource],
        live_bytes: Callable[[], int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        policy = self.config.fsync
        interval = self.config.fsync_interval_s
        if self._old_format:
            self._work.set()  # compact now, not after the idle wait
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                if self.failure is not None:
                    # The journal fails: the batch that failed (and the
                    # expiries since) are tried again now and then.
                    await trio.sleep_until(self._retry_at)
                elif not self._pending:
                    # Idle: wake now and then to check for compaction all
                    # the same (IDLE_COMPACT_CHECK_S).
                    deadline = trio.current_time() + IDLE_COMPACT_CHECK_S
                    if policy == "interval" and self.synced < self.written:
                        deadline = min(deadline, self._last_sync + interval)
                    with trio.move_on_at(deadline):
                        await self._work.wait()
                    self._work = trio.Event()
                if policy != "always":
                    # Gather a batch: one append per FLUSH_S under load, at
                    # once after a quiet spell.
                    await trio.sleep_until(self._last_flush + FLUSH_S)
                source: SnapshotSource | None = None
                try:
                    await self._write_round(policy, interval)
                    if self.failure is not None:
                        self._recovered()
                    live = live_bytes()  # about the size of a snapshot
                    due = self._old_format or compaction_due(
                        self.journal_bytes, self.older_bytes, live,
                        self.config.min_compact_bytes, self._stale,
                    )
                    if (due and not self._compacting
                            and trio.current_time() >= self._compact_after):
                        self._compacting = True
                        try:
                            await self._check_room(live)
                            source = await self._switch_generation(snapshot_source)
                        except _NotCreated as exc:
                            # Journal G still takes every write: a failed
                            # compaction only lets it grow.  Not a reason to
                            # stop serving; tried again later.
                            self._compacting = False
                            self._compaction_failed()
                            log.error(
                                "event=compaction_failed error=%s retry_in_s=%.0f%s",
                                exc.error, COMPACT_RETRY_S, exc.detail and " " + exc.detail,
                            )
                except OSError as exc:
                    # A disk that fails is not a reason to lie to PHP: waiters
                    # get the error, and changes are refused until the
                    # journal takes them again (or the daemon stops; systemd
                    # restarts it).  Writing G's tail at a switch is an
                    # append too.
                    failed = _journal_error(exc, self._journal_path())
                    if self.retry_failed_appends and not failed.lost:
                        self._failing(failed)
                        continue
                    log.critical("event=journal_write_failed error=%s", failed)
                    if self.failure is None:
                        self._failed_upto = self.submitted
                    self.failure = failed
                    self._stopping = True
                    self._progress.set()
                    # The requests waiting on the journal answer with the
                    # error (and new changes are refused) before the stop
                    # cancels their connections.
                    with trio.CancelScope(shield=True):
                        await trio.sleep(FAILED_GRACE_S)
                    raise failed from exc
                if source is not None:
                    nursery.start_soon(self._write_snapshot, source, self.gen)

    def _failing(self, failed: JournalFailed) -> None:
        """An append failed (single node): refuse changes, retry later."""
        now = trio.current_time()
        self._retry_at = now + JOURNAL_RETRY_S
        if self.failure is None:
            self.failure = failed
            self._failed_upto = self.submitted
            self._failed_since = self._failing_logged_at = now
            log.critical(
                "event=journal_write_failed error=%s unwritten_bytes=%d detail=changes "
                "are refused (nothing stored) and reads served until the journal can be "
                "written; the changes acknowledged but not yet in it are kept in memory "
                "and written then (retried every %g s)",
                failed, len(self._unwritten), JOURNAL_RETRY_S,
            )
            # Replies waiting on the journal answer with the error.
            self._progress.set()
            self._progress = trio.Event()
            return
        self.failure = failed
        if now - self._failing_logged_at >= FAILING_LOG_S:
            self._failing_logged_at = now
            log.error(
                "event=journal_still_failing error=%s seconds=%.0f unwritten_bytes=%d",
                failed, now - self._failed_since, len(self._unwritten),
            )

    def _recovered(self, then: str = "changes are taken again") -> None:
        log.warning(
            "event=journal_recovered seconds=%.1f detail=the changes kept in memory are "
            "written; %s", trio.current_time() - self._failed_since, then,
        )
        self.failure = None

    async def _write_round(self, policy: str, interval: float) -> None:
        now = self._last_flush = trio.current_time()
        if self._pending or self._unwritten:
            # After a failed append, its batch goes first (whole or nothing).
            # _unwritten is in this journal's salt: a switch happens only
            # after a round that wrote it.
            buf = self._unwritten + j.encode_changes(self._pending, self.salt)
            self._unwritten = b""
            self._pending = []
            seq = self.submitted
            due = now - self._last_sync >= interval or self._sync_soon
            sync = policy == "always" or (policy == "interval" and due)
            try:
                await self._disk.run(lambda: self._append(buf, sync))
            except OSError:
                self._unwritten = buf
                raise
            self.journal_bytes += len(buf)
            self.written = seq
            if sync:
                self._synced_to(seq, now)
        elif policy == "interval" and self.synced < self.written:
            seq = self.written
            await self._disk.run(self._fsync)
            self._synced_to(seq, now)
        else:
            return
        self._progress.set()
        self._progress = trio.Event()

    def _synced_to(self, seq: int, taken_at: float) -> None:
        """Batches up to ``seq``, taken from the queue at ``taken_at``, are fsynced."""
        self._sync_soon = False
        self.synced = max(self.synced, seq)
        self._last_sync = taken_at
        self._unsynced_since = None if self.submitted <= seq else taken_at

    def _journal_path(self, gen: int | None = None) -> str:
        return os.path.join(self.dir, journal_name(self.gen if gen is None else gen))

    def _append(self, buf: bytes, sync: bool) -> None:
        # Files deleted from under us: appending to an unlinked journal
        # would acknowledge writes that no restart can find.  No retry can
        # mend that: the daemon stops (systemd restarts it).
        st = os.fstat(self._fd)
        if st.st_nlink == 0:
            raise _Lost(
                errno.ENOENT,
                f"{os.path.join(self.dir, journal_name(self.gen))} was deleted while in use "
                "(files removed from the data directory?)",
            )
        try:
            self._lock.check()
        except OSError as exc:
            raise _Lost(exc.errno, exc.strerror) from exc
        _append_whole(self._fd, buf, st.st_size)
        if sync:
            self._fsync()

    def _fsync(self) -> None:
        started = time.monotonic()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _Lost(exc.errno, exc.strerror or str(exc)) from exc
        self.fsyncs_total += 1
        self.fsync_seconds_total += time.monotonic() - started

    async def _check_room(self, estimate_bytes: int) -> None:
        """Raise :class:`_NotCreated` unless the disk has room for a snapshot
        of about ``estimate_bytes`` and its margin (:func:`journal.snapshot_fits`):
        a snapshot that fills the disk would make the journal's appends fail,
        and the daemon stop."""
        try:
            free = await trio.to_thread.run_sync(_free_bytes, self.dir)
        except OSError as exc:
            raise _NotCreated(exc) from exc
        if j.snapshot_fits(estimate_bytes, free):
            return
        assert free is not None  # an unknown is no reason to refuse
        needed = j.snapshot_needs(estimate_bytes)
        raise _NotCreated(
            f"not enough free space in {self.dir} for a snapshot",
            f"needed_bytes={needed} free_bytes={free} detail=the snapshot (about "
            f"{_mib(estimate_bytes)}) and its margin need {_mib(needed)} free, "
            f"{_mib(free)} is free; until there is room the journal takes every "
            "write and grows: free space on that disk",
        )

    async def _switch_generation(
        self, snapshot_source: Callable[[], SnapshotSource]
    ) -> SnapshotSource:
        """Start journal G+1 at one instant of the event loop (module doc)."""
        new_gen = self.gen + 1
        new_path = os.path.join(self.dir, journal_name(new_gen))
        new_salt = _new_salt()
        new_header = j.header(j.JOURNAL, new_salt)

        def create() -> int:
            fd = os.open(new_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, new_header)
                os.fsync(fd)
                _fsync_dir(self.dir)
            except BaseException:
                # Nothing is journaled in it yet: G stays the journal.
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(new_path)
                raise
            return fd

        try:
            new_fd = await trio.to_thread.run_sync(create, abandon_on_cancel=False)
        except OSError as exc:
            raise _NotCreated(exc) from exc
        # -- one instant: everything before is in G (or its pending tail), after in G+1.
        taken = self._pending
        tail = j.encode_changes(taken, self.salt)  # G's tail, in G's salt
        self._pending = []
        seq = self.submitted
        switched_at = trio.current_time()
        source = snapshot_source()
        self._superseded_from = source.entries
        self._superseded = 0
        # Counted now: from here on submit() takes superseded sessions out
        # of the copy (and counts them in _superseded).
        self._snapshot_sessions = len(source.entries)
        metas = self.meta_source() if self.meta_source is not None else {}
        old_fd = self._fd
        self._fd = new_fd
        self.gen = new_gen
        self.salt = new_salt
        self.older_bytes += self.journal_bytes + len(tail)
        self.journal_bytes = len(new_header)
        self._stale = False  # the copy is the store as of now
        # --

        old_path = self._journal_path(new_gen - 1)

        def finish_old() -> None:
            try:
                _append_whole(old_fd, tail)
                _sync(old_fd)
            except OSError as exc:
                raise _journal_error(exc, old_path) from exc
            finally:
                os.close(old_fd)

        # The tail is in no queue any more: this must run even if the daemon
        # is stopping (to_thread.run_sync checks for cancellation before it
        # starts the thread), or acknowledged changes are lost.
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(finish_old, abandon_on_cancel=False)
        except BaseException:
            # Not written to G (or not all of it, or not fsynced): back in
            # the queue, ahead of what came since, for G+1 (the retries or
            # close() write it there).  Replaying a change twice gives the
            # same sessions.  No snapshot follows.
            self._pending[:0] = taken
            self._superseded_from = None
            self._compacting = False
            self._stale = True
            raise
        self.written = max(self.written, seq)
        self._synced_to(seq, switched_at)
        self._progress.set()
        self._progress = trio.Event()
        self._snapshot_metas = metas
        return source

    async def _write_snapshot(self, source: SnapshotSource, gen: int) -> None:
        """Write ``source`` as snapshot ``gen``, then delete the older files.

        The records are encoded here, in the event loop, a slice of about
        ``_SLICE_BYTES`` at a time with a checkpoint between slices; only the
        file operations run in a thread.  Encoding in a thread instead made
        that thread and the event loop fight over the GIL: every time the loop
        gave the GIL up for a syscall it waited up to a switch interval (5 ms)
        to get it back, which put p99 latency at tens of milliseconds during
        every compaction.  Cancelled (the daemon stopping), it removes its
        temporary file; the previous generation still restores everything."""
        started = time.monotonic()
        count = self._snapshot_sessions
        path = os.path.join(self.dir, snapshot_name(gen))
        tmp = path + ".tmp"
        fd = -1
        try:
            fd = await trio.to_thread.run_sync(
                lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            )
            salt = _new_salt()
            parts = [j.header(j.SNAPSHOT, salt)]
            size = total = len(parts[0])
            slices = j.snapshot_chunks(
                _emptied(source.entries), source.offset, self._snapshot_metas.items(),
                _SLICE_BYTES, salt=salt,
            )
            for piece in slices:
                parts.append(piece)
                size += len(piece)
                total += len(piece)
                if size >= _WRITE_CHUNK:
                    await self._write_out(fd, parts)
                    parts = []
                    size = 0
                else:
                    await trio.sleep(0)
            # Encoded: what the copy lost meanwhile is in the new journal.
            # Those records must be as durable as the snapshot before it
            # replaces the old generation.
            self._superseded_from = None
            superseded_up_to = self.submitted
            await self._write_out(fd, parts)
            await self._journaled(superseded_up_to)
            if self.config.fsync == "never":
                # Handed to the kernel is not enough here: once the old
                # generation is deleted, a power loss that took those
                # records would lose the whole sessions, not their last
                # write.  One fdatasync per compaction.
                await self._disk.run(self._fsync)
            out_fd, fd = fd, -1
            await self._snapshot_disk.run(lambda: self._finish_snapshot(out_fd, tmp, path, gen))
        except OSError as exc:
            log.error("event=snapshot_failed generation=%d error=%s", gen, exc)
            self._compaction_failed()
            return
        finally:
            self._compacting = False
            self._superseded_from = None
            # The journal may have outgrown the live data meanwhile (a burst
            # of writes): the writer checks again even if no write follows.
            self._work.set()
            if fd >= 0:  # failed or cancelled half way: the tmp file goes
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        # Generation gen's snapshot is all that is left beside its journal.
        self.older_bytes = total
        self._old_format = False
        self.compactions_total += 1
        log.info(
            "event=compacted generation=%d sessions=%d superseded=%d seconds=%.3f",
            gen,
            count - self._superseded,
            self._superseded,
            time.monotonic() - started,
        )

    def _compaction_failed(self) -> None:
        self.compaction_failures_total += 1
        self._stale = True  # the files it was to replace are all still there
        self._compact_after = trio.current_time() + COMPACT_RETRY_S

    async def _journaled(self, seq: int) -> None:
        """Wait until change batch ``seq`` is in the journal: fsynced, or
        handed to the kernel under ``never``."""
        never = self.config.fsync == "never"
        while (self.written if never else self.synced) < seq:
            if self.failure is not None:
                raise self.failure
            self._sync_soon = not never
            self._work.set()
            await self._progress.wait()

    async def _write_out(self, fd: int, parts: list[bytes]) -> None:
        data = b"".join(parts)
        await self._snapshot_disk.run(lambda: _write_all(fd, data))

    def _finish_snapshot(self, fd: int, tmp: str, path: str, gen: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        snapshots, journals = _generations(self.dir)
        for old in snapshots:
            if old < gen:
                os.unlink(os.path.join(self.dir, snapshot_name(old)))
        for old in journals:
            if old < gen:
                os.unlink(os.path.join(self.dir, journal_name(old)))

    async def close(self) -> None:
        """Write and fsync everything submitted; release the directory."""
        if self._fd >= 0:
            buf = self._unwritten + j.encode_changes(self._pending, self.salt)
            self._pending = []
            self._unwritten = b""
            seq = self.submitted

            path = self._journal_path()

            def final() -> None:
                try:
                    # Also after a failed append (cut off again, whole or
                    # nothing): space may have come back.
                    _append_whole(self._fd, buf)
                    os.fsync(self._fd)
                finally:
                    os.close(self._fd)

            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(final)
            except OSError as exc:
                failed = _journal_error(exc, path)
                if self.failure is None:
                    log.critical("event=journal_write_failed error=%s", failed)
                if buf:
                    log.error(
                        "event=journal_unwritten bytes=%d error=%s detail=changes acknowledged "
                        "before the failure (with --fsync interval or never) are not in the "
                        "journal", len(buf), failed,
                    )
                if not self._stopping:
                    raise failed from exc
                # Stopping for that failure already (run() raised it): this
                # was the last try.
            else:
                if self.failure is not None and not self._stopping:
                    self._recovered("at the stop")  # the last try worked
                self.written = self.synced = seq
                self._progress.set()
            finally:
                self._disk.stop()
                self._snapshot_disk.stop()
                self._fd = -1
                self._lock.release()
        else:
            self._lock.release()


def store_snapshot_source(
    entries: dict[str, Raw], mono_now: float, wall_now: float
) -> SnapshotSource:
    """A copy of the store, for a snapshot written with wall-clock expiries."""
    return SnapshotSource(entries, wall_now - mono_now)
