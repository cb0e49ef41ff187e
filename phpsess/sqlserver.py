"""The SQL storage backend's Trio shell (``--storage mysql://...``): client
connections served from a table in MySQL / MariaDB / MySQL Cluster instead of
the in-memory engine.  The statements, schema and lock names are in the pure
:mod:`phpsess.sqlstore`; its module doc is the theory of operation.

Driver: PyMySQL, blocking, called from worker threads
(``trio.to_thread.run_sync``) through a bounded pool of connections.  It is
pure Python (no compiler, no libmysqlclient), maintained, speaks both MySQL
and MariaDB, and a blocking call in a thread is the one model where a lock
wait (``GET_LOCK`` blocks server-side) costs nothing but a parked thread.
The threads are limited to the pool's size, so the database sees at most
``pool_size`` connections from each daemon.

Failures: any driver error discards that connection and becomes
``ERR UNAVAILABLE`` for the request (PHP's session_start() or write then fails
cleanly; the daemon keeps serving).  A write is acknowledged only after the
database committed it (autocommit), in a strict session (``sql_mode``), so a
value too long for its column is an error, never a truncation.  Pooled
connections are re-made on demand, so service resumes by itself once the
database is back; a reused one found dead (the database restarted) drops
the idle ones and the statement is retried once on a new one, for a lock
request too as long as no lock is held on it.  Locks held on a pinned
connection that broke are gone (the database released them with the
session): the request that finds it broken gets ``ERR UNAVAILABLE``, later
writes under those locks ``ERR LOCK_LOST``, never a silent overwrite.

At start the table is created if missing and checked (its columns, by
:func:`phpsess.sqlstore.schema_problems`): one that cannot hold the sessions,
or an engine that cannot hold the table, stops the daemon with a message
saying what to do.  The database's ``max_allowed_packet`` is read then too:
a WRITE whose statement would exceed it is refused with ``ERR TOO_LARGE``
before it is sent (sent, the database would drop the connection and the
locks on it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import attrs
import pymysql
import pymysql.connections
import trio
from pymysql.constants import CLIENT

from phpsess import netio
from phpsess import protocol as p
from phpsess import sqlstore as sq
from phpsess.engine import (
    _ALPHABETS,
    VERB_NAMES,
    VERSION,
    hello_refusal,
    hello_wait_and_lease,
    too_many_locks,
    verb_breakdown,
)
from phpsess.logs import quoted, sid_tag

if TYPE_CHECKING:
    from phpsess.server import Server, _Conn

log = logging.getLogger("phpsess")

T = TypeVar("T")
if TYPE_CHECKING:  # generic only in the type stubs
    Connection: TypeAlias = pymysql.connections.Connection[Any]
else:
    Connection = pymysql.connections.Connection

# Pooled connections idle longer than this are re-made rather than trusted.
_POOL_IDLE_MAX_S: Final = 60.0
# Extra threads beyond the pool: KILLs and closes while every slot is busy.
_SPARE_THREADS: Final = 4
# Errors that mean the database refuses us for good (not "down for now").
# Access denied (database, user), unknown database, command denied, unknown
# storage engine, unix-socket authentication refused.
_FATAL_AT_START: Final = frozenset({1044, 1045, 1049, 1142, 1286, 1698})
_UNKNOWN_ENGINE: Final = 1286  # its own message: not a matter of users and grants
# Errors that mean the table cannot be used as it is (met at start: fatal;
# the same table would fail every request).  Can't create table, the
# engine lacks an option, unknown column, key too long, row size too large,
# unknown table, the engine cannot hold BLOBs, BLOB in a key, field without
# default, data too long, the engine refuses a create option.
_SCHEMA_ERRORS: Final = frozenset(
    {1005, 1031, 1054, 1071, 1118, 1146, 1163, 1170, 1364, 1406, 1478}
)
# STATS and a metrics scrape wait this long for the count of sessions
# (README "SQL storage": "given 2 s"); then they answer without it.
STATS_TIMEOUT_S: Final = 2.0


class Unavailable(Exception):
    """The database cannot serve this request now; the message says why."""


class _Gone(Exception):
    """The PHP client disconnected while its request waited for a lock."""


class _Refused(Exception):
    """The table cannot hold the sessions; the message says why and what to do."""


@attrs.define(slots=True, eq=False)
class _Client:
    wait_s: float
    lease_s: float
    hello: bool = False
    pinned: Connection | None = None  # holds this client's named locks
    held: dict[str, float] = attrs.field(factory=dict)  # sid -> lease deadline
    revoked: set[str] = attrs.field(factory=set)
    # Held locks granted after the session was destroyed while this client
    # waited for them (PROTOCOL.md §4.1 MISS DESTROYED while no live row is
    # there; sqlstore's module doc), as the engine's marked locks: sid -> the
    # tombstone's expires (its stamp).  Keys are a subset of held's.
    destroyed: dict[str, object] = attrs.field(factory=dict)


class Pool:
    """At most ``size`` connections, idle ones kept for reuse."""

    def __init__(self, connect: Callable[[], Connection], size: int,
                 limiter: trio.CapacityLimiter) -> None:
        self.connect = connect
        self._slots = trio.Semaphore(size)
        self._idle: list[tuple[Connection, float]] = []
        self._limiter = limiter
        self.size = size

    async def acquire(self, timeout_s: float) -> tuple[Connection, bool]:
        """A connection and whether it is fresh (not reused)."""
        with trio.move_on_after(timeout_s) as waited:
            await self.acquire_slot()
        if waited.cancelled_caught:
            raise Unavailable(
                f"all {self.size} database connections stayed busy for {timeout_s:g} s; "
                "raise [storage] pool_size or the database's max_connections"
            )
        try:
            conn = self.take_idle()
            if conn is not None:
                return conn, False
            try:
                return await trio.to_thread.run_sync(self.connect, limiter=self._limiter), True
            except (pymysql.err.Error, OSError) as exc:
                raise Unavailable(describe(exc)) from exc
        except BaseException:
            self._slots.release()
            raise

    async def acquire_slot(self) -> None:
        """One of the ``size`` slots: :meth:`release` or :meth:`forget` it."""
        await self._slots.acquire()

    def take_idle(self) -> Connection | None:
        """An idle connection still to be trusted, for a slot taken."""
        now = trio.current_time()
        while self._idle:
            conn, used = self._idle.pop()
            if now - used < _POOL_IDLE_MAX_S and conn.open:
                return conn
            _close_quietly(conn)
        return None

    def release(self, conn: Connection, *, broken: bool = False) -> None:
        if broken or not conn.open:
            _close_quietly(conn)
        else:
            self._idle.append((conn, trio.current_time()))
        self._slots.release()

    def forget(self, conn: Connection | None) -> None:
        """Give up the slot of a connection a thread may still be using."""
        self._slots.release()

    def discard_idle(self) -> None:
        """After an error, trust no idle connection (the database restarted)."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            _close_quietly(conn)

    def close(self) -> None:
        self.discard_idle()


