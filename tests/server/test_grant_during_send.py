"""A lock granted while the connection that waits for it is still sending
the replies before its locking READ (here: waiting for an fsync) is
delivered, not lost.  It used to be dropped, and the waiter sat there until
its lock wait ran out while everyone behind it queued (bench/http.py saw it
as a stall of 30 s)."""

from __future__ import annotations

import os

import pytest
import trio

from phpsess import protocol as p
from tests.conftest import HangingFdatasync, fsync_always_server
from tests.server.test_server_time import hello


async def test_grant_while_the_waiter_waits_for_the_disk_is_delivered(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = HangingFdatasync(limit_s=10)
    async with fsync_always_server(nursery) as path:
        a, b = await hello(path), await hello(path)
        assert await a.request(p.Read("s")) == p.MISS  # a holds s
        monkeypatch.setattr(os, "fdatasync", disk)
        # b: a write (its reply waits for the fsync) and, pipelined, a
        # locking read of s, which waits for a.
        await b.stream.send_all(
            p.encode_request(p.Write("other", 60, b"x")) + p.encode_request(p.Read("s"))
        )
        await trio.to_thread.run_sync(disk.hung.wait, 10)
        # While b's connection waits for the disk, a writes s: the lock goes to b.
        await a.stream.send_all(p.encode_request(p.Write("s", 60, b"from a")))
        await trio.sleep(0.2)
        disk.release.set()
        assert await a.reply() == p.OK
        with trio.fail_after(10):  # not the 30 s lock wait
            assert await b.reply() == p.OK
            assert await b.reply() == p.Data(b"from a")
        monkeypatch.setattr(os, "fdatasync", disk.real)
        for c in (a, b):
            await c.stream.aclose()
