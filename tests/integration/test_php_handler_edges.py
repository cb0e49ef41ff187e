"""Where the PHP handler used to differ from PHP's files handler: long
requests, a daemon that stops or closes idle connections, new sessions closed
unwritten.  Real php processes against a real daemon."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
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
from tests.conftest import read_counter, run_php
from tests.integration.test_locking import _stats

SCRIPT = Path(__file__).parent / "php" / "handler_edges.php"


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
    (and at ready2 until go2)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_php, address, *args, query=query, ini=ini)
        try:
            _until(lambda: (tmp_path / "ready").exists() or future.done(), "the php script")
            yield future
        finally:
            for go in ("go", "go2"):
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


def test_the_lease_option_and_the_daemons_lease_still_apply(start_daemon: Any) -> None:
    short = start_daemon("--memory-only", "--lock-lease-s", "1")
    proc = _php(short.php_address, "counter", "leasedaemon0123456789abcdef", "2")
    assert "LOCK_LOST" in proc.stderr, proc.stderr
    assert _lines(proc)["n"] == "null"

    normal = start_daemon("--memory-only")
    proc = _php(normal.php_address, "counter", "leaseoption0123456789abcdef", "2",
                query="?lease=1")
    assert "LOCK_LOST" in proc.stderr, proc.stderr
    assert _lines(proc)["n"] == "null"


# -- 2. session_regenerate_id() while the daemon shuts down


@pytest.mark.parametrize("close", ["", "slow-close"])
@pytest.mark.parametrize("delete", ["0", "1"])
def test_regenerate_id_while_the_daemon_restarts_is_no_fatal_error(
    delete: str, close: str, start_daemon: Any, tmp_path: Path
) -> None:
    daemon = start_daemon("--memory-only")
    sid = f"regenstop{delete}0123456789abcdefgh"
    ini = {"session.sid_length": "26", "session.sid_bits_per_character": "5"}
    with _in_background(tmp_path, daemon.php_address, "regenerate", sid, delete,
                        str(tmp_path), close, ini=ini) as future:
        # The daemon stops: it keeps our connection only while it holds the
        # lock, so the write (or destroy) of the old ID ends it, and it
        # accepts no new one. CREATE failed, or with slow-close (the daemon
        # has closed the connection by then) open() did, and PHP threw an
        # Error.
        daemon.signal(signal.SIGTERM)
        _until(lambda: "event=stopping" in daemon.log(), "the daemon to start stopping")
        (tmp_path / "go").touch()
        _until(lambda: (tmp_path / "ready2").exists() or future.done(), "session_regenerate_id()")
        assert daemon.wait() == 0
        # Back before the request ends: the write of the new ID reconnects.
        daemon.start()
        (tmp_path / "go2").touch()
        proc = future.result(60)
    got = _lines(proc)
    assert "thrown" not in got, got
    assert got["regenerate"] == "true"
    assert got["status"] == "2"  # PHP_SESSION_ACTIVE
    assert got["new-sid"] != sid
    # The handler made the ID itself, by PHP's rules for these settings.
    assert re.fullmatch(r"[0-9a-v]{26}", got["new-sid"]), got["new-sid"]
    assert proc.stderr == "", proc.stderr
    with Client(daemon.address) as c:
        assert c.request(p.Read(got["new-sid"], lock=False)) == p.Data(b'user|s:5:"alice";')


def test_regenerate_id_after_the_daemon_stopped_fails_only_the_write(
    start_daemon: Any, tmp_path: Path
) -> None:
    daemon = start_daemon("--memory-only")
    with _in_background(tmp_path, daemon.php_address, "regenerate",
                        "regengone0123456789abcdefgh", "0", str(tmp_path)) as future:
        daemon.signal(signal.SIGTERM)
        _until(lambda: "event=stopping" in daemon.log(), "the daemon to start stopping")
        (tmp_path / "go").touch()
        (tmp_path / "go2").touch()
        proc = future.result(60)
    got = _lines(proc)
    assert "thrown" not in got and got["regenerate"] == "true", got
    # As PHP's files handler on a failing disk: a warning when writing.
    stderr = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(stderr) == 2, proc.stderr
    assert "phpsess: cannot connect to" in stderr[0]
    assert "Failed to write session data" in stderr[1]
    assert daemon.wait() == 0


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


# -- guard: a daemon that cannot be asked never replaces the visitor's ID


@pytest.fixture
def hangup_server(workdir: Path) -> Iterator[str]:
    """A unix socket that accepts connections and closes them unanswered."""
    path = str(workdir / "hangup.sock")
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
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix://{path}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


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
