"""``phpsess import --from-sql`` / ``export --to-sql`` and the character
set of the classic table's columns.

PHP strings are bytes and its serializers count them (``s:5:"René";``): a
session whose bytes changed on the way no longer decodes, and PHP destroys
it ("Failed to decode session object").  A latin1 ``data TEXT`` written
through a latin1 connection holds whatever bytes PHP sent; the import read
it as text, the server converted it to utf8mb4, and every non-ASCII byte
came back as two (reported as imported, lost to PHP).  The same column
written through a utf8mb4 connection holds converted bytes (``Ren\xe9``)
and PHP reads UTF-8 back; the import then copied the bytes stored, which
PHP no longer decoded.  Import takes whichever of the two decodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import MariaDB, fresh_table, private_mariadb, run_php

# The UTF-8 bytes of text, as PHP sends them whatever the connection's
# character set, and bytes that are not UTF-8 (a binary string).
TEXT = 'name|s:5:"René";'.encode()
BINARY = b'name|s:5:"Ren\xc3\xa9";bin|s:4:"\x80\xff\x00\xe9";'
# session.serialize_handler=php_binary: each key's length as a byte.
PHP_BINARY = b'\x04names:5:"Ren\xc3\xa9";\x03bins:4:"\x80\xff\x00\xe9";'

# $_SESSION as hex, so that the test sees PHP's own bytes.
READ_PHP = """<?php
session_id($argv[1]);
if (!session_start()) {
    fwrite(STDERR, "session_start failed\\n");
    exit(3);
}
echo json_encode((object) array_map('bin2hex', $_SESSION)), "\\n";
"""


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phpsess", *args],
                          capture_output=True, text=True, timeout=60)


TEXT_COLUMNS = "id VARCHAR(128) PRIMARY KEY, data TEXT"


def _classic_table(db: MariaDB, table: str, charset: str, values: str = "",
                   columns: str = TEXT_COLUMNS, statements: str = "") -> None:
    """A classic session table (``columns``, then usetime) in ``charset``;
    ``statements`` (``SET NAMES ...;``) run before ``values`` are inserted."""
    sql = (f"CREATE TABLE {table} ({columns}, usetime TIMESTAMP NOT NULL DEFAULT "
           f"CURRENT_TIMESTAMP) DEFAULT CHARSET={charset}; {statements}")
    if values:
        sql += f"INSERT INTO {table} VALUES {values}"
    db.sql(sql, "phpsess")


def _common(db: MariaDB, daemon: Any) -> list[str]:
    return ["--connect", daemon.address, "--password-file", str(db.password_file),
            "--max-lifetime", "1440", "--json"]


@pytest.mark.php
def test_import_keeps_the_bytes_of_latin1_utf8mb4_and_blob_columns_and_php_decodes_them(
    mariadb: MariaDB, start_daemon: Any, tmp_path: Path
) -> None:
    # (table, its id and data columns, its sessions: id, bytes, serializer)
    tables: list[tuple[str, str, str, list[tuple[str, bytes | None, str]]]] = [
        (fresh_table(), "id VARCHAR(128) PRIMARY KEY, data TEXT", "latin1",
         [("latin0123456789abcdefghijk", TEXT, "php"),
          ("latinbin0123456789abcdefgh", BINARY, "php"),
          ("latinphpbin0123456789abcde", PHP_BINARY, "php_binary")]),
        (fresh_table(), "id VARCHAR(128) PRIMARY KEY, data MEDIUMTEXT", "utf8mb4",
         [("utf0123456789abcdefghijklm", TEXT, "php")]),
        (fresh_table(), "id VARBINARY(128) PRIMARY KEY, data BLOB", "latin1",
         [("blob0123456789abcdefghijkl", BINARY, "php"),
          ("blobphpbin0123456789abcdef", PHP_BINARY, "php_binary"),
          # NULL, which PHP's read handler of the recipe returns as "": an
          # empty session (the import crashed on it, bytes(None)).
          ("blobnull0123456789abcdefgh", None, "php")]),
    ]
    d = start_daemon("--memory-only")
    script = tmp_path / "read.php"
    script.write_text(READ_PHP)
    for table, columns, charset, sessions in tables:
        # Hexadecimal literals: the bytes as they are, as a connection in
        # the column's character set stores what PHP sent.
        values = ", ".join(f"('{sid}', {'NULL' if data is None else f'X{data.hex()!r}'}, NOW())"
                           for sid, data, _ in sessions)
        _classic_table(mariadb, table, charset, values, columns)
        done = _admin("import", "--from-sql", mariadb.url(), "--from-table", table,
                      *_common(mariadb, d))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["imported"] == len(sessions), done.stdout
        for sid, data, serializer in sessions:
            with Client(d.address) as c:
                assert c.request(p.Read(sid, lock=False)) == p.Data(data or b""), (charset, sid)
            proc = run_php(script, handler="phpsess", address=d.php_address, args=(sid,),
                           ini={"session.serialize_handler": serializer})
            assert proc.returncode == 0 and proc.stderr == "", (sid, proc.stderr)
            expected = {} if data is None else {"name": "René".encode().hex()}
            if data not in (TEXT, None):
                expected["bin"] = "80ff00e9"
            assert json.loads(proc.stdout) == expected, (sid, proc.stdout)


def test_import_pages_after_an_id_that_is_not_ascii_without_reading_rows_again(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # A page (500 rows) ended on a latin1 id "dé...": the next one started
    # after its UTF-8 bytes read as latin1, "dÃ©...", which the column's
    # collation orders before it, and the 99 rows between came again.
    table = fresh_table()
    rows = [f"('b{n:025d}', 'n|i:1;', NOW())" for n in range(400)]
    rows += [f"('dc{n:024d}', 'n|i:1;', NOW())" for n in range(99)]
    rows.append(f"(X'{('d' + 'é' + 'x' * 24).encode('latin1').hex()}', 'x', NOW())")
    rows += [f"('f{n:025d}', 'n|i:1;', NOW())" for n in range(100)]
    _classic_table(mariadb, table, "latin1", ", ".join(rows))
    d = start_daemon("--memory-only")
    done = _admin("import", "--from-sql", mariadb.url(), "--from-table", table,
                  *_common(mariadb, d))
    assert done.returncode == 1, done.stderr  # the id that is not a session ID
    assert json.loads(done.stdout) == {"imported": 599, "expired": 0, "invalid": 1,
                                       "refused": 0, "stopped": False}
    assert done.stderr.count("not a session ID") == 1, done.stderr


def test_export_never_stores_a_session_its_column_cannot_hold(start_daemon: Any) -> None:
    # Export sends the bytes as _binary literals: a latin1 TEXT stores them
    # as they are.  A utf8mb4 TEXT cannot hold bytes that are not UTF-8:
    # under a server sql_mode that is not strict they were stored as '?',
    # with a warning nobody read, and counted exported.
    d = start_daemon("--memory-only")
    with Client(d.address) as c:
        assert c.request(p.Write("binary0123456789abcdefghij", 600, BINARY)) == p.OK
    with private_mariadb() as db:
        db.sql("SET GLOBAL sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        latin1, utf8 = fresh_table(), fresh_table()
        for table, charset in ((latin1, "latin1"), (utf8, "utf8mb4")):
            _classic_table(db, table, charset)
        done = _admin("export", "--to-sql", db.url(), "--to-table", latin1,
                      *_common(db, d))
        assert done.returncode == 0, done.stderr
        assert db.sql(f"SELECT HEX(data) FROM {latin1}", "phpsess").strip() == (
            BINARY.hex().upper())
        done = _admin("export", "--to-sql", db.url(), "--to-table", utf8, *_common(db, d))
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "Incorrect string value" in done.stderr, done.stderr
        assert db.sql(f"SELECT COUNT(*) FROM {utf8}", "phpsess").strip() == "0"


@pytest.mark.php
def test_import_reads_a_column_written_through_a_utf8mb4_connection_as_php_does(
    mariadb: MariaDB, start_daemon: Any, tmp_path: Path
) -> None:
    # PDO charset=utf8mb4 (MySQL 8's default) writing a legacy latin1 or
    # cp1251 TEXT: the server stores 'Ren\xe9' for PHP's 'René' and converts
    # it back when PHP reads.  The import copied 'Ren\xe9', 4 bytes under
    # s:5:, and PHP destroyed the session.
    cyrillic = "Привет"
    tables = [
        ("latin1", [("utf8conn0123456789abcdefgh", 'name|s:5:"René";', "php",
                     "Ren\xe9"),
                    ("utf8serial0123456789abcdef", 'a:1:{s:4:"name";s:5:"René";}',
                     "php_serialize", "Ren\xe9")]),
        ("cp1251", [("cp1251conn0123456789abcdef", f'name|s:12:"{cyrillic}";', "php",
                     cyrillic.encode("cp1251").decode("latin1"))]),
    ]
    d = start_daemon("--memory-only")
    script = tmp_path / "read.php"
    script.write_text(READ_PHP)
    for charset, sessions in tables:
        table = fresh_table()
        values = ", ".join(f"('{sid}', '{text}', NOW())" for sid, text, _, _ in sessions)
        _classic_table(mariadb, table, charset, values, statements="SET NAMES utf8mb4; ")
        for sid, _, _, stored in sessions:  # the column holds converted bytes
            assert stored.encode("latin1").hex().upper() in mariadb.sql(
                f"SELECT HEX(data) FROM {table} WHERE id = '{sid}'", "phpsess")
        done = _admin("import", "--from-sql", mariadb.url(), "--from-table", table,
                      *_common(mariadb, d))
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert json.loads(done.stdout) == {"imported": len(sessions), "expired": 0,
                                           "invalid": 0, "refused": 0, "stopped": False}
        for sid, text, serializer, _ in sessions:
            with Client(d.address) as c:
                assert c.request(p.Read(sid, lock=False)) == p.Data(text.encode()), sid
            proc = run_php(script, handler="phpsess", address=d.php_address, args=(sid,),
                           ini={"session.serialize_handler": serializer})
            assert proc.returncode == 0 and proc.stderr == "", (sid, proc.stderr)
            word = "René" if charset == "latin1" else cyrillic
            assert json.loads(proc.stdout) == {"name": word.encode().hex()}, (sid, proc.stdout)


def test_import_copies_data_that_decodes_neither_way_and_counts_it(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # s:9: fits neither 'Ren\xe9' (4 bytes) nor 'René' (5): imported as
    # stored, counted and named (the first 20), never dropped or changed.
    bad = b'name|s:9:"Ren\xe9";'
    latin1, blob = fresh_table(), fresh_table()
    rows = [("ok0123456789abcdefghijklmn", b"n|i:1;")]
    rows += [(f"bad{n:02d}0123456789abcdefghijk", bad) for n in range(22)]
    # A BLOB is bytes to every connection: never read through CONVERT,
    # which would make this one (php_binary, a key of 127 bytes) '?' and
    # 63 'k', a key of 63 bytes and a session.
    blob_rows = [("blobbad0123456789abcdefghi", b"\xff" + b"k" * 63 + b"i:1;"),
                 ("blobbad10123456789abcdefgh", bad)]
    for table, columns, table_rows in ((latin1, TEXT_COLUMNS, rows),
                                       (blob, "id VARBINARY(128) PRIMARY KEY, data BLOB",
                                        blob_rows)):
        values = ", ".join(f"('{sid}', X'{data.hex()}', NOW())" for sid, data in table_rows)
        _classic_table(mariadb, table, "latin1", values, columns)
    d = start_daemon("--memory-only")
    done = _admin("import", "--from-sql", mariadb.url(), "--from-table", latin1,
                  *_common(mariadb, d))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"imported": 23, "expired": 0, "invalid": 0,
                                       "refused": 0, "undecodable": 22, "stopped": False}
    warnings = done.stderr.splitlines()
    assert len(warnings) == 21, done.stderr
    assert warnings[0].startswith(
        "phpsess: row with id 'bad000123456789abcdefghijk': data does not decode"), warnings
    assert warnings[-1] == ("phpsess: 2 more rows do not decode as a PHP session "
                            "(imported as stored)"), warnings
    done = _admin("import", "--from-sql", mariadb.url(), "--from-table", blob,
                  *_common(mariadb, d))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["undecodable"] == 2, done.stdout
    assert "'blobbad0123456789abcdefghi'" in done.stderr, done.stderr
    with Client(d.address) as c:
        for sid, data in rows + blob_rows:
            assert c.request(p.Read(sid, lock=False)) == p.Data(data), sid


def test_import_skips_data_that_decodes_as_two_different_sessions(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # A user who controls two values of a session written through a utf8mb4
    # connection into a latin1 column: each é is one byte stored under an
    # s:N: that counted two, so the stored bytes parse into other keys, one
    # of them role|s:5:"admin".  PHP read role "user"; which reading is PHP's
    # cannot be told from the row, so it is not imported.
    v2 = '";role|s:5:"admin";x|s:16:"'
    mid = f'";last|s:{len(v2)}:"'
    v1 = "é" * len(mid)
    text = f'first|s:{len(v1.encode())}:"{v1}";last|s:{len(v2)}:"{v2}";role|s:4:"user";'
    sid = "forged0123456789abcdefghij"
    daemon = start_daemon("--memory-only")
    table = fresh_table()
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    _classic_table(mariadb, table, "latin1", f"('{sid}', '{escaped}', NOW())",
                   statements="SET NAMES utf8mb4; ")
    done = _admin("import", "--from-sql", mariadb.url(), "--from-table", table,
                  *_common(mariadb, daemon))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["imported"] == 0 and report["ambiguous"] == 1, done.stdout
    assert f"skipped row with id {sid!r}: its data decodes as two different sessions" \
        in done.stderr
    with Client(daemon.address) as c:
        assert c.request(p.Read(sid, lock=False)) == p.MISS
