"""Migration between the classic PHP session table and a phpsess daemon:
``phpsess import --from-sql`` and ``phpsess export --to-sql``.

The classic table is the one of the widely copied MySQL session handler
recipe: ``session(id, data, usetime)``, where a session lives
``session.gc_maxlifetime`` seconds after ``usetime``.  Import reads it page
by page (remaining lifetimes by the database's clock) and WRITEs every
live session to the daemon, whatever its storage; export does the reverse
into a table it creates if missing (binary-safe).  Blocking: admin
commands are plain processes.

PHP strings are bytes and its serializers count them (``s:5:"René";``): a
session whose bytes changed no longer decodes, and PHP destroys it.  Export
writes a session's bytes unchanged.  Import takes, for each row, the bytes
that decode as a session, since which bytes PHP read depends on its
connection's character set, which the table does not say:

- the bytes stored, if they decode (a BLOB; a TEXT written through a
  connection in the column's character set, e.g. a latin1 TEXT holding
  PHP's UTF-8 bytes); an empty session decodes;
- else the text as a utf8mb4 connection reads it, if it differs and decodes
  (a latin1 TEXT written through a utf8mb4 connection holds ``Ren\xe9``,
  converted, and PHP reads ``René`` back);
- else the bytes stored, counted as ``undecodable`` and named on stderr.

When both decode and differ, the row is not imported (``ambiguous``, named
on stderr): a user who controls two values of a session can make the
bytes PHP never read parse into keys of their choosing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pymysql

from phpsess import protocol as p
from phpsess.client import Client, describe
from phpsess.decode import DecodeError, decode_session
from phpsess.sqlstore import (
    STRICT_SQL_MODE,
    ClassicStatements,
    SqlConfig,
    StorageError,
    check_identifier,
    parse_storage_url,
)

PAGE: int = 500
# information_schema DATA_TYPEs of a usetime column that holds PHP's time(),
# a unix time, as some copies of the recipe have it (INT(10) UNSIGNED).
_UNIX_TIME_TYPES = frozenset(
    {"tinyint", "smallint", "mediumint", "int", "bigint", "decimal", "float", "double"}
)
# Rows whose data decodes neither way are each named on stderr up to this
# many times per import; the count has them all.
MAX_UNDECODABLE_WARNINGS: int = 20


def _connect(url: str, password_file: str | None) -> tuple[Any, SqlConfig]:
    config = parse_storage_url(url)
    password = ""
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as exc:
            raise StorageError(f"cannot read {password_file}: {exc.strerror}") from exc
    try:
        conn = pymysql.connect(
            host=config.host, port=config.port, unix_socket=config.unix_socket,
            user=config.user, password=password, database=config.database,
            autocommit=True, charset="utf8mb4", binary_prefix=True, connect_timeout=10,
            # Strict: a session a column cannot hold (bytes that are not
            # UTF-8 in a utf8mb4 TEXT, an ID longer than a CHAR(32)) is an
            # error, never stored as '?' or truncated and counted exported.
            init_command=f"SET SESSION {STRICT_SQL_MODE}",
        )
    except pymysql.err.Error as exc:
        raise StorageError(f"{config.url}: {exc.args[-1]}") from exc
    return conn, config


def _text(value: Any) -> str:
    """An information_schema value (bytes under some servers) as text."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return "" if value is None else str(value)


