"""Migration between the classic PHP session table and a phpsess daemon:
``phpsess import --from-sql`` and ``phpsess export --to-sql``.

The classic table is the one of the widely copied MySQL session handler
recipe: ``session(id, data, usetime)``, where a session lives
``session.gc_maxlifetime`` seconds after ``usetime``.  Import reads it page
by page (remaining lifetimes by the database's clock) and WRITEs every
live session to the daemon, whatever its storage; export does the reverse
into a table it creates if missing (binary-safe).  Blocking: admin commands
are plain processes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pymysql

from phpsess import protocol as p
from phpsess.client import Client
from phpsess.sqlstore import ClassicStatements, SqlConfig, StorageError, parse_storage_url

PAGE: int = 500


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
        )
    except pymysql.err.Error as exc:
        raise StorageError(f"{config.url}: {exc.args[-1]}") from exc
    return conn, config


def import_classic(client: Client, args: argparse.Namespace) -> dict[str, int]:
    """WRITE every live session of the classic table to the daemon."""
    conn, _ = _connect(args.from_sql, args.password_file)
    sql = ClassicStatements(args.from_table)
    counts = {"imported": 0, "expired": 0, "invalid": 0, "refused": 0}
    after = b""
    try:
        while True:
            with conn.cursor() as cur:
                cur.execute(sql.select, (args.max_lifetime * 1000, after, PAGE))
                rows = cur.fetchall()
            if not rows:
                break
            writes = []
            for sid_raw, data, ttl_ms in rows:
                sid = sid_raw.decode("ascii", "replace") if isinstance(sid_raw, bytes) \
                    else str(sid_raw)
                after = sid_raw if isinstance(sid_raw, bytes) else sid.encode()
                blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
                if not p.is_valid_sid(sid):
                    counts["invalid"] += 1
                    print(f"phpsess: skipped row with id {sid[:80]!r}: not a session ID",
                          file=sys.stderr)
                    continue
                ttl_s = -(-int(ttl_ms) // 1000)
                if ttl_s <= 0:
                    counts["expired"] += 1
                    continue
                writes.append(p.Write(sid, min(ttl_s, p.MAX_TTL_S), blob))
            for write, reply in zip(writes, client.pipeline(writes), strict=True):
                if isinstance(reply, p.Ok):
                    counts["imported"] += 1
                else:
                    counts["refused"] += 1
                    print(f"phpsess: WRITE {write.sid} refused: {reply}", file=sys.stderr)
    except pymysql.err.Error as exc:
        raise StorageError(f"reading table {args.from_table}: {exc.args[-1]}") from exc
    finally:
        conn.close()
    return counts


def export_classic(client: Client, args: argparse.Namespace) -> dict[str, int]:
    """Upsert every session of the daemon into a classic table."""
    from phpsess.admin import _get_reply, iter_sessions

    conn, _ = _connect(args.to_sql, args.password_file)
    sql = ClassicStatements(args.to_table)
    exported = vanished = 0
    try:
        with conn.cursor() as cur:
            cur.execute(sql.create)
        batch: list[str] = []

        def flush() -> None:
            nonlocal exported, vanished
            replies = client.pipeline([p.Get(sid) for sid in batch])
            rows = []
            for sid, reply in zip(batch, replies, strict=True):
                got = _get_reply(sid, reply)
                if got is None:
                    vanished += 1
                    continue
                data, ttl_ms, _ = got
                # usetime such that usetime + max_lifetime is the expiry.
                age_s = max(0, args.max_lifetime - ttl_ms // 1000)
                rows.append((sid.encode("ascii"), data, age_s))
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(sql.upsert, rows)
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
    return {"exported": exported, "vanished": vanished}
