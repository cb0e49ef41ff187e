"""The SQL storage backend's pure half: the ``--storage`` URL, the schema,
every statement's text, lock names, and the mapping of rows to protocol
replies.  No driver, no trio, no I/O (STYLE.md §1); the Trio/PyMySQL shell
is :mod:`phpsess.sqlserver`.

Theory of operation (README "SQL storage"): one table shared by every
daemon holds each session's bytes and its expiry (UTC, by the database's
clock, so web servers' clocks never matter).  Session locks are the
database server's named locks (``GET_LOCK``), held on a database
connection pinned to the PHP connection that holds them: they die with
that database session when the daemon or its connection dies, the daemon
releases them when PHP disconnects, and its lease timer releases them
(and ``wait_timeout`` on the pinned connection bounds them even if the
daemon hangs).  Every value travels as a statement parameter; the only
text put into statements is the table name and engine, validated here as
plain identifiers.

A session destroyed (``DESTROY``) leaves a *tombstone*: its row, emptied,
with ``expires`` set to the moment of the destroy moved
:data:`TOMBSTONE_DAYS` back (400 years: before any real expiry, so every
statement that looks for live rows ignores it).  It tells a locking
``READ`` that was waiting for the lock at that moment, on any daemon, that
the session was destroyed while it waited (PROTOCOL.md §4.1
``MISS DESTROYED``): the waiter notes the database's time when it began to
wait (:data:`GET_LOCK_AT`) and, once granted, finds a tombstone at least
that recent (:attr:`Statements.read_waited`); one that began to wait later
is not told.  The holder granted that way writes its database connection's
ID into the tombstone (:attr:`Statements.claim`) and clears it as it lets
go, so ``EXISTS`` says 0 while the lock is held only to release the dead
ID (:attr:`Statements.exists`).  Its own ``DESTROY`` keeps the stamp it
found (it tells nobody new).  A write replaces the tombstone; the purge
deletes tombstones once their stamp is older than the longest lock wait
and :data:`TOMBSTONE_KEEP_S` more.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from typing import Final

import attrs

from phpsess import protocol as p

DEFAULT_TABLE: Final = "phpsess_sessions"
DEFAULT_ENGINE: Final = "InnoDB"
DEFAULT_PORT: Final = 3306
DEFAULT_POOL_SIZE: Final = 64
# How often each daemon deletes expired rows, and how many per statement.
PURGE_INTERVAL_S: Final = 10.0
PURGE_BATCH: Final = 1000
# A lock wait is one GET_LOCK per slice of at most this long: a database
# that hangs is noticed within the driver's read timeout, and a waiter whose
# PHP client vanished stops within one slice even if KILL cannot reach it.
LOCK_SLICE_S: Final = 5.0
# A destroyed session's row is dated this far back (400 Gregorian years,
# exactly, in days: no calendar arithmetic): earlier than any real expiry,
# so it is never live, and its own date tells when it was destroyed.
TOMBSTONE_DAYS: Final = 146097
# Tombstones are purged once their stamp is older than the lock wait and
# this: every request waiting at the destroy has read it by then.
TOMBSTONE_KEEP_S: Final = 60
# Named locks are limited to 64 characters: "phpsess:" + 40 hex digits.
_LOCK_PREFIX: Final = "phpsess:"
# PyMySQL sends bytes as X'hex' in the statement text: a WRITE's statement
# is twice the session's size and at most this much more (the statement,
# the ID, the TTL).  The database refuses (and drops the connection of) a
# statement over its max_allowed_packet.
PACKET_MARGIN: Final = 4096
# Every connection sets its session's sql_mode, whatever the server's
# global one: strict, so a value that does not fit is an error, never
# truncated (and acknowledged); and nothing else that changes what the
# statements mean (MariaDB's EMPTY_STRING_IS_NULL made DESTROY's '' a NULL
# and the destroy fail, ANSI quotes, PIPES_AS_CONCAT...).  PyMySQL escapes
# as for the default mode.
STRICT_SQL_MODE: Final = "sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'"

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_USER: Final = re.compile(r"[A-Za-z0-9_.\-]{1,80}")


class StorageError(ValueError):
    """A ``--storage`` setting that cannot be used; the message says why."""


@attrs.frozen
class SqlConfig:
    """Where and how the SQL backend stores sessions (``--storage``)."""

    user: str
    database: str
    host: str = "localhost"
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    password: str = attrs.field(default="", repr=False)
    table: str = DEFAULT_TABLE
    engine: str = DEFAULT_ENGINE
    pool_size: int = DEFAULT_POOL_SIZE
    connect_timeout_s: float = 3.0
    # Longest wait for one reply (a lock wait is sliced to stay below it).
    read_timeout_s: float = 10.0
    purge_interval_s: float = PURGE_INTERVAL_S

    def __attrs_post_init__(self) -> None:
        check_identifier(self.table, "table name")
        check_identifier(self.engine, "storage engine")
        if self.pool_size < 2:
            raise StorageError("the storage pool needs at least 2 connections")

    @property
    def url(self) -> str:
        """The URL without the password, for logs and STATS."""
        where = f"{self.host}:{self.port}"
        query = f"?socket={self.unix_socket}" if self.unix_socket else ""
        return f"mysql://{self.user}@{where}/{self.database}{query}"

    @property
    def lock_scope(self) -> str:
        """What lock names are hashed with: named locks are global to the
        database server, so two tables never share a lock."""
        return f"{self.database}.{self.table}:"


def check_identifier(name: str, what: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise StorageError(
            f"{what} {name!r} must be 1-64 characters of A-Z a-z 0-9 _ not starting "
            "with a digit"
        )
    return name


def parse_storage_url(url: str) -> SqlConfig:
    """``mysql://USER@HOST[:PORT]/DB[?socket=/path.sock]`` as a config
    (password, table and engine come from elsewhere)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("mysql", "mariadb"):
        raise StorageError(
            f"storage {url!r} is not mysql://USER@HOST:PORT/DB (the only SQL storage "
            "spoken: MySQL, MariaDB, MySQL Cluster)"
        )
    if parsed.password is not None:
        raise StorageError(
            "put no password in the storage URL (it would show in ps and logs): use "
            "--storage-password-file or [storage] password_file"
        )
    user = parsed.username or ""
    if not _USER.fullmatch(user):
        raise StorageError(f"storage URL {url!r} needs a user: mysql://USER@HOST:PORT/DB")
    database = parsed.path.lstrip("/")
    check_identifier(database, "database name")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError:
        raise StorageError(f"storage URL {url!r} has a bad port") from None
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise StorageError(f"storage URL option {unknown[0]!r} is unknown; known: socket")
    unix_socket = query.get("socket", [None])[-1]
    if unix_socket is not None and not unix_socket.startswith("/"):
        raise StorageError(f"storage URL socket {unix_socket!r} must be an absolute path")
    return SqlConfig(
        user=user, database=database, host=parsed.hostname or "localhost", port=port,
        unix_socket=unix_socket,
    )


