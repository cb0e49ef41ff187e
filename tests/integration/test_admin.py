"""The admin commands (phpsess/admin.py) against real daemons, with sessions
written by real php in all three serialize formats."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.__main__ import main
from phpsess.client import Client
from tests.conftest import ROOT, free_tcp_port, run_php

RICH_PHP = r"""<?php
class Cart {
    private $items = [];
    protected $owner = 'ann';
    public $self;
    function add($x) { $this->items[] = $x; }
}
session_start();
$cart = new Cart();
$cart->add('book');
$cart->self = $cart;
$_SESSION['cart'] = $cart;
$shared = ['x' => 1];
$_SESSION['a'] = &$shared;
$_SESSION['b'] = &$shared;
$_SESSION['again'] = $cart;
$_SESSION['bin'] = "\0\x01\xff|;";
$_SESSION['nul'] = "a\0b";
$_SESSION['nested'] = [1, [2, [3]], 'k' => null, 'f' => 0.5, 't' => true];
echo session_id();
"""

RICH_JSON = {
    "cart": {
        "__class__": "Cart",
        "items [private Cart]": ["book"],
        "owner [protected]": "ann",
        "self": {"__ref__": '$["cart"]'},
    },
    "a": {"x": 1},
    "b": {"__ref__": '$["a"]'},
    "again": {"__ref__": '$["cart"]'},
    "bin": {"__bytes_hex__": "0001ff7c3b"},
    "nul": "a\0b",
    "nested": {"0": 1, "1": [2, [3]], "k": None, "f": 0.5, "t": True},
}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def put(address: str, sessions: dict[str, tuple[bytes, int]]) -> None:
    with Client(address) as client:
        replies = client.pipeline(
            [p.Write(sid, ttl, data) for sid, (data, ttl) in sessions.items()]
        )
    assert all(isinstance(r, p.Ok) for r in replies), replies


def get(address: str, sid: str) -> tuple[bytes, int] | None:
    with Client(address) as client:
        reply = client.request(p.Get(sid))
    if isinstance(reply, p.Miss):
        return None
    assert isinstance(reply, p.Data)
    return reply.data, int(reply.tokens[0])


# ---------------------------------------------------------------- status


def test_status(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    put(daemon.address, {"s1": (b"x" * 10, 60), "s2": (b"y" * 20, 60)})
    status, out, err = cli(capsys, "status", "--connect", daemon.address)
    assert status == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "sessions 2 (30 B)" in lines
    assert "locks 0 held, 0 waiting" in lines
    assert "phpsess 0.1.0" in out
    assert f"storage journal in {daemon.data_dir}, fsync interval" in lines

    status, out, _ = cli(capsys, "status", "--connect", daemon.address, "--json")
    stats = json.loads(out)
    assert status == 0
    assert stats["sessions"] == 2 and stats["bytes"] == 30
    assert stats["address"] == daemon.address


def test_connect_takes_host_port_as_the_tcp_settings_do(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # cluster_listen and metrics_listen take HOST:PORT; --connect refused it.
    port = free_tcp_port()
    start_daemon("--memory-only", "--listen", f"tcp:127.0.0.1:{port}")
    status, out, err = cli(capsys, "status", "--connect", f"127.0.0.1:{port}", "--json")
    assert status == 0, err
    assert json.loads(out)["address"] == f"tcp:127.0.0.1:{port}"


def test_status_and_the_log_say_when_nothing_is_kept_on_disk(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing said that a daemon kept its sessions in memory only: not
    # status, not a line of the log (a config with memory_only = true and
    # a data_dir seemed durable).
    daemon = start_daemon("--memory-only")
    status, out, err = cli(capsys, "status", "--connect", daemon.address)
    assert status == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "storage memory only (a restart loses every session)" in lines
    assert ("event=memory_only detail=no data directory (--memory-only): a restart of the "
            "daemon loses every session it holds") in daemon.log()


def test_status_shows_the_sql_storage_and_its_error(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens there: the daemon serves UNAVAILABLE, and its STATS
    # says "sessions": null, "bytes": null and why.  status crashed on the
    # nulls, and never showed the storage at all.
    url = f"mysql://u@127.0.0.1:{free_tcp_port()}/db"
    daemon = start_daemon("--storage", url)
    status, out, err = cli(capsys, "status", "--connect", daemon.address)
    assert status == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert f"storage {url}, table phpsess_sessions" in lines
    assert "sessions unknown (the storage did not answer)" in lines
    errors = [line for line in lines if line.startswith("storage error ")]
    assert len(errors) == 1 and "Connection refused" in errors[0], lines
    status, out, _ = cli(capsys, "status", "--connect", daemon.address, "--json")
    stats = json.loads(out)
    assert status == 0 and stats["sessions"] is None and "storage_error" in stats


def test_a_daemon_at_max_connections_is_reported_plainly(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from phpsess.server import ADMIN_RESERVED_CONNECTIONS

    daemon = start_daemon("--memory-only", "--max-connections", "2")
    # Every slot held, the few kept for root and the daemon's user too.
    with contextlib.ExitStack() as held:
        for _ in range(2 + ADMIN_RESERVED_CONNECTIONS):
            held.enter_context(Client(daemon.address))
        for json_flag in ((), ("--json",)):
            status, out, err = cli(capsys, "status", "--connect", daemon.address, *json_flag)
            assert status == 1 and out == ""
            assert err == (f"phpsess: {daemon.address}: the daemon refused the connection: "
                           "BUSY the daemon is at max_connections=2\n"), err


def test_unreachable_and_bad_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = cli(capsys, "status", "--connect", f"unix:{tmp_path}/none.sock")
    assert status == 1
    assert "cannot connect" in err
    status, _, err = cli(capsys, "ls", "--connect", "relative.sock")
    assert status == 2
    assert "--connect" in err
    status, _, err = cli(capsys, "status", "--connect", "127.0.0.1: 5")
    assert status == 2
    assert err == ("phpsess: --connect: '127.0.0.1: 5': expected HOST:PORT (an IP address "
                   "or localhost, and a port)\n")
    with pytest.raises(SystemExit) as info:
        main(["show", "../etc/passwd"])
    assert info.value.code == 2


def test_help_documents_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["kick", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 ok; 1 daemon unreachable" in out
    assert "3 session not found" in out
    assert "4 session data not decodable (show: --raw writes its bytes)" in out
    # show's help says how values that are not plain JSON are shown.
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert 'not UTF-8 is shown as {"__bytes_hex__": HEX}' in out
    assert "a PHP array with such a key looks the same (--raw shows the bytes)" in out
    assert "4 session data not decodable" in out


def _phpsess(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The ``phpsess`` command line, run as a process of its own."""
    return subprocess.run([sys.executable, "-m", "phpsess", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_bad_prefix_and_timeout_are_usage_errors_not_tracebacks(daemon: Any) -> None:
    put(daemon.address, {"ab": (b"x", 60)})
    cases = [
        (["ls", "--prefix", "a.b"], "argument --prefix: 'a.b' cannot start a session ID"),
        (["ls", "--prefix", "a b"], "argument --prefix: 'a b' cannot start a session ID"),
        (["ls", "--prefix", "\u00e9"], "argument --prefix"),
        (["ls", "--prefix", "a" * 257], "up to 256 characters"),
        *[(["status", "--timeout-s", value],
           f"argument --timeout-s: '{value}' must be more than 0 and at most 86400")
          for value in ("inf", "nan", "-1", "0", "1e300")],
        (["drain", "--wait", "--wait-s", "inf"], "argument --wait-s: 'inf' must be"),
    ]
    for args, message in cases:
        proc = _phpsess(*args, "--connect", daemon.address)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert daemon.proc.poll() is None  # the drain was refused before it was sent
    # A prefix of the allowed characters still lists, also an empty one.
    for prefix, listed in (("a", ["ab"]), ("", ["ab"]), ("a,", [])):
        proc = _phpsess("ls", "--connect", daemon.address, "--prefix", prefix, "--json")
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == listed


# ---------------------------------------------------------------- ls


def test_ls_pages_through_2500_sessions(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = {f"s{i:05d}": (b"d" * (i % 50), 600) for i in range(2500)}
    put(daemon.address, sessions)
    status, out, _ = cli(capsys, "ls", "--connect", daemon.address, "--page-size", "97",
                         "--json")
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == sorted(sessions)
    assert all(r["bytes"] == len(sessions[r["id"]][0]) for r in rows)
    assert all(590_000 < r["ttl_ms"] <= 600_000 and r["locked"] is False for r in rows)

    # Human output: a header, one row each, a count.
    status, out, _ = cli(capsys, "ls", "--connect", daemon.address, "--page-size", "1000")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "BYTES", "TTL", "LOCKED"]
    assert lines[1].split()[:2] == ["s00000", "0"] and lines[1].split()[-1] == "no"
    assert lines[-1] == "2500 sessions"

    # Filters and --limit.
    status, out, _ = cli(capsys, "ls", "--connect", daemon.address, "--page-size", "10",
                         "--prefix", "s012", "--min-bytes", "45", "--json")
    ids = [json.loads(line)["id"] for line in out.splitlines()]
    assert ids == [s for s in sorted(sessions) if s.startswith("s012") and int(s[1:]) % 50 >= 45]
    status, out, _ = cli(capsys, "ls", "--connect", daemon.address, "--page-size", "3",
                         "--limit", "7", "--json")
    assert len(out.splitlines()) == 7


def _columns(line: str) -> list[tuple[int, int]]:
    """Where the columns of an ls line start and end (a TTL has single spaces)."""
    return [m.span() for m in re.finditer(r"\S+(?: \S+)*", line)]


def test_ls_columns_fit_long_ids_and_ttls(daemon: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # A cluster's IDs are 42+ characters; the longest TTL is a year.
    long_id = "n1-" + "a" * 45
    put(daemon.address, {long_id: (b"x" * 123456, p.MAX_TTL_S), "short": (b"y", 5)})
    status, out, _ = cli(capsys, "ls", "--connect", daemon.address)
    assert status == 0
    header, *rows, count = out.splitlines()
    assert count == "2 sessions"
    head = _columns(header)
    assert [header[a:b] for a, b in head] == ["ID", "BYTES", "TTL", "LOCKED"]
    assert [row.split()[0] for row in rows] == [long_id, "short"]
    assert rows[0].split()[2:4] == ["364d", "23h"]
    for row in rows:
        cols = _columns(row)
        assert len(cols) == 4, row
        assert cols[0][0] == 0 and cols[1][0] >= len(long_id) + 2, row
        # BYTES and TTL are right-aligned under their headers, LOCKED left.
        assert (cols[1][1], cols[2][1], cols[3][0]) == (head[1][1], head[2][1], head[3][0]), (
            header, row)
        assert cols[2][0] > cols[1][1] + 1, row


def test_ls_refused_prints_no_header(daemon: Any, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    real_request = Client.request

    def deny_list(self: Client, request: p.Request) -> p.Reply:
        if isinstance(request, p.List):
            return p.Error(p.Code.DENIED, "LIST is for root and the daemon's own user")
        return real_request(self, request)

    monkeypatch.setattr(Client, "request", deny_list)
    status, out, err = cli(capsys, "ls", "--connect", daemon.address)
    assert status == 1 and out == ""
    assert "LIST: the daemon refused: DENIED" in err


def test_ls_asks_an_older_daemon_without_roles(daemon: Any, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # A daemon older than LIST ... ROLES answers it BAD_REQUEST (an unknown
    # token, PROTOCOL.md §4.9): ls asks again without, and lists as before.
    put(daemon.address, {f"s{i}": (b"x" * i, 60) for i in range(5)})
    real_request = Client.request
    asked: list[bool] = []

    def older_daemon(self: Client, request: p.Request) -> p.Reply:
        if isinstance(request, p.List):
            asked.append(request.roles)
            if request.roles:
                return p.Error(p.Code.BAD_REQUEST, "LIST takes 2 arguments")
        return real_request(self, request)

    monkeypatch.setattr(Client, "request", older_daemon)
    status, out, err = cli(capsys, "ls", "--connect", daemon.address, "--page-size", "2")
    assert (status, err) == (0, "")
    header, *rows, count = out.splitlines()
    assert header.split() == ["ID", "BYTES", "TTL", "LOCKED"]
    assert [row.split()[:2] for row in rows] == [[f"s{i}", str(i)] for i in range(5)]
    assert count == "5 sessions"
    assert asked == [True, False, False, False]  # once with ROLES, then never again


def test_ls_prefix_seek_is_exact(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # IDs around the prefix boundary, including the prefix itself and IDs
    # using ',' and '-' (the lowest characters of the alphabet).
    ids = ["ab", "ab,", "ab-", "ab0", "abz", "aa", "aaz", "ac", "a", "b", ",", ",,", "-"]
    put(daemon.address, {sid: (b"x", 60) for sid in ids})
    for prefix in ["ab", "a", ",", "-", "ab,", "zz", "aaz"]:
        status, out, _ = cli(capsys, "ls", "--connect", daemon.address, "--prefix", prefix,
                             "--page-size", "1", "--json")
        assert status == 0
        got = [json.loads(line)["id"] for line in out.splitlines()]
        assert got == sorted(s for s in ids if s.startswith(prefix)), prefix


def test_ls_locked(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    put(daemon.address, {"free": (b"1", 60), "held": (b"2", 60)})
    with Client(daemon.address) as holder:
        assert isinstance(holder.request(p.Read("held")), p.Data)
        status, out, _ = cli(capsys, "ls", "--connect", daemon.address, "--locked", "--json")
        assert status == 0
        assert [json.loads(line) for line in out.splitlines()] == [
            {"id": "held", "bytes": 1, "ttl_ms": pytest.approx(60_000, abs=2_000),
             "locked": True}
        ]


# ---------------------------------------------------------------- show


@pytest.mark.php
@pytest.mark.parametrize("serializer", ["php", "php_binary", "php_serialize"])
def test_show_decodes_what_php_wrote(
    serializer: str, daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "rich.php"
    script.write_text(RICH_PHP)
    proc = run_php(script, handler="phpsess", address=daemon.php_address,
                   ini={"session.serialize_handler": serializer})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    sid = proc.stdout.strip()

    status, out, err = cli(capsys, "show", sid, "--connect", daemon.address, "--json")
    assert status == 0, err
    shown = json.loads(out)
    assert shown["format"] == serializer
    assert shown["data"] == RICH_JSON
    assert shown["locked"] is False and shown["id"] == sid

    status, out, _ = cli(capsys, "show", sid, "--connect", daemon.address,
                         "--format", serializer)
    assert status == 0
    assert f"format: {serializer}" in out
    assert '"items [private Cart]": [' in out


def test_show_raw_is_binary_safe(daemon: Any, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    blob = bytes(range(256)) * 3
    put(daemon.address, {"raw1": (blob, 60)})
    assert main(["show", "raw1", "--raw", "--connect", daemon.address]) == 0
    assert capsysbinary.readouterr().out == blob


def test_show_missing_and_undecodable(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "show", "nosuch", "--connect", daemon.address)
    assert status == 3 and out == ""
    assert "no session nosuch" in err
    # --json says so on stdout too, as it does for data it cannot decode.
    status, out, err = cli(capsys, "show", "nosuch", "--connect", daemon.address, "--json")
    assert status == 3 and "no session nosuch" in err
    assert json.loads(out) == {"id": "nosuch", "found": False,
                               "error": "no session nosuch (expired, destroyed or never written)"}

    put(daemon.address, {"junk": (b"\xff\xfe not php", 60), "php1": (b"a|i:1;", 60)})
    # Data that does not decode has an exit status of its own (4), not that
    # of an unreachable daemon (1).
    status, out, err = cli(capsys, "show", "junk", "--connect", daemon.address)
    assert status == 4
    assert "cannot decode" in err and "--raw" in err
    status, out, err = cli(capsys, "show", "junk", "--connect", daemon.address, "--json")
    assert status == 4 and "not a PHP session" in json.loads(out)["error"]
    # A wrong --format is a decoding error naming that format.
    status, _, err = cli(capsys, "show", "php1", "--format", "php_serialize",
                         "--connect", daemon.address)
    assert status == 4
    assert "php_serialize: at byte 0" in err


COLLIDE_PHP = r"""<?php
session_start();
$_SESSION['prefs']["\xff"] = 'hidden-value';
$_SESSION['prefs']['\xff'] = 'decoy';
$_SESSION['obj'] = (object) ['__class__' => 'App\\Admin', 'role' => 'user'];
echo session_id();
"""


@pytest.mark.php
def test_show_keeps_every_value_and_the_class(
    daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Keys from user input: the byte 0xff and the text \xff were both shown
    # as "\\xff" (one value hidden), and a property __class__ replaced the
    # class.
    script = tmp_path / "collide.php"
    script.write_text(COLLIDE_PHP)
    proc = run_php(script, handler="phpsess", address=daemon.php_address)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    status, out, err = cli(capsys, "show", proc.stdout.strip(), "--connect", daemon.address,
                           "--json")
    assert status == 0, err
    assert json.loads(out)["data"] == {
        "prefs": {"\\xff": "hidden-value", "\\\\xff": "decoy"},
        "obj": {"__class__": "stdClass", "__class__ [#2]": "App\\Admin", "role": "user"},
    }


TERMINAL_TRAPS = {
    "esc": "Bob\x1b]0;TITLE\x07\x1b[2J",
    "c1": "x\u009b2J\u009d0;title\u009cy",
    "del": "a\x7fb",
    "bidi": "admin\u202egnp.exe",
    "seps": "a\u2028b\u2029c\u200bd",
    "key\u009b2J": "k",
    "text": "h\u00e9llo \u4e2d \U0001f600",
}


def test_show_escapes_what_a_terminal_would_act_on(
    daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Users' strings reach an operator's terminal: C1 controls (U+009B is
    # CSI), DEL, bidi and format characters, line separators were written
    # raw; a stdout that is not UTF-8 got them as 8-bit bytes, and crashed
    # on a character it cannot encode.
    blob = "".join(
        f'{k}|s:{len(v.encode())}:"{v}";' for k, v in TERMINAL_TRAPS.items()
    ).encode()
    put(daemon.address, {"traps": (blob, 60)})
    status, out, err = cli(capsys, "show", "traps", "--connect", daemon.address)
    assert status == 0, err
    body = out[out.index("{"):]
    assert json.loads(body) == TERMINAL_TRAPS
    assert all(c.isprintable() or c == "\n" for c in out), out
    for escape in ("\\u001b]0;", "\\u009b2J", "\\u007f", "\\u202e", "\\u2028", "\\u2029",
                   "\\u200b", '"key\\u009b2J"'):
        assert escape in body
    assert "h\u00e9llo \u4e2d \U0001f600" in body  # printable text stays as it is

    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    proc = subprocess.run([sys.executable, "-m", "phpsess", "show", "traps", "--connect",
                           daemon.address], capture_output=True, env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert not any(0x80 <= b <= 0x9F or b == 0x7F for b in proc.stdout), proc.stdout
    assert b'"h\xe9llo \\u4e2d \\ud83d\\ude00"' in proc.stdout
    assert json.loads(proc.stdout[proc.stdout.index(b"{"):].decode("latin-1")) == TERMINAL_TRAPS
    # --json stays ASCII.
    status, out, _ = cli(capsys, "show", "traps", "--connect", daemon.address, "--json")
    assert status == 0 and out.isascii() and json.loads(out)["data"] == TERMINAL_TRAPS


def test_show_refuses_huge_numbers_as_undecodable(
    daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # int() refuses over 4300 digits: show ended in a traceback and exit
    # status 1 (the daemon's).  PHP writes at most 20 characters.
    put(daemon.address, {"big": (b"n|i:" + b"9" * 5000 + b";", 60)})
    status, out, err = cli(capsys, "show", "big", "--connect", daemon.address)
    assert status == 4 and out == ""
    assert "cannot decode" in err and "expected an integer of at most 20 digits" in err
    status, out, err = cli(capsys, "show", "big", "--connect", daemon.address, "--json")
    assert status == 4 and "at most 20 digits" in json.loads(out)["error"]


# ---------------------------------------------------------------- kick


def test_kick(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    put(daemon.address, {"k1": (b"a|i:1;", 60), "k2": (b"a|i:2;", 60)})
    status, out, _ = cli(capsys, "kick", "k1", "--connect", daemon.address)
    assert status == 0 and out == "destroyed k1\n"
    assert get(daemon.address, "k1") is None
    # Kicking a missing session is not an error (DESTROY, PROTOCOL.md §4.5).
    status, out, _ = cli(capsys, "kick", "k1", "--connect", daemon.address, "--json")
    assert status == 0
    assert json.loads(out) == {"id": "k1", "destroyed": False, "existed": False}

    with Client(daemon.address) as holder:
        assert isinstance(holder.request(p.Read("k2")), p.Data)
        status, out, err = cli(capsys, "kick", "k2", "--connect", daemon.address)
        assert status == 1
        assert "k2 is locked by a request in progress and was not destroyed" in err
        status, out, err = cli(capsys, "kick", "k2", "--connect", daemon.address, "--json")
        assert status == 1 and json.loads(out)["error"] == "LOCKED"
    assert get(daemon.address, "k2") is not None


def test_kick_takes_a_session_whose_lock_is_past_its_lease(
    daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Past its lease a lock goes to whoever asks for it (PROTOCOL.md
    # §6.3); kick did not ask, so a hung worker's session could not be
    # removed once leases stopped revoking uncontended locks.
    put(daemon.address, {"k3": (b"a|i:3;", 60)})
    with Client(daemon.address, lease_ms=300) as holder:
        assert isinstance(holder.request(p.Read("k3")), p.Data)
        time.sleep(0.6)
        status, out, err = cli(capsys, "kick", "k3", "--connect", daemon.address)
        assert (status, out) == (0, "destroyed k3\n"), err
        reply = holder.request(p.Write("k3", 60, b"late"))
        assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_LOST
    assert get(daemon.address, "k3") is None


# ---------------------------------------------------------------- export/import


def test_export_import_round_trip(start_daemon: Any, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    source, target = start_daemon("--memory-only"), start_daemon("--memory-only")
    sessions = {
        f"e{i:04d}": (bytes([i % 256]) * (i % 300) + b"\0\n\xff", 60 + i * 7)
        for i in range(1200)
    }
    sessions["big"] = (b"\x00\xff" * 600_000, 3600)
    put(source.address, sessions)
    dump = tmp_path / "dump.jsonl"
    status, out, err = cli(capsys, "export", "--connect", source.address, "--output", str(dump),
                           "--page-size", "50")
    assert status == 0, err
    assert out == f"exported {len(sessions)} sessions to {dump}\n"
    assert dump.stat().st_mode & 0o777 == 0o600  # session IDs are login tokens
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []
    lines = dump.read_text().splitlines()
    assert len(lines) == len(sessions)
    first = json.loads(lines[0])
    assert set(first) == {"id", "ttl_ms", "expires_at_ms", "data_b64"}
    # The expiry as Unix time, so that an import later counts the time since.
    assert abs(first["expires_at_ms"] - (time.time() * 1000 + first["ttl_ms"])) < 60_000

    status, out, err = cli(capsys, "import", str(dump), "--connect", target.address, "--json")
    assert status == 0, err
    assert json.loads(out) == {"imported": len(sessions), "expired": 0, "invalid": 0,
                               "refused": 0, "stopped": False}
    for sid, (data, ttl_s) in sessions.items():
        got = get(target.address, sid)
        assert got is not None, sid
        assert got[0] == data
        assert abs(got[1] / 1000 - ttl_s) <= 2, sid

    # Exporting the copy to stdout gives the same sessions (the summary goes
    # to stderr).
    status, out, err = cli(capsys, "export", "--connect", target.address)
    assert status == 0

    def same(text: str) -> list[tuple[str, str]]:
        return [(e["id"], e["data_b64"]) for e in map(json.loads, text.splitlines())]

    assert same(out) == same(dump.read_text())
    assert [json.loads(x)["id"] for x in out.splitlines()] == sorted(sessions)
    assert err == f"exported {len(sessions)} sessions\n"


def test_import_bad_lines_and_expired(daemon: Any, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = '{"id": "%s", "ttl_ms": 1500, "data_b64": "YXxpOjE7"}'
    text = "\n".join([
        good % "i1",
        "not json",
        '{"id": "../x", "ttl_ms": 1000, "data_b64": ""}',
        '{"id": "i2", "ttl_ms": 0, "data_b64": ""}',  # expired: skipped
        '{"id": "i3", "ttl_ms": 1000}',
        '{"id": "i4", "ttl_ms": 1000, "data_b64": "***"}',
        "",
        good % "i5",
    ]) + "\n"
    dump = tmp_path / "in.jsonl"
    dump.write_text(text)

    status, out, err = cli(capsys, "import", str(dump), "--connect", daemon.address)
    assert status == 1
    assert out == "imported 2, skipped 1 expired, 4 invalid lines, 0 refused\n"
    assert f"{dump}:2: not JSON" in err
    assert f"{dump}:3: id '../x' is not a session ID" in err
    assert f"{dump}:5: missing data_b64" in err
    assert f"{dump}:6: data_b64 is not base64" in err
    got = get(daemon.address, "i1")
    assert got is not None and got[0] == b"a|i:1;" and 1000 < got[1] <= 2000  # ceil(1.5 s)
    assert get(daemon.address, "i2") is None

    # --strict stops at line 2 (line 1 before it is still written); stdin.
    monkeypatch.setattr("sys.stdin", io.StringIO(text.replace('"i1"', '"j1"')))
    status, out, err = cli(capsys, "import", "-", "--strict", "--connect", daemon.address)
    assert status == 1
    assert out == "imported 1, skipped 0 expired, 1 invalid lines, 0 refused (stopped: --strict)\n"
    assert "stdin:2: not JSON: " in err and "line refused" in err
    assert get(daemon.address, "j1") is not None


def test_import_counts_the_time_since_the_export(daemon: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # A session exported with 20 min left, imported an hour later, has
    # expired: it is skipped, not brought back for another 20 min. One
    # exported with an hour left, imported 59 min 30 s later, gets 30 s.
    # An export without expires_at_ms (an older version) keeps its ttl_ms.
    now_ms = int(time.time() * 1000)
    lines = [
        {"id": "gone", "ttl_ms": 1_200_000, "expires_at_ms": now_ms - 2_400_000},
        {"id": "short", "ttl_ms": 3_600_000, "expires_at_ms": now_ms + 30_000},
        {"id": "older", "ttl_ms": 90_000},
        # Exported with the longest lifetime on a clock 2 s ahead of ours:
        # it keeps that lifetime, not a longer one the daemon would refuse.
        {"id": "ahead", "ttl_ms": 31_536_000_000, "expires_at_ms": now_ms + 31_536_002_000},
        {"id": "bad", "ttl_ms": 1000, "expires_at_ms": "soon"},
    ]
    dump = tmp_path / "in.jsonl"
    dump.write_text("".join(json.dumps({**line, "data_b64": "YXxpOjE7"}) + "\n"
                            for line in lines))
    status, out, err = cli(capsys, "import", str(dump), "--connect", daemon.address)
    assert status == 1
    assert out == "imported 3, skipped 1 expired, 1 invalid lines, 0 refused\n"
    assert f"{dump}:5: expires_at_ms 'soon' is not a whole number" in err
    assert get(daemon.address, "gone") is None
    short = get(daemon.address, "short")
    assert short is not None and 0 < short[1] <= 31_000
    older = get(daemon.address, "older")
    assert older is not None and 60_000 < older[1] <= 90_000
    ahead = get(daemon.address, "ahead")
    assert ahead is not None and ahead[1] > 31_535_000_000


def test_import_refused_write(daemon: Any, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    put(daemon.address, {"w1": (b"old", 60)})
    dump = tmp_path / "in.jsonl"
    dump.write_text('{"id": "w1", "ttl_ms": 5000, "data_b64": "bmV3"}\n'
                    '{"id": "w2", "ttl_ms": 5000, "data_b64": "bmV3"}\n')
    with Client(daemon.address) as holder:
        assert isinstance(holder.request(p.Read("w1")), p.Data)
        status, out, err = cli(capsys, "import", str(dump), "--connect", daemon.address)
    assert status == 1
    assert "in.jsonl:1: WRITE w1 refused: LOCKED" in err
    assert out == "imported 1, skipped 0 expired, 0 invalid lines, 1 refused\n"
    got = get(daemon.address, "w1")
    assert got is not None and got[0] == b"old"


def test_import_strict_stops_at_the_first_refused_write(
    start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = start_daemon("--memory-only", "--max-session-bytes", str(1 << 20))

    def line(sid: str, data: bytes) -> str:
        return json.dumps({"id": sid, "ttl_ms": 60_000,
                           "data_b64": base64.b64encode(data).decode()}) + "\n"

    dump = tmp_path / "in.jsonl"
    dump.write_text(line("before", b"a|i:1;") + line("big", b"x" * 2_000_000)
                    + "".join(line(f"after{i}", b"a|i:2;") for i in range(5)))
    status, out, err = cli(capsys, "import", str(dump), "--strict", "--connect", daemon.address)
    assert status == 1
    assert out == "imported 1, skipped 0 expired, 0 invalid lines, 1 refused (stopped: --strict)\n"
    assert "in.jsonl:2: WRITE big refused: TOO_LARGE" in err
    assert get(daemon.address, "before") is not None
    assert [sid for sid in ("big", *(f"after{i}" for i in range(5)))
            if get(daemon.address, sid) is not None] == []
    # Without --strict the rest is written.
    status, out, _ = cli(capsys, "import", str(dump), "--connect", daemon.address)
    assert status == 1 and out.startswith("imported 6,")
    assert get(daemon.address, "after4") is not None


def test_export_writes_in_place_to_a_device_fifo_or_symlink(
    daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(daemon.address, {"x1": (b"a|i:1;", 60), "x2": (b"a|i:2;", 60)})
    # -o /dev/stdout: /dev/stdout is a symlink to /proc/self/fd/1, which the
    # temp+rename replaced with a regular file (as root, the system's own).
    fakedev = tmp_path / "dev"
    fakedev.mkdir()
    (fakedev / "stdout").symlink_to("/proc/self/fd/1")
    proc = _phpsess("export", "-o", str(fakedev / "stdout"), "--connect", daemon.address)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["id"] for x in proc.stdout.splitlines()] == ["x1", "x2"]
    assert proc.stderr == f"exported 2 sessions to {fakedev / 'stdout'}\n"  # not in the data
    assert os.readlink(fakedev / "stdout") == "/proc/self/fd/1"
    assert os.listdir(fakedev) == ["stdout"]

    # A fifo, as bash's -o >(gzip > f) gives (/dev/fd/63, in a directory
    # where no temporary file can be made).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["timeout", "20", "cat", str(fifo)], stdout=subprocess.PIPE)
    status, out, err = cli(capsys, "export", "-o", str(fifo), "--connect", daemon.address)
    got, _ = reader.communicate(timeout=30)
    assert status == 0, err
    assert out == f"exported 2 sessions to {fifo}\n"
    assert [json.loads(x)["id"] for x in got.splitlines()] == ["x1", "x2"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    # A symlink to a regular file: the file gets the export, the link stays.
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    status, out, err = cli(capsys, "export", "-o", str(link), "--connect", daemon.address)
    assert status == 0, err
    assert link.is_symlink() and len(real.read_text().splitlines()) == 2


def test_export_output_errors_are_messages_not_tracebacks(
    daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    put(daemon.address, {"x1": (b"a|i:1;", 60)})
    work = tmp_path / "work"
    (work / "somedir").mkdir(parents=True)
    status, out, err = cli(capsys, "export", "-o", str(work / "somedir"),
                           "--connect", daemon.address)
    assert status == 2 and out == ""
    assert f"--output {work / 'somedir'} is a directory" in err
    assert os.listdir(work) == ["somedir"] and os.listdir(work / "somedir") == []

    # A write that fails (a full disk), to a symlinked device.
    (work / "full").symlink_to("/dev/full")
    status, out, err = cli(capsys, "export", "-o", str(work / "full"), "--connect", daemon.address)
    assert status == 1 and out == ""
    assert f"writing {work / 'full'}: " in err and "No space left on device" in err
    assert (work / "full").is_symlink()

    # A rename that fails (e.g. onto an immutable file, chattr +i).
    target = work / "dump.jsonl"
    target.write_text("old\n")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refuse)
        status, out, err = cli(capsys, "export", "-o", str(target), "--connect", daemon.address)
    assert status == 1 and out == ""
    assert f"writing {target}: Operation not permitted" in err
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(work)) == ["dump.jsonl", "full", "somedir"]  # no temp file left


def test_drain_stops_the_daemon_gracefully(start_daemon: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    daemon = start_daemon()
    status, out, _ = cli(capsys, "drain", "--connect", daemon.address, "--wait")
    assert status == 0 and "drained and exited" in out
    assert daemon.wait(10) == 0
    assert "event=drain_requested" in daemon.log()


def test_drain_wait_returns_only_once_the_daemon_has_exited(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # A request holding a lock keeps the draining daemon running; meanwhile
    # new clients are refused at once (not left waiting in the backlog), and
    # drain --wait waits for the process, not for the socket to go quiet.
    daemon = start_daemon("--shutdown-timeout-s", "60")
    holder = Client(daemon.address)
    holder.request(p.Hello(1))
    assert holder.request(p.Read("d1", lock=True)) == p.MISS
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        drained = pool.submit(
            cli, capsys, "drain", "--connect", daemon.address, "--wait", "--timeout-s", "60"
        )
        deadline = time.monotonic() + 10
        while os.path.exists(daemon.sock_path):
            assert time.monotonic() < deadline, "the listening socket was never closed"
            time.sleep(0.02)
        with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as late:
            late.connect(daemon.sock_path)
        time.sleep(1.5)  # the old --wait declared the daemon gone after 1 s
        assert not drained.done()
        assert daemon.proc.poll() is None  # still draining: the lock is held
        assert holder.request(p.Write("d1", 60, b"x|i:1;")) == p.OK  # releases it
        holder.close()
        status, out, _ = drained.result(30)
    assert status == 0 and "drained and exited" in out
    assert daemon.wait(10) == 0


# Run as another user: sends argv[3] (a backslash and n in it stand for a
# newline) over unix or TCP, and prints the first four reply lines.
_AS_NOBODY = r"""
import socket, sys
family, where = sys.argv[1], sys.argv[2]
if family == "tcp":
    s = socket.create_connection(("127.0.0.1", int(where)), timeout=10)
else:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(where)
s.sendall(sys.argv[3].replace("\\n", "\n").encode())
got = b""
while got.count(b"\n") < 4:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
sys.stdout.write(got.decode())
"""


def test_drain_and_list_are_refused_to_other_users(
    start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every PHP worker can reach the socket: stopping the daemon, or listing
    # every session ID (login tokens), is for root and the daemon's user.
    shared = Path(tempfile.mkdtemp(prefix="phpsess-admin-"))
    try:
        shared.chmod(0o755)
        port = free_tcp_port()
        daemon = start_daemon("--listen", f"tcp:127.0.0.1:{port}",
                              "--listen", f"unix:{shared}/s.sock", "--socket-mode", "0666")
        put(daemon.address, {"secret-session-id-0001": (b"x|i:1;", 60)})
        for family, where in (("tcp", str(port)), ("unix", f"{shared}/s.sock")):
            proc = subprocess.run(
                ["/usr/bin/python3", "-c", _AS_NOBODY, family, where,
                 r"HELLO 1\nLIST * 10\nDRAIN\nPING\n"],
                capture_output=True, text=True, timeout=30, user=65534, group=65534,
                extra_groups=[], cwd="/",
            )
            lines = proc.stdout.splitlines()
            assert lines[0] == "OK 1", (family, proc.stdout, proc.stderr)
            assert lines[1].startswith("ERR DENIED LIST "), (family, lines)
            assert lines[2].startswith("ERR DENIED DRAIN "), (family, lines)
            assert lines[3] == "OK", (family, lines)  # the connection goes on
        assert "secret-session-id" not in proc.stdout
        assert "event=admin_denied" in daemon.log() and "uid=65534" in daemon.log()
        # Root (the test) may, on the unix socket and over local TCP alike.
        for address in (daemon.address, f"tcp:127.0.0.1:{port}"):
            status, out, _ = cli(capsys, "ls", "--connect", address)
            assert status == 0 and "secret-session-id-0001" in out, (address, out)
        assert daemon.proc.poll() is None
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_admin_output_piped_into_head_stops_quietly(daemon: Any) -> None:
    put(daemon.address, {f"piped-session-{i:06d}": (b"x|i:1;", 60) for i in range(3000)})
    for command in ("ls", "export"):
        proc = subprocess.run(
            f"{sys.executable} -m phpsess {command} --connect {daemon.address} | head -1",
            shell=True, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert proc.returncode == 0 and proc.stdout.count("\n") == 1, (command, proc)
        assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr


def test_drain_wait_waits_as_long_as_the_drain_may_take(start_daemon: Any) -> None:
    # With a lock held, a drain lasts the daemon's shutdown_timeout_s (in a
    # cluster, drain_timeout_s too): 12 s here.  drain --wait gave up after
    # its --timeout-s (10 s), while the daemon went on and exited after all.
    daemon = start_daemon("--memory-only", "--shutdown-timeout-s", "12")
    with Client(daemon.address) as holder:
        assert holder.request(p.Read("held", lock=True)) == p.MISS
        started = time.monotonic()
        proc = _phpsess("drain", "--wait", "--connect", daemon.address, timeout=120)
        took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "drained and exited" in proc.stdout
    assert took > 11, took  # it did wait for the lock holder's 12 s
    assert daemon.wait(10) == 0
    assert "event=shutdown_timeout" in daemon.log()

    # --wait-s sets the wait: past it, exit 1 saying that the daemon is
    # still draining (it goes on, and exits once the lock is released).
    daemon = start_daemon("--memory-only", "--shutdown-timeout-s", "60")
    with Client(daemon.address) as holder:
        assert holder.request(p.Read("held", lock=True)) == p.MISS
        started = time.monotonic()
        proc = _phpsess("drain", "--wait", "--wait-s", "1", "--connect", daemon.address)
        took = time.monotonic() - started
        assert proc.returncode == 1, proc.stderr
        assert f"{daemon.address} is still draining after 1 s" in proc.stderr
        assert "--wait-s" in proc.stderr
        # A draining daemon accepts no connections: status could not tell.
        assert "phpsess status" not in proc.stderr and f"pid {daemon.pid}" in proc.stderr
        assert 1 <= took < 30, took
        assert daemon.proc.poll() is None
        assert holder.request(p.Write("held", 60, b"x|i:1;")) == p.OK
    assert daemon.wait(30) == 0


def test_drain_wait_default_covers_the_daemons_timeouts(tmp_path: Path) -> None:
    from phpsess import admin
    from phpsess.__main__ import build_parser

    def wait_s(*args: str) -> float:
        return admin._drain_wait_s(build_parser().parse_args(["drain", "--wait", *args]))

    # The defaults, 10 s for the requests holding locks and 30 s for a
    # cluster's hand-over, with room to spare.
    assert wait_s() == 60
    assert wait_s("--wait-s", "5") == 5
    assert wait_s("--timeout-s", "90") == 90  # it bounded the wait before --wait-s
    config = tmp_path / "phpsess.toml"
    config.write_text("[limits]\nshutdown_timeout_s = 100\n[cluster]\ndrain_timeout_s = 50\n")
    assert wait_s("--config", str(config)) == 170
    assert wait_s("--config", str(config), "--wait-s", "3") == 3


def test_ls_reads_a_cluster_nodes_list_lines_and_shows_how_it_holds_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A cluster node's LIST lines carry two more fields, role and the other
    # copy's holder (CLUSTER.md §1); a single daemon's have four.  ls reads
    # both (an older parser failed on the longer lines: too many values to
    # unpack) and shows a COPIES column only for the former.
    from phpsess.admin import Entry, _LsTable, _parse_list

    lines = (b"s1-a-b 6 1000 0 master b\n"
             b"s2-b-a 7 1000 1 backup b\n"
             b"s3-a-a 8 1000 0 master -\n"
             b"s4-a-b 0 1000 1 - - later fields\n")
    entries = list(_parse_list(lines))
    assert [(e.role, e.other) for e in entries] == [
        ("master", "b"), ("backup", "b"), ("master", "-"), ("-", "-"),
    ]
    table = _LsTable(10)
    for entry in entries:
        table.add(entry)
    table.flush()
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "BYTES", "TTL", "LOCKED", "COPIES"]
    assert [line.split("  ")[-1].strip() for line in out[1:]] == [
        "master, other on b", "backup, other on b", "master, single copy", "-",
    ]
    assert list(_parse_list(b"plain 1 1000 0\n")) == [Entry("plain", 1, 1000, False)]
    table = _LsTable(10)
    table.add(Entry("plain", 1, 1000, False))
    table.flush()
    assert capsys.readouterr().out.splitlines()[0].split() == ["ID", "BYTES", "TTL", "LOCKED"]