def _columns(conn: Any, table: str) -> dict[str, tuple[str, str]]:
    """The DATA_TYPE and CHARACTER_SET_NAME of ``table``'s usetime and data
    columns, lower case (none for a table that does not exist)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_SET_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s "
            "AND COLUMN_NAME IN ('usetime', 'data')",
            (table,),
        )
        return {_text(name).lower(): (_text(kind).lower(), _text(charset).lower())
                for name, kind, charset in cur.fetchall()}


def _import_select(conn: Any, table: str) -> str:
    """Import's page query: id, data, data as a utf8mb4 connection reads it
    (NULL where that is the same), usetime, and the remaining lifetime in
    ms by the database's clock (NULL when usetime is NULL or not a time).
    usetime is a TIMESTAMP in the recipe, a DATETIME or a unix time in an
    integer column in some of its copies.

    id and data are read as the bytes the column holds: read as text, the
    server would convert a latin1 TEXT to utf8mb4, and the UTF-8 bytes a
    latin1 connection stored would become two bytes each.  The utf8mb4 reading is what PHP
    reads through a utf8mb4 connection; it is left out for a binary column
    (CONVERT would turn bytes that are not UTF-8 into '?') and a UTF-8 one
    (the same bytes).  The next page starts after the last ID's bytes,
    which the server compares in the column's collation, as ORDER BY
    orders it."""
    quoted = f"`{check_identifier(table, 'table name')}`"
    columns = _columns(conn, table)
    if columns.get("usetime", ("", ""))[0] in _UNIX_TIME_TYPES:
        # As DECIMAL: an UNSIGNED column would refuse to go below 0.
        remaining = ("FLOOR((CAST(usetime AS DECIMAL(30, 6)) - UNIX_TIMESTAMP(NOW(6))) * 1000)"
                     " + %s")
    else:  # a missing table or column gets the database's own error
        remaining = "TIMESTAMPDIFF(MICROSECOND, NOW(6), usetime) DIV 1000 + %s"
    charset = columns.get("data", ("", ""))[1]
    if charset in ("", "binary") or charset.startswith("utf8"):
        as_utf8 = "NULL"
    else:
        as_utf8 = "CAST(CONVERT(data USING utf8mb4) AS BINARY)"
    return (f"SELECT CAST(id AS BINARY), CAST(data AS BINARY), {as_utf8}, usetime, "
            f"{remaining} FROM {quoted} WHERE id > %s ORDER BY id LIMIT %s")


def _decodes(blob: bytes) -> bool:
    try:
        decode_session(blob, "auto")
    except DecodeError:
        return False
    return True


def import_classic(client: Client, args: argparse.Namespace) -> dict[str, int]:
    """WRITE every live session of the classic table to the daemon."""
    conn, _ = _connect(args.from_sql, args.password_file)
    counts = {"imported": 0, "expired": 0, "invalid": 0, "refused": 0}
    undecodable = 0
    ambiguous = 0
    strict = bool(getattr(args, "strict", False))
    stopped = False
    after = b""
    try:
        select = _import_select(conn, args.from_table)
        while not stopped:
            with conn.cursor() as cur:
                cur.execute(select, (args.max_lifetime * 1000, after, PAGE))
                rows = cur.fetchall()
            if not rows:
                break
            writes = []
            for sid_raw, data, as_utf8, usetime, ttl_ms in rows:
                if stopped:
                    break
                sid = sid_raw.decode("ascii", "replace")
                after = sid_raw
                blob = bytes(data) if data is not None else b""
                if not p.is_valid_sid(sid):
                    counts["invalid"] += 1
                    print(f"phpsess: skipped row with id {sid[:80]!r}: not a session ID",
                          file=sys.stderr)
                    stopped = strict
                    continue
                if ttl_ms is None:
                    counts["invalid"] += 1
                    why = "is NULL" if usetime is None else f"{str(usetime)[:40]!r} is not a time"
                    print(f"phpsess: skipped row with id {sid}: usetime {why}; it must be a "
                          "TIMESTAMP, a DATETIME or a unix time in an integer column",
                          file=sys.stderr)
                    stopped = strict
                    continue
                ttl_s = -(-int(ttl_ms) // 1000)
                if ttl_s <= 0:
                    counts["expired"] += 1
                    continue
                other = bytes(as_utf8) if as_utf8 is not None else blob
                stored_decodes = _decodes(blob)
                other_decodes = other != blob and _decodes(other)
                if stored_decodes and other_decodes:
                    # Both readings are sessions, and they differ: which one
                    # PHP read cannot be told, and a user who controls two
                    # values can craft the one PHP never saw (a latin1
                    # column's é is one byte under an s:N: that counted two,
                    # so the stored bytes parse into other keys, say
                    # role|s:5:"admin").  Not imported: named and counted.
                    ambiguous += 1
                    if ambiguous <= MAX_UNDECODABLE_WARNINGS:
                        print(f"phpsess: skipped row with id {sid[:80]!r}: its data decodes "
                              "as two different sessions, as stored and as utf8mb4 text; "
                              "which one PHP read is unknown", file=sys.stderr)
                    stopped = strict
                    continue
                if not stored_decodes:
                    if other_decodes:
                        blob = other
                    else:
                        undecodable += 1
                        if undecodable <= MAX_UNDECODABLE_WARNINGS:
                            print(f"phpsess: row with id {sid[:80]!r}: data does not decode "
                                  "as a PHP session, neither as stored nor as utf8mb4 text; "
                                  "imported as stored", file=sys.stderr)
                writes.append(p.Write(sid, min(ttl_s, p.MAX_TTL_S), blob))
            # --strict: the rows before an invalid one are written; one
            # WRITE at a time, so that none after a refused one is.
            for batch in [[w] for w in writes] if strict else [writes]:
                refused = 0
                for write, reply in zip(batch, client.pipeline(batch), strict=True):
                    if isinstance(reply, p.Ok):
                        counts["imported"] += 1
                    else:
                        refused += 1
                        print(f"phpsess: WRITE {write.sid} refused: {describe(reply)}",
                              file=sys.stderr)
                counts["refused"] += refused
                if strict and refused:
                    stopped = True
                    break
    except pymysql.err.Error as exc:
        raise StorageError(f"reading table {args.from_table}: {exc.args[-1]}") from exc
    finally:
        conn.close()
    if undecodable > MAX_UNDECODABLE_WARNINGS:
        print(f"phpsess: {undecodable - MAX_UNDECODABLE_WARNINGS} more rows do not decode "
              "as a PHP session (imported as stored)", file=sys.stderr)
    if undecodable:  # absent when none, so the report of a table that decodes is unchanged
        counts["undecodable"] = undecodable
    if ambiguous > MAX_UNDECODABLE_WARNINGS:
        print(f"phpsess: {ambiguous - MAX_UNDECODABLE_WARNINGS} more rows decode as two "
              "different sessions (skipped)", file=sys.stderr)
    if ambiguous:
        counts["ambiguous"] = ambiguous
    if stopped:
        counts["stopped"] = 1
    return counts


def export_classic(client: Client, args: argparse.Namespace) -> dict[str, int]:
    """Upsert every session of the daemon into a classic table."""
    from phpsess.admin import _get_reply, iter_sessions

    conn, _ = _connect(args.to_sql, args.password_file)
    sql = ClassicStatements(args.to_table)
    exported = vanished = shortened = 0
    try:
        with conn.cursor() as cur:
            cur.execute(sql.create)
        # usetime as PHP's time() in an integer column, as some copies of
        # the recipe have it: NOW() there was stored as the number
        # YYYYMMDDhhmmss (out of range in an INT; in a BIGINT, a session
        # that a classic handler never expires).
        upsert = (sql.upsert_unix_time
                  if _columns(conn, args.to_table).get("usetime", ("", ""))[0] in _UNIX_TIME_TYPES
                  else sql.upsert)
        batch: list[str] = []

        def flush() -> None:
            nonlocal exported, vanished, shortened
            replies = client.pipeline([p.Get(sid) for sid in batch])
            rows = []
            for sid, reply in zip(batch, replies, strict=True):
                got = _get_reply(sid, reply)
                if got is None:
                    vanished += 1
                    continue
                data, ttl_ms, _ = got
                # usetime such that usetime + max_lifetime is the expiry; a
                # session with longer to live gets max_lifetime, all the
                # table can give it (counted, and said).
                if ttl_ms // 1000 > args.max_lifetime:
                    shortened += 1
                age_s = max(0, args.max_lifetime - ttl_ms // 1000)
                rows.append((sid.encode("ascii"), data, age_s))
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(upsert, rows)
                exported += len(rows)
            batch.clear()

        for entry in iter_sessions(client):
            batch.append(entry.sid)
            if len(batch) >= PAGE:
                flush()
        if batch:
            flush()
    except pymysql.err.Error as exc:
        raise StorageError(f"writing table {args.to_table}: {exc.args[-1]}") from exc
    finally:
        conn.close()
    if shortened:
        print(f"phpsess: {shortened} session{'s' if shortened != 1 else ''} had more than "
              f"--max-lifetime {args.max_lifetime} s to live: in the table "
              f"{'they expire' if shortened != 1 else 'it expires'} {args.max_lifetime} s "
              "from now (a classic table keeps a session --max-lifetime after its usetime)",
              file=sys.stderr)
    return {"exported": exported, "vanished": vanished, "shortened": shortened}