def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # already closed or broken
        conn.close()


class _Abandoned(Exception):
    """A worker thread given up before it began."""


class _Handoff:
    """A connection that a worker thread uses for a Trio task which may stop
    waiting for it (``abandon_on_cancel=True``: a blocking driver call
    cannot be interrupted).  If the task gives up, whichever of the two
    comes last closes the connection: it never goes back to the pool in the
    middle of a statement, nor stays open unused."""

    def __init__(self, conn: Connection | None) -> None:
        self.conn = conn  # None: the thread connects
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False
        self.finished = False

    def run(self, connect: Callable[[], Connection], fn: Callable[[Connection], T]) -> T:
        """In the worker thread: ``fn`` on the connection (made if needed)."""
        with self._lock:
            if self._abandoned:
                self.finished = True
                raise _Abandoned  # never reported: the task is gone
            self._started = True
        try:
            if self.conn is None:
                self.conn = connect()
            return fn(self.conn)
        finally:
            with self._lock:
                self.finished = True
                close = self._abandoned
            if close and self.conn is not None:
                _close_quietly(self.conn)

    def abandon(self) -> None:
        """In the Trio task, which stops waiting for the thread."""
        with self._lock:
            self._abandoned = True
            close = self.finished or not self._started
            if not self._started:
                self.finished = True
        if close and self.conn is not None:
            _close_quietly(self.conn)


def describe(exc: BaseException) -> str:
    """A one-line, printable description of a driver error."""
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 2 and isinstance(args[0], int):
        text = f"{args[0]}: {args[1]}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join("".join(c if " " <= c <= "~" else "?" for c in text).split())[:300]


# -- statements run in worker threads


def _scalar(sql: str, args: tuple[object, ...]) -> Callable[[Connection], object]:
    def run(conn: Connection) -> object:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            row = cur.fetchone()
            return None if row is None else row[0]
    return run


def _row(sql: str, args: tuple[object, ...]) -> Callable[[Connection], tuple[object, ...] | None]:
    def run(conn: Connection) -> tuple[object, ...] | None:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            row = cur.fetchone()
            return None if row is None else tuple(row)
    return run


def _rows(sql: str, args: tuple[object, ...]) -> Callable[[Connection], list[tuple[object, ...]]]:
    def run(conn: Connection) -> list[tuple[object, ...]]:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return [tuple(row) for row in cur.fetchall()]
    return run


def _count(sql: str, args: tuple[object, ...]) -> Callable[[Connection], int]:
    """Rows matched (the connection has CLIENT.FOUND_ROWS)."""
    def run(conn: Connection) -> int:
        with conn.cursor() as cur:
            return int(cur.execute(sql, args))
    return run


def connect_function(config: sq.SqlConfig, wait_timeout_s: int) -> Callable[[], Connection]:
    """A function making one connection as the backend needs it."""

    def connect() -> Connection:
        return pymysql.connect(
            host=config.host, port=config.port, unix_socket=config.unix_socket,
            user=config.user, password=config.password, database=config.database,
            autocommit=True, charset="utf8mb4", binary_prefix=True,
            client_flag=CLIENT.FOUND_ROWS,
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s, write_timeout=config.read_timeout_s,
            # A daemon that hangs holding locks: the database ends the idle
            # pinned session after the lease (and releases its locks).  And
            # strict, whatever the global sql_mode: a value too long for its
            # column is an error, never silently truncated.
            init_command=(
                f"SET SESSION wait_timeout = {int(wait_timeout_s)}, {sq.STRICT_SQL_MODE}"
            ),
        )

    return connect