def lock_name(scope: str, sid: str) -> str:
    """The named lock of session ``sid``; :data:`SQL_LOCK_NAME` computes the
    same in SQL (for LIST's ``locked`` column)."""
    return _LOCK_PREFIX + hashlib.sha1((scope + sid).encode("ascii")).hexdigest()


SQL_LOCK_NAME: Final = f"CONCAT('{_LOCK_PREFIX}', SHA1(CONCAT(%s, id)))"


class Statements:
    """Every statement of one table.  ``%s`` placeholders are filled by the
    driver with escaped parameters; only the validated table name and engine
    are part of the text."""

    def __init__(self, table: str, engine: str) -> None:
        t = f"`{check_identifier(table, 'table name')}`"
        check_identifier(engine, "storage engine")
        self.create = (
            f"CREATE TABLE IF NOT EXISTS {t} (\n"
            "  id VARBINARY(256) NOT NULL,\n"
            "  data LONGBLOB NOT NULL,\n"
            "  expires DATETIME(6) NOT NULL,\n"
            "  PRIMARY KEY (id),\n"
            "  KEY expires (expires)\n"
            f") ENGINE={engine}"
        )
        # The table's columns (schema_problems); parameter: the table name.
        self.columns = (
            "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_OCTET_LENGTH, DATETIME_PRECISION, "
            "COLUMN_KEY, IS_NULLABLE, COLUMN_DEFAULT, EXTRA FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION"
        )
        live = "expires > UTC_TIMESTAMP(6)"
        self.read = f"SELECT data FROM {t} WHERE id = %s AND {live}"
        self.upsert = (
            f"INSERT INTO {t} (id, data, expires) "
            "VALUES (%s, %s, UTC_TIMESTAMP(6) + INTERVAL %s SECOND) "
            "ON DUPLICATE KEY UPDATE data = VALUES(data), expires = VALUES(expires)"
        )
        self.touch = (
            f"UPDATE {t} SET expires = UTC_TIMESTAMP(6) + INTERVAL %s SECOND "
            f"WHERE id = %s AND {live}"
        )
        self.stored = f"SELECT 1 FROM {t} WHERE id = %s AND {live}"
        tomb = f"UTC_TIMESTAMP(6) - INTERVAL {TOMBSTONE_DAYS} DAY"
        # EXISTS: a session being started (its named lock held, no row yet)
        # exists too (PROTOCOL.md §4.4), unless the lock is held by a
        # request told MISS DESTROYED (its connection's ID is in the
        # tombstone, §4.1).  Parameters: the ID, the lock name, the ID, the
        # lock name.
        self.exists = (
            f"SELECT 1 FROM DUAL WHERE EXISTS (SELECT 1 FROM {t} WHERE id = %s AND {live}) "
            "OR IS_USED_LOCK(%s) IS NOT NULL AND NOT EXISTS "
            f"(SELECT 1 FROM {t} WHERE id = %s AND expires <= {tomb} "
            "AND data = CAST(IS_USED_LOCK(%s) AS BINARY))"
        )
        # DESTROY: the row becomes a tombstone (module doc), found or not.
        self.destroy = (
            f"INSERT INTO {t} (id, data, expires) VALUES (%s, '', {tomb}) "
            "ON DUPLICATE KEY UPDATE data = VALUES(data), expires = VALUES(expires)"
        )
        # DESTROY by a holder told MISS DESTROYED: the tombstone it found
        # (its expires, a parameter), whatever it wrote since.
        self.redestroy = (
            f"INSERT INTO {t} (id, data, expires) VALUES (%s, '', %s) "
            "ON DUPLICATE KEY UPDATE data = VALUES(data), expires = VALUES(expires)"
        )
        # A locking READ granted after a wait that began at %s (the
        # database's time): the data if live, and the tombstone's expires if
        # the session was destroyed since then (one at least that recent).
        self.read_waited = (
            f"SELECT IF({live}, data, NULL), IF(expires <= {tomb} AND "
            f"expires >= CAST(%s AS DATETIME(6)) - INTERVAL {TOMBSTONE_DAYS} DAY, "
            f"expires, NULL) FROM {t} WHERE id = %s"
        )
        # The holder told MISS DESTROYED claims the tombstone (for EXISTS),
        # on its pinned connection, and clears it as it lets go.
        self.claim = (
            f"UPDATE {t} SET data = CAST(CONNECTION_ID() AS BINARY) "
            f"WHERE id = %s AND expires <= {tomb}"
        )
        self.unclaim = f"UPDATE {t} SET data = '' WHERE id = %s AND expires <= {tomb}"
        # Expired sessions (the count GC reports), then old tombstones.
        self.purge = (
            f"DELETE FROM {t} WHERE expires <= UTC_TIMESTAMP(6) AND expires > {tomb} "
            f"LIMIT {PURGE_BATCH}"
        )
        # Parameter: the seconds a tombstone is kept.
        self.purge_tombstones = (
            f"DELETE FROM {t} WHERE expires <= {tomb} - INTERVAL %s SECOND "
            f"LIMIT {PURGE_BATCH}"
        )
        self.get = (
            "SELECT data, TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires) DIV 1000, "
            f"IS_USED_LOCK(%s) IS NOT NULL FROM {t} WHERE id = %s AND {live}"
        )
        self.list_first = (
            f"SELECT id, LENGTH(data), TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires) "
            f"DIV 1000, IS_USED_LOCK({SQL_LOCK_NAME}) IS NOT NULL FROM {t} "
            f"WHERE {live} ORDER BY id LIMIT %s"
        )
        self.list_after = (
            f"SELECT id, LENGTH(data), TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires) "
            f"DIV 1000, IS_USED_LOCK({SQL_LOCK_NAME}) IS NOT NULL FROM {t} "
            f"WHERE id > %s AND {live} ORDER BY id LIMIT %s"
        )
        self.count = f"SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM {t} WHERE {live}"


