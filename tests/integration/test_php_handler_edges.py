"""Where the PHP handler used to differ from PHP's files handler: long
requests, a daemon that stops or closes idle connections, new sessions closed
unwritten.  Real php processes against a real daemon."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import (
    PREPEND,
    free_tcp_port,
    php_binary,
    read_counter,
    run_php,
    wait_listening,
)
from tests.integration.test_locking import _stats

SCRIPT = Path(__file__).parent / "php" / "handler_edges.php"
NOBODY = 65534


def _php(address: str, *args: str, query: str = "",
         ini: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Quoted: an unquoted "=" in a -d value is an ini syntax error.
    addr = f'"{address}{query}"' if query else address
    return run_php(SCRIPT, handler="phpsess", address=addr, args=args, ini=ini, timeout=60)


def _lines(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


def _until(condition: Callable[[], bool], what: str, limit_s: float = 15) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def _in_background(
    tmp_path: Path, address: str, *args: str, query: str = "",
    ini: dict[str, str] | None = None,
) -> Iterator[concurrent.futures.Future[subprocess.CompletedProcess[str]]]:
    """Runs the script, which waits at tmp_path/ready until tmp_path/go exists
    (and at ready2 until go2, ready3 until go3)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_php, address, *args, query=query, ini=ini)
        try:
            _until(lambda: (tmp_path / "ready").exists() or future.done(), "the php script")
            yield future
        finally:
            for go in ("go", "go2", "go3"):
                (tmp_path / go).touch()  # never leave the script waiting


# -- 1. the lock lease is wall-clock time, not max_execution_time


def test_a_request_slower_than_max_execution_time_keeps_its_lock(daemon: Any) -> None:
    # max_execution_time counts CPU time on Linux: a request waiting on I/O
    # runs on. The handler used to ask for a lease of max_execution_time + 5 s
    # (6 s here), so this write got LOCK_LOST; PHP's files handler has no limit.
    sid = "leasewall0123456789abcdefgh"
    proc = _php(daemon.php_address, "counter", sid, "6.5", ini={"max_execution_time": "1"})
    assert proc.stderr == "", proc.stderr
    assert _lines(proc)["n"] == "1"
    assert read_counter(daemon.address, sid) == 1


def _short_lease(start_daemon: Any, how: str) -> tuple[Any, str]:
    """A daemon and a save_path query that give a request a 1 s lease: the
    daemon's ``--lock-lease-s``, or the handler's ``lease`` option."""
    if how == "daemon":
        return start_daemon("--memory-only", "--lock-lease-s", "1"), ""
    return start_daemon("--memory-only"), "?lease=1"


@pytest.mark.parametrize("how", ["daemon", "option"])
def test_a_request_past_its_lease_that_nobody_waits_for_keeps_its_write(
    how: str, start_daemon: Any, tmp_path: Path
) -> None:
    # A long request (a report, an import, set_time_limit(0)) that no other
    # request competes with: the files handler's flock has no lease and its
    # write is saved.  The lease only bounds how long a request keeps others
    # waiting (PROTOCOL.md §6.3); it used to cost this write LOCK_LOST.
    daemon, query = _short_lease(start_daemon, how)
    sid = f"leasealone{how}0123456789abcdef"
    expected = {"start": "true", "write-close": "true", "restart": "true", "n": "1"}
    proc = _php(daemon.php_address, "counter", sid, "2.5", query=query)
    assert proc.stderr == "", proc.stderr
    assert _lines(proc) == expected
    assert read_counter(daemon.address, sid) == 1
    assert _stats(daemon)["lock_revoked_total"] == 0
    # PHP's files handler, everything else equal.
    files = tmp_path / "files"
    files.mkdir()
    proc = run_php(SCRIPT, handler="files", save_path=str(files), args=("counter", sid, "2.5"))
    assert proc.stderr == "", proc.stderr
    assert _lines(proc) == expected


@pytest.mark.parametrize("how", ["daemon", "option"])
def test_a_request_past_its_lease_loses_its_write_to_the_next_request_that_asks(
    how: str, start_daemon: Any, tmp_path: Path
) -> None:
    # The lease ran out while nobody waited: the lock stays held until a
    # second request asks for it; that one gets it at once, and the first
    # one's write fails with LOCK_LOST (nothing changed), as it always did.
    daemon, query = _short_lease(start_daemon, how)
    sid = f"leaselost{how}0123456789abcdef"
    with _in_background(tmp_path, daemon.php_address, "counter", sid, str(tmp_path),
                        query=query) as first:
        time.sleep(1.5)  # its 1 s lease runs out; nobody waits
        stats = _stats(daemon)
        assert (stats["locks_held"], stats["lock_revoked_total"]) == (1, 0), stats
        second = _php(daemon.php_address, "counter", sid, "0")
        assert second.stderr == "", second.stderr
        assert _lines(second)["n"] == "1"  # the first's n += 1 is not there
        stats = _stats(daemon)
        assert (stats["lock_waits_total"], stats["lock_revoked_total"]) == (1, 1), stats
        (tmp_path / "go").touch()
        first_proc = first.result(60)
    assert "LOCK_LOST" in first_proc.stderr, first_proc.stderr
    assert "Failed to write session data" in first_proc.stderr, first_proc.stderr
    assert _lines(first_proc)["n"] == "1"  # what the second one wrote
    assert read_counter(daemon.address, sid) == 1


# -- 2. session_regenerate_id() while the daemon shuts down


@pytest.mark.parametrize("close", ["", "slow-close"])
@pytest.mark.parametrize("delete", ["0", "1"])
def test_regenerate_id_while_the_daemon_drains_keeps_the_session(
    delete: str, close: str, start_daemon: Any, tmp_path: Path
) -> None:
    # A graceful stop (SIGTERM, DRAIN) serves a connection only while it
    # holds a lock. The write (or destroy) of the old ID released the last
    # one, the daemon closed the connection, and the handler made the new ID
    # itself: regenerate said true, the final write failed with a warning and
    # the session (a login) was lost. Now the new ID is made, and locked, on
    # that connection first: it stays served until the new session is written.
    # slow-close: the daemon has time to close the connection between the
    # close() and the open() of session_regenerate_id(), if it is to.
    daemon = start_daemon()
    sid = f"regenstop{delete}0123456789abcdefgh"
    with Client(daemon.address) as c:
        assert c.request(p.Write(sid, 600, b"seen|i:1;")) == p.OK
    ini = {"session.sid_length": "26", "session.sid_bits_per_character": "5"}
    with _in_background(tmp_path, daemon.php_address, "regenerate", sid, delete,
                        str(tmp_path), close, ini=ini) as future:
        daemon.signal(signal.SIGTERM)
        _until(lambda: "event=stopping" in daemon.log(), "the daemon to start stopping")
        (tmp_path / "go").touch()
        _until(lambda: (tmp_path / "ready2").exists() or future.done(), "session_regenerate_id()")
        (tmp_path / "go2").touch()
        proc = future.result(60)
    got = _lines(proc)
    assert proc.stderr == "", proc.stderr
    assert got["regenerate"] == "true", got
    assert got["status"] == "2"  # PHP_SESSION_ACTIVE
    assert got["new-sid"] != sid
    assert re.fullmatch(r"[0-9a-v]{26}", got["new-sid"]), got["new-sid"]
    assert daemon.wait() == 0  # it stopped once the request was done
    daemon.start()
    with Client(daemon.address) as c:
        assert c.request(p.Read(got["new-sid"], lock=False)) == p.Data(
            b'seen|i:1;user|s:5:"alice";')
        old = c.request(p.Read(sid, lock=False))
    assert old == (p.MISS if delete == "1" else p.Data(b'seen|i:1;user|s:5:"alice";'))


