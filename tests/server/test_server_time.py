"""The Trio shell in-process, with Trio's autojump clock: TTLs, lock waits and
leases measured in minutes run instantly, over a real unix socket."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from phpsess import protocol as p
from phpsess.addresses import UnixAddress
from phpsess.engine import Limits
from phpsess.server import Server, ServerConfig


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = p.ReplyParser()

    async def request(self, request: p.Request) -> p.Reply:
        await self.stream.send_all(p.encode_request(request))
        return await self.reply()

    async def reply(self) -> p.Reply:
        while True:
            reply = self.parser.next_reply()
            if not isinstance(reply, p._NeedData):
                return reply
            data = await self.stream.receive_some(65536)
            assert data, "daemon closed the connection"
            self.parser.receive_data(data)


async def hello(path: str) -> _Conn:
    """A connection to the daemon on unix socket ``path`` that said HELLO 1."""
    conn = _Conn(await trio.open_unix_socket(path))
    assert await conn.request(p.Hello(1)) == p.Ok(("1",))
    return conn


_open: list[_Conn] = []


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as tmp:
        path = str(Path(tmp) / "s.sock")
        config = ServerConfig(
            listen=(UnixAddress(path),),
            limits=Limits(lock_wait_s=30, lock_lease_s=300),
            idle_timeout_s=86400,
        )
        srv = Server(config)
        await nursery.start(srv.serve)
        yield srv
        for conn in _open:
            await conn.stream.aclose()
        _open.clear()
        srv.shutdown()


async def _connect(server: Server) -> _Conn:
    path = server.config.listen[0]
    assert isinstance(path, UnixAddress)
    conn = _Conn(await trio.open_unix_socket(path.path))
    _open.append(conn)
    assert await conn.request(p.Hello(1)) == p.Ok(("1",))
    return conn


async def test_session_expires_on_its_own_ttl(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    c = await _connect(server)
    assert await c.request(p.Write("cart", 1440, b"n|i:1;")) == p.OK
    await trio.sleep(1439)
    assert await c.request(p.Read("cart", lock=False)) == p.Data(b"n|i:1;")
    assert await c.request(p.Touch("cart", 1440)) == p.OK  # lazy_write moves the TTL
    await trio.sleep(1439)
    assert await c.request(p.Exists("cart")) == p.Ok(("1",))
    await trio.sleep(2)
    # Expired by the daemon's timer, not by anyone calling GC.
    assert server.engine.store.total_bytes == 0
    assert await c.request(p.Read("cart", lock=False)) == p.MISS
    assert await c.request(p.Gc(1440)) == p.Ok(("1",))
    assert await c.request(p.Gc(1440)) == p.Ok(("0",))


async def test_lock_wait_deadline_and_lease(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    a = await _connect(server)
    b = await _connect(server)
    assert await a.request(p.Read("s")) == p.MISS
    start = trio.current_time()
    reply = await b.request(p.Read("s"))
    assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_TIMEOUT
    assert trio.current_time() - start == pytest.approx(30, abs=0.01)
    # a still holds it; after the 300 s lease it is revoked and b gets it.
    assert await b.request(p.Hello(1, wait_ms=600_000)) == p.Ok(("1",))
    reply = await b.request(p.Read("s"))
    assert reply == p.MISS
    assert trio.current_time() - start == pytest.approx(300, abs=0.01)
    reply = await a.request(p.Write("s", 60, b"late"))
    assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_LOST
    assert await b.request(p.Write("s", 60, b"mine")) == p.OK
    assert await a.request(p.Read("s", lock=False)) == p.Data(b"mine")


async def test_waiters_are_served_first_come_first_served(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    holder = await _connect(server)
    assert await holder.request(p.Read("q")) == p.MISS
    order: list[int] = []

    async def waiter(i: int) -> None:
        c = await _connect(server)
        await trio.sleep(i)  # arrive in order 0, 1, 2, ...
        await c.request(p.Read("q"))
        order.append(i)
        await trio.sleep(1)
        assert await c.request(p.Write("q", 60, str(i).encode())) == p.OK

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(waiter, i)
        await trio.sleep(10)
        assert await holder.request(p.Close()) == p.OK
    assert order == list(range(6))
