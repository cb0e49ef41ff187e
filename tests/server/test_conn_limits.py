"""What a connection may cost the daemon, against real daemon processes over
real unix sockets: pipelined replies go out as they pile up, a client that
does not read its replies or whose lease ran out is closed, a graceful
shutdown lets a half-received request finish, and a lock waiter whose client
resets the connection is no crash."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import (
    Daemon,
    HangingFdatasync,
    fsync_always_server,
    proc_status_kib,
)
from tests.server.test_server_time import hello

MIB = 1024 * 1024


def _connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.sock_path)
    return sock


def _receive_exactly(sock: socket.socket, expected: bytes, timeout_s: float = 10) -> None:
    sock.settimeout(timeout_s)
    got = b""
    while len(got) < len(expected):
        data = sock.recv(len(expected) - len(got))
        assert data, f"closed after {got!r}, expected {expected!r}"
        got += data
    assert got == expected


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """True once the daemon closed ``sock`` (EOF or reset), False if it is
    still open after ``timeout_s``; bytes that arrive meanwhile are dropped."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(MIB):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _stats(daemon: Daemon) -> dict[str, Any]:
    with Client(daemon.address) as c:
        reply = c.request(p.Stats())
    assert isinstance(reply, p.Data), reply
    stats: dict[str, Any] = json.loads(reply.data)
    return stats


def _waiting_is(daemon: Daemon, count: int) -> bool:
    return bool(_stats(daemon)["locks_waiting"] == count)


def _wait_until(what: str, check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.02)


# -- pipelined replies