@pytest.mark.parametrize("delete", ["0", "1"])
def test_regenerate_id_without_the_daemon_fails_and_keeps_the_old_session(
    delete: str, start_daemon: Any, tmp_path: Path
) -> None:
    # The daemon dies (kill -9) while the request holds the lock: no new ID
    # can be had, so the old session is neither written nor destroyed and
    # session_regenerate_id() returns false (the page can tell), as with
    # files when the old session cannot be written.
    daemon = start_daemon("--fsync", "always")  # kill -9 keeps what was acknowledged
    sid = f"regenkill{delete}0123456789abcdefgh"
    with Client(daemon.address) as c:
        assert c.request(p.Write(sid, 600, b"seen|i:1;")) == p.OK
    with _in_background(tmp_path, daemon.php_address, "regenerate", sid, delete,
                        str(tmp_path)) as future:
        daemon.kill9()
        daemon.start()
        (tmp_path / "go").touch()
        (tmp_path / "go2").touch()
        proc = future.result(60)
    got = _lines(proc)
    assert got["regenerate"] == "false", got
    assert got["status"] == "1"  # PHP_SESSION_NONE
    assert got["new-sid"] == sid
    assert "phpsess: session_regenerate_id failed: lost the connection" in proc.stderr
    php_says = "Session write failed" if delete == "0" else "Session object destruction failed"
    assert php_says in proc.stderr, proc.stderr
    with Client(daemon.address) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(b"seen|i:1;")
        listed = c.request(p.List(None, 100))
    assert isinstance(listed, p.Data) and listed.data.count(b"\n") == 1, listed  # no new ID


@pytest.mark.parametrize("restart", [False, True])
def test_regenerate_id_never_makes_an_id_the_daemon_does_not_hold(
    restart: bool, start_daemon: Any, tmp_path: Path
) -> None:
    # The daemon dies between the close() and the open() inside
    # session_regenerate_id(), after the old session was written. The handler
    # used to make the new ID itself: regenerate said true and the write at
    # the end failed, losing the session after the page had run. Now
    # create_sid() asks the daemon on a new connection, and fails when there
    # is none (PHP then throws an Error: nothing else is possible there).
    daemon = start_daemon("--fsync", "always")  # kill -9 keeps what was acknowledged
    sid = "regenlost0123456789abcdefgh"
    with _in_background(tmp_path, daemon.php_address, "regenerate", sid, "0",
                        str(tmp_path), "pause-close") as future:
        (tmp_path / "go").touch()
        _until(lambda: (tmp_path / "ready3").exists() or future.done(), "the close()")
        daemon.kill9()
        if restart:
            daemon.start()
        (tmp_path / "go3").touch()
        _until(lambda: (tmp_path / "ready2").exists() or future.done(), "session_regenerate_id()")
        (tmp_path / "go2").touch()
        proc = future.result(60)
    got = _lines(proc)
    if restart:
        assert proc.stderr == "", proc.stderr
        assert got["regenerate"] == "true" and got["status"] == "2", got
        with Client(daemon.address) as c:
            assert c.request(p.Read(got["new-sid"], lock=False)) == p.Data(b'user|s:5:"alice";')
        return
    assert got["thrown"].startswith("Error: Failed to create(read) session ID: user"), got
    assert "regenerate" not in got
    assert got["status"] == "1"  # PHP_SESSION_NONE
    warnings = [line for line in proc.stderr.splitlines() if "phpsess:" in line]
    assert len(warnings) == 1, proc.stderr
    assert re.search(r"phpsess: cannot connect to \S+: Connection refused", warnings[0]), warnings
    assert "Failed to write session data" not in proc.stderr  # nothing pretended to work
    daemon.start()
    with Client(daemon.address) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(b'user|s:5:"alice";')  # written


# -- 3. a connection the daemon closed for idleness (lock=0)


def test_without_locking_a_write_after_the_idle_timeout_reconnects(start_daemon: Any) -> None:
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "1")
    sid = "idlelock0a0123456789abcdefgh"
    proc = _php(daemon.php_address, "counter", sid, "2.5", query="?lock=0")
    assert proc.stderr == "", proc.stderr
    assert _lines(proc)["n"] == "1"
    assert read_counter(daemon.address, sid) == 1
    assert "event=idle_timeout" in daemon.log()  # it did close the connection


def test_a_lock_holder_never_reconnects_to_write(start_daemon: Any, tmp_path: Path) -> None:
    # A new connection would not hold the lock: writing through it could
    # overwrite another request's session. The write must fail instead.
    daemon = start_daemon("--memory-only")
    sid = "lockheld0123456789abcdefgh"
    with _in_background(tmp_path, daemon.php_address, "counter", sid, str(tmp_path)) as future:
        daemon.kill9()
        daemon.start()
        (tmp_path / "go").touch()
        proc = future.result(60)
    assert "phpsess: write failed: lost the connection" in proc.stderr, proc.stderr
    assert _lines(proc)["n"] == "null"
    with Client(daemon.address) as c:
        # Only the session the script started again afterwards (empty) is there.
        assert c.request(p.Read(sid, lock=False)) in (p.MISS, p.Data(b""))


# -- 4. strict mode: a new session closed unwritten keeps its ID


@pytest.mark.parametrize("query", ["", "?lock=0", "?persistent=0"])
@pytest.mark.parametrize("how", ["rac", "abort"])
def test_a_new_session_closed_unwritten_keeps_its_id_in_strict_mode(
    how: str, query: str, daemon: Any
) -> None:
    # PHP's files handler creates the (empty) file at read, so the ID is valid
    # in the next request; without it strict mode makes a new ID every time.
    ini = {"session.use_strict_mode": "1"}
    first = _lines(_php(daemon.php_address, "new", "", how, query=query, ini=ini))
    second = _lines(_php(daemon.php_address, "new", first["sid"], how, query=query, ini=ini))
    assert first["start"] == second["start"] == "true"
    assert second["sid"] == first["sid"]
    with Client(daemon.address) as c:
        got = c.request(p.Get(first["sid"]))
        assert isinstance(got, p.Data) and got.data == b"" and got.tokens[1] == "0"  # not locked


@pytest.mark.parametrize("regenerate", [False, True])
def test_strict_mode_a_new_id_is_valid_before_its_first_write(
    regenerate: bool, daemon: Any, tmp_path: Path
) -> None:
    # A page starts a new session (or regenerates the ID at login) and flushes
    # the cookie; a parallel request brings the ID before the page's write.
    # Files: read() created the file, so the ID validates and the second
    # request waits for the lock. The daemon used to say EXISTS 0 until the
    # write: PHP handed the second request another, empty session.
    ini = {"session.use_strict_mode": "1"}
    old = "firstvisit0123456789abcdefgh"
    if regenerate:
        with Client(daemon.address) as c:
            assert c.request(p.Write(old, 600, b"old|i:1;")) == p.OK
    with _in_background(tmp_path, daemon.php_address, "first-visit", str(tmp_path),
                        old if regenerate else "", ini=ini) as first:
        sid = (tmp_path / "sid").read_text()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(_php, daemon.php_address, "strict", sid, ini=ini)
            _until(lambda: _stats(daemon)["locks_waiting"] == 1 or second.done(),
                   "the second request to wait for the lock")
            (tmp_path / "go").touch()
            got = _lines(second.result(60))
        assert _lines(first.result(60))["write-close"] == "true"
    assert got["start"] == got["kept-given-id"] == "true", got
    expected = {"old": 1, "first": 1} if regenerate else {"first": 1}
    assert json.loads(got["session"]) == expected


# -- 4b. the same behind a wrapper that does not forward create_sid()
#
# Symfony's SessionHandlerProxy, which Symfony puts around the handler
# service, implements no SessionIdInterface: PHP makes new IDs itself and the
# handler first sees them in read(). With files, read() creates the file.

