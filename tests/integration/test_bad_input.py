"""Bad input over real sockets against a real daemon process: each bad
client gets its error or is cut off, nothing partial is stored, and a
well-behaved client is served throughout (issue: bad input)."""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import time
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client, ClientError
from tests.conftest import proc_status_kib


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _recv_all(s: socket.socket, timeout: float = 5) -> bytes:
    s.settimeout(timeout)
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def _refused_busy(path: str) -> None:
    s = _connect(path)
    assert _recv_all(s).startswith(b"ERR BUSY ")
    s.close()


def _good_client_works(address: str, sid: str, value: bytes) -> None:
    with Client(address) as c:
        assert c.request(p.Write(sid, 60, value)) == p.OK
        assert c.request(p.Read(sid, lock=False)) == p.Data(value)


def test_100_mib_length_header_is_refused_and_nothing_stored(daemon: Any) -> None:
    with Client(daemon.address) as c:
        assert c.request(p.Write("victim", 60, b"original")) == p.OK
        # Announce 100 MiB, send a little of it, then vanish.
        c.send_raw(b"WRITE victim 60 104857600\n" + b"x" * 1000)
        reply = c.read_reply()
        assert isinstance(reply, p.Error) and reply.code is p.Code.TOO_LARGE
        assert "max_session_bytes" in reply.message
    _good_client_works(daemon.address, "other", b"fine")
    with Client(daemon.address) as c:
        assert c.request(p.Read("victim", lock=False)) == p.Data(b"original")


def test_too_large_payload_is_discarded_and_connection_stays_usable(start_daemon: Any) -> None:
    daemon = start_daemon("--max-session-bytes", "1024")
    with Client(daemon.address) as c:
        big = b"y" * 5000
        c.send_raw(b"WRITE s 60 5000\n" + big + b"PING\n")
        reply = c.read_reply()
        assert isinstance(reply, p.Error) and reply.code is p.Code.TOO_LARGE
        assert c.read_reply() == p.OK
        assert c.request(p.Read("s", lock=False)) == p.MISS


def test_half_a_payload_then_disconnect_stores_nothing(daemon: Any) -> None:
    with Client(daemon.address) as c:
        assert c.request(p.Write("half", 60, b"before")) == p.OK
        assert c.request(p.Read("half")) == p.Data(b"before")  # take the lock
        c.send_raw(b"WRITE half 60 100\n" + b"z" * 50)
    # The writer is gone: its lock is free at once and the old data stands.
    with Client(daemon.address, wait_ms=2000) as c:
        assert c.request(p.Read("half")) == p.Data(b"before")
        got = c.request(p.Get("half"))
        assert isinstance(got, p.Data) and got.data == b"before"


def test_malformed_frames_are_cut_off_others_served(daemon: Any) -> None:
    bad_inputs = [
        b"HELLO 1\nREAD  two-spaces\n",
        b"HELLO 1\nWRITE s 60 notanumber\nxx",
        b"\x00\x01\x02\xff\n",
        b"HELLO 1\r\n",
        b"A" * 5000,
        bytes(range(256)) * 8,
    ]
    for raw in bad_inputs:
        s = _connect(daemon.sock_path)
        s.sendall(raw)
        reply = _recv_all(s)
        s.close()
        assert b"ERR BAD_FRAME" in reply or b"ERR HEADER_TOO_LONG" in reply, raw[:20]
        assert reply.endswith(b"\n")
        _good_client_works(daemon.address, "good", raw[:10])
    with Client(daemon.address) as c:
        stats = c.request(p.Stats())
        assert isinstance(stats, p.Data)
        assert b'"sessions": 1' in stats.data


def test_garbage_storm_while_a_good_client_works_and_memory_stays_flat(daemon: Any) -> None:
    import random

    rng = random.Random(1234)
    rss = {}
    with Client(daemon.address) as good:
        for i in range(1000):
            s = _connect(daemon.sock_path)
            garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
            if i % 3 == 0:  # some start well and then go wrong mid-request
                garbage = b"HELLO 1\nWRITE g 60 900\n" + garbage[:400]
            s.sendall(garbage)
            s.close()
            assert good.request(p.Write("steady", 60, str(i).encode())) == p.OK
            assert good.request(p.Read("steady", lock=False)) == p.Data(str(i).encode())
            if i in (199, 999):
                rss[i] = proc_status_kib(daemon.pid, "VmRSS")
    assert daemon.proc.poll() is None
    # 800 more bad clients after warm-up must not grow the daemon (no leak).
    assert rss[999] - rss[199] < 8 * 1024, rss
    with Client(daemon.address) as c:
        assert c.request(p.Read("g", lock=False)) == p.MISS  # no partial write stored


