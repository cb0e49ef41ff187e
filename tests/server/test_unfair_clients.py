"""Clients that take more than their share: a slow reader pinning a big
reply, a client pipelining tens of thousands of requests, connections that
never say HELLO, and admin checks of TCP clients, which scan the host's
whole socket table.  Real unix and TCP sockets; real daemon processes where
the behaviour shows from outside, the server in-process where it does not."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from phpsess import peeruid
from phpsess import protocol as p
from phpsess.addresses import TcpAddress, UnixAddress
from phpsess.server import Server, ServerConfig
from tests.integration.test_admin import _AS_NOBODY
from tests.server.test_conn_limits import (
    _closed_within,
    _connect,
    _receive_exactly,
    _stats,
)
from tests.server.test_server_time import _Conn

MIB = 1024 * 1024


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    """An in-process --memory-only daemon on a unix socket and on TCP."""
    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as tmp:
        srv = Server(ServerConfig(
            listen=(UnixAddress(str(Path(tmp) / "s.sock")), TcpAddress("127.0.0.1", 0)),
        ))
        await nursery.start(srv.serve)
        yield srv
        srv.shutdown()


def _unix_path(server: Server) -> str:
    address = server.config.listen[0]
    assert isinstance(address, UnixAddress)
    return address.path


# -- a reply that has to wait for its client has a deadline


def test_a_slow_reader_cannot_keep_a_big_reply_pinned(start_daemon: Any) -> None:
    # Every bit the client read used to restart the send's clock: a client
    # reading a few KiB now and then held the reply (the store's object, an
    # old version of the session once it is rewritten) for ever.  Now the
    # whole reply must be read within idle_timeout_s of the send's first
    # wait.
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "3")
    size = 8 * MIB
    with _connect(daemon) as reader:
        with _connect(daemon) as writer:
            writer.sendall(b"HELLO 1\nWRITE big 600 %d\n" % size + b"a" * size)
            _receive_exactly(writer, b"OK 1\nOK\n")
            reader.sendall(b"HELLO 1\nREAD big NOLOCK\n")
            writer.sendall(b"WRITE big 600 %d\n" % size + b"b" * size)  # the session moves on
            _receive_exactly(writer, b"OK\n")
        reader.setblocking(False)
        started = time.monotonic()
        got = 0
        closed = False
        # 256 KiB a second: the daemon can write more every second or so
        # (a unix socket is writable again once a quarter of its buffer is
        # left), far more often than the 3 s timeout, and 8 MiB take 32 s.
        while time.monotonic() - started < 20:
            time.sleep(0.25)
            try:
                data = reader.recv(64 * 1024)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                closed = True
                break
            if data == b"":
                closed = True
                break
            got += len(data or b"")
            # Closed by the daemon, though the bytes it had queued are
            # still there to read: STATS counts its connections.
            if _stats(daemon)["connections"] == 1:  # STATS' own
                closed = True
                break
        assert closed, f"still open after {time.monotonic() - started:.0f} s, {got} bytes read"
        assert got < size
    log = daemon.log()
    assert "event=send_timeout" in log
    assert "within idle_timeout_s" in log


# -- a long pipelined batch does not hold the event loop


async def test_a_long_pipelined_batch_lets_other_connections_run(server: Server) -> None:
    # 2,000 PINGs in one write arrive in one receive.  They used to be
    # handled in one turn of the event loop, every other client waiting for
    # all of them (50,000 in a 256 KiB receive: 100 ms and more).  Now the
    # batch yields every few hundred requests: another task sees the
    # request count part-way.
    count = 2000
    conn = _Conn(await trio.open_unix_socket(_unix_path(server)))
    assert await conn.request(p.Hello(1)) == p.Ok(("1",))
    engine = server.engine
    before = engine.requests_total
    seen: set[int] = set()
    done = trio.Event()

    async def observe() -> None:
        # Runs at every scheduler pass until the batch's replies are in
        # (a few milliseconds: no long busy loop).
        while not done.is_set():
            seen.add(engine.requests_total - before)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(observe)
        await conn.stream.send_all(p.encode_request(p.Ping()) * count)
        with trio.fail_after(30):
            for _ in range(count):
                assert await conn.reply() == p.OK
        done.set()
    await conn.stream.aclose()
    part_way = sorted(n for n in seen if 0 < n < count)
    assert part_way, f"the batch ran in one turn: counts seen {sorted(seen)}"


# -- connections that never say HELLO


def test_connections_that_never_say_hello_do_not_hold_the_slots(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # They used to be kept for idle_timeout_s (300 s): max_connections of
    # them locked PHP out with BUSY.  A persistent connection that said
    # HELLO and idles between web requests is not touched.
    from phpsess.server import ADMIN_RESERVED_CONNECTIONS

    daemon = start_daemon(*storage_args, "--max-connections", "4")
    persistent = _connect(daemon)
    # The test runs as root, who has a few slots more (for the admin CLI).
    silent = [_connect(daemon) for _ in range(2 + ADMIN_RESERVED_CONNECTIONS)]
    needs_hello = _connect(daemon)
    try:
        persistent.sendall(b"HELLO 1\nPING\n")
        _receive_exactly(persistent, b"OK 1\nOK\n")
        needs_hello.sendall(b"PING\n")  # not a HELLO: refused, not a handshake
        reply = needs_hello.recv(200)
        assert reply.startswith(b"ERR NEED_HELLO "), reply
        with _connect(daemon) as refused:
            assert refused.recv(200).startswith(b"ERR BUSY "), "not at max_connections"
        for sock in [*silent, needs_hello]:
            assert _closed_within(sock, 20), "a connection without HELLO was kept"
        with _connect(daemon) as php:  # room again
            php.sendall(b"HELLO 1\nPING\n")
            _receive_exactly(php, b"OK 1\nOK\n")
        # Silent as long since its HELLO, and still served.
        persistent.sendall(b"HELLO 1\nPING\n")
        _receive_exactly(persistent, b"OK 1\nOK\n")
    finally:
        for sock in [persistent, *silent, needs_hello]:
            sock.close()
    assert "event=handshake_timeout" in daemon.log()


# -- a TCP client's owner is looked up outside the event loop


async def test_admin_checks_of_tcp_clients_scan_proc_net_tcp_in_a_thread(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /proc/net/tcp lists every TCP socket of the host: 7 ms with 4,000 of
    # them, which the event loop used to spend on every LIST or DRAIN over
    # TCP.  The answer is the same.
    threads: list[threading.Thread] = []
    scan = peeruid._tcp_owner

    def recording(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
        threads.append(threading.current_thread())
        return scan(peer, local)

    monkeypatch.setattr(peeruid, "_tcp_owner", recording)
    tcp = next(a for a in server.addresses if a.startswith("tcp:"))
    host, port = tcp[len("tcp:"):].rsplit(":", 1)
    conn = _Conn(await trio.open_tcp_stream(host, int(port)))
    assert await conn.request(p.Hello(1)) == p.Ok(("1",))
    # The daemon's own user (these tests' user) may LIST.
    assert await conn.request(p.List(None, 10)) == p.Data(b"", ("*",))
    assert await conn.request(p.List(None, 10)) == p.Data(b"", ("*",))  # known: no scan
    await conn.stream.aclose()
    assert len(threads) == 1
    assert threads[0] is not threading.main_thread()


def test_an_admin_verb_before_hello_is_need_hello_for_anyone(start_daemon: Any) -> None:
    # NEED_HELLO comes before a verb's own errors (PROTOCOL.md §9): another
    # user's LIST or DRAIN as the first request used to get DENIED, which
    # the SQL storage (and the spec) answer NEED_HELLO.
    shared = Path(tempfile.mkdtemp(prefix="phpsess-admin-"))
    try:
        shared.chmod(0o755)
        daemon = start_daemon("--memory-only", "--listen", f"unix:{shared}/s.sock",
                              "--socket-mode", "0666")
        done = subprocess.run(
            ["/usr/bin/python3", "-c", _AS_NOBODY, "unix", f"{shared}/s.sock",
             r"LIST * 10\nDRAIN\nHELLO 1\nLIST * 10\n"],
            capture_output=True, text=True, timeout=30, user=65534, group=65534,
            extra_groups=[], cwd="/",
        )
        lines = done.stdout.splitlines()
        assert lines[0].startswith("ERR NEED_HELLO "), (done.stdout, done.stderr)
        assert lines[1].startswith("ERR NEED_HELLO "), lines
        assert lines[2:] == ["OK 1", lines[3]] and lines[3].startswith("ERR DENIED LIST "), lines
        assert daemon.proc.poll() is None
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_proc_net_tcp_owner_of_a_loopback_client() -> None:
    # The search of the table finds a client's socket, IPv4 (also as an
    # IPv4-mapped address on a dual-stack listener) and IPv6, and nobody's.
    listeners = [socket.socket(socket.AF_INET)]
    listeners[0].bind(("127.0.0.1", 0))
    if socket.has_ipv6:
        with_v6 = socket.socket(socket.AF_INET6)
        try:
            with_v6.bind(("::", 0))
        except OSError:
            with_v6.close()
        else:
            listeners.append(with_v6)
    try:
        for listener in listeners:
            listener.listen()
            port = listener.getsockname()[1]
            hosts = ["127.0.0.1"] if listener.family == socket.AF_INET else ["127.0.0.1", "::1"]
            for host in hosts:
                with socket.create_connection((host, port)), listener.accept()[0] as accepted:
                    assert peeruid.peer_uid(accepted) == os.geteuid()
        assert peeruid._tcp_owner(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
    finally:
        for listener in listeners:
            listener.close()