PROXY_PAGE = r"""<?php
// php proxy.php <rac|abort|write|empty> [<sid>]
declare(strict_types=1);
ob_start(); // CLI output counts as headers sent
// As Symfony's SessionHandlerProxy: no create_sid().
final class Proxy implements SessionHandlerInterface, SessionUpdateTimestampHandlerInterface
{
    public function __construct(private SessionHandlerInterface $h) {}
    public function open(string $p, string $n): bool { return $this->h->open($p, $n); }
    public function close(): bool { return $this->h->close(); }
    public function read(string $id): string|false { return $this->h->read($id); }
    public function write(string $id, string $d): bool { return $this->h->write($id, $d); }
    public function destroy(string $id): bool { return $this->h->destroy($id); }
    public function gc(int $m): int|false { return $this->h->gc($m); }
    public function validateId(string $id): bool
    {
        return !$this->h instanceof SessionUpdateTimestampHandlerInterface
            || $this->h->validateId($id);
    }
    public function updateTimestamp(string $id, string $d): bool
    {
        return $this->h instanceof SessionUpdateTimestampHandlerInterface
            ? $this->h->updateTimestamp($id, $d) : $this->write($id, $d);
    }
}
if (class_exists(\PhpSess\SessionHandler::class, false)) { // prepend.php: phpsess, else files
    session_set_save_handler(new Proxy(\PhpSess\SessionHandler::fromIni()), false);
}
$given = $argv[2] ?? '';
if ($given !== '') {
    session_id($given);
}
switch ($argv[1]) {
    case 'rac': $ok = session_start(['read_and_close' => true]); break;
    case 'abort': $ok = session_start(); $_SESSION['x'] = 1; session_abort(); break;
    case 'empty': $ok = session_start(); break;
    default: $ok = session_start(); $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
}
echo 'start: ', json_encode($ok), "\n", 'sid: ', session_id(), "\n",
    'kept-given-id: ', json_encode(session_id() === $given), "\n";
"""


def _proxied(handler: str, address: str, tmp_path: Path, *args: str,
             ini: dict[str, str] | None = None) -> dict[str, str]:
    script = _write_script(tmp_path / "pages", "proxy.php", PROXY_PAGE)
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    proc = run_php(script, handler=handler, address=address, save_path=str(files),
                   args=args, ini=ini, timeout=60)
    assert proc.stderr == "", proc.stderr
    return _lines(proc)


@pytest.mark.parametrize("handler", ["files", "phpsess"])
@pytest.mark.parametrize("how", ["rac", "abort"])
def test_behind_a_wrapper_a_new_session_closed_unwritten_keeps_its_id_in_strict_mode(
    how: str, handler: str, daemon: Any, tmp_path: Path
) -> None:
    # The handler stored only IDs it made (create_sid) when closed unwritten:
    # behind the wrapper, strict mode handed out a new ID on every request.
    ini = {"session.use_strict_mode": "1"}
    first = _proxied(handler, daemon.php_address, tmp_path, how, ini=ini)
    assert first["start"] == "true"
    second = _proxied(handler, daemon.php_address, tmp_path, "write", first["sid"], ini=ini)
    assert second["start"] == second["kept-given-id"] == "true", (first, second)
    if handler == "phpsess":
        assert _stored(daemon, first["sid"]) == b"n|i:1;"
        assert _lock_is_free(daemon, first["sid"])


@pytest.mark.parametrize("handler", ["files", "phpsess"])
def test_an_unknown_id_read_and_closed_exists_afterwards_as_with_files(
    handler: str, daemon: Any, tmp_path: Path
) -> None:
    # Strict mode off: the visitor's unknown ID is used; files creates its
    # file at read, so a later strict-mode request accepts it.
    sid = "clientchosen0123456789abcdef"
    first = _proxied(handler, daemon.php_address, tmp_path, "rac", sid)
    assert first["start"] == first["kept-given-id"] == "true"
    second = _proxied(handler, daemon.php_address, tmp_path, "write", sid,
                      ini={"session.use_strict_mode": "1"})
    assert second["start"] == second["kept-given-id"] == "true", second


def test_behind_a_wrapper_a_new_session_costs_a_read_and_a_write(
    daemon: Any, tmp_path: Path
) -> None:
    # Storing a new session closed unwritten adds no round trip to the
    # ordinary request, which writes it anyway (also when it stays empty).
    verbs = ("READ", "WRITE", "TOUCH", "EXISTS", "CREATE", "CLOSE")

    def count() -> dict[str, int]:
        got = _stats(daemon)["verbs"]
        return {verb: got.get(verb, 0) for verb in verbs}

    for how in ("write", "empty"):
        before = count()
        got = _proxied("phpsess", daemon.php_address, tmp_path, how)
        after = count()
        assert {v: after[v] - before[v] for v in verbs} == {
            "READ": 1, "WRITE": 1, "TOUCH": 0, "EXISTS": 0, "CREATE": 0, "CLOSE": 0,
        }, how
        assert _stored(daemon, got["sid"]) == (b"n|i:1;" if how == "write" else b"")


LEASE_PAGE = r"""<?php
// php lease.php <sid> <dir> <value>: start, wait for <dir>/go, store <value>
declare(strict_types=1);
session_id($argv[1]);
echo 'start: ', json_encode(session_start()), "\n";
touch("$argv[2]/ready");
$deadline = microtime(true) + 30;
while (!file_exists("$argv[2]/go") && microtime(true) < $deadline) {
    usleep(10000);
}
$_SESSION['by'] = $argv[3];
"""


def test_a_new_session_whose_lease_ran_out_is_not_stored_empty_over_the_next_holder(
    daemon: Any, tmp_path: Path
) -> None:
    # The first request reads a missing session (strict mode off, an unknown
    # ID) and holds it past its lease; the second gets the lock and writes.
    # The first one's write fails with LOCK_LOST, after which the daemon
    # forgets the revocation: close() must not then store the "new" session
    # empty over the second one's data.
    script = _write_script(tmp_path / "pages", "lease.php", LEASE_PAGE)
    sid = "leasenew0123456789abcdefghij"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    (second_dir / "go").touch()

    def page(directory: Path, value: str, query: str = "") -> subprocess.CompletedProcess[str]:
        address = f'"{daemon.php_address}{query}"' if query else daemon.php_address
        return run_php(script, handler="phpsess", address=address,
                       args=(sid, str(directory), value), timeout=60)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(page, first_dir, "first", "?lease=1")
        try:
            _until(lambda: (first_dir / "ready").exists() or first.done(), "the first request")
            second = page(second_dir, "second")  # gets the lock when the lease runs out
        finally:
            (first_dir / "go").touch()
        first_proc = first.result(60)
    assert second.stderr == "" and _lines(second)["start"] == "true", second
    assert "LOCK_LOST" in first_proc.stderr, first_proc.stderr
    assert _stored(daemon, sid) == b'by|s:6:"second";'


# -- guard: a daemon that cannot be asked never replaces the visitor's ID