def test_pipelined_reads_of_a_big_session_do_not_pile_up_replies(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # Each READ of a 1 MiB session is a 1 MiB reply; 100 of them cost 15 bytes
    # each to send.  They used to be built in memory, all of them, before the
    # first went out (and joined: twice that): 200 MB for a client that reads
    # nothing.  Now the daemon holds about one reply and waits for the client.
    daemon = start_daemon(*storage_args)
    body = b"x" * MIB
    count = 100
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\nWRITE big 600 %d\n" % len(body) + body)
        _receive_exactly(a, b"OK 1\nOK\n")
        before_kib = proc_status_kib(daemon.pid, "VmHWM")
        a.sendall(b"READ big NOLOCK\n" * count)
        time.sleep(2)  # the replies the daemon can make while nobody reads
        grown_mib = (proc_status_kib(daemon.pid, "VmHWM") - before_kib) / 1024
        assert grown_mib < 32, f"the daemon grew by {grown_mib:.0f} MiB"
        # Throttled, not lost: every reply comes once the client reads.
        reply = b"DATA %d\n" % len(body) + body
        for _ in range(count):
            _receive_exactly(a, reply)
        with Client(daemon.address) as other:
            assert other.request(p.Ping()) == p.OK


def test_unread_replies_of_a_big_session_pin_no_copies_of_it(start_daemon: Any) -> None:
    # Clients that ask for a big session and read nothing.  Each reply was
    # a copy (header + data), joined with the HELLO's into another, held
    # until the idle timeout: 20 clients and 8 MiB, 320 MB.  The data now
    # goes out from the store's own object (writev).
    daemon = start_daemon("--memory-only")
    body = bytes(range(256)) * (32 * 1024)  # 8 MiB
    with Client(daemon.address) as c:
        assert c.request(p.Write("big", 600, body)) == p.OK
    before_kib = proc_status_kib(daemon.pid, "VmRSS")
    socks = [_connect(daemon) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(b"HELLO 1\nREAD big NOLOCK\n")
        _wait_until("every client's reply is being sent",
                    lambda: _stats(daemon)["requests_total"] >= 2 + 40)
        time.sleep(0.5)
        grown_mib = (proc_status_kib(daemon.pid, "VmRSS") - before_kib) / 1024
        assert grown_mib < 40, f"the daemon grew by {grown_mib:.0f} MiB"
        expected = b"OK 1\nDATA %d\n" % len(body) + body
        for sock in socks:  # whole and in order, however it went out
            _receive_exactly(sock, expected)
    finally:
        for sock in socks:
            sock.close()


async def test_replies_sent_early_still_wait_for_the_disk(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch's replies that go out before its end (past the size limit)
    # include the WRITE's acknowledgement: not before the journal has it.
    disk = HangingFdatasync(limit_s=10)
    async with fsync_always_server(nursery) as path:
        c = await hello(path)
        body = b"y" * MIB
        assert await c.request(p.Write("big", 600, body)) == p.OK
        monkeypatch.setattr(os, "fdatasync", disk)
        await c.stream.send_all(
            p.encode_request(p.Write("small", 600, b"z"))
            + p.encode_request(p.Read("big", lock=False)) * 3
        )
        await trio.to_thread.run_sync(disk.hung.wait, 10)
        with trio.move_on_after(0.5):
            early = await c.stream.receive_some(65536)
            pytest.fail(f"replies before the write was durable: {early[:40]!r}")
        disk.release.set()
        with trio.fail_after(10):
            assert await c.reply() == p.OK
            for _ in range(3):
                assert await c.reply() == p.Data(body)
        monkeypatch.setattr(os, "fdatasync", disk.real)
        await c.stream.aclose()


def test_a_client_that_does_not_read_its_replies_is_closed(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # It used to sit in the daemon's send for ever: the idle timeout did
    # not apply while sending.
    daemon = start_daemon(*storage_args, "--idle-timeout-s", "1")
    body = b"x" * MIB
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\nWRITE big 600 %d\n" % len(body) + body)
        _receive_exactly(a, b"OK 1\nOK\n")
        a.sendall(b"READ big NOLOCK\n" * 20)
        _wait_until(
            "the connection that reads nothing is closed",
            lambda: _stats(daemon)["connections"] == 1,  # the one asking
            timeout_s=5,
        )
    assert "event=send_timeout" in daemon.log()


def test_a_slow_reader_is_not_cut_while_it_reads(start_daemon: Any) -> None:
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "1")
    body = b"x" * MIB
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\nWRITE big 600 %d\n" % len(body) + body)
        _receive_exactly(a, b"OK 1\nOK\n")
        a.sendall(b"READ big NOLOCK\n" * 6)
        reply = b"DATA %d\n" % len(body) + body
        got = b""
        started = time.monotonic()
        # About 2 s in all (2 idle timeouts), each reply in about 0.35 s: a
        # reply (one send) must be read whole within the timeout (§10).
        while len(got) < 6 * len(reply):
            a.settimeout(5)
            got += a.recv(64 * 1024)
            time.sleep(0.02)
        assert time.monotonic() - started > 1.5
        assert got == reply * 6
    assert "event=send_timeout" not in daemon.log()


def test_requests_after_a_reply_that_waited_for_its_reader_count_from_then(
    start_daemon: Any,
) -> None:
    # A batch's replies past 256 KiB go out before its end, the send waiting
    # for its reader.  The requests after them used to be handled with the
    # clock read at the batch's start: a 2 s lifetime written 3 s later was
    # acknowledged and gone at once, a lease of 2 s was revoked as it was
    # granted.  Each counts from when its request is handled (§4.2, §6.3).
    daemon = start_daemon("--memory-only")
    size = 300_000
    with _connect(daemon) as writer:
        writer.sendall(b"HELLO 1\nWRITE big 600 %d\n" % size + b"b" * size)
        _receive_exactly(writer, b"OK 1\nOK\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(daemon.sock_path)
        slow.sendall(b"HELLO 1 lease_ms=2000\nREAD big NOLOCK\nWRITE t 2 2\nhiREAD l\n")
        time.sleep(3)  # not reading: the big reply's send waits
        _receive_exactly(
            slow, b"OK 1\nDATA %d\n" % size + b"b" * size + b"OK\nMISS\n", timeout_s=10
        )
        slow.sendall(b"READ t NOLOCK\nWRITE l 60 1\nx")
        _receive_exactly(slow, b"DATA 2\nhiOK\n")


# -- idle timeout and locks


def test_a_connection_whose_lease_ran_out_is_idle_closed(start_daemon: Any) -> None:
    # Whether the idle timeout applied was decided when the connection fell
    # silent: it held a lock then, so it was never closed once the lease
    # revoked the lock.
    # A lease that runs out while nobody waits keeps the lock (PROTOCOL.md
    # §6.3): the connection is closed once another request takes it.
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "1")
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1 lease_ms=500\nREAD s1 LOCK\n")
        _receive_exactly(a, b"OK 1\nMISS\n")
        assert not _closed_within(a, 2)  # past lease and idle time, still holding
        with Client(daemon.address) as b:
            assert b.request(p.Read("s1")) == p.MISS  # takes the lock
            assert _closed_within(a, 5)
    log = daemon.log()
    assert "event=lock_revoked" in log
    assert "event=idle_timeout" in log


def test_a_lock_holder_may_think_for_its_lease_but_not_stall_mid_request(
    start_daemon: Any,
) -> None:
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "1")
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1 lease_ms=60000\nREAD s1 LOCK\n")
        _receive_exactly(a, b"OK 1\nMISS\n")
        time.sleep(2.5)  # silent, holding the lock: not cut
        a.sendall(b"PING\n")
        _receive_exactly(a, b"OK\n")
        a.sendall(b"WRITE s1 60 10\nhalf")  # stalls mid-request: cut
        assert _closed_within(a, 5)
    with Client(daemon.address) as c:  # the lock went with it
        assert c.request(p.Read("s1")) == p.MISS


def test_a_request_trickling_in_a_byte_at_a_time_is_cut_off(start_daemon: Any) -> None:
    # Each byte used to restart the idle clock: a 1 KiB header could hold a
    # connection for days, and enough of them fill max_connections.
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "2")
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\n")
        _receive_exactly(a, b"OK 1\n")
        started = time.monotonic()
        closed = False
        for byte in b"WRITE s1 60 100\n" + b"x" * 100:
            try:
                a.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(a, 0.5):
                closed = True
                break
            assert time.monotonic() - started < 20, "never cut off"
        assert closed
        assert time.monotonic() - started < 10
    with _connect(daemon) as b:  # everyone else is served
        b.sendall(b"HELLO 1\nPING\n")
        _receive_exactly(b, b"OK 1\nOK\n")
    assert "event=idle_timeout" in daemon.log()


def test_a_stream_of_pipelined_requests_is_not_cut_off_as_idle(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # §10's clock is for one request arriving too slowly.  It used to run from
    # the first write that ended mid-request, never reset while each write
    # completed requests but ended inside the next: a bulk client streaming
    # pipelined requests was cut after the idle timeout, replies lost.
    daemon = start_daemon(*storage_args, "--idle-timeout-s", "1")
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\nPI")
        _receive_exactly(a, b"OK 1\n")
        started = time.monotonic()
        while time.monotonic() - started < 3:  # three idle timeouts
            a.sendall(b"NG\nPI")  # one PING completed, the next begun
            _receive_exactly(a, b"OK\n", timeout_s=5)
            time.sleep(0.1)
        a.sendall(b"NG\n")
        _receive_exactly(a, b"OK\n")
    assert "event=idle_timeout" not in daemon.log()


# -- graceful shutdown


def test_sigterm_lets_a_half_received_write_finish(start_daemon: Any) -> None:
    # PROTOCOL.md §10: only connections with no request in progress are
    # closed.  One halfway through a WRITE's payload (holding no lock) was.
    daemon = start_daemon("--shutdown-timeout-s", "5")
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\n")
        _receive_exactly(a, b"OK 1\n")
        a.sendall(b"WRITE s1 600 10\nhello")
        time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        _wait_until("the daemon is stopping", lambda: "event=stopping" in daemon.log())
        time.sleep(0.3)  # the drain has looked at the connection by now
        # The rest, and half of a pipelined second WRITE: the batch ends
        # with a request in progress, so the connection goes on.
        a.sendall(b"world" + b"WRITE s2 600 10\nhello")
        _receive_exactly(a, b"OK\n")
        time.sleep(0.3)
        a.sendall(b"again")
        _receive_exactly(a, b"OK\n")
        assert _closed_within(a, 5)  # then, holding no lock, it ends
    assert daemon.wait() == 0
    daemon.start()  # the writes were stored (journal on the data dir)
    with Client(daemon.address) as c:
        assert c.request(p.Read("s1", lock=False)) == p.Data(b"helloworld")
        assert c.request(p.Read("s2", lock=False)) == p.Data(b"helloagain")


def test_a_second_sigterm_while_stopping_is_ignored_not_fatal(start_daemon: Any) -> None:
    # Queued by the signal receiver, it was delivered as the receiver closed:
    # the daemon died of it (status -15) at the end of its stop, unlogged.
    daemon = start_daemon("--shutdown-timeout-s", "2")
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\nREAD s1 LOCK\n")  # a lock: the stop waits for it
        _receive_exactly(a, b"OK 1\nMISS\n")
        daemon.signal(signal.SIGTERM)
        _wait_until("the daemon is stopping", lambda: "event=stopping" in daemon.log())
        daemon.signal(signal.SIGTERM)
        daemon.signal(signal.SIGINT)
        _wait_until("ignored", lambda: daemon.log().count("event=signal_ignored") == 2)
        a.sendall(b"WRITE s1 600 2\nok")  # the request in progress finishes
        _receive_exactly(a, b"OK\n")
        assert _closed_within(a, 5)
    assert daemon.wait() == 0
    assert "event=stopped" in daemon.log()


# -- lock waiters


def test_a_lock_waiter_reset_by_its_client_is_no_crash(start_daemon: Any) -> None:
    # The reset surfaced in the waiter's socket-watching task, inside a
    # nursery: an ExceptionGroup, logged as connection_crashed with a traceback.
    daemon = start_daemon("--memory-only")
    with _connect(daemon) as a, _connect(daemon) as c:
        a.sendall(b"HELLO 1\nREAD s1 LOCK\n")
        _receive_exactly(a, b"OK 1\nMISS\n")
        b = _connect(daemon)
        b.sendall(b"HELLO 1\nREAD s1 LOCK\n")
        _wait_until("b waits", lambda: _stats(daemon)["locks_waiting"] == 1)
        c.sendall(b"HELLO 1\nREAD s1 LOCK\n")
        _receive_exactly(c, b"OK 1\n")
        _wait_until("c waits", lambda: _stats(daemon)["locks_waiting"] == 2)
        b.close()  # with "OK 1" unread: the daemon's read gets ECONNRESET
        _wait_until("b is gone", lambda: _stats(daemon)["locks_waiting"] == 1)
        a.sendall(b"WRITE s1 60 1\nx")
        _receive_exactly(a, b"OK\n")
        _receive_exactly(c, b"DATA 1\nx")  # the lock went to the next waiter
    log = daemon.log()
    assert "connection_crashed" not in log
    assert "Traceback" not in log


def test_a_lock_waiter_that_hangs_up_with_a_full_buffer_leaves_the_queue(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # A waiter whose pipelined requests passed the buffer the daemon keeps
    # for it is no longer read from, so its EOF went unseen: it stayed
    # queued, and when granted its buffered WRITE overwrote what others had
    # written since it gave up.
    daemon = start_daemon(*storage_args)
    with _connect(daemon) as a:
        a.sendall(b"HELLO 1\nREAD s1 LOCK\n")
        _receive_exactly(a, b"OK 1\nMISS\n")
        b = _connect(daemon)
        b.sendall(b"HELLO 1\nREAD s1 LOCK\nWRITE s1 60 5\nstale")
        _wait_until("b waits", lambda: _stats(daemon)["locks_waiting"] == 1)
        b.sendall(b"WRITE s1 60 1000000\n" + b"x" * 200_000)  # more to come: buffered
        time.sleep(0.5)  # the daemon buffers it and stops reading
        b.close()
        _wait_until("b is gone", lambda: _stats(daemon)["locks_waiting"] == 0)
        a.sendall(b"WRITE s1 60 5\nfresh")
        _receive_exactly(a, b"OK\n")
    with _connect(daemon) as c:
        c.sendall(b"HELLO 1\nREAD s1 LOCK\n")
        _receive_exactly(c, b"OK 1\nDATA 5\nfresh")
    assert "Traceback" not in daemon.log()


def test_requests_still_arriving_are_bounded_daemon_wide(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # Clients that start big WRITEs and stall each hold up to
    # max_session_bytes until the idle timeout: many of them exhausted
    # memory.  Past --max-incoming-bytes the client adding to them gets BUSY.
    daemon = start_daemon(
        "--max-incoming-bytes", "1000000", "--max-session-bytes", "1000000", *storage_args
    )
    with _connect(daemon) as stalled:
        stalled.sendall(b"HELLO 1\nWRITE big1 60 900000\n" + b"a" * 600_000)
        _receive_exactly(stalled, b"OK 1\n")
        _wait_until("counted", lambda: _stats(daemon)["incoming_bytes"] >= 600_000)
        with _connect(daemon) as second:
            second.sendall(b"HELLO 1\nWRITE big2 60 900000\n")
            _receive_exactly(second, b"OK 1\n")
            with contextlib.suppress(OSError):  # refused midway: a reset
                second.sendall(b"b" * 600_000)
            reply = second.recv(4096)
            assert reply.startswith(b"ERR BUSY ") and b"max_incoming_bytes" in reply, reply
            assert _closed_within(second, 10)
        # A usual write (under 64 KiB) goes through whatever the others hold.
        with Client(daemon.address) as c:
            assert c.request(p.Write("small", 60, b"s" * 10_000)) == p.OK
        stats = _stats(daemon)
        assert stats["incoming_refusals_total"] == 1
        assert 600_000 <= stats["incoming_bytes"] < 1_000_000  # the refused one's are freed
        stalled.sendall(b"a" * 300_000)  # the stalled one completes
        _receive_exactly(stalled, b"OK\n")
    _wait_until("released", lambda: _stats(daemon)["incoming_bytes"] == 0)
    with Client(daemon.address) as c:  # and room is back for big writes
        assert c.request(p.Write("big3", 60, b"c" * 900_000)) == p.OK
        assert c.request(p.Read("big1", lock=False)) == p.Data(b"a" * 900_000)
    # A request alone is never refused, however it arrives (the limit is at
    # least max_session_bytes): here one of 1,000,000 bytes, in two parts.
    with _connect(daemon) as alone:
        alone.sendall(b"HELLO 1\nWRITE big4 60 1000000\n" + b"d" * 700_000)
        _receive_exactly(alone, b"OK 1\n")
        _wait_until("counted", lambda: _stats(daemon)["incoming_bytes"] >= 700_000)
        alone.sendall(b"d" * 300_000)
        _receive_exactly(alone, b"OK\n")
    assert "reason=max_incoming_bytes" in daemon.log()


def test_lock_waiters_read_ahead_little_and_count_in_the_bound(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # A waiter's next requests are read ahead only up to 64 KiB (then the
    # daemon stops reading it); those bytes count in --max-incoming-bytes.
    # They did not, and each waiter could buffer some 320 KiB.
    daemon = start_daemon(
        "--max-incoming-bytes", "1000000", "--max-session-bytes", "1000000", *storage_args
    )
    ahead = 64 * 1024 + 1
    with _connect(daemon) as holder:
        holder.sendall(b"HELLO 1\nREAD s1 LOCK\n")
        _receive_exactly(holder, b"OK 1\nMISS\n")
        waiters = []
        for count in range(1, 21):
            waiter = _connect(daemon)
            waiter.sendall(b"HELLO 1\n")
            _receive_exactly(waiter, b"OK 1\n")
            waiter.sendall(b"READ s1 LOCK\n")
            _wait_until("it waits", functools.partial(_waiting_is, daemon, count))
            waiters.append(waiter)
        for waiter in waiters:  # read while it waits
            waiter.sendall(b"WRITE s1 60 900000\n" + b"w" * 200_000)
        # 15 waiters of 65,537 bytes fit in 1,000,000; the other 5 are refused.
        _wait_until("read ahead", lambda: _stats(daemon)["incoming_refusals_total"] == 5)
        _wait_until("counted", lambda: _stats(daemon)["incoming_bytes"] == 15 * ahead)
        refused = 0
        for waiter in waiters:
            waiter.settimeout(0.2)
            try:
                reply = waiter.recv(4096)
            except TimeoutError:
                continue  # still waiting for the lock
            assert reply.startswith(b"ERR BUSY "), reply
            refused += 1
        assert refused == 5
        for waiter in waiters:
            waiter.close()
    _wait_until("released", lambda: _stats(daemon)["incoming_bytes"] == 0)
    assert _stats(daemon)["locks_waiting"] == 0


def test_out_of_file_descriptors_new_clients_get_busy_not_a_hang(start_daemon: Any) -> None:
    # Past the descriptor limit accept(2) fails with EMFILE and the client
    # would wait in the backlog until PHP's own timeout.  The daemon keeps
    # a spare descriptor to answer it BUSY, and serves the others on.
    daemon = start_daemon("--memory-only")
    room = 8
    in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (in_use + room, in_use + room))
    served: list[socket.socket] = []
    refused = 0
    while refused < 5:
        assert len(served) <= room + 2, "the limit was never reached"
        sock = _connect(daemon)  # the backlog takes it either way
        with contextlib.suppress(BrokenPipeError):  # refused before it was sent
            sock.sendall(b"HELLO 1\n")
        reply = sock.recv(4096)  # a reply (timeout 10 s), not a hang
        if reply == b"OK 1\n":
            assert not refused, "once out of descriptors, no more until one is freed"
            served.append(sock)
            continue
        assert reply.startswith(b"ERR BUSY "), reply
        assert _closed_within(sock, 10)
        sock.close()
        refused += 1
    assert len(served) >= room - 2
    # Idle at the limit, the daemon still holds its spare (stdin is the
    # other /dev/null): nothing else can take the descriptor meanwhile.
    time.sleep(0.3)
    fds = os.listdir(f"/proc/{daemon.pid}/fd")
    assert sum(os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == "/dev/null" for fd in fds) == 2
    for sock in served:  # the connections it had are served on
        sock.sendall(b"PING\n")
        _receive_exactly(sock, b"OK\n")
    served.pop().close()
    time.sleep(0.2)  # the daemon sees the close and frees the descriptor
    with _connect(daemon) as sock:  # and the spare was taken back: room again
        sock.sendall(b"HELLO 1\nPING\n")
        _receive_exactly(sock, b"OK 1\nOK\n")
    for sock in served:
        sock.close()
    assert daemon.proc.poll() is None
    assert daemon.log().count("event=out_of_file_descriptors") == 1  # rare: 1st, 10th...
    assert "refused=1 " in daemon.log()
    # Every refusal is counted, logged or not (STATS, the metric).
    assert _stats(daemon)["fd_refusals_total"] == refused
