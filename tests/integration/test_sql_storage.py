"""The SQL storage backend (``--storage mysql://...``) against a real MariaDB
that the test run starts itself (issue 7).  The PHP-semantics transcripts
and the locking tests run against it too (``any_daemon``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import (
    PREPEND,
    MariaDB,
    free_tcp_port,
    fresh_table,
    php_binary,
    private_mariadb,
    read_counter,
    scrape_metrics,
)

HOLD = Path(__file__).parent / "php" / "hold.php"


def _php_hold(daemon: Any, sid: str, hold_ms: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [php_binary(), "-d", "display_errors=stderr", "-d", "session.use_cookies=0",
         "-d", "session.cache_limiter=", "-d", f"auto_prepend_file={PREPEND}",
         "-d", f"phpsess.address={daemon.php_address}", str(HOLD), sid, str(hold_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_daemons_sharing_one_table_50_concurrent_increments_end_at_plus_50(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    table = fresh_table()
    daemons = [start_daemon(*mariadb.daemon_args(table)) for _ in range(2)]
    sid = "shared0123456789abcdefghij"
    with Client(daemons[0].address) as c:
        assert c.request(p.Write(sid, 1440, b"n|i:7;")) == p.OK
    # Alternate: every other request goes through the other daemon.
    procs = [_php_hold(daemons[i % 2], sid, 20) for i in range(50)]
    results = [(proc.wait(120), *proc.communicate()) for proc in procs]
    assert [r for r in results if r[0] != 0 or r[2]] == []
    seen = sorted(int(out.split("n=")[1]) for _, out, _ in results)
    assert seen == list(range(8, 58))  # each request saw its predecessor's write
    for d in daemons:  # both daemons see the one shared table
        assert read_counter(d.address, sid) == 57
    waits = 0
    for d in daemons:
        with Client(d.address) as c:
            stats = c.request(p.Stats())
            assert isinstance(stats, p.Data)
            waits += int(stats.data.split(b'"lock_waits_total": ')[1].split(b",")[0])
    assert waits > 0  # they really contended, across daemons


def test_a_lock_holds_across_daemons_and_goes_with_the_holders_connection(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    table = fresh_table()
    one, two = (start_daemon(*mariadb.daemon_args(table)) for _ in range(2))
    sid = "crossdaemon0123456789abcdef"
    holder = Client(one.address)
    with Client(two.address) as other:
        assert other.request(p.Exists(sid)) == p.Ok(("0",))
    assert holder.request(p.Read(sid)) == p.MISS  # locked, on daemon one
    with Client(two.address) as other:
        # Being started, it exists (PROTOCOL.md §4.4), as a file PHP opened does.
        assert other.request(p.Exists(sid)) == p.Ok(("1",))
        assert other.request(p.Write(sid, 60, b"x")).code == p.Code.LOCKED  # type: ignore[union-attr]
        assert other.request(p.Destroy(sid)).code == p.Code.LOCKED  # type: ignore[union-attr]
        other.send_raw(p.encode_request(p.Read(sid)))  # queues on daemon two
        time.sleep(0.3)
        assert holder.request(p.Write(sid, 60, b"v|i:1;", keep=True)) == p.OK
        started = time.monotonic()
        holder.close()  # the PHP worker dies: its lock goes at once
        assert other.read_reply() == p.Data(b"v|i:1;")
        assert time.monotonic() - started < 2
        assert other.request(p.Write(sid, 60, b"v|i:2;")) == p.OK


def test_the_lease_revokes_a_lock_and_the_late_write_is_refused(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    d = start_daemon(*mariadb.daemon_args(fresh_table()))
    sid = "lease0123456789abcdefghijk"
    slow = Client(d.address, hello=False)
    assert slow.request(p.Hello(1, lease_ms=300)) == p.Ok(("1",))
    assert slow.request(p.Read(sid)) == p.MISS
    with Client(d.address) as other:
        started = time.monotonic()
        assert other.request(p.Read(sid)) == p.MISS  # granted once the lease ran out
        assert 0.2 < time.monotonic() - started < 3
        assert other.request(p.Write(sid, 60, b"winner")) == p.OK
    late = slow.request(p.Write(sid, 60, b"late"))
    assert isinstance(late, p.Error) and late.code == p.Code.LOCK_LOST
    slow.close()
    with Client(d.address) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(b"winner")


def test_expiry_by_the_expiry_column_and_binary_data(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    table = fresh_table()
    d = start_daemon(*mariadb.daemon_args(table))
    blob = bytes(range(256)) * 8 + b"\x00'\"\\"
    with Client(d.address) as c:
        assert c.request(p.Write("short", 1, blob)) == p.OK
        assert c.request(p.Write("long", 100, blob)) == p.OK
        assert c.request(p.Read("short", lock=False)) == p.Data(blob)
        assert c.request(p.Touch("gone", 100)) == p.MISS
        time.sleep(1.2)
        assert c.request(p.Read("short", lock=False)) == p.MISS
        assert c.request(p.Exists("short")) == p.Ok(("0",))
        assert c.request(p.Touch("short", 100)) == p.MISS
        assert c.request(p.Read("long", lock=False)) == p.Data(blob)
    columns = mariadb.sql(f"SHOW CREATE TABLE {table}", "phpsess")
    assert "`data` longblob NOT NULL" in columns and "KEY `expires`" in columns
    assert "ENGINE=InnoDB" in columns


def test_an_idle_connection_is_cut_off_and_a_lock_holder_is_not(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    d = start_daemon(*mariadb.daemon_args(fresh_table()), "--idle-timeout-s", "1")
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(d.sock_path)
    idle.settimeout(10)
    with Client(d.address) as holder:
        assert holder.request(p.Read("held")) == p.MISS  # holds the lock
        idle.sendall(b"HELLO 1\n")
        assert idle.recv(100) == b"OK 1\n"
        started = time.monotonic()
        assert idle.recv(100) == b""  # closed by the daemon
        assert time.monotonic() - started < 5
        time.sleep(1.5)  # past the idle timeout: the holder may think
        assert holder.request(p.Write("held", 60, b"kept")) == p.OK
    idle.close()


@pytest.fixture
def own_mariadb() -> Iterator[MariaDB]:
    """A MariaDB of its own, for a test that kills it."""
    with private_mariadb() as server:
        yield server


def test_database_killed_and_restarted_under_load_loses_no_acknowledged_write(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    d = start_daemon(*own_mariadb.daemon_args(fresh_table()))
    stop = threading.Event()
    acked: dict[str, int] = {}
    attempted: dict[str, int] = {}
    failures: dict[str, list[str]] = {}

    def writer(sid: str) -> None:
        n = 0
        failures[sid] = []
        with Client(d.address) as c:
            while not stop.is_set():
                read = c.request(p.Read(sid))
                if not isinstance(read, (p.Data, p.Miss)):
                    failures[sid].append(str(read))
                    time.sleep(0.01)
                    continue
                attempted[sid] = n + 1
                reply = c.request(p.Write(sid, 600, str(n + 1).encode()))
                if reply == p.OK:
                    n += 1
                    acked[sid] = n
                else:
                    failures[sid].append(str(reply))
                    time.sleep(0.01)

    sids = [f"load{i}abcdefghijklmnopqrstuvw" for i in range(4)]
    threads = [threading.Thread(target=writer, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert all(acked.get(sid, 0) > 0 for sid in sids), acked
        own_mariadb.kill9()
        time.sleep(0.3)
        # While it is down PHP gets a clean failure: session_start() false
        # with a warning naming the cause, no hang, no files fallback.
        proc = _php_hold(d, "phpdown0123456789abcdefgh", 0)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, (out, err)
        assert "UNAVAILABLE" in err and "session_start failed" in err, err
        with Client(d.address) as c:  # the daemon itself keeps serving
            assert c.request(p.Ping()) == p.OK
        down_acked = dict(acked)
        own_mariadb.start()
        restarted = time.monotonic()
        # Service resumes by itself: every writer gets acknowledged writes again.
        while not all(acked.get(sid, 0) > down_acked.get(sid, 0) for sid in sids):
            assert time.monotonic() - restarted < 20, (acked, down_acked)
            time.sleep(0.05)
        print(f"resumed {time.monotonic() - restarted:.2f} s after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert all("UNAVAILABLE" in " ".join(failures[sid]) for sid in sids), failures
    with Client(d.address) as c:
        for sid in sids:
            reply = c.request(p.Read(sid, lock=False))
            assert isinstance(reply, p.Data)
            stored = int(reply.data)
            # Every acknowledged write is there; at most the one in flight
            # when it failed may have been committed too.
            assert acked[sid] <= stored <= attempted[sid], (sid, acked, stored)
    proc = _php_hold(d, "phpback0123456789abcdefgh", 0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "" and "n=1" in out, err


def _serve(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phpsess", "serve", "--listen", "unix:/tmp/never.sock", *args],
        capture_output=True, text=True, timeout=timeout_s,
    )


def test_bad_storage_settings_are_refused_clearly(mariadb: MariaDB, tmp_path: Path) -> None:
    url = mariadb.url()
    done = _serve("--storage", url, "--node", "web1")
    assert done.returncode == 2 and "alternatives" in done.stderr, done.stderr
    done = _serve("--storage", url.replace("phpsess@", "phpsess:secret@"))
    assert done.returncode == 2 and "no password in the storage URL" in done.stderr
    done = _serve("--storage", url, "--storage-table", "bad-name;drop")
    assert done.returncode == 2 and "table name" in done.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    done = _serve("--storage", url, "--storage-password-file", str(wrong))
    assert done.returncode == 1, done.stderr
    assert "Access denied" in done.stderr and "password" in done.stderr


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phpsess", *args],
                          capture_output=True, text=True, timeout=60)


def test_import_from_and_export_to_the_classic_session_table(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # The classic recipe's table: TEXT data, TIMESTAMP usetime, a CHAR id.
    classic, back = fresh_table(), fresh_table()
    mariadb.sql(
        f"CREATE TABLE {classic} (id CHAR(32) PRIMARY KEY, data TEXT, "
        "usetime TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP); "
        f"INSERT INTO {classic} VALUES ('fresh0123456789abcdefghijk', 'n|i:5;', NOW()), "
        f"('old0123456789abcdefghijklm', 'n|i:1;', NOW() - INTERVAL 2 HOUR), "
        f"('../../etc/passwd', 'x', NOW())", "phpsess")
    d = start_daemon(*mariadb.daemon_args(fresh_table()))
    common = ["--connect", d.address, "--password-file", str(mariadb.password_file),
              "--max-lifetime", "1440", "--json"]
    done = _admin("import", "--from-sql", mariadb.url(), "--from-table", classic, *common)
    assert done.returncode == 1, done.stderr  # one row's id is not a session ID
    assert '"imported": 1' in done.stdout and '"expired": 1' in done.stdout
    assert '"invalid": 1' in done.stdout and "not a session ID" in done.stderr
    assert read_counter(d.address, "fresh0123456789abcdefghijk") == 5
    with Client(d.address) as c:
        got = c.request(p.Get("fresh0123456789abcdefghijk"))
        assert isinstance(got, p.Data)
        assert 1_400_000 < int(got.tokens[0]) <= 1_440_000  # usetime + max - now
        assert c.request(p.Write("binary0123456789abcdefghij", 600, b"\x00\xff\n")) == p.OK

    done = _admin("export", "--to-sql", mariadb.url(), "--to-table", back, *common)
    assert done.returncode == 0 and '"exported": 2' in done.stdout, done.stderr
    rows = mariadb.sql(
        f"SELECT id, HEX(data), TIMESTAMPDIFF(SECOND, usetime, NOW()) FROM {back} ORDER BY id",
        "phpsess").splitlines()
    assert [r.split("\t")[:2] for r in rows] == [
        ["binary0123456789abcdefghij", "00FF0A"], ["fresh0123456789abcdefghijk", "6E7C693A353B"]]
    age_binary = int(rows[0].split("\t")[2])
    assert 1440 - 600 - 5 <= age_binary <= 1440 - 600 + 5  # expires when it would have


def test_import_from_a_classic_table_with_unix_time_or_null_usetime(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # Copies of the recipe keep PHP's time() in an INT usetime, or let it be
    # NULL: such a row crashed the import (int(None)).
    ints, dates = fresh_table(), fresh_table()
    mariadb.sql(
        f"CREATE TABLE {ints} (id VARCHAR(64) PRIMARY KEY, data TEXT, usetime INT UNSIGNED); "
        f"INSERT INTO {ints} VALUES "
        "('unixfresh0123456789abcdefg', 'n|i:3;', UNIX_TIMESTAMP() - 40), "
        "('unixold0123456789abcdefghi', 'n|i:1;', UNIX_TIMESTAMP() - 7200), "
        "('unixnull0123456789abcdefgh', 'n|i:2;', NULL); "
        f"CREATE TABLE {dates} (id CHAR(32) PRIMARY KEY, data TEXT, usetime DATETIME NULL); "
        f"INSERT INTO {dates} VALUES ('datenull0123456789abcdefgh', 'x', NULL), "
        "('datefresh0123456789abcdefg', 'n|i:4;', NOW())", "phpsess")
    d = start_daemon("--memory-only")
    common = ["--connect", d.address, "--password-file", str(mariadb.password_file),
              "--max-lifetime", "1440", "--json"]
    for table, fresh, null in ((ints, "unixfresh0123456789abcdefg", "unixnull0123456789abcdefgh"),
                               (dates, "datefresh0123456789abcdefg",
                                "datenull0123456789abcdefgh")):
        done = _admin("import", "--from-sql", mariadb.url(), "--from-table", table, *common)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert json.loads(done.stdout) == {"imported": 1, "expired": int(table == ints),
                                           "invalid": 1, "refused": 0, "stopped": False}
        assert f"skipped row with id {null}: usetime is NULL; it must be a TIMESTAMP" in (
            done.stderr)
        with Client(d.address) as c:
            got = c.request(p.Get(fresh))
            assert isinstance(got, p.Data), (table, got)
            expected_ms = 1_400_000 if table == ints else 1_440_000
            assert expected_ms - 3_000 <= int(got.tokens[0]) <= expected_ms, got
            assert c.request(p.Get(null)) == p.MISS
    # --strict stops at the NULL row: the expired row after it (in ID order)
    # is not even looked at.
    done = _admin("import", "--from-sql", mariadb.url(), "--from-table", ints, "--strict",
                  *common)
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"imported": 1, "expired": 0, "invalid": 1,
                                       "refused": 0, "stopped": True}
    # And back: export wrote NOW() into the integer usetime, stored as the
    # number YYYYMMDDhhmmss. An INT refused it (out of range); a BIGINT took
    # it, and a classic handler would never have expired the session.
    wide = fresh_table()
    mariadb.sql(f"CREATE TABLE {wide} (id VARCHAR(64) PRIMARY KEY, data TEXT, "
                "usetime BIGINT)", "phpsess")
    for table in (ints, wide):
        done = _admin("export", "--to-sql", mariadb.url(), "--to-table", table, *common)
        assert done.returncode == 0, done.stderr
        age = mariadb.sql(f"SELECT UNIX_TIMESTAMP() - usetime FROM {table} "
                          "WHERE id = 'unixfresh0123456789abcdefg'", "phpsess")
        assert 40 - 5 <= int(age) <= 40 + 5, (table, age)  # as old as it was


def test_export_to_a_classic_table_says_which_lifetimes_it_shortened(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # A classic table keeps a session --max-lifetime after its usetime: an
    # hour-long session came back with 24 minutes, and the report was silent.
    d = start_daemon("--memory-only")
    with Client(d.address) as c:
        assert c.request(p.Write("hour0123456789abcdefghijkl", 3600, b"n|i:1;")) == p.OK
        assert c.request(p.Write("short0123456789abcdefghijk", 600, b"n|i:2;")) == p.OK
    common = ["--connect", d.address, "--password-file", str(mariadb.password_file),
              "--max-lifetime", "1440", "--to-sql", mariadb.url(), "--to-table", fresh_table()]
    done = _admin("export", *common)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exported 2, vanished 0, shortened 1\n"
    assert "1 session had more than --max-lifetime 1440 s to live" in done.stderr
    done = _admin("export", *common, "--json")
    assert json.loads(done.stdout) == {"exported": 2, "vanished": 0, "shortened": 1}


def test_metrics_say_when_the_database_does_not_answer(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    port = free_tcp_port()
    d = start_daemon("--metrics-listen", f"127.0.0.1:{port}",
                     *own_mariadb.daemon_args(fresh_table()))
    with Client(d.address) as c:
        assert c.request(p.Write("m1", 60, b"x" * 10)) == p.OK
    up = scrape_metrics(port)
    assert up[("phpsess_storage_up", ())] == 1 and up[("phpsess_sessions", ())] == 1
    own_mariadb.kill9()
    down = scrape_metrics(port)
    assert down[("phpsess_storage_up", ())] == 0
    assert ("phpsess_sessions", ()) not in down
    assert down[("phpsess_requests_total", (("verb", "WRITE"),))] == 1  # counted here, still there


def test_a_hung_database_costs_a_scrape_and_stats_2_s_and_nothing_after(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    """kill -STOP of the database: the count of sessions cannot be
    interrupted in its worker thread, yet /metrics and STATS answer within
    about 2 s without it; once the database runs again, so does everything
    (the abandoned thread's connection never went back to the pool)."""
    import os
    import signal

    port = free_tcp_port()
    d = start_daemon("--metrics-listen", f"127.0.0.1:{port}",
                     *own_mariadb.daemon_args(fresh_table()))
    with Client(d.address) as c:
        assert c.request(p.Write("h1", 60, b"x" * 10)) == p.OK
    assert scrape_metrics(port)[("phpsess_storage_up", ())] == 1
    os.kill(own_mariadb.server_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        down = scrape_metrics(port)
        assert time.monotonic() - started < 4
        assert down[("phpsess_storage_up", ())] == 0
        assert ("phpsess_sessions", ()) not in down
        started = time.monotonic()
        with Client(d.address, timeout_s=5) as c:
            stats = c.request(p.Stats())
        assert time.monotonic() - started < 4
        assert isinstance(stats, p.Data) and b'"storage_error"' in stats.data
    finally:
        os.kill(own_mariadb.server_pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while scrape_metrics(port)[("phpsess_storage_up", ())] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for _ in range(5):
        up = scrape_metrics(port)
        assert up[("phpsess_storage_up", ())] == 1 and up[("phpsess_sessions", ())] == 1
        with Client(d.address) as c:
            assert c.request(p.Read("h1", lock=False)) == p.Data(b"x" * 10)


# -- MISS DESTROYED (PROTOCOL.md §4.1): a session destroyed while a READ
# waited for its lock, told to the waiter on any daemon sharing the table


def _waiting(daemon: Any) -> int:
    with Client(daemon.address) as c:
        stats = c.request(p.Stats())
    assert isinstance(stats, p.Data)
    waiting: int = json.loads(stats.data)["locks_waiting"]
    return waiting


def _until_waiting(daemons: dict[Any, int]) -> None:
    deadline = time.monotonic() + 15
    while any(_waiting(d) != n for d, n in daemons.items()):
        assert time.monotonic() < deadline, "the READs did not wait for the lock"
        time.sleep(0.01)


def _granted(waiters: dict[str, Client]) -> str:
    """The waiter whose reply came first (the database picks the order)."""
    import select

    by_socket = {c._sock: name for name, c in waiters.items()}
    ready, _, _ = select.select(list(by_socket), [], [], 15)
    assert ready, "no waiter was granted the lock"
    return by_socket[ready[0]]


def test_a_session_destroyed_while_reads_wait_for_its_lock_is_dead_for_each_on_any_daemon(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # The SQL storage accepted the token and said MISS: PHP's handler took
    # the destroyed session for a new one and stored the logged-out ID again.
    table = fresh_table()
    one, two = (start_daemon(*mariadb.daemon_args(table)) for _ in range(2))
    sid = "doomedsql0123456789abcdefgh"
    holder = Client(one.address)
    assert holder.request(p.Read(sid)) == p.MISS
    assert holder.request(p.Write(sid, 1440, b'user|s:5:"alice";', keep=True)) == p.OK
    # Queued on the same daemon and on the other, two asking to be told, one
    # not (an older handler): it gets MISS, as before.
    on = {"same": one, "other": two, "plain": two, "late": one}
    waiters = {name: Client(on[name].address) for name in ("same", "other", "plain")}
    waiters["same"].send_raw(b"READ " + sid.encode() + b" LOCK DESTROYED\n")
    waiters["other"].send_raw(b"READ " + sid.encode() + b" LOCK DESTROYED\n")
    waiters["plain"].send_raw(p.encode_request(p.Read(sid)))
    _until_waiting({one: 1, two: 2})
    assert holder.request(p.Destroy(sid)) == p.OK
    holder.close()
    # Each is granted in turn, the previous one letting go unwritten (as
    # PHP's handler does: DESTROY instead of its write, or CLOSE): the
    # session stays dead for each that waited at the destroy. One that
    # queued after it, behind the first granted, is not told (a new
    # session for it); the DESTROYs of the dead ID tell nobody new.
    told: dict[str, p.Reply] = {}
    while waiters:
        name = _granted(waiters)
        c = waiters.pop(name)
        if not told:  # the first granted holds it: one more queues behind it
            waiters["late"] = Client(one.address)
            waiters["late"].send_raw(b"READ " + sid.encode() + b" LOCK DESTROYED\n")
            _until_waiting({d: sum(on[w] is d for w in waiters) for d in (one, two)})
        told[name] = c.read_reply()
        again = c.request(p.Read(sid, lock=True, destroyed=name != "plain"))  # re-entrant
        assert again == told[name], (name, again)
        # Held only to release the dead ID: strict mode must not keep it (it
        # is being started for one that came after the destroy, §4.4).
        seen = "1" if name == "late" else "0"
        for d in (one, two):
            with Client(d.address) as look:
                assert look.request(p.Exists(sid)) == p.Ok((seen,)), (name, d)
        done = p.Destroy(sid) if told[name] == p.MISS_DESTROYED else p.Close()
        assert c.request(done) == p.OK
        c.close()
    assert told == {"same": p.MISS_DESTROYED, "other": p.MISS_DESTROYED, "plain": p.MISS,
                    "late": p.MISS}
    # Once the lock is free, the ID is simply unknown.
    for d in (one, two):
        with Client(d.address) as c:
            assert c.request(p.Exists(sid)) == p.Ok(("0",))
            assert c.request(p.Read(sid, lock=True, destroyed=True)) == p.MISS
            assert c.request(p.Close()) == p.OK


def test_a_waiter_is_told_destroyed_only_if_the_session_was_destroyed_unwritten_since(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    table = fresh_table()
    one, two = (start_daemon(*mariadb.daemon_args(table)) for _ in range(2))

    def wait_on(d: Any, sid: str) -> Client:
        c = Client(d.address)
        c.send_raw(b"READ " + sid.encode() + b" LOCK DESTROYED\n")
        return c

    # Written by the first granted after the destroy: the next reads it.
    sid = "rewritten0123456789abcdefgh"
    with Client(one.address) as holder:
        assert holder.request(p.Read(sid)) == p.MISS
        assert holder.request(p.Write(sid, 1440, b"old", keep=True)) == p.OK
        waiters = {"a": wait_on(one, sid), "b": wait_on(two, sid)}
        _until_waiting({one: 1, two: 1})
        assert holder.request(p.Destroy(sid)) == p.OK
    first = waiters.pop(_granted(waiters))
    assert first.read_reply() == p.MISS_DESTROYED
    assert first.request(p.Write(sid, 1440, b"new")) == p.OK
    (second,) = waiters.values()
    assert second.read_reply() == p.Data(b"new")
    assert second.request(p.Close()) == p.OK
    first.close()
    second.close()

    # Never existed (the holder started it and let go): MISS.
    sid = "neverwas0123456789abcdefghi"
    with Client(one.address) as holder:
        assert holder.request(p.Read(sid)) == p.MISS
        waiter = wait_on(two, sid)
        _until_waiting({two: 1})
        assert holder.request(p.Close()) == p.OK
    assert waiter.read_reply() == p.MISS
    assert waiter.request(p.Close()) == p.OK
    waiter.close()

    # Expired while the READ waited, not destroyed: MISS (a destroy leaves
    # no mark that an expiry could be taken for, nor the other way round).
    sid = "expiredwait0123456789abcdef"
    with Client(one.address) as holder:
        assert holder.request(p.Read(sid)) == p.MISS
        assert holder.request(p.Write(sid, 1, b"short", keep=True)) == p.OK
        waiter = wait_on(two, sid)
        _until_waiting({two: 1})
        time.sleep(1.2)
        assert holder.request(p.Close()) == p.OK
    assert waiter.read_reply() == p.MISS
    waiter.close()


# -- the table as the backend needs it, the database's limits, its restarts


def _serve_storage(db: MariaDB, table: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``phpsess serve`` on ``table``, expected to refuse to start (bounded:
    a daemon that starts instead is stopped after 20 s and fails the test)."""
    try:
        return _serve(*db.daemon_args(table), *args, timeout_s=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon started on table {table} instead of refusing it")


def test_a_table_that_cannot_hold_the_sessions_is_refused_at_start(
    mariadb: MariaDB, start_daemon: Any
) -> None:
    # A narrower data column (a session over 64 KiB was cut to 65,535 bytes
    # and acknowledged under a non-strict sql_mode).
    legacy = fresh_table()
    mariadb.sql(
        f"CREATE TABLE {legacy} (id VARBINARY(256) PRIMARY KEY, data BLOB NOT NULL, "
        "expires DATETIME(6) NOT NULL, KEY expires(expires))", "phpsess")
    done = _serve_storage(mariadb, legacy)
    assert done.returncode == 1, done.stderr
    assert f"storage table phpsess.{legacy} cannot hold the sessions" in done.stderr
    assert "data is BLOB, which holds 65535 bytes, less than --max-session-bytes 16777216" in (
        done.stderr)
    assert "give --storage-table a new name" in done.stderr
    # Wide enough for the sessions it is allowed: used.
    d = start_daemon(*mariadb.daemon_args(legacy), "--max-session-bytes", "65535")
    with Client(d.address) as c:
        assert c.request(p.Write("legacy0123456789abcdefghij", 60, b"\xfe" * 65535)) == p.OK
        assert c.request(p.Read("legacy0123456789abcdefghij", lock=False)) == p.Data(
            b"\xfe" * 65535)
    # The classic PHP session table: every request failed with 1054
    # Unknown column, for ever, after event=storage_ready.
    classic = fresh_table()
    mariadb.sql(f"CREATE TABLE {classic} (id VARCHAR(128) PRIMARY KEY, data TEXT, "
                "usetime TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)", "phpsess")
    done = _serve_storage(mariadb, classic)
    assert done.returncode == 1, done.stderr
    assert "it has no column expires (its columns: id, data, usetime)" in done.stderr
    assert "id is VARCHAR(" in done.stderr and "data is TEXT, not a binary type" in done.stderr
    assert "phpsess import --from-sql" in done.stderr
    # An engine that cannot hold the table: every request failed with 1163.
    done = _serve_storage(mariadb, fresh_table(), "--storage-engine", "MEMORY")
    assert done.returncode == 1, done.stderr
    assert "1163" in done.stderr and "engine MEMORY" in done.stderr, done.stderr
    assert "give --storage-table a new name" in done.stderr
    # An engine the server lacks (the README's ndbcluster on a plain
    # MariaDB): its message was about users, passwords and grants.
    done = _serve_storage(mariadb, fresh_table(), "--storage-engine", "ndbcluster")
    assert done.returncode == 1, done.stderr
    assert "the database has no storage engine ndbcluster" in done.stderr, done.stderr
    assert "grants" not in done.stderr


def test_a_value_too_long_for_its_column_is_an_error_never_truncated(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    # A column narrowed while the daemon runs, on a server whose sql_mode is
    # not strict: the write was acknowledged and 65,535 bytes came back.
    own_mariadb.sql("SET GLOBAL sql_mode = 'NO_ENGINE_SUBSTITUTION'")
    table = fresh_table()
    d = start_daemon(*own_mariadb.daemon_args(table))
    blob = bytes(range(256)) * 390 + b"end of it!!!!!"  # 100,014 bytes
    with Client(d.address) as c:
        assert c.request(p.Write("narrow0123456789abcdefghij", 600, b"small")) == p.OK
        own_mariadb.sql(f"ALTER TABLE {table} MODIFY data BLOB NOT NULL", "phpsess")
        reply = c.request(p.Write("narrow0123456789abcdefghij", 600, blob))
        assert isinstance(reply, p.Error) and reply.code == p.Code.UNAVAILABLE, reply
        assert "1406" in reply.message and "Data too long" in reply.message
        assert c.request(p.Read("narrow0123456789abcdefghij", lock=False)) == p.Data(b"small")


def test_a_session_over_max_allowed_packet_is_refused_and_its_lock_kept(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    # PyMySQL sends bytes as hex: a session over half of max_allowed_packet
    # failed with UNAVAILABLE (1153 or 2006) and its connection, lock and
    # all, was dropped.
    own_mariadb.sql("SET GLOBAL max_allowed_packet = 1048576")
    d = start_daemon(*own_mariadb.daemon_args(fresh_table()))
    assert "event=storage_packet_small" in d.log()
    assert "max_allowed_packet=1048576 max_session_bytes=16777216" in d.log()
    assert "raise the database's max_allowed_packet to at least 33558528" in d.log()
    sid = "packet0123456789abcdefghijk"
    with Client(d.address) as holder:
        assert holder.request(p.Read(sid)) == p.MISS
        big = holder.request(p.Write(sid, 600, b"\x00" * 600_000, keep=True))
        assert isinstance(big, p.Error) and big.code == p.Code.TOO_LARGE, big
        assert "max_allowed_packet is 1048576" in big.message
        with Client(d.address) as other:  # still locked
            locked = other.request(p.Write(sid, 600, b"other"))
            assert isinstance(locked, p.Error) and locked.code == p.Code.LOCKED, locked
        fits = b"\xff" * 520_000
        assert holder.request(p.Write(sid, 600, fits)) == p.OK  # the lock was kept
    with Client(d.address) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(fits)


def test_after_a_database_restart_no_request_fails_on_a_stale_pooled_connection(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    table = fresh_table()
    d = start_daemon(*own_mariadb.daemon_args(table), "--log-level", "debug")
    # The purge (every 10 s) would also clear the stale connections: right
    # after one, the test has 10 s to itself.
    own_mariadb.sql(f"INSERT INTO {table} VALUES ('old', '', UTC_TIMESTAMP(6))", "phpsess")
    deadline = time.monotonic() + 15
    while "event=purged rows=1" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    # One more to purge: the next purge says so in the log.
    own_mariadb.sql(f"INSERT INTO {table} VALUES ('old2', '', UTC_TIMESTAMP(6))", "phpsess")
    # Six lock holders at once: six pinned connections, then idle in the pool.
    holders = [Client(d.address) for _ in range(6)]
    for i, c in enumerate(holders):
        assert c.request(p.Read(f"warm{i}0123456789abcdefghij")) == p.MISS
    for i, c in enumerate(holders):
        assert c.request(p.Write(f"warm{i}0123456789abcdefghij", 600, b"w")) == p.OK
        c.close()
    own_mariadb.kill9()
    own_mariadb.start()
    sid = "restart0123456789abcdefghij"
    # Ten PHP requests in turn: session_start() (a locking READ), and only
    # if it worked, the write.  Each stale connection failed one of them.
    reads: list[p.Reply] = []
    written = 0
    for _ in range(10):
        with Client(d.address) as c:
            reads.append(c.request(p.Read(sid)))
            if isinstance(reads[-1], (p.Data, p.Miss)):
                assert c.request(p.Write(sid, 600, str(written).encode())) == p.OK
                written += 1
    # (Else the purge may have cleared the stale connections first.)
    assert d.log().count("event=purged") == 1, "a purge ran meanwhile: the machine is too slow"
    assert reads == [p.MISS] + [p.Data(str(n).encode()) for n in range(9)], reads


def test_a_table_found_wrong_once_the_database_is_back_is_refused_clearly(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    # Started while the database was down, the daemon cannot check the
    # table at start: once it answers, requests get the reason, not 1054.
    classic = fresh_table()
    own_mariadb.sql(f"CREATE TABLE {classic} (id VARCHAR(128) PRIMARY KEY, data TEXT, "
                    "usetime TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)", "phpsess")
    own_mariadb.kill9()
    d = start_daemon(*own_mariadb.daemon_args(classic))
    assert "event=storage_unreachable" in d.log()
    own_mariadb.start()
    deadline = time.monotonic() + 30
    while "event=storage_refused" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    assert f"storage table phpsess.{classic} cannot hold the sessions" in d.log()
    sid = "wrong0123456789abcdefghijk"
    with Client(d.address) as c:
        for request in (p.Read(sid), p.Exists(sid), p.Write(sid, 60, b"x")):
            reply = c.request(request)
            assert isinstance(reply, p.Error) and reply.code == p.Code.UNAVAILABLE, reply
            assert "it has no column expires" in reply.message, reply
        assert c.request(p.Ping()) == p.OK
        # Monitoring sees it: the storage is reachable but cannot be used.
        stats = c.request(p.Stats())
    assert isinstance(stats, p.Data)
    assert "it has no column expires" in json.loads(stats.data)["storage_error"]


def test_a_destroy_works_whatever_the_servers_sql_mode(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    # Each connection added strict to the server's modes and kept the rest:
    # under MariaDB's EMPTY_STRING_IS_NULL a DESTROY's '' became NULL, the
    # DESTROY failed (1048) and the session outlived session_destroy().
    own_mariadb.sql("SET GLOBAL sql_mode = 'STRICT_TRANS_TABLES,EMPTY_STRING_IS_NULL,ANSI'")
    d = start_daemon(*own_mariadb.daemon_args(fresh_table()))
    sid = "modes0123456789abcdefghijk"
    with Client(d.address) as c:
        assert c.request(p.Read(sid)) == p.MISS
        assert c.request(p.Write(sid, 600, b"", keep=True)) == p.OK
        assert c.request(p.Destroy(sid)) == p.OK
        assert c.request(p.Exists(sid)) == p.Ok(("0",))
        assert c.request(p.Read(sid, lock=False)) == p.MISS


def test_a_raised_max_allowed_packet_is_taken_without_a_restart(
    own_mariadb: MariaDB, start_daemon: Any
) -> None:
    # Read once at start: after the operator raised it, as the warning
    # advises, the daemon went on refusing until it was restarted.
    own_mariadb.sql("SET GLOBAL max_allowed_packet = 1048576")
    d = start_daemon(*own_mariadb.daemon_args(fresh_table()))
    assert "event=storage_packet_small" in d.log()
    own_mariadb.sql("SET GLOBAL max_allowed_packet = 67108864")
    sid = "raised0123456789abcdefghij"
    big = b"\x01" * 600_000
    deadline = time.monotonic() + 30  # read again at every purge (10 s)
    with Client(d.address) as c:
        while (reply := c.request(p.Write(sid, 600, big))) != p.OK:
            assert isinstance(reply, p.Error) and reply.code == p.Code.TOO_LARGE, reply
            assert time.monotonic() < deadline, reply
            time.sleep(0.5)
        assert c.request(p.Read(sid, lock=False)) == p.Data(big)
