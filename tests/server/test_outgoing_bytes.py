"""Memory held for clients that do not read their replies, all connections
together: ``--max-outgoing-bytes`` (PROTOCOL.md §10).  Each such client
used to hold about 1 MiB (its replies, the requests read ahead behind them)
or an old copy of a big session until ``idle_timeout_s``, however many of
them there were.  Real daemon processes, real unix sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import Daemon, proc_status_kib
from tests.server.test_conn_limits import (
    _connect,
    _receive_exactly,
    _stats,
    _wait_until,
)

MIB = 1024 * 1024


def _served(daemon: Daemon, sid: str, body: bytes) -> None:
    """What PHP does for one web request (one request, then read the
    reply), checked: the well-behaved client is served in full."""
    with Client(daemon.address) as php:
        assert php.request(p.Read(sid, lock=True)) in (p.Data(body), p.Miss())
        assert php.request(p.Write(sid, 600, body)) == p.OK


def _still_open(sock: socket.socket) -> bool:
    """Whether the daemon has not closed ``sock`` (its unread replies are
    left where they are)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def test_clients_pipelining_without_reading_are_held_to_the_bound(start_daemon: Any) -> None:
    # 200 clients each send all the READs the daemon takes and read no
    # reply: the daemon used to hold about 1 MiB for each (200 MiB, for
    # idle_timeout_s).  Now what they hold stays near --max-outgoing-bytes
    # (those that read nothing longest are closed) while PHP is served.
    limit = 16 * MIB
    daemon = start_daemon("--memory-only", "--max-outgoing-bytes", str(limit))
    body = b"s" * (60 * 1024)  # a reply copied whole: the most a reply costs
    with Client(daemon.address) as c:
        assert c.request(p.Write("s", 600, body)) == p.OK
    before_kib = proc_status_kib(daemon.pid, "VmHWM")
    burst = b"HELLO 1\n" + b"READ s NOLOCK\n" * (256 * 1024 // 14)
    clients = []
    try:
        for _ in range(200):
            sock = _connect(daemon)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(burst)  # what fits: the daemon may stop reading it
            clients.append(sock)
            if len(clients) % 20 == 0:
                _served(daemon, "php", b"php")
        _wait_until(
            "the clients that do not read are held to the bound",
            lambda: _stats(daemon)["outgoing_bytes"] <= limit, timeout_s=10,
        )
        _served(daemon, "php", b"php")
        stats = _stats(daemon)
        grown_mib = (proc_status_kib(daemon.pid, "VmHWM") - before_kib) / 1024
        assert stats["outgoing_closes_total"] > 0, stats
        assert stats["outgoing_bytes"] > limit // 2, stats  # still holding: closed no more
        assert grown_mib < 64, f"the daemon grew by {grown_mib:.0f} MiB"
        assert any(_still_open(sock) for sock in clients)
    finally:
        for sock in clients:
            sock.close()
    _wait_until("all freed", lambda: _stats(daemon)["outgoing_bytes"] == 0)
    assert "event=connection_closed reason=max_outgoing_bytes" in daemon.log()


def test_old_copies_of_a_session_pinned_by_unread_replies_are_bounded(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # Each client reads the session once and never its reply, and the
    # session is rewritten after each: every reply pins a copy of its own
    # (the SQL backend's READ is always one).  Either storage's loop: the
    # bound is the shell's.
    limit = 4 * MIB
    daemon = start_daemon(
        *storage_args, "--max-session-bytes", str(MIB), "--max-outgoing-bytes", str(limit)
    )
    clients = []
    try:
        with Client(daemon.address) as writer:
            for i in range(40):
                assert writer.request(p.Write("big", 600, bytes([i]) * (MIB // 2))) == p.OK
                sock = _connect(daemon)
                sock.sendall(b"HELLO 1\nREAD big NOLOCK\n")
                clients.append(sock)
                assert sock.recv(1, socket.MSG_PEEK), "no reply"  # it pins this copy
            _wait_until(
                "the old copies are let go",
                lambda: _stats(daemon)["outgoing_bytes"] <= limit, timeout_s=10,
            )
            _served(daemon, "php", b"php")
            stats = _stats(daemon)
            assert stats["outgoing_closes_total"] >= 40 - limit // (MIB // 2), stats
            # The last client's reply is whole and in order.
            half = MIB // 2
            _receive_exactly(clients[-1], b"OK 1\nDATA %d\n" % half + bytes([39]) * half)
    finally:
        for sock in clients:
            sock.close()


def test_a_client_that_reads_is_not_closed_for_the_others(start_daemon: Any) -> None:
    # A client reading a big reply steadily (as a slow PHP worker would)
    # while others that read nothing push the daemon past the bound: they
    # are closed, though their sends began after its own; it gets all of it.
    size = 4 * MIB
    daemon = start_daemon(
        "--memory-only", "--max-session-bytes", str(size), "--max-outgoing-bytes", str(size)
    )
    body = bytes(range(256)) * (size // 256)
    with Client(daemon.address) as c:
        assert c.request(p.Write("big", 600, body)) == p.OK
    reader = _connect(daemon)
    reader.sendall(b"HELLO 1\nREAD big NOLOCK\n")
    expected = b"OK 1\nDATA %d\n" % size + body
    got = bytearray()
    failure: list[BaseException] = []

    def read_slowly() -> None:
        try:
            while len(got) < len(expected):
                data = reader.recv(32 * 1024)
                if not data:
                    break
                got.extend(data)
                time.sleep(0.01)  # about 3 MB/s: some every few ms, never all at once
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=read_slowly)
    thread.start()
    others = []
    try:
        for i in range(10):
            with Client(daemon.address) as writer:  # each pins an old copy
                assert writer.request(p.Write("big", 600, bytes([i]) * size)) == p.OK
            sock = _connect(daemon)
            sock.sendall(b"HELLO 1\nREAD big NOLOCK\n")
            others.append(sock)
        _wait_until(
            "the clients that read nothing are closed",
            lambda: _stats(daemon)["outgoing_closes_total"] >= 9, timeout_s=10,
        )
        thread.join(30)
        assert not failure, failure
        assert bytes(got) == expected, f"{len(got)} of {len(expected)} bytes"
        assert _still_open(reader)
    finally:
        thread.join(30)
        reader.close()
        for sock in others:
            sock.close()