@contextlib.contextmanager
def _unix_server(path: str, handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A unix socket at ``path`` whose connections a thread hands to
    ``handle`` one by one; yields its PHP address, stops and closes after."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix://{path}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.fixture
def hangup_server(workdir: Path) -> Iterator[str]:
    """A unix socket that accepts connections and closes them unanswered."""

    def hang_up(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(4096)

    with _unix_server(str(workdir / "hangup.sock"), hang_up) as address:
        yield address


def test_strict_mode_keeps_the_id_when_the_daemon_cannot_be_asked(hangup_server: str) -> None:
    # validateId() fails: a new (empty) session would log the visitor out.
    # session_start() fails instead, as it does when read() fails.
    proc = _php(hangup_server, "strict", "knownid0123456789abcdefghij",
                ini={"session.use_strict_mode": "1"})
    got = _lines(proc)
    assert got["start"] == "false"
    assert got["status"] == "1"  # PHP_SESSION_NONE
    assert "phpsess: validateId failed: lost the connection" in proc.stderr, proc.stderr


def test_a_new_visitor_gets_no_session_when_the_daemon_cannot_make_an_id(
    hangup_server: str,
) -> None:
    # Files fails session_start() when it cannot store a new session; an ID
    # made here would start a session whose write fails after the page ran.
    proc = _php(hangup_server, "fresh")
    got = _lines(proc)
    assert got["start"] == "false"
    assert got["status"] == "1"  # PHP_SESSION_NONE
    assert "phpsess: create_sid failed" in proc.stderr, proc.stderr


# -- review of PHP's own calls: session_create_id(), session_reset(), prepend.php


def test_session_create_id_in_a_running_session_creates_and_locks_nothing(daemon: Any) -> None:
    sid = "createid0123456789abcdefghij"
    got = _lines(_php(daemon.php_address, "create-id", sid))
    assert got["start"] == got["write-close"] == "true"
    created = got["created"]
    assert created.startswith("pfx-") and len(created) > 20
    with Client(daemon.address) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(b"a|i:1;")
        assert c.request(p.Exists(created)) == p.Ok(("0",))
        assert c.request(p.Exists(created.removeprefix("pfx-"))) == p.Ok(("0",))
        listed = c.request(p.List(None, 100))
    assert isinstance(listed, p.Data) and listed.data.count(b"\n") == 1, listed  # the session only


def test_session_reset_in_strict_mode_keeps_a_new_sessions_id(daemon: Any) -> None:
    # Files: read() created the session's file, so strict mode accepts the ID.
    got = _lines(_php(daemon.php_address, "reset", ini={"session.use_strict_mode": "1"}))
    assert got["start"] == got["reset"] == got["same-id"] == "true"


def test_prepend_leaves_no_variables_and_other_handlers_alone(daemon: Any) -> None:
    got = _lines(_php(daemon.php_address, "scope"))
    assert got["globals"] == "[]"
    assert got["handler"] == "user"  # phpsess took over from the default, files
    proc = _php(daemon.php_address, "scope", ini={"session.save_handler": "redis"})
    assert _lines(proc)["handler"] == "redis"  # a pool that chose redis keeps it


# -- a second session_start() fails as the first did


def test_a_second_session_start_fails_like_the_first(hangup_server: str) -> None:
    # The first start's failure made PHP call close(); the handler took that
    # for "inside session_regenerate_id()" and made an ID itself: the second
    # start succeeded with a new, empty session whose write was bound to fail.
    # Files and phpredis fail it like the first.
    proc = _php(hangup_server, "twice")
    got = _lines(proc)
    assert got["start"] == got["start2"] == "false", got
    assert got["status"] == "1"  # PHP_SESSION_NONE
    assert proc.stderr.count("phpsess: create_sid failed") == 2, proc.stderr


@pytest.mark.parametrize("how", ["new", "same"])
def test_a_session_after_the_daemon_went_away_in_the_same_request_fails(
    how: str, daemon: Any, tmp_path: Path
) -> None:
    # new: the second start used to succeed (an ID made here, its write
    # failing after the page ran). same: it failed, but the warning said only
    # "not connected" (the reconnect in open() was silent); the cause is kept.
    with _in_background(tmp_path, daemon.php_address, "two-sessions", str(tmp_path),
                        how) as future:
        daemon.stop()
        (tmp_path / "go").touch()
        proc = future.result(60)
    got = _lines(proc)
    assert got["start"] == got["write-close"] == "true", got
    assert got["start2"] == "false", got
    assert got["status"] == "1" and got["session"] == "[]", got
    warnings = [line for line in proc.stderr.splitlines() if "phpsess:" in line]
    assert len(warnings) == 1, proc.stderr
    assert re.search(
        r"phpsess: cannot connect to unix://\S+: (No such file or directory|Connection refused) "
        r"\(is the phpsess daemon running\?\)", warnings[0]), warnings


# -- a failed session_start() leaves $_SESSION = [], as files and phpredis do


@pytest.mark.parametrize(("sid", "strict"), [("", "0"), ("someid0123456789abcdefghij", "0"),
                                             ("someid0123456789abcdefghij", "1")])
def test_a_failed_start_leaves_an_empty_session_array(
    sid: str, strict: str, workdir: Path
) -> None:
    # open() used to fail when the daemon could not be reached, and PHP sets
    # up $_SESSION only after open(): code reading it after @session_start()
    # died with a TypeError (HTTP 500). Files (missing directory) and
    # phpredis (Redis down) leave [] and the page renders.
    ini = {"session.use_strict_mode": strict}
    files = run_php(SCRIPT, handler="files", save_path=str(workdir / "missing"),
                    args=("failed-start", sid), ini=ini)
    address = f"unix://{workdir}/nobody-listens.sock"
    proc = _php(address, "failed-start", sid, ini=ini)
    assert _lines(proc) == _lines(files) == {
        "start": "false", "status": "1", "session": "[]", "logged-in": "false"}
    # One warning naming the address and the cause, then PHP's own.
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2, proc.stderr
    assert (f"phpsess: cannot connect to {address}: No such file or directory "
            "(is the phpsess daemon running?)") in warnings[0]
    assert "session_start(): Failed to read session data: user" in warnings[1]


@pytest.mark.parametrize("strict", ["0", "1"])
def test_a_malformed_address_leaves_an_empty_session_array(strict: str) -> None:
    # prepend.php's stand-in handler, likewise.
    proc = _php("http://not-an-address", "failed-start", "someid0123456789abcdefghij",
                ini={"session.use_strict_mode": strict})
    assert _lines(proc) == {
        "start": "false", "status": "1", "session": "[]", "logged-in": "false"}
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2, proc.stderr
    assert 'phpsess: cannot use "http://not-an-address" as the daemon address' in warnings[0]
    assert "fix phpsess.address or session.save_path" in warnings[0]
    assert "Failed to read session data" in warnings[1]


# -- session.save_path: the daemon's forms, any case, stray spaces; typos named


def _with_save_path(save_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    # phpsess.address empty: the handler follows session.save_path. Quoted,
    # as php.ini needs for "=" and keeps spaces.
    return run_php(SCRIPT, handler="phpsess", address="", args=args,
                   ini={"session.save_path": f'"{save_path}"'}, timeout=60)


@pytest.mark.parametrize("form", ["unix:{sock}", "UNIX://{sock}", " unix://{sock} ",
                                  "Unix:{sock}?lock_wait=5", "TCP://127.0.0.1:{port}",
                                  "tcp:127.0.0.1:{port}"])
def test_save_path_in_the_daemons_form_any_case_or_with_spaces_is_used(
    form: str, start_daemon: Any
) -> None:
    # These were silently ignored: sessions went to unix:///run/phpsess/phpsess.sock.
    port = free_tcp_port()
    daemon = start_daemon("--memory-only", "--listen", f"tcp:127.0.0.1:{port}")
    sid = "savepath0123456789abcdefgh"
    proc = _with_save_path(form.format(sock=daemon.sock_path, port=port), "counter", sid, "0")
    assert proc.stderr == "", proc.stderr
    assert _lines(proc)["n"] == "1"
    assert read_counter(daemon.address, sid) == 1


@pytest.mark.parametrize("value", ["unix:relative.sock", "unix:", "tcp://127.0.0.1",
                                   "TCP:localhost", " unix:/// ", "tcp://[::1]:99999"])
def test_a_malformed_save_path_address_is_named(value: str) -> None:
    # One of ours by its scheme, but malformed: an error naming it (it was
    # ignored, and sessions went to the default address).
    proc = _with_save_path(value, "failed-start")
    got = _lines(proc)
    assert got["start"] == "false" and got["session"] == "[]", got
    warnings = [line for line in proc.stderr.splitlines() if "phpsess:" in line]
    assert len(warnings) == 1, proc.stderr
    assert f'phpsess: cannot use "{value}" as the daemon address' in warnings[0]


@pytest.mark.parametrize("value", ["/var/lib/php/sessions", "2;/tmp/sessions", "",
                                   "/tmp/unix:odd"])
def test_a_save_path_for_another_handler_is_still_ignored(value: str) -> None:
    # The default address is used (whether or not a daemon listens there).
    proc = _with_save_path(value, "counter", "savepath0123456789abcdefgh", "0")
    assert "cannot use" not in proc.stderr, proc.stderr
    if _lines(proc)["start"] == "false":
        assert "cannot connect to unix:///run/phpsess/phpsess.sock:" in proc.stderr


# -- a socket the PHP user may not use says so


def test_permission_denied_on_the_socket_names_the_php_user(daemon: Any) -> None:
    # It said "(is the phpsess daemon running?)", which sent people looking
    # at a daemon that was running fine.
    sock = Path(daemon.sock_path)
    cmd = [php_binary(), "-d", "display_errors=stderr", "-d", "log_errors=0",
           "-d", "session.use_cookies=0",
           "-d", "session.cache_limiter=", "-d", f"auto_prepend_file={PREPEND}",
           "-d", f"phpsess.address={daemon.php_address}", str(SCRIPT), "fresh"]
    if os.geteuid() == 0:
        # root may use any socket: run PHP as nobody, who may not use this one.
        sock.parent.chmod(0o755)
        sock.chmod(0o660)
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *cmd]
        user = f"user {pwd.getpwuid(NOBODY).pw_name}"
    else:
        sock.chmod(0)
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert _lines(proc)["start"] == "false"
    warnings = [line for line in proc.stderr.splitlines() if "phpsess:" in line]
    assert len(warnings) == 1, proc.stderr
    assert f"phpsess: cannot connect to {daemon.php_address}: Permission denied" in warnings[0]
    assert f"(this PHP process ({user}) may not use this socket" in warnings[0]
    assert "is the phpsess daemon running" not in warnings[0]


# -- review of the PHP handler: end of request, reconnects, failures, lifetimes
#
# The PHP here is written into tmp_path by each test: the pages run under
# PHP's built-in web server (one worker process, so every request reuses the
# same persistent connection, as a php-fpm worker does).


def _write_script(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(source)
    return path


@contextlib.contextmanager
def _web_server(docroot: Path, settings: dict[str, str]) -> Iterator[tuple[int, Path]]:
    """``php -S`` on a free loopback port serving ``docroot``; yields the port
    and the file its log (PHP's errors included) goes to."""
    port = free_tcp_port()
    log = docroot.parent / f"web-{port}.log"
    cmd = ["timeout", "300", php_binary(), "-S", f"127.0.0.1:{port}", "-t", str(docroot),
           "-d", "display_errors=0", "-d", "log_errors=1", "-d", "html_errors=0",
           "-d", "error_reporting=32767", "-d", "session.use_cookies=0",
           "-d", "session.use_only_cookies=0", "-d", "session.cache_limiter=",
           "-d", "session.gc_probability=0"]
    for key, value in settings.items():
        cmd += ["-d", f"{key}={value}"]
    with open(log, "wb") as out:
        web = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_listening(port, web, "php -S", log)
        yield port, log
    finally:
        web.terminate()
        web.wait(10)


def _phpsess_web(address: str) -> dict[str, str]:
    # Quoted: an unquoted "=" in a -d value is an ini syntax error.
    return {"auto_prepend_file": str(PREPEND), "phpsess.address": f'"{address}"'}


def _http(port: int, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _php_warnings(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines()
            if "phpsess" in line or "Warning" in line]


def _lock_is_free(daemon: Any, sid: str) -> bool:
    with Client(daemon.address, wait_ms=0) as c:
        reply = c.request(p.Read(sid))
        c.request(p.Close())
    return not (isinstance(reply, p.Error) and reply.code is p.Code.LOCK_TIMEOUT)


def _stored(daemon: Any, sid: str) -> bytes | None:
    with Client(daemon.address) as c:
        reply = c.request(p.Read(sid, lock=False))
    if reply == p.MISS:
        return None
    assert isinstance(reply, p.Data), reply
    return reply.data


# A web request whose end is reached in various ways; a destructor changes
# $_SESSION at the end of the script (Symfony's and Doctrine's objects do).
END_OF_REQUEST_PAGE = r"""<?php
// ?sid=...&m=plain|exit|throw|fatal|close|rac|abort|racfatal|bigthrow|writethrowfatal
class Cart
{
    public function __destruct() { $_SESSION['d'] = ($_SESSION['d'] ?? 0) + 1; }
}
$m = $_GET['m'];
if ($m === 'bigthrow' || $m === 'writethrowfatal') { // Symfony-style: warnings become exceptions
    set_error_handler(function (int $no, string $str, string $file, int $line): bool {
        if (!(error_reporting() & $no)) {
            return false;
        }
        throw new ErrorException($str, 0, $no, $file, $line);
    });
}
session_id($_GET['sid']);
session_start(in_array($m, ['rac', 'racfatal'], true) ? ['read_and_close' => true] : []);
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
$cart = new Cart();
switch ($m) {
    case 'exit':
        exit;
    case 'throw':
        throw new RuntimeException('app error');
    case 'fatal':
    case 'racfatal': // a real fatal error: destructors do not run
        ini_set('memory_limit', '16M');
        $a = [];
        while (true) {
            $a[] = str_repeat('x', 1 << 20);
        }
    case 'close':
        session_write_close();
        break;
    case 'abort':
        session_abort();
        break;
    case 'bigthrow': // the final write fails (over --max-session-bytes) and throws
        $_SESSION['big'] = str_repeat('x', 8192);
        break;
    case 'writethrowfatal': // that write throws before the end, then a fatal error
        $_SESSION['big'] = str_repeat('x', 8192);
        try {
            session_write_close();
        } catch (ErrorException $e) {
        }
        ini_set('memory_limit', '16M');
        $a = [];
        while (true) {
            $a[] = str_repeat('x', 1 << 20);
        }
}
echo 'done';
"""

END_OF_REQUEST_MODES = ["plain", "exit", "throw", "fatal", "close", "rac", "abort",
                        "racfatal", "plain"]


@pytest.mark.parametrize("query", ["", "?persistent=0", "?lock=0"])
def test_session_changes_made_by_destructors_are_saved_as_with_files(
    query: str, start_daemon: Any, tmp_path: Path
) -> None:
    # prepend.php registered the handler with session_set_save_handler(h,
    # true): PHP then writes the session in a shutdown function, before
    # destructors run, and what they put in $_SESSION was lost. The files
    # handler writes at the very end. Every way a request ends must leave the
    # same session as with files, and (persistent connection) no lock behind.
    daemon = start_daemon("--memory-only", "--max-session-bytes", "4096")
    docroot = tmp_path / "www"
    _write_script(docroot, "page.php", END_OF_REQUEST_PAGE)
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    sid = "endofrequest0123456789abcdef"

    with _web_server(docroot, {"session.save_handler": "files",
                               "session.save_path": str(files_dir)}) as (port, _):
        want = []
        for mode in END_OF_REQUEST_MODES:
            _http(port, f"/page.php?sid={sid}&m={mode}")
            want.append((mode, (files_dir / f"sess_{sid}").read_bytes()))
    assert want[0][1] == b"n|i:1;d|i:1;"  # the destructor's change is saved

    with _web_server(docroot, _phpsess_web(daemon.php_address + query)) as (port, log):
        got = []
        for mode in END_OF_REQUEST_MODES:
            _http(port, f"/page.php?sid={sid}&m={mode}")
            got.append((mode, _stored(daemon, sid)))
            assert _lock_is_free(daemon, sid), f"lock held after {mode}"
        assert got == want
        assert _php_warnings(log) == []
        # The final write fails and the error handler throws: PHP never calls
        # close(), and nothing runs after it, yet the lock must not stay held
        # by the idle worker's connection until its next request.
        _http(port, f"/page.php?sid={sid}&m=bigthrow")
        assert _lock_is_free(daemon, sid)
        assert _stored(daemon, sid) == want[-1][1]
        assert "TOO_LARGE" in log.read_text()
        # A write that threw (PHP never called close()), then a fatal error:
        # no destructor runs; the handler's shutdown function releases it.
        _http(port, f"/page.php?sid={sid}&m=writethrowfatal")
        assert _lock_is_free(daemon, sid)
        assert _stored(daemon, sid) == want[-1][1]
        assert _http(port, f"/page.php?sid={sid}&m=plain") == (200, "done")
        assert _stored(daemon, sid) == b"n|i:7;d|i:5;"


@contextlib.contextmanager
def _relay(
    target: str, path: str, *, lag_s: float = 0.0,
    requests: Callable[[bytes], bytes] = lambda data: data,
) -> Iterator[str]:
    """A unix socket at ``path`` that forwards to the unix socket ``target``:
    each chunk of requests passed through ``requests``, each chunk of
    replies held back ``lag_s``. Yields the PHP address of the relay."""
    opened: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket, delay: float,
             change: Callable[[bytes], bytes]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                time.sleep(delay)
                dst.sendall(change(data))
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def connect(client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(target)
        opened.extend((client, upstream))
        for args in ((client, upstream, 0.0, requests),
                     (upstream, client, lag_s, lambda data: data)):
            threading.Thread(target=pump, args=args, daemon=True).start()

    try:
        with _unix_server(path, connect) as address:
            yield address
    finally:
        for s in opened:
            s.close()


def _lagging_proxy(target: str, path: str, lag_s: float) -> contextlib.AbstractContextManager[str]:
    """A daemon whose replies are in flight ``lag_s`` (a long time)."""
    return _relay(target, path, lag_s=lag_s)


STALE_REPLY_PAGE = r"""<?php
// ?m=set|racfatal|shutdownfatal
function fill_memory(): void
{
    ini_set('memory_limit', '16M');
    $a = [];
    while (true) {
        $a[] = str_repeat('x', 1 << 20);
    }
}
$m = $_GET['m'];
if ($m === 'shutdownfatal') { // a fatal error in a shutdown function that runs before ours
    register_shutdown_function('fill_memory');
}
session_id('stalereply0123456789abcdef');
session_start($m === 'set' ? [] : ['read_and_close' => true]);
echo json_encode($_SESSION);
if ($m === 'racfatal') {
    fill_memory();
}
if ($m === 'set') {
    $_SESSION['v'] = ($_SESSION['v'] ?? 0) + 1;
}
"""


@pytest.mark.parametrize("mode", ["racfatal", "shutdownfatal"])
def test_a_fatal_error_leaves_no_stale_reply_for_the_next_request(
    mode: str, daemon: Any, tmp_path: Path
) -> None:
    # read_and_close sends its CLOSE without waiting; the destructor used to
    # read the reply, but destructors do not run after a fatal error. When the
    # next request on the persistent connection came while that reply was
    # still in flight, it took the stale "OK" for the reply to its HELLO:
    # 'unexpected reply to HELLO ... "OK"', and session_start() failed.
    # racfatal: a shutdown function (which runs after fatal errors) now reads
    # it; shutdownfatal: that one cannot run (an earlier shutdown function
    # died), and the stale "OK" is recognised in front of HELLO's "OK 1".
    docroot = tmp_path / "www"
    _write_script(docroot, "x.php", STALE_REPLY_PAGE)
    with _lagging_proxy(daemon.sock_path, str(tmp_path / "lag.sock"), 0.3) as lagging, \
            _web_server(docroot, _phpsess_web(lagging)) as (port, log):
        assert _http(port, "/x.php?m=set") == (200, "[]")
        status, _ = _http(port, f"/x.php?m={mode}")
        assert status == 500
        assert _http(port, "/x.php?m=set") == (200, '{"v":1}')
        assert _http(port, "/x.php?m=set") == (200, '{"v":2}')
        assert [line for line in _php_warnings(log) if "phpsess" in line] == []
    assert _stored(daemon, "stalereply0123456789abcdef") == b"v|i:3;"


RECONNECT_SCRIPT = r"""<?php
// <how: rac|abort|new> <dir>: close a session without writing it, wait until
// the test says go (the daemon closed the idle connection), start it again.
ob_start();
[, $how, $dir] = $argv;
if ($how !== 'new') {
    session_id('reconnect' . $how . '0123456789abcdefgh');
}
if ($how === 'abort') {
    session_start();
    $_SESSION['x'] = 1;
    session_abort();
} else {
    session_start(['read_and_close' => true]); // 'new': a WRITE and a CLOSE unanswered
}
touch("$dir/ready");
for ($i = 0; $i < 3000 && !file_exists("$dir/go"); ++$i) {
    usleep(10000);
}
echo 'sid: ', session_id(), "\n";
echo 'start: ', json_encode(session_start()), "\n";
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
echo 'write-close: ', json_encode(session_write_close()), "\n";
"""


@pytest.mark.parametrize("how", ["rac", "abort", "new"])
def test_a_session_after_read_and_close_or_abort_reconnects_after_the_idle_timeout(
    how: str, start_daemon: Any, tmp_path: Path
) -> None:
    # close() sends its CLOSE (and for a new ID an empty WRITE) without
    # waiting. The daemon then closed the idle connection, and the next
    # session_start() failed ("lost the connection ... while sending the
    # request"): a request was sent again on a new connection only if no
    # reply was pending. Without a lock held, none of them needs the old
    # connection.
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "1")
    script = _write_script(tmp_path, "reconnect.php", RECONNECT_SCRIPT)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_php, script, handler="phpsess", address=daemon.php_address,
                             args=(how, str(tmp_path)),
                             ini={"session.use_strict_mode": "1"})
        try:
            _until(lambda: (tmp_path / "ready").exists() or future.done(), "the php script")
            _until(lambda: "event=idle_timeout" in daemon.log() or future.done(),
                   "the daemon to close the idle connection")
        finally:
            (tmp_path / "go").touch()
        proc = future.result(60)
    got = _lines(proc)
    assert proc.stderr == "", proc.stderr
    assert got["start"] == got["write-close"] == "true", got
    assert read_counter(daemon.address, got["sid"]) == 1


FAILED_START_SCRIPT = r"""<?php
// [<sid>]: session_start() under an error handler that turns warnings into
// exceptions (Symfony, Yii, CakePHP), with sessions that cannot be had.
ob_start();
set_error_handler(function (int $no, string $str, string $file, int $line): bool {
    if (!(error_reporting() & $no)) {
        return false;
    }
    throw new ErrorException($str, 0, $no, $file, $line);
});
if (($argv[1] ?? '') !== '') {
    session_id($argv[1]);
}
try {
    $started = session_start();
    echo 'start: ', json_encode($started), "\n";
} catch (Throwable $e) {
    echo 'thrown: ', get_class($e), ': ', $e->getMessage(), "\n";
    echo 'previous: ', $e->getPrevious() === null ? 'none' : get_class($e->getPrevious()), "\n";
}
echo 'status: ', session_status(), "\n";
echo 'session: ', isset($_SESSION) ? json_encode($_SESSION) : 'undefined', "\n";
"""


@pytest.mark.parametrize(("sid", "strict"), [("", "0"), ("", "1"),
                                             ("someid0123456789abcdefghij", "0"),
                                             ("someid0123456789abcdefghij", "1")])
def test_an_error_handler_that_throws_gets_the_phpsess_warning_as_with_files(
    sid: str, strict: str, workdir: Path
) -> None:
    # create_sid() and validateId() warned: the error handler's exception
    # thrown there made PHP throw its own Error ("Session id must be a
    # string"), the real cause hidden in getPrevious(), and $_SESSION was left
    # undefined. Files throws the ErrorException of its warning from
    # session_start() and leaves $_SESSION = [].
    script = _write_script(workdir, "failed_start.php", FAILED_START_SCRIPT)
    ini = {"session.use_strict_mode": strict}
    files = _lines(run_php(script, handler="files", save_path=str(workdir / "missing"),
                           args=(sid,), ini=ini))
    address = f"unix://{workdir}/nobody-listens.sock"
    got = _lines(run_php(script, handler="phpsess", address=address, args=(sid,), ini=ini))
    assert files["thrown"].startswith("ErrorException: session_start(): open(")
    assert got["thrown"] == (f"ErrorException: phpsess: cannot connect to {address}: "
                             "No such file or directory (is the phpsess daemon running?)")
    assert got["previous"] == files["previous"] == "none"
    assert got["status"] == files["status"] == "1"
    assert got["session"] == files["session"] == "[]"


TTL_SCRIPT = r"""<?php
ob_start();
session_id($argv[1]);
session_start();
$_SESSION['a'] = 1;
echo 'write-close: ', json_encode(session_write_close()), "\n";
"""


@pytest.mark.parametrize(("lifetime", "expected_s"), [
    ("1440", 1440), ("0", 31536000), ("-1", 31536000), ("99999999999", 31536000),
    ("1k", 1024),
])
def test_gc_maxlifetime_outside_what_the_daemon_takes(
    lifetime: str, expected_s: int, daemon: Any, tmp_path: Path
) -> None:
    # 0 (or less) was sent as 1 s: the session vanished a second after each
    # request. PHP's files handler never expires a session by itself (only
    # its gc() does, which Debian never runs): the longest lifetime the
    # daemon takes, a year, is the closest. Longer values are capped there,
    # quietly. "1k" is 1024 s, as PHP reads it.
    script = _write_script(tmp_path, "ttl.php", TTL_SCRIPT)
    sid = "lifetime0123456789abcdefgh"
    proc = run_php(script, handler="phpsess", address=daemon.php_address, args=(sid,),
                   ini={"session.gc_maxlifetime": lifetime})
    assert proc.stderr == "", proc.stderr
    assert _lines(proc)["write-close"] == "true"
    with Client(daemon.address) as c:
        got = c.request(p.Get(sid))
    assert isinstance(got, p.Data) and got.data == b"a|i:1;", got
    assert expected_s * 1000 - 60_000 < int(got.tokens[0]) <= expected_s * 1000


def _refuses_handlers_with_upload_progress() -> bool:
    """Whether this PHP refuses session handlers (and session ini_set())
    while session.upload_progress.enabled is On, as 8.2.36 does."""
    out = subprocess.run(
        [php_binary(), "-d", "session.upload_progress.enabled=1", "-r",
         "try { ini_set('session.gc_maxlifetime', '100'); echo 'allowed'; } "
         "catch (\\Error $e) { echo 'refused'; }"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.stdout in ("allowed", "refused"), (out.stdout, out.stderr)
    return out.stdout == "refused"


UPLOAD_PAGE = r"""<?php
session_id('upload0123456789abcdefghij');
session_start();
echo json_encode(array_keys($_SESSION));
"""


def test_prepend_logs_that_upload_progress_never_reaches_phpsess(
    daemon: Any, tmp_path: Path
) -> None:
    # PHP records upload progress with its files handler while it reads the
    # body, before prepend.php runs: with a directory in session.save_path it
    # lands in local files, silently. prepend.php says so in the log (never
    # on the page: output there would stop the session cookie).
    docroot = tmp_path / "www"
    _write_script(docroot, "up.php", UPLOAD_PAGE)
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    boundary = "phpsessboundary"

    def multipart(fields: dict[str, str]) -> bytes:
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                 f"{value}\r\n" for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="f"; '
                     'filename="a.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     + "x" * 10000 + f"\r\n--{boundary}--\r\n")
        return "".join(parts).encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
               "Cookie": "PHPSESSID=upload0123456789abcdefghij"}
    # PHP looks for the session ID of the progress in the cookie.
    # Upload progress on (PHP's default before 8.2.36, which turned it off).
    settings = {**_phpsess_web(daemon.php_address), "session.save_path": str(files_dir),
                "session.use_cookies": "1", "session.upload_progress.enabled": "1"}
    if _refuses_handlers_with_upload_progress():
        # PHP 8.2.36 and later: no session handler but PHP's own while upload
        # progress is on.  prepend.php let that Error out, and every page of
        # the site failed; now pages work, with the files handler, and the
        # log says why phpsess is not in use.
        with _web_server(docroot, settings) as (port, log):
            assert _http(port, "/up.php", multipart({"a": "b"}), headers) == (200, "[]")
            said = [line for line in log.read_text().splitlines() if "phpsess:" in line]
        assert len(said) == 1, said
        assert "phpsess: not in use: this PHP refuses session handlers while " \
            "session.upload_progress.enabled is On" in said[0]
        assert "set session.upload_progress.enabled = 0" in said[0]
        assert [f.name for f in files_dir.iterdir()] == ["sess_upload0123456789abcdefghij"]
        return
    with _web_server(docroot, settings) as (port, log):
        assert _http(port, "/up.php", multipart({"a": "b"}), headers) == (200, "[]")
        assert "phpsess:" not in log.read_text()
        assert _http(port, "/up.php", multipart({"PHP_SESSION_UPLOAD_PROGRESS": "x"}),
                     headers) == (200, "[]")  # the progress is not in the session
        said = [line for line in log.read_text().splitlines() if "phpsess:" in line]
    assert len(said) == 1, said
    assert "phpsess: this request asks for session upload progress" in said[0]
    assert "set session.upload_progress.enabled = 0" in said[0]
    # where it went instead: PHP's files handler, in session.save_path
    assert [f.name for f in files_dir.iterdir()] == ["sess_upload0123456789abcdefghij"]


# -- an unreachable daemon never changes or deletes the visitor's cookie

COOKIE_PAGE = r"""<?php
$started = session_start();
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
echo json_encode(['start' => $started, 'id' => session_id(), 'n' => $_SESSION['n']]);
"""


def _get_with_cookie(port: int, path: str, cookie: str) -> tuple[int, list[str], dict[str, Any]]:
    """A GET with ``cookie``: the status, the Set-Cookie headers, the JSON body."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Cookie": cookie})
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, response.headers.get_all("Set-Cookie") or [], json.loads(body)
    finally:
        conn.close()


@pytest.mark.parametrize("strict", ["1", "0"])
def test_a_daemon_restart_never_changes_the_visitors_cookie(
    strict: str, start_daemon: Any, tmp_path: Path
) -> None:
    # Strict mode: validateId() could not ask the daemon and said "invalid";
    # PHP then sent the ID create_sid() made, '' with the daemon down
    # ("Set-Cookie: PHPSESSID=; path=/") before read() failed, so a daemon
    # restart logged every visitor out for good. The files handler (its
    # directory unusable) replaces the cookie with a new ID, just as bad.
    daemon = start_daemon()
    sid = "cookie0123456789abcdefghijkl"
    with Client(daemon.address) as c:
        assert c.request(p.Write(sid, 1440, b"n|i:41;")) == p.OK
    docroot = tmp_path / "www"
    _write_script(docroot, "page.php", COOKIE_PAGE)
    settings = {**_phpsess_web(daemon.php_address), "session.use_cookies": "1",
                "session.use_only_cookies": "1", "session.use_strict_mode": strict}
    with _web_server(docroot, settings) as (port, log):
        daemon.stop()  # a restart: nothing listens for a moment
        status, cookies, body = _get_with_cookie(port, "/page.php", f"PHPSESSID={sid}")
        assert status == 200
        assert cookies == []  # the visitor's cookie is neither replaced nor deleted
        assert body["start"] is False and body["id"] == "", body
        warnings = [line for line in _php_warnings(log) if "Warning" in line]
        assert len(warnings) == 2, warnings
        assert "phpsess: " in warnings[0] and "is the phpsess daemon running?" in warnings[0]
        assert "Failed to read session data" in warnings[1]

        daemon.start()  # back, with its sessions (--data-dir)
        status, cookies, body = _get_with_cookie(port, "/page.php", f"PHPSESSID={sid}")
    assert status == 200
    assert cookies == []
    assert body == {"start": True, "id": sid, "n": 42}
    assert _stored(daemon, sid) == b"n|i:42;"


# -- a session destroyed while another request waits for its lock stays dead

HOLDER_SCRIPT = r"""<?php
// holder.php <sid> <dir> <destroy|regenerate>: holds the session's lock
// until the test says go, then destroys it or moves it to a new ID.
ob_start();
session_id($argv[1]);
session_start();
touch("$argv[2]/ready");
$deadline = microtime(true) + 30;
while (!file_exists("$argv[2]/go")) {
    if (microtime(true) > $deadline) {
        exit(3);
    }
    usleep(10000);
}
if ($argv[3] === 'destroy') {
    $ok = session_destroy();
} else {
    $ok = session_regenerate_id(true);
    $_SESSION['moved'] = 1;
}
echo json_encode(['ok' => $ok, 'id' => session_id()]), "\n";
"""

WAITER_SCRIPT = r"""<?php
// waiter.php <sid> <plain|rac|write>: starts the session (waiting for its
// lock), says what it found; write: puts something in it.
ob_start();
session_id($argv[1]);
$ok = session_start($argv[2] === 'rac' ? ['read_and_close' => true] : []);
$seen = $_SESSION;
if ($argv[2] === 'write') {
    $_SESSION['b'] = 'written by the waiter';
}
echo json_encode(['start' => $ok, 'seen' => $seen, 'id' => session_id()]), "\n";
"""


@pytest.mark.parametrize("mode", ["plain", "rac", "write"])
@pytest.mark.parametrize("action", ["destroy", "regenerate"])
def test_a_session_destroyed_while_a_request_waits_for_its_lock_stays_dead(
    action: str, mode: str, storage_args: list[str], start_daemon: Any, tmp_path: Path
) -> None:
    # The waiter's READ was granted after the DESTROY and said MISS: the
    # handler took the session for a new one and stored it at close (empty,
    # or with what the waiter wrote), so a logged-out ID, or the old ID of
    # session_regenerate_id(true), was valid again in strict mode. With
    # files, the waiter's flock is granted on the unlinked file: it reads the
    # old data (phpsess: nothing, see php-ext-shim/README.md), its write is
    # lost, the ID stays dead. The SQL storage said MISS too (its waiter may
    # be on another daemon: the destroy is marked in the table).
    daemon = start_daemon(*storage_args)
    sid = "doomed0123456789abcdefghijkl"
    with Client(daemon.address) as c:
        assert c.request(p.Write(sid, 1440, b'user|s:5:"alice";')) == p.OK
    holder = _write_script(tmp_path / "php", "holder.php", HOLDER_SCRIPT)
    waiter = _write_script(tmp_path / "php", "waiter.php", WAITER_SCRIPT)
    ini = {"session.use_strict_mode": "1"}

    def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return run_php(script, handler="phpsess", address=daemon.php_address, args=args,
                       ini=ini, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            held = pool.submit(run, holder, sid, str(tmp_path), action)
            _until(lambda: (tmp_path / "ready").exists() or held.done(), "the lock holder")
            waiting = pool.submit(run, waiter, sid, mode)
            _until(lambda: _stats(daemon)["locks_waiting"] == 1 or waiting.done(),
                   "the waiter to wait for the lock")
        finally:
            (tmp_path / "go").touch()
        first, second = held.result(60), waiting.result(60)
    assert first.returncode == second.returncode == 0, (first, second)
    assert "Warning" not in first.stderr + second.stderr, (first.stderr, second.stderr)
    a = json.loads(first.stdout)
    b = json.loads(second.stdout)
    assert a["ok"] is True
    # As with files, the waiter keeps the ID it brought; the old data is gone.
    assert b == {"start": True, "seen": [], "id": sid}, b
    with Client(daemon.address) as c:
        assert c.request(p.Exists(sid)) == p.Ok(("0",))  # dead: strict mode refuses it
        assert c.request(p.Read(sid, lock=False)) == p.MISS
    if action == "regenerate":
        assert a["id"] != sid
        assert _stored(daemon, a["id"]) == b'user|s:5:"alice";moved|i:1;'
    # A later request with the old ID gets a new one (strict mode).
    later = json.loads(run(waiter, sid, "plain").stdout)
    assert later["start"] is True and later["seen"] == [] and later["id"] != sid, later
    assert _lock_is_free(daemon, sid)


def _older_daemon(target: str, path: str) -> contextlib.AbstractContextManager[str]:
    """A unix socket at ``path`` in front of the daemon at ``target`` that
    refuses READ's DESTROYED token with BAD_REQUEST, as a daemon older than
    it does: the token becomes an unknown one, which the daemon refuses in
    turn, in order with the other replies. Yields its PHP address."""
    return _relay(target, path, requests=lambda data: data.replace(
        b" LOCK DESTROYED\n", b" LOCK UNKNOWN\n"))


@pytest.mark.parametrize("query", ["", "?persistent=0"])
def test_a_daemon_older_than_the_destroyed_token_still_serves_sessions(
    query: str, daemon: Any, workdir: Path
) -> None:
    # A handler upgraded before its daemon (or a cluster node forwarding to
    # an older master) must not fail every session_start().
    sid = "olderdaemon0123456789abcdef"
    with Client(daemon.address) as c:
        assert c.request(p.Write(sid, 1440, b"n|i:4;")) == p.OK
    with _older_daemon(daemon.sock_path, str(workdir / "older.sock")) as address:
        proc = _php(address, "counter", sid, "0", query=query)
    got = _lines(proc)
    assert got["start"] == got["write-close"] == got["restart"] == "true", got
    assert got["n"] == "5"
    assert "Warning" not in proc.stderr, proc.stderr
    assert read_counter(daemon.address, sid) == 5


def test_an_older_daemon_costs_one_refused_read_a_minute_not_one_a_request(
    daemon: Any, workdir: Path
) -> None:
    # prepend.php makes a handler per web request: the fallback to a plain
    # READ is remembered per process and address, not per handler, or every
    # request against an older daemon would cost two round trips.
    sid = "olderdaemonmanyrequests0123"
    script = workdir / "three.php"
    script.write_text(
        "<?php\n"
        "for ($i = 0; $i < 3; $i++) {\n"
        "    session_set_save_handler(\\PhpSess\\SessionHandler::fromIni(), false);\n"
        "    session_id($argv[1]);\n"
        "    session_start();\n"
        "    $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;\n"
        "    session_write_close();\n"
        "}\n"
        "echo $_SESSION['n'], \"\\n\";\n"
    )
    before = _stats(daemon)["errors_total"]
    with _older_daemon(daemon.sock_path, str(workdir / "older.sock")) as address:
        proc = run_php(script, handler="phpsess", address=address, args=(sid,), timeout=60)
    assert proc.returncode == 0 and proc.stdout == "3\n", (proc.stdout, proc.stderr)
    assert _stats(daemon)["errors_total"] - before == 1  # the first READ only


SECOND_HANDLER_PAGE = r"""<?php
// prepend.php's handler looks at the session first (legacy bootstrap code),
// then the application registers a handler of its own for the same
// address (Symfony's SessionHandler::fromIni(), php-ext-shim/README.md).
session_id($argv[1]);
if ($argv[2] === 'abort') {
    session_start();
    session_abort();
} else {
    session_start(['read_and_close' => true]);
}
session_set_save_handler(\PhpSess\SessionHandler::fromIni(), false);
$ok = session_start();
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
echo json_encode($ok), ' ', $_SESSION['n'], "\n";
"""


@pytest.mark.parametrize("first", ["abort", "rac"])
def test_a_second_handler_object_for_the_address_saves_the_session(
    first: str, daemon: Any, tmp_path: Path
) -> None:
    # Both objects used PHP's one pooled connection for the address: the
    # second read the first's pending reply, the first then waited 5 s for
    # it, closed the shared connection, and a TypeError ended the request
    # unsaved. Now the second opens a connection of its own.
    script = _write_script(tmp_path / "pages", "second.php", SECOND_HANDLER_PAGE)
    sid = "secondhandler0123456789abc"
    for n in (1, 2, 3):
        proc = run_php(script, handler="phpsess", address=daemon.php_address,
                       args=(sid, first), timeout=60)
        assert (proc.stdout, proc.stderr) == (f"true {n}\n", ""), n
    assert _stored(daemon, sid) == b"n|i:3;"
    assert _lock_is_free(daemon, sid)