# Named locks (MariaDB and MySQL): 1 granted, 0 timed out, NULL error.
GET_LOCK: Final = "SELECT GET_LOCK(%s, %s)"
# The same, and the database's time as it began (a statement's
# UTC_TIMESTAMP is its start): when a READ that must wait began to.
GET_LOCK_AT: Final = "SELECT GET_LOCK(%s, %s), UTC_TIMESTAMP(6)"
RELEASE_LOCK: Final = "DO RELEASE_LOCK(%s)"
IS_USED_LOCK: Final = "SELECT IS_USED_LOCK(%s)"


def write_packet_bytes(size: int) -> int:
    """The largest statement a WRITE of ``size`` bytes of data sends."""
    return 2 * size + PACKET_MARGIN


def largest_write(max_allowed_packet: int) -> int:
    """The largest session a statement within ``max_allowed_packet`` carries."""
    return max(0, (max_allowed_packet - PACKET_MARGIN) // 2)


# The table's columns as the backend needs them (information_schema.COLUMNS
# of the table, :attr:`Statements.columns`): sizes in bytes.
_DATA_TYPES: Final = frozenset({"tinyblob", "blob", "mediumblob", "longblob", "varbinary"})
_GENERATED: Final = ("auto_increment", "generated", "virtual", "persistent", "stored")


def schema_problems(rows: list[tuple[object, ...]], max_session_bytes: int) -> list[str]:
    """What is wrong with a table whose columns are ``rows`` (name, type,
    octet length, datetime precision, key, nullable, default, extra) for
    sessions of up to ``max_session_bytes``; empty if nothing."""

    def text(value: object) -> str:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8", "replace")
        return "" if value is None else str(value)

    def number(value: object) -> int:
        return int(text(value)) if text(value).isdigit() else 0

    columns = {text(r[0]).lower(): r for r in rows}
    problems = []
    missing = [name for name in ("id", "data", "expires") if name not in columns]
    if missing:
        problems.append(
            f"it has no column {', '.join(missing)} (its columns: "
            f"{', '.join(text(r[0]) for r in rows) or 'none'})"
        )
    if "id" in columns:
        _, kind, octets, _, key, *_ = columns["id"]
        if text(kind).lower() != "varbinary" or number(octets) < p.MAX_SID_LENGTH:
            problems.append(
                f"id is {text(kind).upper()}({number(octets)}), not VARBINARY of at least "
                f"{p.MAX_SID_LENGTH} bytes (session IDs are bytewise and up to "
                f"{p.MAX_SID_LENGTH} characters)"
            )
        if text(key).upper() != "PRI":
            problems.append("id is not its primary key")
    if "data" in columns:
        _, kind, octets, *_ = columns["data"]
        if text(kind).lower() not in _DATA_TYPES:
            problems.append(
                f"data is {text(kind).upper()}, not a binary type (LONGBLOB): session data "
                "is bytes, a character type would mangle it"
            )
        elif number(octets) < max_session_bytes:
            problems.append(
                f"data is {text(kind).upper()}, which holds {number(octets)} bytes, less than "
                f"--max-session-bytes {max_session_bytes}"
            )
    if "expires" in columns:
        _, kind, _, precision, *_ = columns["expires"]
        if text(kind).lower() != "datetime" or number(precision) != 6:
            problems.append(f"expires is {text(kind).upper()}"
                            f"{f'({number(precision)})' if number(precision) else ''}, "
                            "not DATETIME(6)")
    for name, row in columns.items():
        if name in ("id", "data", "expires"):
            continue
        _, _, _, _, _, nullable, default, extra = row
        if (text(nullable).upper() == "NO" and default is None
                and not any(g in text(extra).lower() for g in _GENERATED)):
            problems.append(f"column {text(row[0])} is NOT NULL without a default, and "
                            "the daemon does not write it")
    return problems


def schema_refusal(config: SqlConfig, problems: list[str]) -> str:
    """Why the daemon does not use table ``config.table``, and what to do."""
    return (
        f"storage table {config.database}.{config.table} cannot hold the sessions: "
        f"{'; '.join(problems)}. The daemon needs (id VARBINARY(256) PRIMARY KEY, data "
        "LONGBLOB, expires DATETIME(6)) as README \"SQL storage\" shows: give "
        "--storage-table a new name (it is created) or ALTER the table to match; sessions "
        "of a classic PHP session table (id, data, usetime) are moved with "
        "phpsess import --from-sql"
    )


def sid_bytes(sid: str) -> bytes:
    return sid.encode("ascii")


def get_reply(row: tuple[object, ...] | None) -> p.Reply:
    """``GET``'s reply from :attr:`Statements.get`'s row."""
    if row is None:
        return p.MISS
    data, ttl_ms, locked = row
    assert isinstance(data, bytes)
    return p.Data(data, (str(max(0, int(str(ttl_ms)))), "1" if locked else "0"))


def list_reply(rows: list[tuple[object, ...]], limit: int) -> p.Reply:
    """``LIST``'s reply from up to ``limit + 1`` rows of :attr:`Statements.list_*`."""
    page = rows[:limit]
    lines = []
    for sid, size, ttl_ms, locked in page:
        assert isinstance(sid, bytes)
        lines.append(
            f"{sid.decode('ascii')} {int(str(size))} {max(0, int(str(ttl_ms)))} "
            f"{1 if locked else 0}\n"
        )
    last = page[-1][0] if page else None
    more = len(rows) > limit and isinstance(last, bytes)
    next_token = last.decode("ascii") if more and isinstance(last, bytes) else "*"
    return p.Data("".join(lines).encode("ascii"), (next_token,))


# The classic PHP session table (phpsess import --from-sql / export --to-sql):
# id, data, and usetime, the last write; a session lives gc_maxlifetime after it.
CLASSIC_COLUMNS: Final = ("id", "data", "usetime")


class ClassicStatements:
    def __init__(self, table: str) -> None:
        t = f"`{check_identifier(table, 'table name')}`"
        self.create = (
            f"CREATE TABLE IF NOT EXISTS {t} (\n"
            "  id VARBINARY(256) NOT NULL PRIMARY KEY,\n"
            "  data LONGBLOB NOT NULL,\n"
            "  usetime TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,\n"
            "  KEY usetime (usetime)\n"
            ") ENGINE=InnoDB"
        )
        self.upsert = (
            f"INSERT INTO {t} (id, data, usetime) "
            "VALUES (%s, %s, NOW() - INTERVAL %s SECOND) "
            "ON DUPLICATE KEY UPDATE data = VALUES(data), usetime = VALUES(usetime)"
        )
        # For a usetime that holds PHP's time() (an integer column).
        self.upsert_unix_time = (
            f"INSERT INTO {t} (id, data, usetime) "
            "VALUES (%s, %s, UNIX_TIMESTAMP() - %s) "
            "ON DUPLICATE KEY UPDATE data = VALUES(data), usetime = VALUES(usetime)"
        )
