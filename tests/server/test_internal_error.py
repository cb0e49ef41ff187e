"""A bug while handling one request (injected here: a user never runs one)
is answered INTERNAL after the replies to the requests before it, and the
daemon goes on serving everyone else (PROTOCOL.md §9)."""

from __future__ import annotations

import pytest
import trio

from phpsess import protocol as p
from tests.conftest import fsync_always_server
from tests.server.test_server_time import _Conn, hello


async def test_a_bug_in_one_request_answers_internal_after_the_replies_before_it(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # PROTOCOL.md §9: INTERNAL is fatal and logged with a traceback.  The
    # pipelined WRITE before it was carried out: its OK must not be lost.
    from phpsess.engine import Engine

    real = Engine.handle

    def buggy(self: Engine, owner: object, event: object, now: float) -> object:
        if isinstance(event, p.Ping):
            raise RuntimeError("injected bug")
        return real(self, owner, event, now)  # type: ignore[arg-type]

    async with fsync_always_server(nursery) as path:
        monkeypatch.setattr(Engine, "handle", buggy)
        a = _Conn(await trio.open_unix_socket(path))
        await a.stream.send_all(b"HELLO 1\nWRITE s 60 2\nhiPING\nPING\n")
        with trio.fail_after(10):
            assert await a.reply() == p.Ok(("1",))
            assert await a.reply() == p.OK
            internal = await a.reply()
            assert isinstance(internal, p.Error) and internal.code is p.Code.INTERNAL
            assert await a.stream.receive_some(100) == b""  # then it closes
        monkeypatch.setattr(Engine, "handle", real)
        b = await hello(path)  # everyone else is served
        assert await b.request(p.Read("s", lock=False)) == p.Data(b"hi")
        await b.stream.aclose()
        await a.stream.aclose()
    assert "event=internal_error" in caplog.text and "injected bug" in caplog.text