class SqlBackend:
    """Serves client connections from the SQL table (PROTOCOL.md semantics)."""

    def __init__(self, config: sq.SqlConfig, server: Server) -> None:
        self.config = config
        self.server = server
        self.sql = sq.Statements(config.table, config.engine)
        self._limiter = trio.CapacityLimiter(config.pool_size + _SPARE_THREADS)
        lease_s = server.config.limits.lock_lease_s
        self.pool = Pool(
            connect_function(config, math.ceil(lease_s) + 60), config.pool_size, self._limiter
        )
        self._clients: dict[int, _Client] = {}
        self._down: str | None = None  # why the database is failing, while it is
        self._started = trio.current_time()
        self.locks_waiting = 0
        self.lock_waits_total = 0
        self.lock_timeouts_total = 0
        self.lock_revoked_total = 0
        self.expired_total = 0
        self._expired_at_last_gc = 0
        self.requests_total = 0
        self.errors_total = 0
        self._verb_counts: dict[type, int] = {}
        self._abandoned: _Handoff | None = None  # the last call _bounded gave up on
        # Why the table cannot be used, found once the database answered
        # after a start without it (at start it is fatal).
        self._refused: str | None = None
        # The database's, once read (None: not yet, WRITEs are not checked).
        self.max_allowed_packet: int | None = None

    # -- lifecycle

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the table, then purge expired rows every purge interval."""
        from phpsess.server import StartupError

        schema_ok = False
        try:
            await self._prepare()
            schema_ok = True
        except _Refused as exc:
            raise StartupError(str(exc)) from exc
        except Unavailable as exc:
            cause = exc.__cause__
            code = _driver_code(exc)
            if code == _UNKNOWN_ENGINE:
                raise StartupError(
                    f"storage {self.config.url}: the database has no storage engine "
                    f"{self.config.engine} ({describe(cause) if cause is not None else exc}): "
                    "give --storage-engine one it has (InnoDB), or use a server that has it"
                ) from exc
            if code in _FATAL_AT_START:
                raise StartupError(
                    f"storage {self.config.url}: {exc} (check the user, its password, the "
                    "database and its grants: the user needs CREATE, SELECT, INSERT, UPDATE, "
                    "DELETE on the database)"
                ) from exc
            log.warning("event=storage_unreachable storage=%s detail=%s", quoted(self.config.url),
                        quoted(f"{exc}; serving ERR UNAVAILABLE until it is back"))
        task_status.started()
        try:
            while True:
                # Until the table has been checked (the database was down at
                # start): every second, so that requests meet its refusal or
                # its max_allowed_packet soon after it is back.
                await trio.sleep(self.config.purge_interval_s if schema_ok else 1.0)
                try:
                    if schema_ok:
                        # An operator may change it (as the warning advises).
                        await self._read_packet_limit()
                    else:
                        # The database was unreachable at start: check now.
                        try:
                            await self._prepare()
                        except _Refused as exc:
                            if self._refused is None:
                                log.error("event=storage_refused storage=%s detail=%s",
                                          quoted(self.config.url), quoted(str(exc)))
                            self._refused = str(exc)
                            continue
                        self._refused = None
                        schema_ok = True
                    await self.purge()
                except Unavailable:
                    pass  # logged once by _call; retried next interval
        finally:
            self.pool.close()

    async def _prepare(self) -> None:
        """Create the table if missing and check that it can hold the
        sessions (else :class:`_Refused`, saying what to do); read the
        database's max_allowed_packet, which bounds a WRITE's size."""
        table = f"{self.config.database}.{self.config.table}"
        try:
            await self._pooled(_count(self.sql.create, ()))
            rows = await self._pooled(_rows(self.sql.columns, (self.config.table,)))
        except Unavailable as exc:
            cause = exc.__cause__
            if _driver_code(exc) not in _SCHEMA_ERRORS:
                raise
            raise _Refused(
                f"storage table {table} (engine {self.config.engine} if created here) cannot "
                f"be used: {describe(cause) if cause is not None else exc}. Use an engine that "
                "holds BLOBs in a table of the shape README \"SQL storage\" shows (InnoDB, or "
                "ndbcluster): give --storage-table a new name (it is created) or fix the table"
            ) from exc
        max_session_bytes = self.server.config.limits.max_session_bytes
        problems = sq.schema_problems(rows, max_session_bytes)
        if problems:
            raise _Refused(sq.schema_refusal(self.config, problems))
        await self._read_packet_limit()
        log.info("event=storage_ready storage=%s table=%s engine=%s",
                 quoted(self.config.url), self.config.table, self.config.engine)

    async def _read_packet_limit(self) -> None:
        """Read the database's max_allowed_packet (at start, then at every
        purge: it may be raised as the warning advises, or lowered); warn
        when a session of --max-session-bytes does not fit in it, once per
        value."""
        max_session_bytes = self.server.config.limits.max_session_bytes
        # The global value: a connection keeps the one it started with, so
        # the idle ones are renewed when it changed (those holding locks
        # keep theirs until their request ends).
        packet = await self._pooled(_scalar("SELECT @@GLOBAL.max_allowed_packet", ()))
        before, self.max_allowed_packet = self.max_allowed_packet, int(str(packet))
        if before is not None and self.max_allowed_packet != before:
            self.pool.discard_idle()
            log.info("event=storage_packet_changed storage=%s max_allowed_packet=%d was=%d",
                     quoted(self.config.url), self.max_allowed_packet, before)
        if (self.max_allowed_packet != before
                and sq.write_packet_bytes(max_session_bytes) > self.max_allowed_packet):
            log.warning(
                "event=storage_packet_small storage=%s max_allowed_packet=%d "
                "max_session_bytes=%d detail=%s", quoted(self.config.url),
                self.max_allowed_packet, max_session_bytes,
                quoted(f"a session is sent as twice its size, so sessions over "
                       f"{sq.largest_write(self.max_allowed_packet)} bytes are refused "
                       f"(TOO_LARGE): raise the database's max_allowed_packet to at least "
                       f"{sq.write_packet_bytes(max_session_bytes)} or lower "
                       f"--max-session-bytes to "
                       f"{sq.largest_write(self.max_allowed_packet)} (read again every "
                       f"{self.config.purge_interval_s:g} s)"))

    async def purge(self) -> int:
        """Delete expired rows (reads already ignore them), in batches, and
        old tombstones of destroyed sessions (not counted: they had ended)."""
        total = 0
        while True:
            n = await self._pooled(_count(self.sql.purge, ()))
            total += n
            if n < sq.PURGE_BATCH:
                break
        keep_s = math.ceil(self.server.config.limits.lock_wait_s) + sq.TOMBSTONE_KEEP_S
        while await self._pooled(
            _count(self.sql.purge_tombstones, (keep_s,))
        ) >= sq.PURGE_BATCH:
            pass
        self.expired_total += total
        if total:
            log.debug("event=purged rows=%d", total)
        return total

    # -- database calls

    async def _call(self, conn: Connection, fn: Callable[[Connection], T], *,
                    abandon: bool = False) -> T:
        try:
            result = await trio.to_thread.run_sync(
                fn, conn, limiter=self._limiter, abandon_on_cancel=abandon
            )
        except (pymysql.err.Error, OSError) as exc:
            raise self._failed(exc) from exc
        self._answered()
        return result

    def _failed(self, exc: BaseException) -> Unavailable:
        why = describe(exc)
        if self._down is None:
            log.warning("event=storage_failing storage=%s detail=%s",
                        quoted(self.config.url), quoted(why))
        self._down = why
        return Unavailable(
            f"the session database {self.config.url} failed ({why}); "
            "sessions are unavailable until it is back"
        )

    def _answered(self) -> None:
        if self._down is not None:
            log.info("event=storage_recovered storage=%s", quoted(self.config.url))
            self._down = None

    async def _bounded(self, fn: Callable[[Connection], T], timeout_s: float) -> T:
        """``fn`` on a pooled connection, as :meth:`_pooled`, but Unavailable
        after ``timeout_s`` even while the database hangs: the worker thread
        is then abandoned, and the connection it uses is closed once it
        returns, never put back in the pool (:class:`_Handoff`).  While a
        call given up on still runs, later ones fail at once: a hung database
        costs no more threads and connections than the calls running when it
        hung."""
        if self._abandoned is not None and not self._abandoned.finished:
            raise Unavailable(
                f"the session database {self.config.url} has not answered an earlier "
                "query yet"
            )
        with trio.move_on_after(timeout_s):
            for attempt in (1, 2):
                await self.pool.acquire_slot()
                call = _Handoff(self.pool.take_idle())
                reused = call.conn is not None
                try:
                    result = await trio.to_thread.run_sync(
                        call.run, self.pool.connect, fn,
                        limiter=self._limiter, abandon_on_cancel=True,
                    )
                except (pymysql.err.Error, OSError) as exc:
                    # The thread returned: the connection is ours to close.
                    if call.conn is None:
                        self.pool.forget(None)
                    else:
                        self.pool.release(call.conn, broken=True)
                    self.pool.discard_idle()
                    if reused and attempt == 1:
                        continue  # the database restarted: a fresh connection
                    raise self._failed(exc) from exc
                except BaseException:
                    call.abandon()
                    self._abandoned = call
                    self.pool.forget(call.conn)
                    raise
                assert call.conn is not None
                self.pool.release(call.conn)
                self._answered()
                return result
        raise Unavailable(
            f"the session database {self.config.url} did not answer within {timeout_s:g} s"
        )

    async def _pooled(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a pooled connection; a reused one that turns out
        dead (the database restarted) is replaced once (every statement
        run this way is idempotent)."""
        for attempt in (1, 2):
            conn, fresh = await self._acquire()
            try:
                result = await self._call(conn, fn)
            except Unavailable:
                self.pool.release(conn, broken=True)
                self.pool.discard_idle()
                if fresh or attempt == 2:
                    raise
                continue
            self.pool.release(conn)
            return result
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[Connection, bool]:
        """A pooled connection and whether it is new (else reused)."""
        try:
            return await self.pool.acquire(self.config.read_timeout_s)
        except Unavailable as exc:
            self._note_unreachable(exc)
            raise

    def _note_unreachable(self, exc: Unavailable) -> None:
        why = str(exc)
        if self._down is None:
            log.warning("event=storage_failing storage=%s detail=%s", quoted(self.config.url),
                        quoted(why))
        self._down = why

    async def _pinned(self, client: _Client, fn: Callable[[Connection], T], *,
                      abandon: bool = False) -> T:
        conn = client.pinned
        assert conn is not None
        try:
            return await self._call(conn, fn, abandon=abandon)
        except Unavailable:
            self._lose_pinned(client)
            raise

    async def _pin_and_run(self, client: _Client, fn: Callable[[Connection], T]) -> T:
        """``fn`` on the client's pinned connection, pinning a pooled one if
        it has none.  A reused one that turns out dead (the database
        restarted) is replaced once, as in :meth:`_pooled`: no lock is held
        on a connection just pinned, so nothing is lost by retrying."""
        if client.pinned is not None:
            return await self._pinned(client, fn)
        for attempt in (1, 2):
            conn, fresh = await self._acquire()
            client.pinned = conn
            try:
                return await self._pinned(client, fn)
            except Unavailable:
                # _pinned released it as broken; the others idle are as stale.
                self.pool.discard_idle()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _lose_pinned(self, client: _Client, *, in_use: bool = False) -> None:
        """The pinned connection broke: the database released its locks."""
        conn = client.pinned
        client.pinned = None
        client.destroyed.clear()
        if client.held:
            self.lock_revoked_total += len(client.held)
            client.revoked.update(client.held)
            client.held.clear()
        if conn is not None:
            if in_use:
                self.pool.forget(conn)
            else:
                self.pool.release(conn, broken=True)

    def _unpin_if_idle(self, client: _Client) -> None:
        if client.pinned is not None and not client.held:
            self.pool.release(client.pinned)
            client.pinned = None

    # -- locks

    def _name(self, sid: str) -> str:
        return sq.lock_name(self.config.lock_scope, sid)

    async def _release(self, client: _Client, sid: str) -> None:
        if client.held.pop(sid, None) is None:
            return
        with contextlib.suppress(Unavailable):  # a broken connection took the lock
            if client.destroyed.pop(sid, None) is not None:
                # It held the dead ID: EXISTS no longer sees it as held so.
                await self._pinned(client, _count(self.sql.unclaim, (sq.sid_bytes(sid),)))
            await self._pinned(client, _count(sq.RELEASE_LOCK, (self._name(sid),)))
        self._unpin_if_idle(client)

    async def _release_all(self, client: _Client) -> None:
        for sid in list(client.held):
            await self._release(client, sid)
        self._unpin_if_idle(client)

    async def _lock(self, conn: _Conn, client: _Client, parser: p.RequestParser,
                    sid: str) -> p.Error | object:
        """Take the lock on ``sid`` for ``client`` (re-entrant); an error
        reply, or once held, the database's time when this request began to
        wait for it (None if it did not wait).  Raises _Gone if the client
        vanished."""
        if sid in client.held:
            return None
        limits = self.server.config.limits
        if len(client.held) >= limits.max_locks_per_connection:
            self.errors_total += 1
            return too_many_locks(limits)
        client.revoked.discard(sid)  # PROTOCOL.md §6.3: a new locking READ
        name = self._name(sid)
        first = await self._pin_and_run(client, _row(sq.GET_LOCK_AT, (name, 0)))
        assert first is not None
        pinned = client.pinned
        assert pinned is not None
        got, since = first
        if got == 1:
            since = None
        if got != 1 and client.wait_s > 0:
            self.lock_waits_total += 1
            self.locks_waiting += 1
            try:
                got = await self._wait_lock(conn, client, parser, pinned, name)
            finally:
                self.locks_waiting -= 1
        if got != 1:
            self.lock_timeouts_total += 1
            self._unpin_if_idle(client)
            return self._error(
                p.Code.LOCK_TIMEOUT,
                f"session is locked by another request; gave up after waiting "
                f"{client.wait_s:g} s (wait_ms); the lock holder may be slow or stuck",
            )
        client.held[sid] = trio.current_time() + client.lease_s
        return since

    async def _wait_lock(self, conn: _Conn, client: _Client, parser: p.RequestParser,
                         pinned: Connection, name: str) -> object:
        """GET_LOCK in slices until granted or ``wait_s``, while watching
        the client: if it goes away, its waiting database session is killed."""
        deadline = trio.current_time() + client.wait_s
        thread_id: int = pinned.thread_id()  # type: ignore[no-untyped-call]
        result: object = 0
        failure: Unavailable | None = None
        gone = False

        async def wait(cancel: trio.CancelScope) -> None:
            nonlocal result, failure
            try:
                while True:
                    remaining = deadline - trio.current_time()
                    if remaining <= 0:
                        result = 0
                        break
                    slice_s = round(min(remaining, sq.LOCK_SLICE_S), 3)
                    result = await self._call(
                        pinned, _scalar(sq.GET_LOCK, (name, slice_s)), abandon=True
                    )
                    if result != 0:
                        break
            except Unavailable as exc:
                failure = exc
            cancel.cancel()

        async def watch(cancel: trio.CancelScope) -> None:
            nonlocal gone
            gone = await self.server.read_while_waiting(conn, parser)
            if gone:
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, nursery.cancel_scope)
            nursery.start_soon(watch, nursery.cancel_scope)
        if gone and failure is None and result != 1:
            # Its GET_LOCK may still be running in an abandoned thread: kill
            # that database session, which also frees any lock it got.
            self._lose_pinned(client, in_use=True)
            # (If the database is down, the session died with it.)
            with trio.CancelScope(shield=True), contextlib.suppress(Unavailable):
                    await self._pooled(_count("KILL CONNECTION %s", (thread_id,)))
            raise _Gone
        if failure is not None:
            self._lose_pinned(client)
            raise failure
        return result

    def _lock_error(self, client: _Client, sid: str) -> p.Error | None:
        if sid in client.revoked:
            client.revoked.discard(sid)
            return self._error(
                p.Code.LOCK_LOST,
                "this request held the session lock longer than its lease (or the session "
                "database lost it) and lost it; nothing was changed",
            )
        return None

    async def _locked_by_other(self, client: _Client, sid: str) -> p.Error | None:
        if sid in client.held:
            return None
        holder = await self._pooled(_scalar(sq.IS_USED_LOCK, (self._name(sid),)))
        if holder is not None:
            return self._error(
                p.Code.LOCKED, "another request holds the session lock; nothing was changed"
            )
        return None

    async def _on_holder(self, client: _Client, sid: str, fn: Callable[[Connection], T]) -> T:
        """Run on the connection holding the lock on ``sid``, else pooled."""
        if sid in client.held:
            return await self._pinned(client, fn)
        return await self._pooled(fn)

    async def _expire_leases(self, conn: _Conn, client: _Client) -> None:
        now = trio.current_time()
        for sid, until in list(client.held.items()):
            if until <= now:
                await self._release(client, sid)
                client.revoked.add(sid)
                self.lock_revoked_total += 1
                suffix = self.server.notice_throttle.suffix(now)
                if suffix is not None:
                    log.warning("event=lock_revoked session=%s owner=%d %s%s", sid_tag(sid),
                                conn.owner, conn.who(), suffix)

    # -- connections

    async def serve_connection(self, conn: _Conn, leftover: bytes = b"") -> None:
        limits = self.server.config.limits
        client = _Client(wait_s=limits.lock_wait_s, lease_s=limits.lock_lease_s)
        self._clients[conn.owner] = client
        try:
            await self._serve(conn, client, leftover)
        finally:
            del self._clients[conn.owner]
            with trio.CancelScope(shield=True):
                if client.pinned is not None:
                    await self._release_all(client)

    async def _serve(self, conn: _Conn, client: _Client, leftover: bytes) -> None:
        parser = p.RequestParser(self.server.config.limits.max_session_bytes)
        parser.receive_data(leftover)
        conn.parser = parser
        stream = conn.stream
        fd = netio.fileno(stream)
        metrics = self.server.metrics
        server = self.server
        while True:
            out: list[bytes] = []
            out_bytes = 0
            # Past max_outgoing_bytes, in smaller steps (Server.hold_outgoing).
            flush_bytes = server.flush_bytes()
            if client.held:
                await self._expire_leases(conn, client)
            while True:
                event = parser.next_event()
                if event is p.NEED_DATA:
                    break
                conn.busy = True
                conn.partial_since = None  # a whole request came: §10's clock restarts
                started = 0.0 if metrics is None else trio.current_time()
                try:
                    reply = await self._handle(conn, client, parser, event)
                except _Gone:
                    return
                if metrics is not None:
                    metrics.observe(
                        VERB_NAMES.get(type(event), "INVALID"), trio.current_time() - started
                    )
                out_bytes += netio.append_reply(out, reply)
                if isinstance(reply, p.Error) and (reply.fatal or isinstance(event, p.FatalError)):
                    server.log_protocol_error(conn, reply)  # throttled, as the engine's
                    await netio.send_parts(fd, out, conn)
                    return
                if out_bytes >= flush_bytes:
                    # As in the engine's loop: a client that does not read
                    # is held back by its socket buffer, not our memory.
                    await netio.send_parts(fd, out, conn)
                    out = []
                    out_bytes = 0
            if out:
                await netio.send_parts(fd, out, conn)
            # Busy while holding a lock: a graceful shutdown lets it finish.
            conn.busy = bool(client.held)
            if self.server.engine.shutting_down and not client.held and not parser.mid_request:
                return
            incoming = len(parser._buf)  # max_incoming_bytes, as in Server
            if incoming != conn.incoming and not await self.server.count_incoming(
                conn, fd, incoming
            ):
                return
            if client.held and not parser.mid_request:
                # It may think as long as its lease; then the lock is revoked.
                with trio.move_on_at(min(client.held.values())):
                    data = await netio.receive(fd, server.receive_bytes())
                    if not data:
                        return
                    parser.receive_data(data)
                    del data
                continue
            conn.idle_since = conn.waiting_since(trio.current_time())  # see Server._idle_sweeper
            data = await netio.receive(fd, server.receive_bytes())
            conn.idle_since = None
            if not data:
                return
            parser.receive_data(data)
            del data  # the parser has its own copy (as in Server)

    def said_hello(self, owner: int) -> bool:
        """Whether connection ``owner`` had a HELLO accepted (its handshake
        timeout, PROTOCOL.md §10, is the server's)."""
        client = self._clients.get(owner)
        return client is not None and client.hello

    def _error(self, code: p.Code, message: str) -> p.Error:
        self.errors_total += 1
        return p.Error(code, message)

    async def _handle(self, conn: _Conn, client: _Client, parser: p.RequestParser,
                      event: p.Event) -> p.Reply:
        self.requests_total += 1
        kind = type(event)
        self._verb_counts[kind] = self._verb_counts.get(kind, 0) + 1
        if isinstance(event, (p.RequestError, p.FatalError)):
            return self._error(event.code, event.message)
        if isinstance(event, p.Hello):
            return await self._hello(conn, client, event)
        if not client.hello:
            return self._error(
                p.Code.NEED_HELLO, "the first request on a connection must be HELLO 1"
            )
        if kind in p.ADMIN_ONLY and not await self.server.may_administer_tcp(conn):
            self.errors_total += 1
            return self.server.denied(conn, event)
        if self._refused is not None and isinstance(event, _TABLE_VERBS):
            return self._error(p.Code.UNAVAILABLE, self._refused)
        try:
            if isinstance(event, p.Read):
                return await self._read(conn, client, parser, event)
            if isinstance(event, p.Write):
                return await self._write(client, event)
            if isinstance(event, p.Touch):
                return await self._touch(client, event)
            if isinstance(event, p.Exists):
                found = await self._pooled(_scalar(
                    self.sql.exists, (sq.sid_bytes(event.sid), self._name(event.sid),
                                      sq.sid_bytes(event.sid), self._name(event.sid))
                ))
                return _OK_1 if found is not None else _OK_0
            if isinstance(event, p.Destroy):
                return await self._destroy(client, event)
            if isinstance(event, p.Close):
                await self._release_all(client)
                return p.OK
            if isinstance(event, p.Gc):
                count = self.expired_total - self._expired_at_last_gc
                self._expired_at_last_gc = self.expired_total
                return p.Ok((str(count),))
            if isinstance(event, p.Create):
                return await self._create(client, event)
            if isinstance(event, p.Ping):
                return p.OK
            if isinstance(event, p.Drain):
                log.info("event=drain_requested owner=%d %s", conn.owner, conn.who())
                self.server.shutdown()
                return p.OK
            if isinstance(event, p.Stats):
                return p.Data(json.dumps(await self.statistics(), sort_keys=True).encode())
            if isinstance(event, p.Get):
                row = await self._pooled(_row(
                    self.sql.get, (self._name(event.sid), sq.sid_bytes(event.sid))
                ))
                return sq.get_reply(row)
            if isinstance(event, p.List):
                return await self._list(event)
        except Unavailable as exc:
            return self._error(p.Code.UNAVAILABLE, str(exc))
        return self._error(p.Code.UNKNOWN_VERB, f"{VERB_NAMES.get(kind, kind.__name__)} "
                           "is not served with SQL storage")

    async def _hello(self, conn: _Conn, client: _Client, event: p.Hello) -> p.Reply:
        refused = hello_refusal(event, self.server.engine.shutting_down)
        if refused is not None:
            return self._error(*refused)
        # A HELLO starts the connection afresh (§3.2).
        await self._release_all(client)
        client.revoked.clear()
        client.hello = True
        conn.label = event.client or ""  # for the log lines about it (client=)
        client.wait_s, client.lease_s = hello_wait_and_lease(event, self.server.config.limits)
        return _OK_1

    async def _read(self, conn: _Conn, client: _Client, parser: p.RequestParser,
                    event: p.Read) -> p.Reply:
        sid = event.sid
        since: object = None
        if event.lock:
            since = await self._lock(conn, client, parser, sid)
            if isinstance(since, p.Error):
                return since
        if since is None:
            data = await self._on_holder(
                client, sid, _scalar(self.sql.read, (sq.sid_bytes(sid),))
            )
        else:
            # Granted after a wait: was it destroyed meanwhile (§4.1)?
            row = await self._pinned(client, _row(
                self.sql.read_waited, (since, sq.sid_bytes(sid))
            ))
            data = None if row is None else row[0]
            if data is None and row is not None and row[1] is not None:
                client.destroyed[sid] = row[1]
                await self._pinned(client, _count(self.sql.claim, (sq.sid_bytes(sid),)))
        if data is None:
            if event.lock and event.destroyed and sid in client.destroyed:
                return p.MISS_DESTROYED
            return p.MISS
        assert isinstance(data, bytes)
        return p.Data(data)

    async def _write(self, client: _Client, event: p.Write) -> p.Reply:
        sid = event.sid
        packet = self.max_allowed_packet
        if packet is not None and sq.write_packet_bytes(len(event.data)) > packet:
            # Sent, it would be refused and its connection dropped (with
            # the lock held on it): refused here, the lock is kept.
            return self._error(
                p.Code.TOO_LARGE,
                f"a session of {len(event.data)} bytes is over the {sq.largest_write(packet)} "
                f"the session database takes: its max_allowed_packet is {packet} and a "
                "session is sent as twice its size; nothing was changed",
            )
        error = self._lock_error(client, sid) or await self._locked_by_other(client, sid)
        if error is not None:
            return error
        await self._on_holder(client, sid, _count(
            self.sql.upsert, (sq.sid_bytes(sid), event.data, event.ttl_s)
        ))
        if not event.keep:
            await self._release(client, sid)
        return p.OK

    async def _touch(self, client: _Client, event: p.Touch) -> p.Reply:
        sid = event.sid
        error = self._lock_error(client, sid) or await self._locked_by_other(client, sid)
        if error is not None:
            return error
        found = await self._on_holder(client, sid, _count(
            self.sql.touch, (event.ttl_s, sq.sid_bytes(sid))
        ))
        if not found:
            return p.MISS  # the lock is kept for the WRITE that follows (§4.3)
        if not event.keep:
            await self._release(client, sid)
        return p.OK

    async def _destroy(self, client: _Client, event: p.Destroy) -> p.Reply:
        sid = event.sid
        error = self._lock_error(client, sid) or await self._locked_by_other(client, sid)
        if error is not None:
            return error
        # A tombstone, not a DELETE: those waiting for its lock learn it was
        # destroyed (§4.1, sqlstore's module doc); by a holder told so, the
        # one it found, which tells nobody new.
        stamp = client.destroyed.pop(sid, None)
        if stamp is None:
            await self._on_holder(client, sid, _count(self.sql.destroy, (sq.sid_bytes(sid),)))
        else:
            await self._pinned(client, _count(self.sql.redestroy, (sq.sid_bytes(sid), stamp)))
        await self._release(client, sid)
        return p.OK

    async def _create(self, client: _Client, event: p.Create) -> p.Reply:
        import secrets

        limits = self.server.config.limits
        if event.lock and len(client.held) >= limits.max_locks_per_connection:
            self.errors_total += 1
            return too_many_locks(limits)

        alphabet = _ALPHABETS[event.bits]
        mask = len(alphabet) - 1
        while True:
            raw = secrets.token_bytes(event.length)
            sid = "".join([alphabet[b & mask] for b in raw])
            name = self._name(sid)
            if event.lock:
                got = await self._pin_and_run(client, _scalar(sq.GET_LOCK, (name, 0)))
                if got != 1:
                    continue  # someone holds this very ID: draw again
                client.held[sid] = trio.current_time() + client.lease_s
            elif await self._pooled(_scalar(sq.IS_USED_LOCK, (name,))) is not None:
                continue
            exists = await self._on_holder(client, sid, _scalar(
                self.sql.stored, (sq.sid_bytes(sid),)
            ))
            if exists is None:
                return p.Ok((sid,))
            await self._release(client, sid)  # collision with a stored session

    async def _list(self, event: p.List) -> p.Reply:
        scope = self.config.lock_scope
        if event.after is None:
            rows = await self._pooled(_rows(self.sql.list_first, (scope, event.limit + 1)))
        else:
            rows = await self._pooled(_rows(
                self.sql.list_after, (scope, sq.sid_bytes(event.after), event.limit + 1)
            ))
        return sq.list_reply(rows, event.limit)

    async def statistics(self, timeout_s: float = STATS_TIMEOUT_S) -> dict[str, object]:
        """STATS: the counters, and the sessions counted in the database
        within ``timeout_s`` (else ``storage_error`` says why not)."""
        if self._refused is not None:  # reachable, but the table cannot be used
            return {"storage_error": self._refused} | self.counters()
        try:
            row = await self._bounded(_row(self.sql.count, ()), timeout_s)
            assert row is not None
        except Unavailable as exc:
            return {"storage_error": str(exc)} | self.counters()
        return self.counters(int(str(row[0])), int(str(row[1])))

    def counters(self, sessions: int | None = None, size: int | None = None) -> dict[str, object]:
        """What this daemon counts itself (sessions and bytes are the
        database's: None unless counted there)."""
        return {
            "version": VERSION,
            "pid": self.server.engine.pid,
            "uptime_s": round(trio.current_time() - self._started, 3),
            "storage": self.config.url,
            "storage_table": self.config.table,
            "sessions": sessions,
            "bytes": size,
            "connections": len(self._clients),
            "incoming_bytes": self.server.incoming_bytes,
            "incoming_refusals_total": self.server.incoming_refusals_total,
            "outgoing_bytes": self.server.outgoing_bytes,
            "outgoing_closes_total": self.server.outgoing_closes_total,
            "connection_refusals_total": self.server.busy_refusals_total,
            "fd_refusals_total": self.server.fd_refusals_total,
            "protocol_errors_total": self.server.protocol_errors_total,
            "timeout_closes": dict(self.server.timeout_closes),
            "locks_held": sum(len(c.held) for c in self._clients.values()),
            "locks_waiting": self.locks_waiting,
            "lock_waits_total": self.lock_waits_total,
            "lock_timeouts_total": self.lock_timeouts_total,
            "lock_revoked_total": self.lock_revoked_total,
            "expired_total": self.expired_total,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "verbs": verb_breakdown(self._verb_counts),
        }


def _driver_code(exc: Unavailable) -> object:
    """The database's error number behind ``exc`` (its driver error's first
    argument), or None."""
    cause = exc.__cause__
    return cause.args[0] if cause is not None and cause.args else None


# The requests that use the table (refused while it cannot be used).
_TABLE_VERBS: Final = (p.Read, p.Write, p.Touch, p.Exists, p.Destroy, p.Create, p.Get, p.List)
_OK_1: Final = p.Ok(("1",))
_OK_0: Final = p.Ok(("0",))