def test_1000_idle_connections_are_cut_off_while_a_client_is_served(start_daemon: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    daemon = start_daemon("--idle-timeout-s", "2", "--max-connections", "1100")
    idle = []
    try:
        for i in range(1000):
            s = _connect(daemon.sock_path)
            if i % 2:
                s.sendall(b"HELLO 1\n")  # half say hello, half say nothing
            idle.append(s)
        # Served while the idle crowd is connected.
        _good_client_works(daemon.address, "busy-day", b"served")
        with Client(daemon.address) as c:
            stats = c.request(p.Stats())
            assert isinstance(stats, p.Data) and b'"connections": 1001' in stats.data
        # Each idle connection is closed by the daemon after the idle timeout.
        deadline = time.monotonic() + 20
        closed = 0
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data in (b"", b"OK 1\n")
            closed += 1
        assert closed == 1000
        _good_client_works(daemon.address, "after", b"still served")
    finally:
        for s in idle:
            s.close()


def test_connections_over_the_limit_get_busy(start_daemon: Any) -> None:
    daemon = start_daemon("--max-connections", "5")
    # The test runs as root, who has a few slots more (for the admin CLI).
    from phpsess.server import ADMIN_RESERVED_CONNECTIONS

    held = [Client(daemon.address) for _ in range(5 + ADMIN_RESERVED_CONNECTIONS)]
    try:
        _refused_busy(daemon.sock_path)
    finally:
        for c in held:
            c.close()
    time.sleep(0.2)
    _good_client_works(daemon.address, "room-again", b"yes")


def test_at_max_connections_root_still_has_a_few_slots_for_admin(start_daemon: Any) -> None:
    """PHP's workers holding every slot must not lock the operator out:
    root and the daemon's user get ADMIN_RESERVED_CONNECTIONS more on a unix
    socket, other users get BUSY."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from phpsess.server import ADMIN_RESERVED_CONNECTIONS
    from tests.integration.test_admin import _AS_NOBODY

    shared = tempfile.mkdtemp(prefix="phpsess-reserve-")
    held: list[Client] = []
    try:
        os.chmod(shared, 0o755)
        address = f"unix:{shared}/s.sock"
        start_daemon("--max-connections", "3", "--listen", address, "--socket-mode", "0666")
        held += [Client(address) for _ in range(3)]
        as_nobody = subprocess.run(
            ["/usr/bin/python3", "-c", _AS_NOBODY, "unix", f"{shared}/s.sock", r"PING\n"],
            capture_output=True, text=True, timeout=30, user=65534, group=65534,
            extra_groups=[], cwd="/",
        )
        assert as_nobody.stdout.startswith("ERR BUSY "), (as_nobody.stdout, as_nobody.stderr)
        status = subprocess.run(
            [sys.executable, "-m", "phpsess", "status", "--connect", address],
            capture_output=True, text=True, timeout=30,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        held += [Client(address) for _ in range(ADMIN_RESERVED_CONNECTIONS)]
        _refused_busy(f"{shared}/s.sock")  # the reserve is bounded too
    finally:
        for c in held:
            c.close()
        shutil.rmtree(shared, ignore_errors=True)


def test_sigterm_lets_a_lock_holder_finish_then_exits_0(daemon: Any) -> None:
    holder = Client(daemon.address)
    idle = Client(daemon.address)
    assert holder.request(p.Read("cart")) == p.MISS  # holds the lock
    daemon.signal(signal.SIGTERM)
    time.sleep(0.3)
    # The idle connection is closed; the in-flight request may finish.
    with pytest.raises(ClientError):
        idle.request(p.Ping())
    assert holder.request(p.Write("cart", 60, b"paid")) == p.OK
    assert daemon.wait(10) == 0
    holder.close()
    idle.close()
    assert "event=stopping" in daemon.log()


def test_sigterm_deadline_cuts_a_stuck_holder(start_daemon: Any) -> None:
    daemon = start_daemon("--shutdown-timeout-s", "0.5")
    with Client(daemon.address) as holder:
        assert holder.request(p.Read("stuck")) == p.MISS
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        assert time.monotonic() - started < 5
    assert "event=shutdown_timeout" in daemon.log()


def test_no_session_data_in_logs(daemon: Any) -> None:
    secret = b"credit-card-4111111111111111"
    with Client(daemon.address) as c:
        c.request(p.Write("logsid123", 60, secret))
        c.send_raw(b"WRITE logsid123 60 x\n")
        c.read_reply()
    daemon.stop()
    log = daemon.log()
    assert "credit-card" not in log
    assert "logsid123" not in log


def test_unix_socket_mode_is_0660_by_default_and_configurable(start_daemon: Any) -> None:
    import os
    import stat

    default = start_daemon()
    assert stat.S_IMODE(os.stat(default.sock_path).st_mode) == 0o660
    private = start_daemon("--socket-mode", "0600")
    assert stat.S_IMODE(os.stat(private.sock_path).st_mode) == 0o600


def test_a_second_daemon_on_a_live_socket_refuses_and_leaves_it_alone(
    daemon: Any, start_daemon: Any
) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "serve", "--memory-only", "--listen", daemon.address],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert "another daemon is listening" in proc.stderr
    _good_client_works(daemon.address, "still-mine", b"yes")


def test_a_socket_whose_backlog_is_full_is_not_taken_for_stale(tmp_path: Any) -> None:
    """A stalled daemon (its listen backlog full, connections time out) keeps
    its socket: only a refused connection proves a socket file stale."""
    import subprocess
    import sys

    path = str(tmp_path / "busy.sock")
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting: list[socket.socket] = []
    try:
        stalled.bind(path)
        stalled.listen(0)  # never accepts
        ours = os.stat(path).st_ino
        while True:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                c.close()
                break
            waiting.append(c)
        proc = subprocess.run(
            [sys.executable, "-m", "phpsess", "serve", "--memory-only", "--listen",
             f"unix:{path}"],
            capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 1, proc.stderr
        assert "another daemon is listening" in proc.stderr
        assert "not refused" in proc.stderr
        assert os.stat(path).st_ino == ours  # not removed and made anew
    finally:
        for c in waiting:
            c.close()
        stalled.close()


def _daemon_stats(address: str) -> dict[str, Any]:
    import json

    with Client(address) as c:
        reply = c.request(p.Stats())
        assert isinstance(reply, p.Data)
        stats: dict[str, Any] = json.loads(reply.data)
        return stats


def test_warnings_a_client_causes_at_will_are_throttled_and_counted(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # Each revoked lock and each refused connection was a warning line:
    # a client could write megabytes of log a second (and stall the daemon
    # writing them).  A few lines a second now; the counters count all.
    daemon = start_daemon(*storage_args, "--max-connections", "3")
    started = time.monotonic()
    with Client(daemon.address, lease_ms=1) as c, Client(daemon.address) as other:
        for _ in range(150):
            created = c.request(p.Create())
            assert isinstance(created, p.Ok)
            time.sleep(0.003)  # the lease of 1 ms runs out ...
            # ... and another request asks for the lock: revoked (§6.3).
            assert other.request(p.Read(created.tokens[0])) == p.MISS
            assert other.request(p.Close()) == p.OK
    from phpsess.server import ADMIN_RESERVED_CONNECTIONS

    revoking_s = time.monotonic() - started
    held = [Client(daemon.address) for _ in range(3 + ADMIN_RESERVED_CONNECTIONS)]
    started = time.monotonic()
    try:
        for _ in range(150):
            _refused_busy(daemon.sock_path)
        refusing_s = time.monotonic() - started
        time.sleep(1.1)  # the next line, a second later, says how many were left out
        _refused_busy(daemon.sock_path)
    finally:
        for c in held:
            c.close()
    time.sleep(0.2)
    stats = _daemon_stats(daemon.address)
    assert stats["lock_revoked_total"] >= 140, stats
    assert stats["connection_refusals_total"] == 151, stats
    log = daemon.log()
    revoked = log.count("event=lock_revoked ")
    refused = log.count("event=connection_refused ")
    # At most 10 lines a second, however slowly a busy machine runs the
    # loops (the line after the pause is the 151st refusal's).
    assert 1 <= revoked <= 10 * (math.ceil(revoking_s) + 1), (revoked, revoking_s)
    assert 1 <= refused <= 10 * (math.ceil(refusing_s) + 1) + 1, (refused, refusing_s)
    assert revoked < stats["lock_revoked_total"] and refused < 151, (revoked, refused)
    last = log[log.rindex("event=connection_refused "):].splitlines()[0]
    assert "refused_total=151 not_logged_before=" in last, last
