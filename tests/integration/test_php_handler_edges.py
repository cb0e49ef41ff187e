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
from tests.conftest import PREPEND, free_tcp_port, php_binary, read_counter, run_php
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
